"""Process group and device meshes of one training process, built by torchtitan's `ParallelDims`.

Mesh contract (torchtitan's legacy layout, which folds dp_shard and cp into one
"fsdp" axis so FSDP shards parameters over both):

    world = dp_replicate x dp_shard x cp x tp   (tp innermost, so TP stays inside a node)
    dp mesh    ("dp_replicate", "fsdp")  parameters and gradients (HSDP), or ("fsdp",)
    tp mesh    ("tp",)                    tensor-parallel linears
    cp mesh    ("cp",)                    K/V all-gather of context parallelism
    batch mesh ("batch",)                 data-parallel ranks that read different packs
    loss mesh  ("loss",) = batch x cp     ranks whose loss tokens differ (token counts are summed here)
"""

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from bagel.platform.config import ParallelConfig
from bagel.platform.device import DeviceInfo

logger = logging.getLogger(__name__)


@dataclass
class Meshes:
    """The parallel layout of this process."""

    parallel: ParallelConfig  # resolved degrees (dp_shard filled in)
    world_size: int
    rank: int
    dims: object  # torchtitan.distributed.ParallelDims
    dp_mesh: DeviceMesh  # FSDP/HSDP mesh, always present (size 1 on one process)
    tp_mesh: DeviceMesh | None
    cp_mesh: DeviceMesh | None
    loss_group: dist.ProcessGroup | None  # None when the loss mesh has one rank
    dp_rank: int  # this rank's index among the ranks that read different data
    dp_size: int
    cp_rank: int


def init_process_group(device: DeviceInfo, timeout_s: float = 600.0) -> None:
    """Start the default process group; a plain process (no torchrun) becomes a world of one."""
    if dist.is_initialized():
        return
    kwargs = {}
    if "RANK" not in os.environ:
        # One plain process: rendezvous with itself on a free loopback port. The
        # address goes in init_method, not os.environ, so subprocesses started
        # later (tests, launchers) do not inherit a stale rank or port.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        kwargs.update(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device.type == "cuda":
        kwargs["device_id"] = device.device
    dist.init_process_group(backend=device.backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def build_meshes(parallel: ParallelConfig) -> Meshes:
    """Resolve the parallel degrees against the world size and build every mesh of the contract above.

    Call `init_process_group` (and `bagel.platform.device.init_device`) first.
    """
    # ParallelDims gives degree-1 axes the "fake" backend, which this import registers.
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
    from torchtitan.distributed import ParallelDims

    world_size = dist.get_world_size()
    resolved = parallel.resolve(world_size)
    dims = ParallelDims(
        dp_replicate=resolved.dp_replicate,
        dp_shard=resolved.dp_shard,
        cp=resolved.cp,
        tp=resolved.tp,
        pp=1,
        ep=1,
        world_size=world_size,
        spmd_backend="partial_dtensor",
    )
    dims.build_mesh()
    dp_names = ["dp_replicate", "fsdp"] if dims.dp_replicate_enabled else ["fsdp"]
    dp_mesh = dims.get_mesh(dp_names)
    tp_mesh = dims.get_optional_mesh("tp")
    cp_mesh = dims.get_optional_mesh("cp")
    batch_mesh = dims.get_optional_mesh("batch")
    loss_mesh = dims.get_optional_mesh("loss")
    loss_group = loss_mesh.get_group() if loss_mesh is not None and loss_mesh.size() > 1 else None
    meshes = Meshes(
        parallel=resolved,
        world_size=world_size,
        rank=dist.get_rank(),
        dims=dims,
        dp_mesh=dp_mesh,
        tp_mesh=tp_mesh,
        cp_mesh=cp_mesh,
        loss_group=loss_group,
        dp_rank=batch_mesh.get_local_rank() if batch_mesh is not None else 0,
        dp_size=batch_mesh.size() if batch_mesh is not None else 1,
        cp_rank=cp_mesh.get_local_rank() if cp_mesh is not None else 0,
    )
    logger.info(
        "mesh: world %d = dp_replicate %d x dp_shard %d x cp %d x tp %d; this rank reads data shard %d of %d",
        world_size, resolved.dp_replicate, resolved.dp_shard, resolved.cp, resolved.tp, meshes.dp_rank, meshes.dp_size,
    )
    return meshes


def all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `values` in place over `group`; a no-op for None (a group of one)."""
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values
