"""Exponential moving average of the trainable weights, fp32, sharded exactly like the model.

After every optimizer step: ema <- decay * ema + (1 - decay) * weight, on each
rank's local shards only (no communication). The shadow tensors are DTensors
with the parameters' placements, so a distributed checkpoint saves and
reshards them like the model.
"""

import logging

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from bagel.platform.checkpoint.states import clean_fqn

logger = logging.getLogger(__name__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ModelEMA:
    """fp32 EMA of the parameters of `model` with requires_grad; a `Stateful` for checkpoints."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} is invalid: use a value in (0, 1)")
        self.decay = decay
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                name = clean_fqn(name)
                self.names.append(name)
                self.params.append(param)
                self.shadow[name] = param.detach().to(torch.float32, copy=True)
        self._shadow_locals = [_local(self.shadow[name]) for name in self.names]
        self._param_locals = [_local(param) for param in self.params]
        logger.info("EMA of %d trainable tensors, decay %s", len(self.names), decay)

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow tensor towards its parameter by (1 - decay)."""
        params = [p if p.dtype == torch.float32 else p.float() for p in self._param_locals]
        torch._foreach_lerp_(self._shadow_locals, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state_dict))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                _local(tensor).copy_(_local(state_dict[name]))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the trainable parameters of `model` with the EMA weights."""
        params = {clean_fqn(name): param for name, param in model.named_parameters()}
        for name in self.names:
            _local(params[name]).copy_(_local(self.shadow[name]))
