"""The generalized causal mask: rules on a hand-built packing, flex == dense on random packings."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from bagel.model.attention import joint_attention
from bagel.model.attention_mask import (
    block_mask,
    build_attention_mask,
    dense_mask,
    flex_padded_length,
    mask_structure,
    resolve_backend,
)


def _reference_mask(sample_lens, split_lens, attn_modes):
    """Plain-Python statement of the rule, token by token."""
    sample_of, split_of, mode_of = [], [], []
    for index, length in enumerate(sample_lens):
        sample_of += [index] * length
    for index, (length, mode) in enumerate(zip(split_lens, attn_modes)):
        split_of += [index] * length
        mode_of += [mode] * length
    size = len(sample_of)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            if sample_of[q] != sample_of[k]:
                continue
            same_split = split_of[q] == split_of[k]
            if not (q >= k or (same_split and mode_of[k] in ("full", "noise"))):
                continue
            if mode_of[k] == "noise" and not same_split:
                continue
            mask[q, k] = True
    return mask


def _random_packing(rng: random.Random):
    sample_lens, split_lens, attn_modes = [], [], []
    for _ in range(rng.randint(1, 4)):
        total = 0
        for _ in range(rng.randint(1, 5)):
            length = rng.randint(1, 40)
            split_lens.append(length)
            attn_modes.append(rng.choice(["causal", "full", "noise"]))
            total += length
        sample_lens.append(total)
    return sample_lens, split_lens, attn_modes


def test_dense_mask_rules():
    # Sample 0: text(3) causal, noised image(2), clean image(2), text(2); sample 1: text(2).
    sample_lens, split_lens, modes = [9, 2], [3, 2, 2, 2, 2], ["causal", "noise", "full", "causal", "causal"]
    mask = dense_mask(mask_structure(sample_lens, split_lens, modes))
    assert torch.equal(mask, _reference_mask(sample_lens, split_lens, modes))
    assert mask[1, 0]  # causal text
    assert not mask[0, 1]
    assert mask[3, 4]  # the noised image is bidirectional inside
    assert mask[4, 3]
    assert mask[3, 0]  # and attends to the earlier text
    assert not mask[5, 3]  # later tokens never attend to the noised image
    assert not mask[7, 4]
    assert mask[5, 6]  # the clean image is bidirectional and visible later
    assert mask[7, 6]
    assert not mask[9, 8]  # no attention across samples
    assert not mask[9, 0]
    assert bool(mask.diagonal().all())


@pytest.mark.parametrize("seed", range(6))
def test_flex_equals_dense(seed):
    rng = random.Random(seed)
    sample_lens, split_lens, modes = _random_packing(rng)
    structure = mask_structure(sample_lens, split_lens, modes)
    dense = dense_mask(structure)
    assert torch.equal(dense, _reference_mask(sample_lens, split_lens, modes))

    blocks = block_mask(structure, block_size=16)
    length = sum(sample_lens)
    positions = torch.arange(length)
    from_mask_mod = blocks.mask_mod(0, 0, positions[:, None], positions[None, :])
    assert torch.equal(from_mask_mod, dense)
    # The BlockMask's own dense view must cover every allowed pair (partial blocks
    # are re-checked by mask_mod inside the kernel).
    block_view = blocks.to_dense()[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:length, :length]
    assert bool(block_view[dense].all())

    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(length, 4, 8, generator=generator)
    k = torch.randn(length, 2, 8, generator=generator)
    v = torch.randn(length, 2, 8, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused
        flex_out = joint_attention(q, k, v, blocks)
    dense_out = joint_attention(q, k, v, dense)
    torch.testing.assert_close(flex_out, dense_out, atol=1e-5, rtol=1e-5)


def test_dense_attention_matches_per_sample_loop():
    rng = random.Random(11)
    sample_lens, split_lens, modes = _random_packing(rng)
    dense = dense_mask(mask_structure(sample_lens, split_lens, modes))
    length = sum(sample_lens)
    q, k, v = (torch.randn(length, 2, 8) for _ in range(3))
    packed = joint_attention(q, k, v, dense)
    start = 0
    for sample_len in sample_lens:
        rows = slice(start, start + sample_len)
        sub_mask = dense[rows, rows]
        expected = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1), attn_mask=sub_mask
        ).transpose(0, 1)
        torch.testing.assert_close(packed[rows], expected)
        start += sample_len


def test_mask_structure_rejects_bad_splits():
    with pytest.raises(ValueError, match="sum to"):
        mask_structure([5], [2, 2], ["causal", "full"])
    with pytest.raises(ValueError, match="unknown attention modes"):
        mask_structure([2], [2], ["bidirectional"])
    with pytest.raises(ValueError, match="crosses a sample boundary"):
        mask_structure([2, 2], [1, 2, 1], ["causal", "full", "causal"])


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_backend("xformers", torch.device("cpu"))


@pytest.mark.parametrize("pad_to", [0, 200])
def test_padded_flex_equals_dense(pad_to):
    rng = random.Random(40 + pad_to)
    sample_lens, split_lens, modes = _random_packing(rng)
    length = sum(sample_lens)
    blocks = build_attention_mask(sample_lens, split_lens, modes, "flex", "cpu", block_size=16, pad_to=pad_to)
    assert blocks.seq_lengths[0] == flex_padded_length(length, 16, pad_to)
    assert blocks.seq_lengths[0] % 16 == 0 or blocks.seq_lengths[0] == pad_to
    dense = build_attention_mask(sample_lens, split_lens, modes, "sdpa", "cpu")
    q = torch.randn(length, 4, 8)
    k = torch.randn(length, 2, 8)
    v = torch.randn(length, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flex_out = joint_attention(q, k, v, blocks)
    torch.testing.assert_close(flex_out, joint_attention(q, k, v, dense), atol=1e-5, rtol=1e-5)


def test_flex_padded_length():
    assert flex_padded_length(100, 128) == 128
    assert flex_padded_length(128, 128) == 128
    assert flex_padded_length(100, 128, pad_to=1000) == 1000
    assert flex_padded_length(1001, 128, pad_to=1000) == 1024
