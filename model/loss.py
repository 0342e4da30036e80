"""Loss sums from one forward pass, and their normalisation into global per-token means.

The model returns sums and token counts (`LossSums`). The trainer all-reduces
the counts of every micro-batch of a step (`all_reduce_token_counts`), and
`normalize` then divides each rank's sums by those global counts. Summing the
normalised terms over data-parallel ranks therefore gives the global
per-token mean, and gradients summed over ranks are the gradient of that mean
(with gradient averaging over W ranks, multiply the loss by W).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class LossSums:
    """Unnormalised losses of one packed sequence."""

    ce_sum: torch.Tensor  # 0-dim float32: sum of next-token CE over CE tokens
    ce_tokens: int  # number of CE tokens in this pack
    mse_sum: torch.Tensor  # 0-dim float32: sum over MSE tokens of the mean squared error over 64 channels
    mse_tokens: int  # number of MSE (noised latent) tokens in this pack


@dataclass
class LossTerms:
    """Normalised losses; a term whose global token count is 0 is None (absent), never NaN or 0."""

    total: torch.Tensor  # 0-dim, finite and differentiable even when both terms are absent
    ce: torch.Tensor | None
    mse: torch.Tensor | None


def normalize(
    sums: LossSums, ce_tokens_global: int, mse_tokens_global: int, ce_weight: float, mse_weight: float
) -> LossTerms:
    """Divide this rank's sums by the global token counts and weight them: total = ce_weight*ce + mse_weight*mse.

    An absent term still enters `total` multiplied by 0, so every parameter
    that produced it gets a (zero) gradient and all ranks run the same backward.
    """
    if ce_tokens_global < sums.ce_tokens or mse_tokens_global < sums.mse_tokens:
        raise ValueError(
            f"global token counts (ce {ce_tokens_global}, mse {mse_tokens_global}) are below this rank's "
            f"(ce {sums.ce_tokens}, mse {sums.mse_tokens}): all-reduce the counts with SUM first"
        )
    ce = sums.ce_sum / ce_tokens_global if ce_tokens_global > 0 else None
    mse = sums.mse_sum / mse_tokens_global if mse_tokens_global > 0 else None
    total = (sums.ce_sum + sums.mse_sum) * 0.0
    if ce is not None:
        total = total + ce_weight * ce
    if mse is not None:
        total = total + mse_weight * mse
    return LossTerms(total=total, ce=ce, mse=mse)


def all_reduce_token_counts(
    ce_tokens: int, mse_tokens: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> tuple[int, int]:
    """Sum (ce_tokens, mse_tokens) over `group`; returns them unchanged without an initialised process group.

    `device` must suit the group's backend (CUDA for NCCL, CPU for gloo).
    """
    if not dist.is_available() or not dist.is_initialized():
        return ce_tokens, mse_tokens
    counts = torch.tensor([ce_tokens, mse_tokens], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return int(counts[0]), int(counts[1])
