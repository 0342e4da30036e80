"""`Stateful` adapters for what a training checkpoint contains.

DCP saves a dict of `Stateful` objects: it calls `state_dict()` on save and
`state_dict()` then `load_state_dict()` on load. Values that are DTensors
(FSDP2/TP-sharded parameters and optimizer moments) are stored once with their
global shape, so a different world size or parallel layout reshards them on
load. Plain values whose key is the same on every rank are stored once (DCP
keeps one copy per key), so per-rank values (data-loader positions, RNG
states) go through `PerRankState`, which keys them by rank.
"""

import io
import logging
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from bagel.platform.exit_codes import UsageError

logger = logging.getLogger(__name__)

# Name segments that module wrappers insert into parameter names: activation
# checkpointing (torch's checkpoint_wrapper), torch.compile and FSDP1.
WRAPPER_SEGMENTS = (_CHECKPOINT_WRAPPED_MODULE, "_orig_mod", "_fsdp_wrapped_module")


def clean_fqn(name: str) -> str:
    """Return a parameter or buffer name without wrapper segments, as checkpoints key it.

    `language_model.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`
    becomes `language_model.model.layers.0.mlp.up_proj.weight`, so a checkpoint
    saved with activation checkpointing or compile on loads with them off, and
    the other way round. torch's `get_model_state_dict` applies the same rule
    to the model and optimizer states; everything else keyed by parameter names
    (the EMA, promotion) uses this function.
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


class ModelState(Stateful):
    """A module's parameters and persistent buffers under canonical FQNs (wrapper prefixes such as
    `_checkpoint_wrapped_module` and `_orig_mod` removed), as DTensors when the module is sharded."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter FQN (not by index), so it reshards with the model."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


@dataclass
class TrainProgress(Stateful):
    """Training counters, identical on every rank."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # tokens consumed over all ranks
    # JSON of the stage's first logged step ({"step", "loss", "ce", "mse"}), so a
    # resumed stage still reports its first loss, not the resumed attempt's.
    first_step_json: str = ""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.first_step_json = str(state_dict.get("first_step_json", ""))


class RNGState(Stateful):
    """This process's Python, torch CPU and (when present) CUDA generator states."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        torch.set_rng_state(state_dict["torch_cpu"])
        if "torch_cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["torch_cuda"])

    def load_resharded_state_dicts(self, state_dicts: list[dict[str, Any]], rank: int) -> None:
        """Take rank `rank % saved size`'s states: a resharded run cannot replay the old random streams anyway."""
        self.load_state_dict(state_dicts[rank % len(state_dicts)])


class ReshardableState(Protocol):
    """Interface of a per-rank state that can resume under a different number of ranks."""

    def load_resharded_state_dicts(self, state_dicts: list[dict[str, Any]], rank: int) -> None:
        """Restore this rank from all the saved ranks' states (index = saved rank)."""


_RANK_KEY = re.compile(r"^rank(\d+)$")


class PerRankState(Stateful):
    """Save one state per rank, keyed `rank{r}`, and restore it under the same or a different rank count.

    `inner.state_dict()` is serialised to bytes so that its structure may
    differ between ranks. Resumed with the same `size`, each rank loads its
    own entry. With a different `size`, every rank receives all saved entries
    and `inner.load_resharded_state_dicts(states, rank)` decides (e.g. the data
    loader reshards its positions); an `inner` without that method raises
    UsageError, because silently restarting it would repeat or skip data.
    """

    def __init__(self, name: str, inner: Any, rank: int, size: int) -> None:
        self.name = name  # key in the states dict, used in messages
        self.inner = inner
        self.rank = rank
        self.size = size
        self.saved_size: int | None = None  # set by the checkpoint manager before a load

    def state_dict(self) -> dict[str, Any]:
        if self.saved_size is not None and self.saved_size != self.size:
            return {f"rank{r}": b"" for r in range(self.saved_size)}
        return {f"rank{self.rank}": _to_bytes(self.inner.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_size = self.saved_size if self.saved_size is not None else self.size
        self.saved_size = None
        if saved_size == self.size:
            self.inner.load_state_dict(_from_bytes(state_dict[f"rank{self.rank}"]))
            return
        if not hasattr(self.inner, "load_resharded_state_dicts"):
            raise UsageError(
                f"state {self.name!r} was saved by {saved_size} ranks and cannot be restored on {self.size}: "
                f"{type(self.inner).__name__} does not support resharding. Resume with {saved_size} ranks, "
                f"or start the stage fresh from its initial checkpoint"
            )
        states = [_from_bytes(state_dict[f"rank{r}"]) for r in range(saved_size)]
        logger.warning("resharding %s: saved by %d ranks, resuming on %d", self.name, saved_size, self.size)
        self.inner.load_resharded_state_dicts(states, self.rank)


def saved_rank_count(checkpoint_keys: list[str], name: str) -> int | None:
    """Return how many `rank{r}` entries `name` has among the checkpoint's flattened keys (None: absent)."""
    prefix = f"{name}."
    ranks = [int(m.group(1)) for key in checkpoint_keys if key.startswith(prefix) if (m := _RANK_KEY.match(key[len(prefix):]))]
    return max(ranks) + 1 if ranks else None


def _to_bytes(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    # weights_only=False: the bytes come from this project's own checkpoints
    # and may hold Python objects (e.g. random.getstate() tuples).
    return torch.load(io.BytesIO(data), weights_only=False)
