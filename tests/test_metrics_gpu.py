"""NVML GPU-health collector.

This machine has no GPU and no NVIDIA driver, so the collector runs against a
stand-in module that implements the pynvml functions it calls, with the
constants of nvidia-ml-py. The cross-rank reduction runs on real gloo ranks.
"""

import inspect
import subprocess
import sys
import textwrap
import types

import pytest

from bagel.platform.metrics.gpu import GpuHealthCollector


def make_nvml(util: int = 80, power_mw: int = 350_000, reasons: int = 0, ecc_supported: bool = True):
    """Return a stand-in pynvml module for one GPU."""
    import pynvml

    class NotSupported(Exception):
        pass

    nvml = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=pynvml.NVML_TEMPERATURE_GPU,
        NVML_CLOCK_SM=pynvml.NVML_CLOCK_SM,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        NVML_VOLATILE_ECC=pynvml.NVML_VOLATILE_ECC,
        shutdown_calls=0,
    )

    def ecc(handle, error_type, counter_type):
        assert (error_type, counter_type) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        if not ecc_supported:
            raise NotSupported()
        return 2

    def shutdown():
        nvml.shutdown_calls += 1

    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=util, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: power_mw
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 65
    nvml.nvmlDeviceGetClockInfo = lambda h, clock: 1980
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: reasons
    nvml.nvmlDeviceGetTotalEccErrors = ecc
    return nvml


def test_collect_local_values() -> None:
    collector = GpuHealthCollector(nvml=make_nvml(reasons=0x4 | 0x40), device_index=0)
    values = collector.collect_local()
    assert values["utilization_pct"] == 80
    assert values["memory_used_gib"] == 3.0
    assert values["power_w"] == 350.0
    assert values["temperature_c"] == 65
    assert values["sm_clock_mhz"] == 1980
    assert values["throttle_power"] == 1.0
    assert values["throttle_thermal"] == 1.0
    assert values["throttle_hw_slowdown"] == 0.0
    assert values["ecc_uncorrected"] == 2
    collector.close()


def test_unsupported_counter_left_out() -> None:
    collector = GpuHealthCollector(nvml=make_nvml(ecc_supported=False), device_index=0)
    reduced = collector.collect()
    assert "gpu/ecc_uncorrected_mean" not in reduced
    assert reduced["gpu/power_w_min"] == reduced["gpu/power_w_max"] == 350.0


def test_without_nvml_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("NVML Shared Library Not Found")))
    with caplog.at_level("INFO"):
        collector = GpuHealthCollector(nvml=broken)
    assert not collector.enabled
    assert collector.collect() == {}
    assert "NVML is not available" in caplog.text


def test_real_pynvml_without_driver_is_disabled() -> None:
    """On this machine the real nvidia-ml-py finds no driver: the collector turns itself off."""
    collector = GpuHealthCollector()
    if collector.enabled:
        pytest.skip("a GPU driver is present")
    assert collector.collect() == {}


@pytest.mark.slow
def test_reduce_min_mean_max_across_ranks(tmp_path) -> None:
    """Two gloo ranks report different power; min/mean/max expose the straggler."""
    script = tmp_path / "reduce.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, types
            import torch.distributed as dist
            from bagel.platform.metrics.gpu import GpuHealthCollector
            dist.init_process_group("gloo")
            """
        )
        + inspect.getsource(make_nvml)
        + textwrap.dedent(
            """
            rank = dist.get_rank()
            collector = GpuHealthCollector(nvml=make_nvml(util=90 - 60 * rank, power_mw=300_000 + 100_000 * rank))
            result = collector.collect()
            if rank == 0:
                print(json.dumps(result))
            dist.destroy_process_group()
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gpu/power_w_min"] == 300.0
    assert result["gpu/power_w_max"] == 400.0
    assert result["gpu/power_w_mean"] == 350.0
    assert result["gpu/utilization_pct_min"] == 30.0
    assert result["gpu/utilization_pct_mean"] == 60.0
