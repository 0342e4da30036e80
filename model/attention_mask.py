"""BAGEL's generalized causal mask, as a dense boolean matrix (SDPA) or a FlexAttention BlockMask.

Query q may attend to key k iff all three hold:
1. same sample: attention never crosses packed samples;
2. q >= k, or q and k lie in the same "full"/"noise" split (images are
   bidirectional inside themselves, text is causal);
3. if k lies in a "noise" split, q lies in that same split, so a noised image
   is visible only to itself and later tokens see its clean/ViT copy instead.
Every query may attend to itself, so no row of the mask is empty.
"""

from dataclasses import dataclass

import torch

from bagel.model.sequence import ATTN_MODES, CAUSAL, FULL, NOISE

_MODE_CODE = {mode: code for code, mode in enumerate(ATTN_MODES)}


@dataclass
class MaskStructure:
    """Per-token ids that define the mask; each a long tensor [L] on the attention device."""

    sample_id: torch.Tensor
    split_id: torch.Tensor
    split_mode: torch.Tensor  # _MODE_CODE of the token's split


def mask_structure(
    sample_lens: list[int], split_lens: list[int], attn_modes: list[str], device: torch.device | str = "cpu"
) -> MaskStructure:
    """Expand sample and split lengths into per-token ids; raise ValueError if they disagree."""
    if len(split_lens) != len(attn_modes):
        raise ValueError(f"{len(split_lens)} split_lens but {len(attn_modes)} attn_modes: they must pair up")
    unknown = sorted(set(attn_modes) - set(ATTN_MODES))
    if unknown:
        raise ValueError(f"unknown attention modes {unknown}: use {ATTN_MODES}")
    if sum(sample_lens) != sum(split_lens):
        raise ValueError(f"sample_lens sum to {sum(sample_lens)} but split_lens to {sum(split_lens)}")
    sample_id = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens, dtype=torch.long))
    split_id = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens, dtype=torch.long))
    codes = torch.tensor([_MODE_CODE[mode] for mode in attn_modes], dtype=torch.long)
    split_mode = codes[split_id]
    # A split must not straddle two samples.
    starts = torch.cumsum(torch.tensor([0] + split_lens[:-1], dtype=torch.long), 0)
    ends = starts + torch.tensor(split_lens, dtype=torch.long) - 1
    if len(split_lens) and not torch.equal(sample_id[starts], sample_id[ends.clamp(min=0)]):
        raise ValueError("a split crosses a sample boundary: split_lens must subdivide sample_lens")
    return MaskStructure(sample_id.to(device), split_id.to(device), split_mode.to(device))


def allowed(structure: MaskStructure, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Evaluate the mask rule for broadcastable query/key position tensors."""
    same_sample = structure.sample_id[q_idx] == structure.sample_id[kv_idx]
    same_split = structure.split_id[q_idx] == structure.split_id[kv_idx]
    key_mode = structure.split_mode[kv_idx]
    bidirectional = (key_mode == _MODE_CODE[FULL]) | (key_mode == _MODE_CODE[NOISE])
    visible = (q_idx >= kv_idx) | (same_split & bidirectional)
    not_hidden = (key_mode != _MODE_CODE[NOISE]) | same_split
    return same_sample & visible & not_hidden


def dense_mask(structure: MaskStructure) -> torch.Tensor:
    """Return the boolean mask [L, L] (True = may attend) for scaled_dot_product_attention."""
    length = structure.sample_id.numel()
    positions = torch.arange(length, device=structure.sample_id.device)
    return allowed(structure, positions[:, None], positions[None, :])


def block_mask(structure: MaskStructure, block_size: int = 128, compile_mask: bool = False):
    """Return a FlexAttention BlockMask with the same rule (batch and heads broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(structure, q_idx, kv_idx)

    length = structure.sample_id.numel()
    return create_block_mask(
        mask_mod,
        B=None,
        H=None,
        Q_LEN=length,
        KV_LEN=length,
        device=structure.sample_id.device,
        BLOCK_SIZE=block_size,
        _compile=compile_mask,
    )


def resolve_backend(attn_backend: str, device: torch.device) -> str:
    """Map "auto" to "flex" on CUDA and "sdpa" elsewhere (FlexAttention has no CPU backward in torch 2.13)."""
    if attn_backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if attn_backend not in ("flex", "sdpa"):
        raise ValueError(f"attn_backend={attn_backend!r} is invalid: use 'auto', 'flex' or 'sdpa'")
    return attn_backend


def flex_padded_length(length: int, block_size: int, pad_to: int = 0) -> int:
    """Return the sequence length FlexAttention runs at: `pad_to` if it fits, else `length` rounded up to blocks."""
    if pad_to >= length:
        return pad_to
    return -(-length // block_size) * block_size


def build_attention_mask(
    sample_lens: list[int],
    split_lens: list[int],
    attn_modes: list[str],
    backend: str,
    device: torch.device | str,
    block_size: int = 128,
    pad_to: int = 0,
):
    """Build the mask for `backend` ("flex" -> BlockMask, "sdpa" -> bool [L, L]).

    For flex the mask covers flex_padded_length(L, block_size, pad_to) tokens.
    The padding forms one extra causal sample, so real tokens never attend to
    it, and `joint_attention` zero-pads q/k/v to that length and drops the
    padded rows. A fixed `pad_to` gives compiled FlexAttention one static shape.
    """
    if backend == "sdpa":
        return dense_mask(mask_structure(sample_lens, split_lens, attn_modes, device))
    if backend != "flex":
        raise ValueError(f"attention backend {backend!r} is invalid: use 'flex' or 'sdpa'")
    length = sum(sample_lens)
    padding = flex_padded_length(length, block_size, pad_to) - length
    if padding:
        sample_lens = [*sample_lens, padding]
        split_lens = [*split_lens, padding]
        attn_modes = [*attn_modes, CAUSAL]
    structure = mask_structure(sample_lens, split_lens, attn_modes, device)
    return block_mask(structure, block_size, compile_mask=torch.device(device).type == "cuda")
