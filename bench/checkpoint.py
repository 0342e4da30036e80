"""Checkpoint save/load throughput, async stall and resume cost, each against a baseline measured in the same run.

1. Throughput: `CheckpointManager.save` (synchronous, so the whole write is
   timed, checksums included) and `resume` (checksum verification included;
   it runs in the same pass as the read) of a state of --mib MiB, against a
   raw fsspec write / read of the same tensor bytes, as one file in 8 MiB
   reads, to / from the same store. Goal: ratio (raw time / checkpoint time)
   >= 0.7. Reads are measured twice, each path under the same cache state:
   "cold" evicts both files from the local page cache first (a restarted
   pod; for S3 the server's own caches are warm for both), "warm" reads both
   right after they were written (page cache, local store only differs).
2. Stall: the time `save` blocks the training loop with async_save=True
   against a synchronous save of the same state. The steady-state figure is
   the second asynchronous save of one manager (staging buffers reused); the
   first save, which allocates them, is printed too. Goal: ratio <= 0.1.
3. Resume: seconds from process start to the end of the first training step
   of the toy FSDP2 loop (`bagel.platform.checkpoint.toy`, 2 gloo ranks,
   --toy-mib MiB of model + EMA + AdamW state) resuming from a checkpoint,
   against a cold start (fresh initialisation) of the same loop. Goal: ratio <= 1.5.
   The in-process figure (build + resume + one step against build + one step)
   is printed too.

The store is a local temporary directory, or the loopback SeaweedFS server
with --s3 (started on 127.0.0.1).

    python bench/checkpoint.py [--mib 256] [--rounds 3] [--toy-mib 128] [--s3]
"""

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid

import torch
from torch import nn

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.manager import CheckpointManager
from bagel.platform.checkpoint.states import ModelState, OptimizerState, TrainProgress
from bagel.platform.layout import StageLayout

# Width of the benchmark MLP; the layer count follows from --mib.
_WIDTH = 1024


def build(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build an MLP whose parameters take about `mib` / 3 MiB, so with AdamW's two moments the state is about `mib` MiB."""
    layer_bytes = _WIDTH * _WIDTH * 4
    layers = max(1, (mib * 2**20) // (3 * layer_bytes))
    model = nn.Sequential(*[nn.Linear(_WIDTH, _WIDTH, bias=False) for _ in range(layers)])
    # foreach, as the trainer's optimizer runs on CPU (optim.implementation falls back from fused to
    # foreach there). torch's CPU default loops over tensors, which makes the zero-gradient step that
    # DCP runs before loading optimizer state several times slower than in training.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    inputs = torch.randn(8, _WIDTH)
    model(inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def states_of(model: nn.Module, optimizer: torch.optim.Optimizer, progress: TrainProgress) -> dict:
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "progress": progress}


def evict(fs, path: str) -> None:
    """Drop the local files under `path` from the page cache (no-op for object stores), so the next read hits the disk."""
    import os

    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" not in protocols or not hasattr(os, "posix_fadvise"):
        return
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(fs, path: str) -> float:
    begin = time.perf_counter()
    with fs.open(path, "rb", block_size=8 * 2**20) as stream:
        while stream.read(8 * 2**20):
            pass
    return time.perf_counter() - begin


def raw_write(root: str, options: dict, tensors: list[torch.Tensor]) -> tuple[float, float, float]:
    """Write the tensors' bytes as one file (as one rank's shard); return (write, warm read, cold read) seconds."""
    fs, path = storage.open_fs(storage.join(root, f"raw-{uuid.uuid4().hex[:8]}"), options)
    begin = time.perf_counter()
    with fs.open(path, "wb") as stream:
        for tensor in tensors:
            stream.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    seconds = time.perf_counter() - begin
    warm = raw_read(fs, path)
    evict(fs, path)
    cold = raw_read(fs, path)
    fs.rm(path)
    return seconds, warm, cold


def measure(root: str, options: dict, mib: int, rounds: int) -> dict[str, list[float]]:
    keys = ("save", "raw_write", "load", "raw_read", "load_warm", "raw_read_warm", "stall_async", "stall_async_first", "stall_sync", "resume", "cold")
    results: dict[str, list[float]] = {key: [] for key in keys}
    for round_index in range(rounds):
        run = f"bench-{round_index}-{uuid.uuid4().hex[:6]}"
        model, optimizer = build(mib)
        train_step(model, optimizer)  # materialise the AdamW moments
        progress = TrainProgress(step=1)
        states = states_of(model, optimizer, progress)
        state_tensors = [p.detach() for p in model.parameters()]
        for state in optimizer.state.values():
            state_tensors += [value for value in state.values() if value.dim() > 0]

        sync = CheckpointManager(CheckpointConfig(async_save=False, keep_latest=0, storage_options=options), StageLayout(root, run, "pretrain"))
        begin = time.perf_counter()
        sync.save(1, states)
        results["save"].append(time.perf_counter() - begin)
        results["stall_sync"].append(results["save"][-1])
        write_seconds, warm_read, cold_read = raw_write(root, options, state_tensors)
        results["raw_write"].append(write_seconds)
        results["raw_read"].append(cold_read)
        results["raw_read_warm"].append(warm_read)

        asynchronous = CheckpointManager(CheckpointConfig(async_save=True, keep_latest=0, storage_options=options), StageLayout(root, run, "pretrain"))
        begin = time.perf_counter()
        asynchronous.save(2, states)
        results["stall_async_first"].append(time.perf_counter() - begin)
        asynchronous.wait()
        train_step(model, optimizer)
        begin = time.perf_counter()
        asynchronous.save(3, states)
        results["stall_async"].append(time.perf_counter() - begin)
        asynchronous.close()
        step_uri = asynchronous.latest_complete().uri

        begin = time.perf_counter()
        cold_model, cold_optimizer = build(mib)
        train_step(cold_model, cold_optimizer)
        results["cold"].append(time.perf_counter() - begin)

        # Warm load: the checkpoint was just written (page cache for a local store).
        warm_model, warm_optimizer = build(mib)
        load_begin = time.perf_counter()
        CheckpointManager(CheckpointConfig(storage_options=options), StageLayout(root, run, "pretrain")).resume(
            states_of(warm_model, warm_optimizer, TrainProgress())
        )
        results["load_warm"].append(time.perf_counter() - load_begin)

        evict(*storage.open_fs(step_uri, options))
        begin = time.perf_counter()
        warm_model, warm_optimizer = build(mib)
        load_begin = time.perf_counter()
        manager = CheckpointManager(CheckpointConfig(storage_options=options), StageLayout(root, run, "pretrain"))
        manager.resume(states_of(warm_model, warm_optimizer, TrainProgress()))
        results["load"].append(time.perf_counter() - load_begin)
        train_step(warm_model, warm_optimizer)
        results["resume"].append(time.perf_counter() - begin)
    return results


def measure_restart(root: str, env: dict[str, str], toy_mib: int, log_dir: str) -> tuple[float, float]:
    """Return (cold start, resume) seconds from process start to the end of the first step, 2 toy ranks."""
    import json
    import sys

    from bagel.platform.checkpoint.toy import spawn_ranks, wait_ranks

    # Model (dim x hidden x 2 fp32) + EMA + two AdamW moments = 4 copies.
    dim = 1024
    hidden = max(64, toy_mib * 2**20 // (4 * 2 * 4 * dim))
    run = f"restart-{uuid.uuid4().hex[:6]}"

    def toy(name: str, steps: int, run_name: str) -> dict:
        out = f"{log_dir}/{name}.json"
        command = [
            sys.executable, "-m", "bagel.platform.checkpoint.toy", "--storage", root, "--run", run_name,
            "--steps", str(steps), "--interval-steps", "2", "--dim", str(dim), "--hidden", str(hidden), "--out", out,
        ]
        codes = wait_ranks(spawn_ranks(command, 2, env=env, log_dir=log_dir), 600)
        if codes != [0, 0]:
            raise RuntimeError(f"toy run {name} exited with {codes}: see {log_dir}")
        with open(out) as result_file:
            return json.load(result_file)

    toy("save", 2, run)
    cold = toy("cold", 1, f"{run}-cold")
    resumed = toy("resume", 3, run)
    if resumed["source"] != "checkpoint":
        raise RuntimeError(f"the resume run started from {resumed['source']}, expected a checkpoint")
    return cold["first_step_done_since_start"], resumed["first_step_done_since_start"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="approximate checkpoint size in MiB (model + AdamW moments)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--toy-mib", type=int, default=128, help="state size in MiB of the toy loop used for the restart measurement")
    parser.add_argument("--s3", action="store_true", help="use a loopback SeaweedFS server instead of a local directory")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with contextlib.ExitStack() as stack:
        if args.s3:
            from bagel.platform.data.loopback_s3 import seaweedfs_server

            server = stack.enter_context(seaweedfs_server())
            root = f"{server.make_bucket('bench-checkpoint')}/{uuid.uuid4().hex[:8]}"
            options = server.storage_options
            env = server.env
        else:
            root = f"file://{stack.enter_context(tempfile.TemporaryDirectory())}"
            options = {}
            env = {}
        results = measure(root, options, args.mib, args.rounds)
        cold_start, resume_start = measure_restart(root, env, args.toy_mib, stack.enter_context(tempfile.TemporaryDirectory()))

    median = {key: statistics.median(values) for key, values in results.items()}
    size = args.mib
    print(f"store: {'SeaweedFS (loopback)' if args.s3 else 'local directory'}, state ~{size} MiB, {args.rounds} rounds (medians)")
    print(f"save   {size / median['save']:8.1f} MiB/s   raw write {size / median['raw_write']:8.1f} MiB/s   "
          f"ratio {median['raw_write'] / median['save']:.2f} (goal >= 0.7; sync save incl. SHA-256 and MANIFEST vs one plain file)")
    print(f"load   {size / median['load']:8.1f} MiB/s   raw read  {size / median['raw_read']:8.1f} MiB/s   "
          f"ratio {median['raw_read'] / median['load']:.2f} (goal >= 0.7; cold: both evicted from the page cache; "
          f"resume incl. listing, SHA-256 check and optimizer-state set-up)")
    print(f"load   {size / median['load_warm']:8.1f} MiB/s   raw read  {size / median['raw_read_warm']:8.1f} MiB/s   "
          f"ratio {median['raw_read_warm'] / median['load_warm']:.2f} (warm: both read right after being written)")
    print(f"stall  async {median['stall_async']:.3f} s   sync {median['stall_sync']:.3f} s   ratio {median['stall_async'] / median['stall_sync']:.3f} "
          f"(goal <= 0.1; steady state, 2nd async save of a manager; 1st save {median['stall_async_first']:.3f} s, "
          f"ratio {median['stall_async_first'] / median['stall_sync']:.3f})")
    print(f"start  process to first step: resume {resume_start:.2f} s   cold {cold_start:.2f} s   ratio {resume_start / cold_start:.2f} (goal <= 1.5)")
    print(f"       in process (build + first step): resume {median['resume']:.3f} s   cold {median['cold']:.3f} s   ratio {median['resume'] / median['cold']:.2f}")


if __name__ == "__main__":
    main()
