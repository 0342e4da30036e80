"""Image decoding and the per-role resize (BAGEL's ImageTransform, minus its faults).

An image becomes a float tensor [3, H, W] in [-1, 1] (mean = std = 0.5) with H
and W multiples of the role's stride and within the model's position tables.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bagel.model.inputs import ImageRole
from bagel.platform.data.config import ImageTransformConfig


class SampleError(Exception):
    """A sample that cannot be used; `reason` names the metric it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RoleLimits:
    """Model limits for one image role."""

    stride: int  # px per token side (ViT patch, or VAE downsample x latent patch)
    max_side: int  # px; the position table's extent


def model_limits(model_config) -> dict[ImageRole, RoleLimits]:
    """Strides and maximum sides per role from a BagelConfig."""
    vit_patch = int(model_config.vit.patch_size)
    vit_side = int(model_config.vit_max_num_patch_per_side) * vit_patch
    vae_stride = int(model_config.latent_downsample)
    vae_side = int(model_config.max_latent_size) * vae_stride
    vae = RoleLimits(vae_stride, vae_side)
    return {ImageRole.VIT: RoleLimits(vit_patch, vit_side), ImageRole.VAE_NOISED: vae, ImageRole.VAE_CLEAN: vae}


def decode_image(data: bytes):
    """Decode encoded image bytes to an RGB PIL image; raises SampleError on bad or empty images."""

    if not data:
        raise SampleError("zero_size_image", "empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as error:
        raise SampleError("image_too_large", str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise SampleError("corrupt_image", str(error)) from error
    if image.width == 0 or image.height == 0:
        raise SampleError("zero_size_image", f"{image.width}x{image.height}")
    return image.convert("RGB")


def target_size(
    width: int, height: int, cfg: ImageTransformConfig, limits: RoleLimits, num_images: int, shrink: float = 1.0
) -> tuple[int, int]:
    """Compute (width, height) after the resize rules: both multiples of the stride, at least one stride.

    `shrink` (<= 1) scales the result down further, past min_side, so that a
    sample fits the per-sample token cap.
    """
    stride = cfg.stride or limits.stride
    max_side = min(cfg.max_side or limits.max_side, limits.max_side)
    scale = 1.0
    if max(width, height) * scale > max_side:
        scale = max_side / max(width, height)
    if cfg.min_side and min(width, height) * scale < cfg.min_side:
        scale = cfg.min_side / min(width, height)  # the minimum wins, as in BAGEL
    if cfg.max_pixels:
        budget = cfg.max_pixels / max(1, num_images)
        if width * height * scale * scale > budget:
            scale = math.sqrt(budget / (width * height))
    scale *= shrink
    w = max(stride, int(round(width * scale / stride)) * stride)
    h = max(stride, int(round(height * scale / stride)) * stride)
    # The model's table is a hard limit, whatever min_side asked for.
    cap = (limits.max_side // stride) * stride
    return min(w, cap), min(h, cap)


# value / 127.5 - 1.0 for every uint8 value, computed in float32 by the same
# numpy operations as an elementwise conversion, so a lookup gives the same bits.
_NORMALISED = np.arange(256, dtype=np.float32) / 127.5 - 1.0


def to_tensor(image, size: tuple[int, int]) -> torch.Tensor:
    """Resize (bicubic, antialiased) and normalise: float [3, H, W] in [-1, 1].

    A downscale runs torch's uint8 antialiased bicubic kernel, the filter of
    PIL's `Image.resize(BICUBIC)` (a = -0.5, support widened by the downscale
    factor), about 3.5x faster than PIL on one thread. The two round a few
    values differently: at most 1 of 255 levels, in under 0.5% of them
    (tests/test_data_transforms.py checks that bound). Upscaling differs more
    between the two (up to 8 levels), and it is rare and cheap, so any size
    that grows along either axis goes through PIL itself.
    """
    width, height = size
    if image.size != size and (width > image.width or height > image.height):
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)

    # [H, W, 3] uint8 viewed as [1, 3, H, W] channels-last, the layout of the vectorised kernel.
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    if image.size != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True)

    # Map each byte through the table, because uint8 is a quarter of the bytes
    # of float32 and a lookup is cheaper than a float conversion. The output is
    # contiguous [3, H, W] float32.
    return torch.from_numpy(np.take(_NORMALISED, pixels[0].numpy()))
