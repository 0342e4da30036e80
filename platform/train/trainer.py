"""The training program of `bagel train`: set up the parallel model, then loop, log, checkpoint and summarise.

One code path for a plain process, torchrun on CPU/gloo and torchrun on
CUDA/NCCL. Exit codes: 0 after the last step (summary.json written), 75
(`ExitCode.PREEMPTED`) after SIGTERM and a final checkpoint, 2 for invalid
configuration or data, 3 (`ExitCode.DIVERGED`) when the loss-spike policy
stops the run.
"""

import json
import logging
import resource
import time

import torch
import torch.distributed as dist

from bagel.platform.config import RunConfig
from bagel.platform.exit_codes import ExitCode
from bagel.platform.train.spike import TrainingDiverged

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per accelerator, by a substring of the CUDA device
# name (vendor data sheets; H100/H200 SXM 989).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "H20": 148.0, "L40": 181.0, "L20": 119.5}


def peak_flops_per_s(device: torch.device, configured_tflops: float) -> float:
    """Return the peak FLOP/s for MFU: the configured value, a table entry for the GPU, or 0 (no MFU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


def gather_data_metrics(local: dict[str, float], dp_rank: int, world_size: int) -> dict[str, float]:
    """Sum the data loaders' cumulative counters (packs, tokens, skipped/<reason>, ...) over the data-parallel ranks.

    Collective over all ranks. Ranks with the same `dp_rank` (tensor- and
    context-parallel peers) read the same data, so each data shard counts once.
    """
    if world_size == 1:
        return dict(local)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (dp_rank, local))
    total: dict[str, float] = {}
    for _, metrics in dict(gathered).items():  # one entry per dp_rank
        for key, value in metrics.items():
            total[key] = total.get(key, 0) + value
    return total


def check_run_storage(config: RunConfig) -> None:
    """Fail before any GPU work when `run.storage` is on S3 and its bucket does not exist.

    Checkpoint and TensorBoard writes would otherwise create the bucket
    (s3fs's makedirs does), so a misspelled bucket name would quietly start
    a new bucket. Raises BucketNotFoundError (a UsageError, exit code 2).
    """
    from bagel.platform.data.config import RetryConfig
    from bagel.platform.data.storage import check_bucket, new_filesystem

    storage = config.run.storage
    storage_options = getattr(config.checkpoint, "storage_options", {}) or {}
    fs, _ = new_filesystem(storage, storage_options)
    check_bucket(fs, storage, RetryConfig())


class Trainer:
    """Owns every object of one training run; `setup()` then `fit()` (or the parity harness calls `step_fn`)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.tensorboard = None
        self.gpu = None

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        from bagel.model.bagel import build_model
        from bagel.model.configs import apply_overrides, get_model_config
        from bagel.platform.device import init_device
        from bagel.platform.train.ema import ModelEMA
        from bagel.platform.train.mesh import build_meshes, init_process_group
        from bagel.platform.train.optim import build_lr_scheduler, build_optimizer
        from bagel.platform.train.parallelize import parallelize_bagel, validate_parallel_shapes
        from bagel.platform.train.spike import SpikeMonitor
        from bagel.platform.train.step import TrainStep

        config = self.config
        check_run_storage(config)
        self.device_info = init_device()
        device = self.device_info.device
        self.device = device
        init_process_group(self.device_info)
        self.meshes = build_meshes(config.parallel)
        self.rank = self.meshes.rank

        try:
            self.model_config = apply_overrides(get_model_config(config.model.name), config.model.overrides)
        except ValueError as error:
            from bagel.platform.config import ConfigError

            raise ConfigError(f"model.overrides: {error}") from None
        packing = getattr(config.data, "packing", None)
        validate_parallel_shapes(self.model_config, self.meshes.parallel, getattr(packing, "max_tokens", None))

        dtype_name = config.train.dtype
        if dtype_name == "auto":
            dtype_name = "bf16" if device.type == "cuda" else "fp32"
        self.compute_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32

        # On CPU the full model is built once per rank from the seed and then
        # sharded, so every layout starts from bit-identical weights. On CUDA
        # it is built on the meta device and initialised shard by shard, so no
        # rank ever materialises the full fp32 model in host memory.
        # NOTE: the CUDA path (meta init, NCCL, FlexAttention CP, bf16, compile) has not run on a GPU yet.
        meta_init = device.type == "cuda"
        model = build_model(self.model_config, device="meta" if meta_init else "cpu", seed=config.train.seed)
        self.model = parallelize_bagel(model, self.meshes, config.train, device.type, self.compute_dtype)
        if meta_init:
            self.model.to_empty(device=device)
            torch.manual_seed(config.train.seed)
            with torch.no_grad():
                self.model.init_weights()
        self.model.train()
        self.vae = self._build_vae()

        self.optimizers = build_optimizer(self.model, config.optim, device.type)
        self.lr_scheduler = build_lr_scheduler(self.optimizers, config.schedule, config.train.steps)
        self.ema = ModelEMA(self.model, config.train.ema) if config.train.ema > 0 else None
        self.spike = SpikeMonitor(config.train.spike)
        from bagel.model.flops import pack_training_flops

        model_config = self.model_config
        self.step_fn = TrainStep(
            self.model,
            self.vae,
            self.optimizers,
            self.lr_scheduler,
            self.meshes,
            device,
            ce_weight=model_config.ce_weight,
            mse_weight=model_config.mse_weight,
            max_grad_norm=config.optim.max_grad_norm,
            spike=self.spike,
            ema=self.ema,
            flops_fn=lambda packed: pack_training_flops(model_config, packed),
        )
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            "model %s: %.2fM trainable parameters (local shards), compute dtype %s",
            config.model.name, trainable / 1e6, self.compute_dtype,
        )

    def _build_vae(self):
        from bagel.model.vae import FrozenVAE

        if self.config.model.vae_path:
            return FrozenVAE.from_file(self.model_config, self.config.model.vae_path, device=self.device)
        # A random but identical VAE on every rank (tests and smoke runs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed + 1)
            vae = FrozenVAE(self.model_config)
        return vae.to(self.device)

    # ----------------------------------------------------------------- loop

    def fit(self, data=None) -> ExitCode:
        """Train `train.steps` steps from `data` (default: the configured data loader); return the exit code."""
        from bagel.platform.checkpoint import CheckpointManager, GoodputTracker
        from bagel.platform.checkpoint.states import TrainProgress
        from bagel.platform.preemption import PreemptionHandler, inject_fault

        config = self.config
        layout = config.run.layout
        meshes = self.meshes
        preemption = PreemptionHandler(config.preemption)
        preemption.install()
        storage_options = getattr(config.checkpoint, "storage_options", {}) or {}
        goodput = GoodputTracker(
            layout, rank=self.rank, storage_options=storage_options, heartbeat_seconds=config.metrics.goodput_heartbeat_s
        )
        self._goodput = goodput
        # Checkpoints written before the spike monitor was saved lack its state; it then restarts its warm-up.
        ckpt = CheckpointManager(
            config.checkpoint, layout, init_from=config.run.init_from, optional_keys=("spike",), goodput=goodput
        )

        if data is None:
            from bagel.platform.data.loader import build_data_loader

            data = build_data_loader(config.data, self.model_config, meshes.dp_rank, meshes.dp_size)
        progress = TrainProgress()
        states = self.checkpoint_states(progress, data)
        info = ckpt.resume(states)
        goodput.resumed(progress.step)
        logger.info("starting at step %d of %d (%s)", progress.step + 1, config.train.steps, getattr(info, "source", "fresh"))

        self._start_metrics()
        iterator = iter(data)
        peak = peak_flops_per_s(self.device, config.metrics.peak_tflops)
        summary = {"first": json.loads(progress.first_step_json) if progress.first_step_json else None, "last": None}
        wall_begin = time.perf_counter()
        window = {"tokens": 0, "flops": 0.0, "time": 0.0, "data": 0.0, "steps": 0}
        exit_code = ExitCode.SUCCESS
        try:
            for step in range(progress.step + 1, config.train.steps + 1):
                goodput.step_started()
                step_begin = time.perf_counter()
                packs = [next(iterator) for _ in range(config.train.grad_accum)]
                data_s = time.perf_counter() - step_begin
                result = self.step_fn.run(step, packs)
                step_s = time.perf_counter() - step_begin

                if result.decision.action == "skip":
                    logger.warning("step %d skipped: %s", step, result.decision.reason)
                elif result.decision.action == "stop":
                    raise TrainingDiverged(self._divergence_message(step, result.decision.reason, ckpt))
                progress.step = step
                progress.tokens_seen += result.tokens
                record = {"step": step, "loss": result.total, "ce": result.ce, "mse": result.mse}
                if summary["first"] is None:
                    summary["first"] = record
                    progress.first_step_json = json.dumps(record)
                summary["last"] = record

                window["tokens"] += result.tokens
                window["flops"] += result.flops
                window["time"] += step_s
                window["data"] += data_s
                window["steps"] += 1
                if step % config.metrics.log_every == 0 or step == config.train.steps:
                    self._log(step, result, window, peak, data)
                    window = {"tokens": 0, "flops": 0.0, "time": 0.0, "data": 0.0, "steps": 0}

                goodput.heartbeat(step)
                inject_fault(step)
                if preemption.should_stop():
                    logger.warning("SIGTERM: saving step %d and exiting with %d", step, int(ExitCode.PREEMPTED))
                    ckpt.save(step, states, blocking=True)
                    exit_code = ExitCode.PREEMPTED
                    break
                if ckpt.should_save(step, last_step=step == config.train.steps):
                    ckpt.save(step, states, extra={"tokens_seen": progress.tokens_seen})
        finally:
            ckpt.close()
            goodput.finish()
            if self.tensorboard is not None and progress.step > 0:
                # The final figures include this attempt's last save (the preemption save too).
                self.tensorboard.add_scalars(progress.step, goodput.scalars())
            self._stop_metrics()
            if hasattr(data, "close"):
                data.close()

        if exit_code == ExitCode.SUCCESS:
            self._write_summary(progress, summary, time.perf_counter() - wall_begin, goodput, ckpt)
        return exit_code

    def _divergence_message(self, step: int, reason: str, ckpt) -> str:
        """Explain a spike-policy stop: what happened, why a retry would repeat it, and what to change."""
        spike = self.config.train.spike
        latest = ckpt.latest_complete()
        if latest is not None:
            restart = f"start a new run from an earlier checkpoint (the latest complete one is {latest.uri}) with run.init_from"
        else:
            restart = "start the stage again"
        if spike.policy == "stop":
            policy = "or set train.spike.policy=skip to skip such steps"
        else:
            policy = f"or raise train.spike.max_consecutive (now {spike.max_consecutive})"
        return (
            f"step {step}: {reason}. Resuming would replay the same data into the same divergence: "
            f"lower optim.lr and {restart}, {policy}"
        )

    def checkpoint_states(self, progress, data=None) -> dict:
        """Return the `Stateful` objects a checkpoint of this run holds, keyed by their top-level names.

        Parameter-keyed states (model, optimizer, EMA) use names without
        wrapper segments, so activation checkpointing or compile may differ
        between the saving and the loading run.
        """
        from bagel.platform.checkpoint.states import ModelState, OptimizerState, PerRankState, RNGState

        meshes = self.meshes
        states = {
            "model": ModelState(self.model),
            # torchtitan's container contains one AdamW; DCP's optimizer state helpers need the torch optimizer.
            "optimizer": OptimizerState(self.model, self.optimizers.optimizers[0]),
            "lr_schedule": self.lr_scheduler,
            "progress": progress,
            "rng": PerRankState("rng", RNGState(), self.rank, meshes.world_size),
            # Running loss means and skip counters: the same on every rank (losses are reduced first).
            "spike": self.spike,
        }
        if self.ema is not None:
            states["ema"] = self.ema
        if hasattr(data, "state_dict"):
            states["dataloader"] = PerRankState("dataloader", data, meshes.dp_rank, meshes.dp_size)
        return states

    # -------------------------------------------------------------- metrics

    def _start_metrics(self) -> None:
        from bagel.platform.metrics.gpu import GpuHealthCollector

        metrics = self.config.metrics
        if metrics.gpu_health:
            self.gpu = GpuHealthCollector()
        if metrics.tensorboard and self.rank == 0:
            from bagel.platform.metrics.tensorboard import TensorBoardSync

            self.tensorboard = TensorBoardSync(
                self.config.run.layout.tensorboard_dir,
                local_dir=metrics.local_dir,
                sync_every_s=metrics.sync_every_s,
                storage_options=getattr(self.config.checkpoint, "storage_options", {}) or {},
            )

    def _stop_metrics(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None

    def _log(self, step: int, result, window: dict, peak: float, data) -> None:
        from bagel.platform.train.optim import current_lr

        world = self.meshes.world_size
        # FLOPs of this rank's packs, summed over ranks, per second per accelerator.
        flops = torch.tensor([window["flops"]], dtype=torch.float64, device=self.device)
        if world > 1:
            dist.all_reduce(flops)
        seconds = max(window["time"], 1e-9)
        tokens_per_s = window["tokens"] / seconds
        mfu = float(flops[0]) / seconds / world / peak if peak > 0 else None
        if self.device.type == "cuda":
            memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
        scalars = {
            "loss/total": result.total,
            "loss/ce": result.ce,
            "loss/mse": result.mse,
            "lr": current_lr(self.optimizers),
            "grad_norm": result.grad_norm,
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/mfu": mfu,
            "time/step_s": seconds / window["steps"],
            "time/data_wait_s": window["data"] / window["steps"],
            "memory/peak_gib": memory_gib,
            "train/skipped_steps": float(self.spike.skipped_total),
        }
        if hasattr(data, "metrics"):
            for key, value in gather_data_metrics(data.metrics(), self.meshes.dp_rank, world).items():
                scalars[f"data/{key}"] = float(value)
        goodput = getattr(self, "_goodput", None)
        if goodput is not None:
            scalars.update(goodput.scalars())  # tags under goodput/
        if self.gpu is not None:
            scalars.update(self.gpu.collect(device=self.device))
        if self.rank == 0:
            ce = f"{result.ce:.4f}" if result.ce is not None else "-"
            mse = f"{result.mse:.4f}" if result.mse is not None else "-"
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            logger.info(
                "step %d/%d loss %.4f ce %s mse %s lr %.2e grad_norm %.3f %.0f tok/s mfu %s step %.2fs data %.2fs",
                step, self.config.train.steps, result.total, ce, mse, scalars["lr"], result.grad_norm,
                tokens_per_s, mfu_text, scalars["time/step_s"], scalars["time/data_wait_s"],
            )
        if self.tensorboard is not None:
            self.tensorboard.add_scalars(step, scalars)

    def _write_summary(self, progress, summary: dict, wall_s: float, goodput, ckpt) -> None:
        if self.rank != 0:
            return
        import fsspec

        first, last = summary["first"] or {}, summary["last"] or {}
        latest = ckpt.latest_complete()
        # Over all attempts of the stage: seconds lost to restarts, checkpoint
        # stalls and work redone after preemption, and the productive fraction.
        goodput_figures = goodput.summary()
        payload = {
            "stage": self.config.run.stage,
            "run": self.config.run.name,
            "steps": progress.step,
            "tokens": progress.tokens_seen,
            "first_loss": first.get("loss"),
            "last_loss": last.get("loss"),
            "first_ce": first.get("ce"),
            "final_ce": last.get("ce"),
            "first_mse": first.get("mse"),
            "final_mse": last.get("mse"),
            "wall_time_s": wall_s,
            "goodput": goodput_figures["goodput"],
            "goodput_breakdown": goodput_figures,
            "checkpoint": getattr(latest, "uri", None),
        }
        uri = self.config.run.layout.summary_uri
        storage_options = getattr(self.config.checkpoint, "storage_options", {}) or {}
        with fsspec.open(uri, "w", **storage_options) as handle:
            json.dump(payload, handle, indent=2)
        logger.info("wrote %s", uri)

    def close(self) -> None:
        self._stop_metrics()

