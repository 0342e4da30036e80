"""The one place that decides the compute device and the collective backend.

torchtitan 0.3 picks its device when `torchtitan.tools.utils` is imported and
falls back to "cuda" when no accelerator is visible; several of its modules
copy that value into their own globals at import. `use_torchtitan_on()`
rewrites every copy, so CPU + gloo and CUDA + NCCL run the same code path.
Import torchtitan wherever you like, but call `init_device()` (or
`use_torchtitan_on()`) before building meshes.
"""

import logging
import os
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    device: torch.device  # this process's device (cuda:LOCAL_RANK or cpu)


def detect_device_type() -> str:
    """Return "cuda" when a GPU is visible, else "cpu". BAGEL_DEVICE overrides the choice."""
    requested = os.environ.get("BAGEL_DEVICE")
    if requested:
        if requested not in ("cuda", "cpu"):
            raise ValueError(f"BAGEL_DEVICE={requested!r} is invalid: use 'cuda' or 'cpu'")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_torchtitan_on(device_type: str) -> None:
    """Point torchtitan's import-time device globals at `device_type`.

    Patches `torchtitan.tools.utils` and every already imported torchtitan
    module that copied `device_type`/`device_module` from it.
    """
    import torchtitan.tools.utils as titan_utils

    device_module = getattr(torch, device_type)
    titan_utils.device_type = device_type
    titan_utils.device_module = device_module
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if isinstance(getattr(module, "device_type", None), str):
            module.device_type = device_type
        if hasattr(module, "device_module"):
            module.device_module = device_module


def init_device() -> DeviceInfo:
    """Select this process's device (CUDA: the LOCAL_RANK-th GPU) and configure torchtitan for it."""
    device_type = detect_device_type()
    use_torchtitan_on(device_type)
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return DeviceInfo("cuda", "nccl", torch.device("cuda", local_rank))
    return DeviceInfo("cpu", "gloo", torch.device("cpu"))
