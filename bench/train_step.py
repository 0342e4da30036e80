"""Benchmark the full train step against a bare forward + backward + optimizer step on the same packs.

    python bench/train_step.py [--steps 8] [--model tiny] [--layers N]

Prints, for one process on this machine's device: tokens/s of the bare loop,
of the full step (`TrainStep.run`: token-count all-reduce, VAE encode, loss
normalisation, global-norm clipping, spike check, EMA, scheduler) and of the
full step plus metrics (scalars written to TensorBoard every step), and the
ratios to the bare loop (goal: full step <= 1.05x the bare time). On CUDA it
also prints MFU from `bagel.model.flops`. With --model bagel-7b-mot --layers 2
it measures a 7B-shaped stack with fewer layers in bf16 (one GPU).
For other layouts run it under torchrun; every rank prints its own line.
"""

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, small or bagel-7b-mot")
    parser.add_argument("--layers", type=int, default=0, help="override llm.num_hidden_layers (0 keeps the config's)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--packs", type=int, default=4, help="distinct packs cycled through")
    parser.add_argument("--samples", type=int, default=3, help="samples per pack")
    parser.add_argument("--ac", default="none", help="activation checkpointing: none, selective, full")
    args = parser.parse_args()

    from bagel.model.flops import pack_training_flops
    from bagel.model.testing import random_pack
    from bagel.platform.config import RunConfig, SpikeConfig, TrainConfig
    from bagel.platform.metrics.tensorboard import TensorBoardSync
    from bagel.platform.train.trainer import Trainer, peak_flops_per_s

    config = RunConfig()
    config.model.name = args.model
    if args.layers:
        config.model.overrides = {"llm": {"num_hidden_layers": args.layers}}
    config.train = TrainConfig(steps=10_000, ema=0.999, activation_checkpointing=args.ac, spike=SpikeConfig(policy="skip"))
    config.metrics.tensorboard = False
    config.metrics.gpu_health = False
    trainer = Trainer(config)
    trainer.setup()
    device = trainer.device
    packs = [random_pack(trainer.model_config, seed=i, num_samples=args.samples) for i in range(args.packs)]
    tokens = [p.length for p in packs]
    flops = [pack_training_flops(trainer.model_config, p) for p in packs]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare(i: int) -> None:
        # What a minimal loop must do: encode the VAE images, forward, backward, step.
        packed = packs[i].to(device)
        latents = None
        if packed.vae_indexes.numel():
            latents = trainer.vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)
        sums = trainer.model(packed, latents)
        loss = (0.25 * sums.ce_sum / max(sums.ce_tokens, 1) + sums.mse_sum / max(sums.mse_tokens, 1))
        loss.backward()
        trainer.optimizers.step()
        trainer.optimizers.zero_grad()

    step_counter = [0]

    def full(i: int) -> None:
        step_counter[0] += 1
        trainer.step_fn.run(step_counter[0], [packs[i]])

    with tempfile.TemporaryDirectory() as remote:
        writer = TensorBoardSync(f"file://{remote}", sync_every_s=3600)

        def full_with_metrics(i: int) -> None:
            step_counter[0] += 1
            result = trainer.step_fn.run(step_counter[0], [packs[i]])
            writer.add_scalars(step_counter[0], {"loss/total": result.total, "grad_norm": result.grad_norm})

        variants = {"bare": bare, "full_step": full, "full_step+metrics": full_with_metrics}
        for name, fn in variants.items():
            for i in range(2):
                fn(i % args.packs)
        sync()
        # Variants alternate step by step, so load from other processes hits them alike.
        per_step: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.steps):
            for name, fn in variants.items():
                begin = time.perf_counter()
                fn(i % args.packs)
                sync()
                per_step[name].append(time.perf_counter() - begin)
        timings = {name: statistics.median(values) for name, values in per_step.items()}
        writer.close()

    mean_tokens = sum(tokens) / len(tokens)
    mean_flops = sum(flops) / len(flops)
    peak = peak_flops_per_s(device, 0.0)
    print(f"device {device}, model {args.model}, layers {trainer.model_config.llm.num_hidden_layers}, "
          f"dtype {trainer.compute_dtype}, {mean_tokens:.0f} tokens per pack, median of {args.steps} steps")
    for name, seconds in timings.items():
        line = f"{name:>18}: {seconds * 1e3:8.1f} ms/step {mean_tokens / seconds:9.0f} tok/s  x{seconds / timings['bare']:.3f} vs bare"
        if peak > 0:
            line += f"  MFU {100 * mean_flops / seconds / peak:.1f}%"
        print(line)
    trainer.close()


if __name__ == "__main__":
    main()
