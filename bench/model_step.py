"""Tokens/s of one training step of the `tiny` model with the FlexAttention mask vs the dense SDPA mask.

Both backends run in the same process on the same packs, so the printed ratio
(flex / dense) does not depend on how busy the machine is. torch 2.13 has no
FlexAttention backward on CPU, so there the script times flex forward against
dense forward, plus dense forward+backward alone. On CUDA it times
forward+backward for both backends (flex compiled).

    python bench/model_step.py [--tokens 1024] [--steps 5] [--model tiny]
"""

import argparse
import dataclasses
import statistics
import time
import warnings

import torch

from bagel.model.bagel import build_model
from bagel.model.configs import get_model_config
from bagel.model.loss import normalize
from bagel.model.testing import random_pack
from bagel.model.vae import FrozenVAE


def _packs(config, tokens: int, count: int):
    packs = []
    seed = 0
    while len(packs) < count:
        samples = 1
        packed = random_pack(config, seed=seed, num_samples=samples)
        while packed.length < tokens:
            samples += 1
            packed = random_pack(config, seed=seed, num_samples=samples)
        packs.append(packed)
        seed += 1
    return packs


def _time(fn, packs, device) -> float:
    """Return the median tokens/s of fn(pack) over packs (after one warm-up call)."""
    fn(packs[0])
    rates = []
    for packed in packs:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(packed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(packed.length / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model config name")
    parser.add_argument("--tokens", type=int, default=1024, help="minimum tokens per packed sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed packs per measurement")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = get_model_config(args.model)
    torch.manual_seed(0)
    vae = FrozenVAE(config).to(device)
    packs = [p.to(device) for p in _packs(config, args.tokens, args.steps)]
    latents = {id(p): vae.encode_tokens(p.vae_images, p.vae_latent_grids, p.vae_noise_seeds) for p in packs}

    # Same seed, so both models hold identical weights and differ only in the mask backend.
    models = {
        backend: build_model(dataclasses.replace(config, attn_backend=backend), device=device, seed=0)
        for backend in ("sdpa", "flex")
    }

    def forward(backend):
        def run(packed):
            with torch.no_grad():
                models[backend](packed, latents[id(packed)])
        return run

    def train_step(backend):
        model = models[backend]

        def run(packed):
            sums = model(packed, latents[id(packed)])
            normalize(sums, sums.ce_tokens, sums.mse_tokens, config.ce_weight, config.mse_weight).total.backward()
            model.zero_grad(set_to_none=True)
        return run

    mean_tokens = statistics.mean(p.length for p in packs)
    print(f"model={args.model} device={device} packs={len(packs)} mean tokens/pack={mean_tokens:.0f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns that it is unfused
        dense_fwd = _time(forward("sdpa"), packs, device)
        flex_fwd = _time(forward("flex"), packs, device)
        dense_step = _time(train_step("sdpa"), packs, device)
        print(f"dense mask forward          {dense_fwd:12.0f} tokens/s")
        print(f"flex mask forward           {flex_fwd:12.0f} tokens/s")
        print(f"dense mask forward+backward {dense_step:12.0f} tokens/s")
        if device.type == "cuda":
            flex_step = _time(train_step("flex"), packs, device)
            print(f"flex mask forward+backward  {flex_step:12.0f} tokens/s")
            print(f"ratio flex/dense forward+backward: {flex_step / dense_step:.2f}")
        else:
            print("flex forward+backward: not measured (torch 2.13 has no FlexAttention backward on CPU)")
    print(f"ratio flex/dense forward: {flex_fwd / dense_fwd:.2f}")


if __name__ == "__main__":
    main()
