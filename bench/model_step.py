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


def _time_interleaved(functions: dict, packs, device) -> dict[str, float]:
    """Return the median tokens/s of each fn(pack), alternating the functions pack by pack.

    Alternating spreads any change in machine load over all functions alike.
    Each function gets one untimed warm-up call first.
    """
    for fn in functions.values():
        fn(packs[0])
    rates = {name: [] for name in functions}
    for packed in packs:
        for name, fn in functions.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(packed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(packed.length / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


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
    functions = {
        "dense forward": forward("sdpa"),
        "flex forward": forward("flex"),
        "dense forward+backward": train_step("sdpa"),
    }
    if device.type == "cuda":
        functions["flex forward+backward"] = train_step("flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns that it is unfused
        rates = _time_interleaved(functions, packs, device)

    for name, rate in rates.items():
        print(f"{name:<24} {rate:12.0f} tokens/s")
    if device.type == "cuda":
        ratio = rates["flex forward+backward"] / rates["dense forward+backward"]
        print(f"ratio flex/dense forward+backward: {ratio:.2f}")
    else:
        print("flex forward+backward: not measured (torch 2.13 has no FlexAttention backward on CPU)")
    print(f"ratio flex/dense forward: {rates['flex forward'] / rates['dense forward']:.2f}")


if __name__ == "__main__":
    main()
