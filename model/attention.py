"""The joint attention over a packed sequence: one call per decoder layer, swappable as a whole.

`joint_attention(q, k, v, mask)` is the default `attention_fn` of every
decoder layer. A trainer may replace it (for example with a context-parallel
wrapper) through `Bagel.set_attention_fn`, keeping the same signature.
"""

import torch
import torch.nn.functional as F

_compiled_flex = None


def _flex_attention():
    """Return FlexAttention, compiled once per process on CUDA (eager is an unfused reference kernel)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        # NOTE: compiled only on CUDA, and not run in this repository's CPU tests.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Attend q [L, Hq, D] to k, v [L, Hkv, D] (GQA: Hq a multiple of Hkv); return [L, Hq, D].

    `mask` is a FlexAttention BlockMask or a boolean [L, L] (True = may
    attend). The softmax scale is 1/sqrt(D) and there is no dropout.
    """
    query = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    key = k.transpose(0, 1).unsqueeze(0)
    value = v.transpose(0, 1).unsqueeze(0)
    if isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    # A BlockMask may cover padded lengths (see build_attention_mask): pad with
    # zeros, which no real token attends to, and drop the padded query rows after.
    q_len, kv_len = mask.seq_lengths
    length = q.shape[0]
    if q_len < length or kv_len < k.shape[0]:
        raise ValueError(
            f"BlockMask covers {q_len} queries x {kv_len} keys but q has {length} rows and k {k.shape[0]}"
        )
    query = F.pad(query, (0, 0, 0, q_len - length))
    key = F.pad(key, (0, 0, 0, kv_len - k.shape[0]))
    value = F.pad(value, (0, 0, 0, kv_len - v.shape[0]))
    out = _flex_attention()(query, key, value, block_mask=mask, enable_gqa=True)
    return out[:, :, :length].squeeze(0).transpose(0, 1)
