"""Context parallelism for packed sequences under BAGEL's generalized causal mask.

Every rank of a cp group receives the same pack. The embeddings (text, ViT,
latents) are computed for the whole pack on each cp rank, which is cheap next
to the decoder; the decoder stack then runs on this rank's contiguous chunk of
rows only:

- rows [start, end) of inputs, position ids and routing, and rows
  [start, end) of the mask (queries) against all L keys;
- in each attention call, K and V of all chunks are all-gathered along cp
  (differentiable: the backward sums the K/V gradients of every chunk's
  queries), as torchtitan's FlexAttention CP does;
- the decoder output is zero outside the chunk, and `shard_loss_positions`
  keeps only the CE/MSE positions inside the chunk, so the cp ranks' loss
  sums add up to the pack's loss and FSDP's gradient sum over the "fsdp" axis
  (dp_shard x cp) assembles the full gradient.

Chunks follow torch.tensor_split: the first L % cp chunks hold one row more.
On CPU the mask is dense boolean rows; on CUDA a FlexAttention BlockMask with
the query offset folded into its mask_mod.
"""

import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from bagel.model.inputs import PackedSequence
from bagel.model.llm import Routing

logger = logging.getLogger(__name__)


def chunk_bounds(length: int, cp: int, rank: int) -> tuple[int, int]:
    """Return [start, end) of chunk `rank` when `length` rows are split into `cp` chunks (tensor_split sizes)."""
    base, extra = divmod(length, cp)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_loss_positions(packed: PackedSequence, cp: int, rank: int) -> PackedSequence:
    """Return a copy of `packed` whose ce/mse positions are restricted to this rank's chunk."""
    start, end = chunk_bounds(packed.length, cp, rank)
    ce_keep = (packed.ce_indexes >= start) & (packed.ce_indexes < end)
    mse_keep = (packed.mse_indexes >= start) & (packed.mse_indexes < end)
    return dataclasses.replace(
        packed,
        ce_indexes=packed.ce_indexes[ce_keep],
        ce_labels=packed.ce_labels[ce_keep],
        mse_indexes=packed.mse_indexes[mse_keep],
    )


class _GatherRows(torch.autograd.Function):
    """All-gather [n_r, ...] chunks of unequal length along dim 0; backward sums and returns this rank's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        width = max(sizes)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = local.new_empty((len(sizes) * width, *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        pieces = [gathered[r * width : r * width + n] for r, n in enumerate(sizes)]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # Every rank's queries produced gradients for every chunk's keys: sum them.
        # (all_reduce rather than reduce_scatter because gloo lacks reduce_scatter_tensor.)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


class _ChunkState:
    """The chunk of the forward pass in progress (set by the decoder wrapper, read by attention)."""

    sizes: list[int] = []
    start: int = 0
    end: int = 0


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Run `model.language_model.model` on this rank's chunk and attention against all-gathered K/V."""
    group = cp_mesh.get_group()
    cp = cp_mesh.size()
    rank = cp_mesh.get_local_rank()
    state = _ChunkState()
    decoder = model.language_model.model
    original_forward = decoder.forward
    flex_cache: dict[str, object] = {}

    def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        from bagel.model.attention import joint_attention

        k_all = _GatherRows.apply(k.contiguous(), group, state.sizes, rank)
        v_all = _GatherRows.apply(v.contiguous(), group, state.sizes, rank)
        return joint_attention(q, k_all, v_all, mask)

    def local_mask(mask, length: int):
        if isinstance(mask, torch.Tensor):
            return mask[state.start : state.end]
        # Hold the mask object itself: an id() could be reused by the next pack's mask.
        if flex_cache.get("mask") is not mask:
            from torch.nn.attention.flex_attention import create_block_mask

            mask_mod, offset = mask.mask_mod, state.start

            def shifted(b, h, q_idx, kv_idx):
                return mask_mod(b, h, q_idx + offset, kv_idx)

            flex_cache["mask"] = mask
            flex_cache["local"] = create_block_mask(
                shifted, B=None, H=None, Q_LEN=state.end - state.start, KV_LEN=length,
                device=q_device(mask), BLOCK_SIZE=mask.BLOCK_SIZE,
            )
        return flex_cache["local"]

    def q_device(mask):
        return mask.kv_num_blocks.device

    def cp_forward(inputs_embeds: torch.Tensor, position_ids: torch.Tensor, routing: Routing | None, mask):
        length = inputs_embeds.shape[0]
        state.sizes = [chunk_bounds(length, cp, r)[1] - chunk_bounds(length, cp, r)[0] for r in range(cp)]
        state.start, state.end = chunk_bounds(length, cp, rank)
        start, end = state.start, state.end
        local_routing = None
        if routing is not None:
            gen = routing.gen_indexes
            local_gen = gen[(gen >= start) & (gen < end)] - start
            local_routing = Routing.from_gen_indexes(end - start, local_gen)
        local = original_forward(
            inputs_embeds[start:end], position_ids[start:end], local_routing, local_mask(mask, length)
        )
        before = local.new_zeros((start, local.shape[1]))
        after = local.new_zeros((length - end, local.shape[1]))
        return torch.cat([before, local, after])

    decoder.forward = cp_forward
    model.set_attention_fn(cp_attention)
    logger.info("applied context parallelism (cp=%d): this rank runs chunk %d of each pack", cp, rank)
