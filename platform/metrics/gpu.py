"""Per-rank GPU health from NVML (nvidia-ml-py), reduced across ranks to min/mean/max.

The reduction makes a straggler visible: one slow or throttled GPU shows as a
low `min` of SM clock or utilisation while the mean stays high. Without NVML
(no driver, no GPU) the collector logs one info line and reports nothing.
"""

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Metric names in the order of the reduced vector; units in the names.
FIELDS = (
    "utilization_pct",
    "memory_utilization_pct",
    "memory_used_gib",
    "power_w",
    "temperature_c",
    "sm_clock_mhz",
    "throttle_power",
    "throttle_thermal",
    "throttle_hw_slowdown",
    "ecc_uncorrected",
)

# nvmlClocksThrottleReasons bits (nvml.h): power cap 0x4, SW thermal 0x20,
# HW thermal 0x40, HW slowdown 0x8, HW power brake 0x80.
_POWER_BITS = 0x4 | 0x80
_THERMAL_BITS = 0x20 | 0x40
_HW_SLOWDOWN_BITS = 0x8


class GpuHealthCollector:
    """Read NVML counters of this rank's GPU (index LOCAL_RANK) and reduce them over all ranks.

    `nvml` is the `pynvml` module (nvidia-ml-py); tests pass a stand-in module
    with the same functions because this machine has no GPU.
    """

    def __init__(self, nvml=None, device_index: int | None = None) -> None:
        self.enabled = False
        self.nvml = nvml
        self.handle = None
        if device_index is None:
            device_index = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as error:  # noqa: BLE001  # NVMLError subclasses differ per failure
            logger.info("GPU health metrics off: NVML is not available (%s)", error)
            return
        self.enabled = True

    def _read(self, name: str, call, *args, default: float = float("nan")) -> float:
        try:
            return float(call(self.handle, *args))
        except Exception:  # noqa: BLE001  # e.g. NVMLError_NotSupported for ECC on consumer GPUs
            return default

    def collect_local(self) -> dict[str, float]:
        """Return this GPU's current values, one per name in FIELDS (NaN where NVML does not support it)."""
        if not self.enabled:
            return {}
        nvml = self.nvml
        values: dict[str, float] = {}
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(self.handle)
            values["utilization_pct"] = float(rates.gpu)
            values["memory_utilization_pct"] = float(rates.memory)
        except Exception:  # noqa: BLE001
            values["utilization_pct"] = values["memory_utilization_pct"] = float("nan")
        try:
            values["memory_used_gib"] = nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30
        except Exception:  # noqa: BLE001
            values["memory_used_gib"] = float("nan")
        values["power_w"] = self._read("power", nvml.nvmlDeviceGetPowerUsage) / 1000.0  # NVML reports mW
        values["temperature_c"] = self._read("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        values["sm_clock_mhz"] = self._read("sm_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        reasons = self._read("throttle", reasons_fn, default=0.0)
        reasons_bits = int(reasons)
        values["throttle_power"] = float(bool(reasons_bits & _POWER_BITS))
        values["throttle_thermal"] = float(bool(reasons_bits & _THERMAL_BITS))
        values["throttle_hw_slowdown"] = float(bool(reasons_bits & _HW_SLOWDOWN_BITS))
        values["ecc_uncorrected"] = self._read(
            "ecc",
            nvml.nvmlDeviceGetTotalEccErrors,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        return values

    def collect(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
        """Return {"gpu/<field>_{min,mean,max}": value} over all ranks of `group` (every rank must call it).

        NaN values (unsupported counters) are left out of the reduction; a field
        no rank supports is not reported.
        """
        if not self.enabled:
            return {}
        local = self.collect_local()
        # On NCCL the reduction needs device tensors, on gloo CPU ones: pass this rank's device.
        values = torch.tensor([local[name] for name in FIELDS], dtype=torch.float64, device=device)
        valid = ~torch.isnan(values)
        low = torch.where(valid, values, torch.full_like(values, float("inf")))
        high = torch.where(valid, values, torch.full_like(values, float("-inf")))
        total = torch.where(valid, values, torch.zeros_like(values))
        count = valid.to(torch.float64)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            summed = torch.stack([total, count])
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            total, count = summed[0], summed[1]
        result = {}
        for i, name in enumerate(FIELDS):
            if count[i] == 0:
                continue
            result[f"gpu/{name}_min"] = float(low[i])
            result[f"gpu/{name}_mean"] = float(total[i] / count[i])
            result[f"gpu/{name}_max"] = float(high[i])
        return result

    def close(self) -> None:
        if self.enabled:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self.enabled = False
