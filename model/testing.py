"""Small synthetic samples and packs for tests and benchmarks (tiny config sizes)."""

import random

import torch

from bagel.model.configs import BagelConfig
from bagel.model.inputs import ImageItem, ImageRole, InterleavedSample, PackedSequence, TextItem
from bagel.model.sequence import layout_sample, pack


def random_image(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform pixels [3, height, width] in [-1, 1]."""
    return torch.rand(3, height, width, generator=generator) * 2 - 1


def random_sample(sample_id: str, rng: random.Random, config: BagelConfig, kind: str | None = None) -> InterleavedSample:
    """Build a random sample of one kind.

    Kinds: "t2i" (caption, then noised image), "vlm" (ViT image, then a text
    reply with loss), "edit" (clean VAE + ViT source, instruction, noised
    target) or "text".
    """
    kind = kind or rng.choice(["t2i", "vlm", "edit", "text"])
    generator = torch.Generator().manual_seed(rng.getrandbits(31))
    vit_side = config.vit.patch_size
    vae_side = config.latent_downsample
    max_vit = min(config.vit_max_num_patch_per_side, 4)
    max_vae = min(config.max_latent_size, 4)

    def text(loss: bool, droppable: bool = False) -> TextItem:
        return TextItem([rng.randrange(256) for _ in range(rng.randint(1, 12))], loss=loss, cfg_droppable=droppable)

    def vit_image(droppable: bool = False) -> ImageItem:
        pixels = random_image(vit_side * rng.randint(1, max_vit), vit_side * rng.randint(1, max_vit), generator)
        return ImageItem(pixels, ImageRole.VIT, cfg_droppable=droppable)

    def vae_image(role: ImageRole, droppable: bool = False) -> ImageItem:
        pixels = random_image(vae_side * rng.randint(1, max_vae), vae_side * rng.randint(1, max_vae), generator)
        return ImageItem(pixels, role, cfg_droppable=droppable)

    if kind == "t2i":
        items = [text(False, droppable=True), vae_image(ImageRole.VAE_NOISED)]
    elif kind == "vlm":
        items = [text(False), vit_image(), text(True)]
    elif kind == "edit":
        items = [
            vae_image(ImageRole.VAE_CLEAN, droppable=True),
            vit_image(droppable=True),
            text(False, droppable=True),
            vae_image(ImageRole.VAE_NOISED),
        ]
    elif kind == "text":
        items = [text(True)]
    else:
        raise ValueError(f"unknown sample kind {kind!r}: use t2i, vlm, edit or text")
    return InterleavedSample(sample_id=sample_id, items=items, dataset=kind)


def random_pack(
    config: BagelConfig, seed: int, num_samples: int = 3, kinds: list[str] | None = None
) -> PackedSequence:
    """Lay out and pack `num_samples` random samples; `kinds` fixes their kinds in order."""
    rng = random.Random(seed)
    layouts = []
    for index in range(num_samples):
        kind = kinds[index] if kinds else None
        sample = random_sample(f"s{seed}-{index}", rng, config, kind)
        layouts.append(layout_sample(sample, config, rng, noise_seed=seed * 1000 + index))
    return pack(layouts)
