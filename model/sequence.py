"""Lay out interleaved samples as BAGEL token sequences and pack them.

One sample becomes a run of splits:
- text item: `[bos] + tokens + [eos]`, one "causal" split, consecutive position
  ids. With `loss`, the positions bos .. last token predict tokens + [eos].
- ViT image: `[start_of_image] + patches + [end_of_image]`, one "full" split.
- VAE image: `[start_of_image] + latent tokens + [end_of_image]`, one "noise"
  split when noised (MSE loss on its latent tokens), else one "full" split.

Position ids (1D RoPE) restart at 0 per sample. Every token of an image,
markers included, shares one id. The counter then advances by 1, except after
a noised VAE image, so that the clean/ViT copy that follows reuses its id. A
CFG-dropped image still advances the counter; a dropped text item does not
(the released BAGEL data code behaves the same way).

Randomness: walking the items in order, `rng` makes one uniform draw per
CFG-droppable item (drop or keep) and one standard-normal draw per noised VAE
image (its timestep logit). `noise_seed` derives one seed per VAE image for
its posterior sample and its flow-matching noise.
"""

import random
from dataclasses import dataclass, field

import torch

from bagel.model.configs import BagelConfig
from bagel.model.inputs import ImageItem, ImageRole, InterleavedSample, PackedSequence, TextItem

CAUSAL, FULL, NOISE = "causal", "full", "noise"
ATTN_MODES = (CAUSAL, FULL, NOISE)

# Keys of PackedSequence.cfg_dropped.
CFG_TEXT, CFG_VIT, CFG_VAE = "text", "vit", "vae"

_SEED_MASK = (1 << 63) - 1


def derive_seed(seed: int, stream: int) -> int:
    """Mix `seed` and a stream number into an independent 63-bit seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + stream + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _SEED_MASK


@dataclass
class SampleLayout:
    """One sample laid out as tokens; every index is local to the sample (0 .. num_tokens-1)."""

    sample_id: str
    num_tokens: int
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_indexes: list[int] = field(default_factory=list)
    vit_patch_dim: int = 0
    vit_patches: list[torch.Tensor] = field(default_factory=list)  # per image: float [n_i, vit_patch_dim]
    vit_position_ids: list[int] = field(default_factory=list)
    vit_token_seqlens: list[int] = field(default_factory=list)
    vit_indexes: list[int] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)
    vae_latent_grids: list[tuple[int, int]] = field(default_factory=list)
    vae_indexes: list[int] = field(default_factory=list)
    vae_position_ids: list[int] = field(default_factory=list)
    vae_timestep_logits: list[float] = field(default_factory=list)
    vae_noise_seeds: list[int] = field(default_factory=list)
    ce_indexes: list[int] = field(default_factory=list)
    ce_labels: list[int] = field(default_factory=list)
    mse_indexes: list[int] = field(default_factory=list)
    cfg_dropped: dict[str, int] = field(default_factory=dict)


def _check_pixels(pixels: torch.Tensor, channels: int) -> None:
    if pixels.dim() != 3 or pixels.shape[0] != channels:
        raise ValueError(f"image tensor has shape {tuple(pixels.shape)}: expected [{channels}, H, W]")


def vit_grid(pixels: torch.Tensor, config: BagelConfig) -> tuple[int, int]:
    """Return (rows, cols) of ViT patches for an image [3, H, W]; raise ValueError if it does not fit."""
    _check_pixels(pixels, config.vit.num_channels)
    _, height, width = pixels.shape
    patch = config.vit.patch_size
    if height % patch or width % patch:
        raise ValueError(f"ViT image of {height}x{width} px is not a multiple of the patch size {patch}: resize it")
    rows, cols = height // patch, width // patch
    side = config.vit_max_num_patch_per_side
    if rows > side or cols > side:
        raise ValueError(
            f"ViT image of {height}x{width} px has {rows}x{cols} patches, more than "
            f"vit_max_num_patch_per_side={side}: resize it to at most {side * patch} px per side"
        )
    return rows, cols


def latent_grid(pixels: torch.Tensor, config: BagelConfig) -> tuple[int, int]:
    """Return (rows, cols) of 2x2 latent patches for an image [3, H, W]; raise ValueError if it does not fit."""
    _check_pixels(pixels, config.vae.in_channels)
    _, height, width = pixels.shape
    stride = config.latent_downsample
    if height % stride or width % stride:
        raise ValueError(f"VAE image of {height}x{width} px is not a multiple of {stride} px: resize it")
    rows, cols = height // stride, width // stride
    side = config.max_latent_size
    if rows > side or cols > side:
        raise ValueError(
            f"VAE image of {height}x{width} px has {rows}x{cols} latent patches, more than "
            f"max_latent_size={side}: resize it to at most {side * stride} px per side"
        )
    return rows, cols


def patchify_vit(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut [C, H, W] into patches [rows*cols, patch*patch*C], each flattened in (row, col, channel) order."""
    channels, height, width = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixels.reshape(channels, rows, patch_size, cols, patch_size)
    x = x.permute(1, 3, 2, 4, 0)  # (rows, cols, p, q, c)
    return x.reshape(rows * cols, patch_size * patch_size * channels)


def grid_position_ids(rows: int, cols: int, side: int) -> list[int]:
    """Flattened ids r * side + c of a rows x cols grid in the top-left corner of a side x side table."""
    return [r * side + c for r in range(rows) for c in range(cols)]


def _item_tokens(item: TextItem | ImageItem, config: BagelConfig) -> int:
    if isinstance(item, TextItem):
        return len(item.token_ids) + 2
    if item.role is ImageRole.VIT:
        rows, cols = vit_grid(item.pixels, config)
    else:
        rows, cols = latent_grid(item.pixels, config)
    return rows * cols + 2


def estimate_tokens(sample: InterleavedSample, config: BagelConfig) -> int:
    """Return the exact token count of `sample` when no item is CFG-dropped (an upper bound otherwise)."""
    return sum(_item_tokens(item, config) for item in sample.items)


def _drop_probability(item: TextItem | ImageItem, config: BagelConfig) -> tuple[str, float]:
    if isinstance(item, TextItem):
        return CFG_TEXT, config.text_cond_dropout_prob
    if item.role is ImageRole.VIT:
        return CFG_VIT, config.vit_cond_dropout_prob
    return CFG_VAE, config.vae_cond_dropout_prob


def layout_sample(
    sample: InterleavedSample, config: BagelConfig, rng: random.Random, noise_seed: int
) -> SampleLayout:
    """Lay out one sample: CFG dropout, splits, position ids, ViT patches, latent grids and loss positions.

    Raises ValueError for an item that cannot be laid out (a loss-carrying item
    marked CFG-droppable, an image that does not fit the position tables, an
    empty sample).
    """
    special = config.special_tokens
    layout = SampleLayout(sample_id=sample.sample_id, num_tokens=0, vit_patch_dim=config.vit.patch_dim)
    curr = 0  # next token index within the sample
    rope_id = 0  # next RoPE position id

    for item_index, item in enumerate(sample.items):
        if item.cfg_droppable and item.loss:
            raise ValueError(
                f"sample {sample.sample_id!r} item {item_index} carries a loss and is CFG-droppable: "
                "only conditions (no loss) may be dropped"
            )
        if item.cfg_droppable:
            kind, probability = _drop_probability(item, config)
            if rng.random() < probability:
                layout.cfg_dropped[kind] = layout.cfg_dropped.get(kind, 0) + 1
                if isinstance(item, ImageItem):
                    rope_id += 1
                continue

        if isinstance(item, TextItem):
            tokens = [special.bos, *item.token_ids, special.eos]
            length = len(tokens)
            layout.text_ids.extend(tokens)
            layout.text_indexes.extend(range(curr, curr + length))
            if item.loss:
                # Inputs bos .. last token predict tokens + [eos]; the eos input predicts nothing.
                layout.ce_indexes.extend(range(curr, curr + length - 1))
                layout.ce_labels.extend(tokens[1:])
            layout.position_ids.extend(range(rope_id, rope_id + length))
            layout.split_lens.append(length)
            layout.attn_modes.append(CAUSAL)
            rope_id += length
            curr += length
            continue

        if not isinstance(item, ImageItem):
            raise ValueError(f"sample {sample.sample_id!r} item {item_index} has unknown type {type(item).__name__}")

        # Image: [start_of_image] + tokens + [end_of_image], all at position rope_id.
        if item.role is ImageRole.VIT:
            rows, cols = vit_grid(item.pixels, config)
        else:
            rows, cols = latent_grid(item.pixels, config)
        count = rows * cols
        length = count + 2
        layout.text_ids.append(special.start_of_image)
        layout.text_indexes.append(curr)
        token_positions = range(curr + 1, curr + 1 + count)
        layout.text_ids.append(special.end_of_image)
        layout.text_indexes.append(curr + 1 + count)

        if item.role is ImageRole.VIT:
            layout.vit_patches.append(patchify_vit(item.pixels, config.vit.patch_size))
            layout.vit_position_ids.extend(grid_position_ids(rows, cols, config.vit_max_num_patch_per_side))
            layout.vit_token_seqlens.append(count)
            layout.vit_indexes.extend(token_positions)
            layout.attn_modes.append(FULL)
            advance = 1
        else:
            noised = item.role is ImageRole.VAE_NOISED
            layout.vae_images.append(item.pixels)
            layout.vae_latent_grids.append((rows, cols))
            layout.vae_indexes.extend(token_positions)
            layout.vae_position_ids.extend(grid_position_ids(rows, cols, config.max_latent_size))
            logit = rng.gauss(0.0, 1.0) if noised else float("-inf")
            layout.vae_timestep_logits.extend([logit] * count)
            layout.vae_noise_seeds.append(derive_seed(noise_seed, item_index))
            if noised:
                layout.mse_indexes.extend(token_positions)
            layout.attn_modes.append(NOISE if noised else FULL)
            advance = 0 if noised else 1

        layout.position_ids.extend([rope_id] * length)
        layout.split_lens.append(length)
        rope_id += advance
        curr += length

    if curr == 0:
        raise ValueError(f"sample {sample.sample_id!r} has no tokens after CFG dropout: give it at least one item")
    layout.num_tokens = curr
    return layout


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def pack(layouts: list[SampleLayout]) -> PackedSequence:
    """Concatenate sample layouts into one PackedSequence, shifting every index by the sample's offset."""
    if not layouts:
        raise ValueError("pack() needs at least one sample layout")
    patch_dims = {layout.vit_patch_dim for layout in layouts}
    if len(patch_dims) != 1:
        raise ValueError(f"sample layouts come from different ViT configs (patch dims {sorted(patch_dims)})")
    patch_dim = patch_dims.pop()

    text_ids, text_indexes, vit_indexes, vae_indexes = [], [], [], []
    ce_indexes, ce_labels, mse_indexes = [], [], []
    position_ids, split_lens, attn_modes = [], [], []
    vit_patches, vit_position_ids, vit_token_seqlens = [], [], []
    vae_images, vae_grids, vae_position_ids, vae_logits, vae_seeds = [], [], [], [], []
    cfg_dropped: dict[str, int] = {}

    offset = 0
    for layout in layouts:
        text_ids += layout.text_ids
        text_indexes += [i + offset for i in layout.text_indexes]
        vit_indexes += [i + offset for i in layout.vit_indexes]
        vae_indexes += [i + offset for i in layout.vae_indexes]
        ce_indexes += [i + offset for i in layout.ce_indexes]
        mse_indexes += [i + offset for i in layout.mse_indexes]
        ce_labels += layout.ce_labels
        position_ids += layout.position_ids
        split_lens += layout.split_lens
        attn_modes += layout.attn_modes
        vit_patches += layout.vit_patches
        vit_position_ids += layout.vit_position_ids
        vit_token_seqlens += layout.vit_token_seqlens
        vae_images += layout.vae_images
        vae_grids += layout.vae_latent_grids
        vae_position_ids += layout.vae_position_ids
        vae_logits += layout.vae_timestep_logits
        vae_seeds += layout.vae_noise_seeds
        for kind, count in layout.cfg_dropped.items():
            cfg_dropped[kind] = cfg_dropped.get(kind, 0) + count
        offset += layout.num_tokens

    return PackedSequence(
        sample_lens=[layout.num_tokens for layout in layouts],
        split_lens=split_lens,
        attn_modes=attn_modes,
        sample_ids=[layout.sample_id for layout in layouts],
        position_ids=_long(position_ids),
        text_ids=_long(text_ids),
        text_indexes=_long(text_indexes),
        vit_patches=torch.cat(vit_patches) if vit_patches else torch.zeros(0, patch_dim),
        vit_position_ids=_long(vit_position_ids),
        vit_token_seqlens=_long(vit_token_seqlens),
        vit_indexes=_long(vit_indexes),
        vae_images=vae_images,
        vae_latent_grids=vae_grids,
        vae_indexes=_long(vae_indexes),
        vae_position_ids=_long(vae_position_ids),
        vae_timestep_logits=torch.tensor(vae_logits, dtype=torch.float32),
        vae_noise_seeds=vae_seeds,
        ce_indexes=_long(ce_indexes),
        ce_labels=_long(ce_labels),
        mse_indexes=_long(mse_indexes),
        cfg_dropped=cfg_dropped,
    )
