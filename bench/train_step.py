"""Benchmark the full train step (data, step, metrics) against bare forward + backward + optimizer on the same packs.

    python bench/train_step.py [--steps 10] [--warmup 3] [--num-workers N]
    torchrun --standalone --nproc-per-node 2 bench/train_step.py --layout dp_shard=2
    torchrun --standalone --nproc-per-node 2 bench/train_step.py --layout tp=2

Setup: the demo dataset (`bagel.platform.data.demo.write_demo`, as `bagel data
demo` writes it) goes to a temporary directory, and the run config is the
`--config` stage config (default `tiny/pretrain`) with BAGEL_DATA_ROOT set to
that directory. So the data section and pack budget are the config's; for
`tiny/pretrain` that is about 384 tokens per pack, at most 512.
`Trainer.setup` builds the process group, meshes and the FSDP/TP/CP-wrapped
model, so every layout runs the trainer's own parallelisation code.

Each timed step runs both sides, one right after the other, so load from
other processes on a shared machine hits them alike:

- full: the next pack from `build_data_loader`, with the data wait timed.
  Then `TrainStep.run`: device copy, VAE encode, token-count all-reduce,
  forward, backward, global-norm clipping, spike check, optimizer, EMA and LR
  scheduler. Then the trainer's per-step metrics (`Trainer._log`): FLOPs
  all-reduce, data counters gathered over ranks, TensorBoard scalars written
  by rank 0 to a temporary file:// run storage, and NVML scalars where NVML
  exists.
- bare: device copy, VAE encode, forward, loss, backward, optimizer step and
  zero_grad on the same pack. The bare packs are built before the clock starts
  by a second loader with the same config and are checked to equal the
  streamed ones.

Before the steps, every pack goes once through the bare side, untimed, so
DTensor's per-shape caches (tp and cp layouts) are warm for both sides. The
figures are therefore those of a long run whose pack shapes have all been
seen. Without that pass, the side that ran first on a new pack shape was
about 3x slower (tp=2, 2 gloo ranks on a shared 2-core CPU, this script).

Both sides step the same model and optimizer. Rank 0 prints the global
tokens/s of each side (the tokens of all data-parallel ranks per second of
the slowest rank), each the median over the timed steps after `--warmup`
steps, and the median over those steps of full time / bare time (goal:
<= 1.05). On CUDA it also prints MFU (`bagel.model.flops`), e.g. of a
7B-shaped stack with `--config bagel-7b-mot/pretrain --layers 2`. One launch
measures one layout, so run one torchrun per layout.
NOTE: only the CPU/gloo path has run (1 process, dp_shard=2, tp=2, cp=2). The
CUDA path, including MFU and the 7B-shaped stack, has not run yet.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def parse_layout(text: str):
    """Parse "dp_shard=2,tp=2"-style text into a ParallelConfig.

    Degrees not named are 1, except dp_shard, which fills the world size left over.
    """
    from bagel.platform.config import ParallelConfig

    degrees = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in ("dp_replicate", "dp_shard", "tp", "cp") or not value.isdigit():
            raise SystemExit(f"--layout item {item!r} is invalid: use dp_replicate=N, dp_shard=N, tp=N or cp=N")
        degrees[key] = int(value)
    degrees.setdefault("dp_shard", -1)
    return ParallelConfig(**degrees)


def same_pack(a, b) -> bool:
    """Return whether two packs contain the same samples, tokens and images."""
    return (
        a.sample_ids == b.sample_ids
        and a.split_lens == b.split_lens
        and torch.equal(a.text_ids, b.text_ids)
        and torch.equal(a.vit_patches, b.vit_patches)
        and all(torch.equal(x, y) for x, y in zip(a.vae_images, b.vae_images))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny/pretrain", help="stage config name or YAML path")
    parser.add_argument("--layout", default="", help="parallel degrees, e.g. dp_shard=2 or tp=2 (default: all ranks dp_shard)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (each runs the full and the bare side once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of both sides before the timed ones")
    parser.add_argument("--num-workers", type=int, default=None, help="data.num_workers (default: the config's)")
    parser.add_argument("--layers", type=int, default=0, help="override llm.num_hidden_layers (0 keeps the config's)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides of the config, e.g. train.ema=0")
    args = parser.parse_args()

    from bagel.model.loss import normalize
    from bagel.platform.config import build_run_config, load_config_dict
    from bagel.platform.data.demo import write_demo
    from bagel.platform.data.loader import build_data_loader
    from bagel.platform.train.trainer import Trainer, peak_flops_per_s

    parallel = parse_layout(args.layout)
    tmp = tempfile.TemporaryDirectory(prefix="bagel-bench-train-")
    # Every rank writes its own copy because ranks may not share /tmp. The demo is deterministic and a few MB.
    write_demo(f"{tmp.name}/demo")
    os.environ["BAGEL_DATA_ROOT"] = f"file://{tmp.name}/demo"
    config = build_run_config(load_config_dict(args.config, args.overrides))
    config.parallel = parallel
    config.run.storage = f"file://{tmp.name}/storage"
    # A far-off last step keeps a cosine schedule at its peak. The loop below stops on its own.
    config.train.steps = 10**6
    if args.num_workers is not None:
        config.data.num_workers = args.num_workers
    if args.layers:
        llm = {**config.model.overrides.get("llm", {}), "num_hidden_layers": args.layers}
        config.model.overrides = {**config.model.overrides, "llm": llm}
    config.validate()

    trainer = Trainer(config)
    trainer.setup()
    meshes, device = trainer.meshes, trainer.device
    total_steps = args.warmup + args.steps

    # The bare side's packs, built and kept in memory before any timing.
    reference = build_data_loader(config.data, trainer.model_config, meshes.dp_rank, meshes.dp_size)
    packs = [next(reference) for _ in range(total_steps)]
    reference.close()
    stream = build_data_loader(config.data, trainer.model_config, meshes.dp_rank, meshes.dp_size)
    iterator = iter(stream)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare(pack) -> None:
        # `_prepare` is the device copy, VAE encode and (cp > 1) loss-position split that any loop needs.
        (packed, latents), = trainer.step_fn._prepare([pack])
        sums = trainer.model(packed, latents)
        terms = normalize(sums, sums.ce_tokens, sums.mse_tokens, trainer.model_config.ce_weight, trainer.model_config.mse_weight)
        terms.total.backward()
        trainer.optimizers.step()
        trainer.optimizers.zero_grad()

    # DTensor (tp/cp layouts) caches its sharding propagation per tensor shape, and a
    # pack's shapes are new to it only the first time. So run every pack once, untimed,
    # before timing: otherwise the side that runs first on a pack pays for both.
    for pack in packs:
        bare(pack)

    peak = peak_flops_per_s(device, config.metrics.peak_tflops)
    log_every = config.metrics.log_every
    trainer._start_metrics()
    # Per timed step on this rank: seconds of [full, data wait, step, metrics, bare], the step's
    # global tokens, and the training FLOPs of this rank's pack.
    seconds: list[list[float]] = []
    tokens: list[int] = []
    flops: list[float] = []
    skipped = 0
    for step in range(1, total_steps + 1):
        begin = time.perf_counter()
        pack = next(iterator)
        data_s = time.perf_counter() - begin
        result = trainer.step_fn.run(step, [pack])
        step_end = time.perf_counter()
        if step % log_every == 0:
            window = {"tokens": result.tokens, "flops": result.flops, "time": step_end - begin, "data": data_s, "steps": 1}
            trainer._log(step, result, window, peak, stream)
        sync()
        full_end = time.perf_counter()
        skipped += result.decision.action != "ok"

        if not same_pack(pack, packs[step - 1]):
            raise RuntimeError(f"pack {step} of the streaming loader differs from the materialised one: the loader is not deterministic")
        bare_begin = time.perf_counter()
        bare(packs[step - 1])
        sync()
        bare_s = time.perf_counter() - bare_begin

        if step > args.warmup:
            seconds.append([full_end - begin, data_s, step_end - begin - data_s, full_end - step_end, bare_s])
            tokens.append(result.tokens)
            flops.append(result.flops)
    trainer._stop_metrics()
    stream.close()

    # A step takes as long as its slowest rank.
    per_rank = [(seconds, flops)]
    if meshes.world_size > 1:
        per_rank = [None] * meshes.world_size
        dist.all_gather_object(per_rank, (seconds, flops))
    slowest = [[max(rank[0][i][j] for rank in per_rank) for j in range(5)] for i in range(args.steps)]
    step_flops = [sum(rank[1][i] for rank in per_rank) for i in range(args.steps)]  # over all ranks

    if meshes.rank == 0:
        full_tps = statistics.median(t / s[0] for t, s in zip(tokens, slowest))
        bare_tps = statistics.median(t / s[4] for t, s in zip(tokens, slowest))
        parts = [statistics.median(s[j] for s in slowest) * 1e3 for j in range(5)]
        layout = meshes.parallel
        print(
            f"layout dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} tp={layout.tp} cp={layout.cp} "
            f"({meshes.world_size} process{'es' if meshes.world_size > 1 else ''}), device {device.type}, "
            f"config {args.config}, model {config.model.name}, dtype {trainer.compute_dtype}, "
            f"data.num_workers {config.data.num_workers}"
        )
        print(
            f"  {statistics.median(tokens):.0f} tokens per step over all data-parallel ranks (median), "
            f"median of {args.steps} steps after {args.warmup} warm-up steps, {skipped} steps skipped by the spike policy"
        )
        print(
            f"  full (data + TrainStep.run + metrics): {full_tps:9.0f} tok/s  "
            f"{parts[0]:.1f} ms/step = data wait {parts[1]:.1f} + step {parts[2]:.1f} + metrics {parts[3]:.1f} (medians)"
        )
        print(f"  bare (forward + backward + optimizer): {bare_tps:9.0f} tok/s  {parts[4]:.1f} ms/step")
        # Paired per step (same pack, back to back), so it is steadier than the ratio of the two medians.
        ratio = statistics.median(s[0] / s[4] for s in slowest)
        print(f"  full/bare time per step (median of per-step ratios): x{ratio:.3f} (goal <= 1.05)")
        if peak > 0:
            full_mfu = statistics.median(f / s[0] for f, s in zip(step_flops, slowest)) / meshes.world_size / peak
            bare_mfu = statistics.median(f / s[4] for f, s in zip(step_flops, slowest)) / meshes.world_size / peak
            print(f"  MFU full {100 * full_mfu:.1f}%, bare {100 * bare_mfu:.1f}% (peak {peak / 1e12:.0f} TFLOP/s per device)")
    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    tmp.cleanup()


if __name__ == "__main__":
    main()
