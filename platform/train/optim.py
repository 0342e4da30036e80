"""AdamW, the learning-rate schedule and gradient clipping with the global norm over every mesh.

The optimizer and scheduler are torchtitan's containers, so they are `Stateful`
for distributed checkpoints and build their state dicts keyed by parameter name.
"""

import logging
import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from bagel.platform.config import OptimConfig, ScheduleConfig

logger = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, config: OptimConfig, device_type: str):
    """Return a torchtitan `OptimizersContainer` holding one AdamW over the trainable parameters of `model`."""
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    implementation = config.implementation
    if implementation == "fused" and device_type != "cuda":
        logger.warning("optim.implementation='fused' needs CUDA; using 'foreach' on %s", device_type)
        implementation = "foreach"
    container_config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=".*",
                optimizer_name="AdamW",
                optimizer_kwargs={
                    "lr": config.lr,
                    "betas": tuple(config.betas),
                    "eps": config.eps,
                    "weight_decay": config.weight_decay,
                },
            )
        ],
        implementation=implementation,
    )
    return OptimizersContainer(container_config, model_parts=[model])


def build_lr_scheduler(optimizers, config: ScheduleConfig, train_steps: int):
    """Return torchtitan's `LRSchedulersContainer`: linear warm-up, then constant or cosine to min_lr_factor."""
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

    scheduler_config = LRSchedulersContainer.Config(
        warmup_steps=config.warmup_steps,
        total_steps=config.total_steps,
        # A decay phase of zero steps keeps the rate constant after warm-up.
        decay_ratio=0.0 if config.kind == "constant" else None,
        decay_type="cosine",
        min_lr_factor=config.min_lr_factor if config.kind == "cosine" else 1.0,
    )
    return scheduler_config.build(optimizers=optimizers, training_steps=train_steps)


def current_lr(optimizers) -> float:
    """Return the learning rate of the first parameter group (all groups share one schedule)."""
    return float(next(iter(optimizers)).param_groups[0]["lr"])


@torch.no_grad()
def global_grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """Return the L2 norm of all gradients as one vector, identical on every rank.

    Parameters may live on different meshes (TP-sharded linears on (dp, tp),
    norms and the ViT on (dp,) only), and `torch.nn.utils.clip_grad_norm_`
    cannot reduce DTensors of different meshes together. So the norm is taken
    per mesh, each reduced over its own mesh by DTensor, and the squares summed.
    """
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    device = None
    for param in parameters:
        if param.grad is None:
            continue
        grad = param.grad
        key = grad.device_mesh if isinstance(grad, DTensor) else None
        groups[key].append(grad)
        device = grad.device
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    squares = []
    for grads in groups.values():
        # Per-tensor norms accumulate in float64, so the result does not depend
        # on how a layout splits the sums (float32 sums over millions of
        # elements differ by ~1e-6 between shardings).
        norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float64) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms), 2)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm**2)
    return torch.stack(squares).sum().sqrt().float().to(device)


@torch.no_grad()
def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before clipping.

    max_norm 0 only measures. A non-finite norm leaves the gradients untouched
    (the caller skips or stops on it).
    """
    parameters = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(parameters)
    if max_norm > 0 and math.isfinite(total.item()):
        groups: dict[object, list[nn.Parameter]] = defaultdict(list)
        for param in parameters:
            key = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups[key].append(param)
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
