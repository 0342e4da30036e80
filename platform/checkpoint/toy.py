"""A tiny FSDP2 training loop that drives the checkpoint manager exactly as the trainer does.

The checkpoint tests and `bench/checkpoint.py` run it under N CPU/gloo ranks:

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python -m bagel.platform.checkpoint.toy --storage file:///tmp/s --run r1 --steps 8 --out out.json

It has every kind of state a BAGEL run checkpoints: a sharded model (with
dropout, so the RNG matters), an EMA copy, AdamW moments, an LR schedule, a
data loader whose position is per rank and reshardable, RNG states and
progress counters. Rank 0 writes `--out`: the loss of each step (as exact
float hex), SHA-256 digests of the full (unsharded) model, EMA and optimizer
state, and how the run started.
"""

import argparse
import copy
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.goodput import GoodputTracker, process_start_unix
from bagel.platform.checkpoint.manager import CheckpointManager
from bagel.platform.checkpoint.states import ModelState, OptimizerState, PerRankState, RNGState, TrainProgress
from bagel.platform.exit_codes import ExitCode
from bagel.platform.layout import StageLayout
from bagel.platform.log import setup_logging
from bagel.platform.preemption import PreemptionConfig, PreemptionHandler, inject_fault

logger = logging.getLogger(__name__)


class ToyLoader:
    """Deterministic batches: global sample i is drawn from a generator seeded with i."""

    def __init__(self, seed: int, dp_rank: int, dp_size: int, batch: int, dim: int) -> None:
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.batch = batch
        self.dim = dim
        self.position = 0  # batches this rank has consumed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.position * self.dp_size + self.dp_rank
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        inputs = torch.randn(self.batch, self.dim, generator=generator)
        targets = torch.tanh(inputs.roll(1, dims=-1))
        self.position += 1
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict["position"])

    def load_resharded_state_dicts(self, state_dicts: list[dict[str, Any]], rank: int) -> None:
        consumed = sum(int(state["position"]) for state in state_dicts)
        if consumed % self.dp_size:
            raise ValueError(f"{consumed} consumed batches cannot be split evenly over {self.dp_size} ranks")
        self.position = consumed // self.dp_size


def build_model(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))


def state_digests(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """Return SHA-256 digests of the full model, EMA and optimizer states (collective; valid on rank 0)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": _digest(get_model_state_dict(model, options=options)),
        "ema": _digest(get_model_state_dict(ema, options=options)),
        "optimizer": _digest(get_optimizer_state_dict(model, optimizer, options=options)),
    }


def _digest(tree: Any) -> str:
    digest = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{prefix}.{index}", item)
        elif isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.detach().contiguous().cpu().numpy().tobytes())
        else:
            digest.update(f"{prefix}={value!r}".encode())

    visit("", tree)
    return digest.hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="storage root URI (file:// or s3://)")
    parser.add_argument("--run", default="toy")
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--steps", type=int, default=8, help="total optimizer steps")
    parser.add_argument("--interval-steps", type=int, default=2)
    parser.add_argument("--keep-latest", type=int, default=2)
    parser.add_argument("--sync", action="store_true", help="save synchronously")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum pass on resume")
    parser.add_argument("--init-from", default="")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (simulated compute)")
    parser.add_argument("--deadline", type=float, default=20.0, help="preemption deadline in seconds")
    parser.add_argument("--out", default="", help="JSON result file written by rank 0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(os.environ.get("BAGEL_LOG_LEVEL", "INFO"))
    preemption = PreemptionHandler(PreemptionConfig(deadline_seconds=args.deadline))
    preemption.install()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    mesh = init_device_mesh("cpu", (world_size,)) if dist.is_initialized() else None

    model = build_model(args.dim, args.hidden)
    ema = copy.deepcopy(model).requires_grad_(False)
    if mesh is not None:
        fully_shard(model, mesh=mesh)
        fully_shard(ema, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    loader = ToyLoader(seed=7, dp_rank=rank, dp_size=world_size, batch=args.batch, dim=args.dim)
    progress = TrainProgress()

    layout = StageLayout(args.storage, args.run, args.stage)
    config = CheckpointConfig(
        interval_steps=args.interval_steps,
        keep_latest=args.keep_latest,
        async_save=not args.sync,
        verify_checksums=not args.no_verify,
    )
    goodput = GoodputTracker(layout, rank=rank, heartbeat_seconds=1.0)
    ckpt = CheckpointManager(config, layout, init_from=args.init_from, goodput=goodput)
    states = {
        "model": ModelState(model),
        "ema": ModelState(ema),
        "optimizer": OptimizerState(model, optimizer),
        "lr_schedule": schedule,
        "dataloader": PerRankState("dataloader", loader, rank, world_size),
        "rng": PerRankState("rng", RNGState(), rank, world_size),
        "progress": progress,
    }
    resume_begin = time.monotonic()
    info = ckpt.resume(states)
    resume_seconds = time.monotonic() - resume_begin
    goodput.resumed(progress.step)

    losses: dict[int, str] = {}
    first_step_seconds = None
    first_step_done_since_start = None  # seconds from process start to the end of the first step
    exit_code = ExitCode.SUCCESS
    for step in range(progress.step + 1, args.steps + 1):
        goodput.step_started()
        step_begin = time.monotonic()
        inputs, targets = loader.next_batch()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.lerp_(param, 0.1)
        reduced = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(reduced)
            reduced /= world_size
        losses[step] = float(reduced).hex()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if first_step_seconds is None:
            first_step_seconds = time.monotonic() - step_begin
            first_step_done_since_start = time.time() - process_start_unix()
        progress.step = step
        progress.tokens_seen += args.batch * world_size
        goodput.heartbeat(step)
        inject_fault(step)

        if preemption.should_stop():
            ckpt.save(step, states, blocking=True, extra={"tokens_seen": progress.tokens_seen})
            exit_code = ExitCode.PREEMPTED
            break
        if ckpt.should_save(step, last_step=step == args.steps):
            ckpt.save(step, states, extra={"tokens_seen": progress.tokens_seen})

    ckpt.close()
    goodput.finish()
    digests = state_digests(model, ema, optimizer) if dist.is_initialized() else {
        "model": _digest(model.state_dict()),
        "ema": _digest(ema.state_dict()),
        "optimizer": _digest(get_optimizer_state_dict(model, optimizer)),
    }
    if rank == 0 and args.out:
        result = {
            "source": info.source,
            "resumed_step": info.step,
            "resumed_uri": info.uri,
            "saved_world_size": info.saved_world_size,
            "skipped": info.skipped,
            "final_step": progress.step,
            "tokens_seen": progress.tokens_seen,
            "loader_consumed": loader.position * world_size,
            "losses": losses,
            "digests": digests,
            "exit_code": int(exit_code),
            "resume_seconds": resume_seconds,
            "first_step_seconds": first_step_seconds,
            "first_step_done_since_start": first_step_done_since_start,
            "goodput": goodput.summary(),
        }
        with open(args.out, "w") as out_file:
            json.dump(result, out_file, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    if exit_code == ExitCode.PREEMPTED:
        logger.warning("preempted after step %d: checkpoint saved, exiting with %d", progress.step, int(exit_code))
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())


def spawn_ranks(command: list[str], nprocs: int, env: dict[str, str] | None = None, log_dir: str | None = None) -> list[subprocess.Popen]:
    """Start `command` once per rank with the torchrun environment (RANK, WORLD_SIZE, MASTER_*), without torchrun.

    Each rank is a direct child, so a test sees its exit code and can signal
    it. Output goes to `{log_dir}/rank{r}.log` when `log_dir` is set.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(nprocs):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        output = open(os.path.join(log_dir, f"rank{rank}.log"), "ab") if log_dir else subprocess.DEVNULL
        processes.append(subprocess.Popen(command, env=rank_env, stdout=output, stderr=subprocess.STDOUT))
    return processes


def wait_ranks(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every rank and return their exit codes; kill all of them on timeout."""
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:
            for other in processes:
                other.kill()
            raise
    return codes
