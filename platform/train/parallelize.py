"""Apply tensor, context and data parallelism, activation checkpointing and compile to a `Bagel`.

Order (as in torchtitan's qwen3 `parallelize`), each step relying on the previous one:
1. freeze: set requires_grad per stage first, because FSDP units are chosen so
   that no unit mixes frozen and trainable parameters;
2. context parallelism: wrap the decoder stack so each cp rank runs its chunk
   of the sequence and attention all-gathers K/V (plain module methods, so it
   must precede the DTensor wrappers);
3. tensor parallelism: column-wise q/k/v/gate/up and row-wise o/down of both
   experts on the "tp" mesh (before FSDP, which then shards the TP DTensors on
   the dp mesh to 2D);
4. activation checkpointing of each decoder layer and ViT encoder layer
   (before compile and FSDP so the recomputed region covers the whole layer);
5. torch.compile of each decoder layer (CUDA only);
6. FSDP2 `fully_shard`: one unit per decoder layer (both experts together), the
   ViT, the connector, the token embedding, [final norms + lm_head], then the root.

The VAE is not part of `Bagel` and is never sharded.
"""

import logging
import re

import torch
import torch.distributed as dist
import torch.nn as nn

from bagel.platform.config import ConfigError, ParallelConfig, TrainConfig
from bagel.platform.train.mesh import Meshes

logger = logging.getLogger(__name__)


def validate_parallel_shapes(model_config, parallel: ParallelConfig, max_pack_tokens: int | None) -> None:
    """Raise ConfigError when head counts or widths do not divide by tp, or the pack budget by cp."""
    llm = model_config.llm
    tp = parallel.tp
    checks = {
        "llm.num_attention_heads": llm.num_attention_heads,
        "llm.num_key_value_heads": llm.num_key_value_heads,
        "llm.intermediate_size": llm.intermediate_size,
    }
    for name, value in checks.items():
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide model {name}={value}: choose a tp that divides it")
    if max_pack_tokens is not None and max_pack_tokens % parallel.cp:
        raise ConfigError(
            f"parallel.cp={parallel.cp} does not divide data.packing.max_tokens={max_pack_tokens}: "
            "use a pack budget that is a multiple of cp"
        )


def apply_trainable(model: nn.Module, trainable: list[str], frozen: list[str]) -> tuple[int, int]:
    """Set requires_grad from regexes (re.match on parameter names); return (trainable, frozen) element counts."""
    trainable_re = [re.compile(p) for p in trainable]
    frozen_re = [re.compile(p) for p in frozen]
    counts = [0, 0]
    for name, param in model.named_parameters():
        # Parameters built frozen (the sin-cos tables) stay frozen whatever the patterns match.
        built_frozen = getattr(param, "_bagel_built_frozen", None)
        if built_frozen is None:
            built_frozen = not param.requires_grad
            param._bagel_built_frozen = built_frozen
        train = (
            not built_frozen
            and any(r.match(name) for r in trainable_re)
            and not any(r.match(name) for r in frozen_re)
        )
        param.requires_grad_(train)
        counts[0 if train else 1] += param.numel()
    if counts[0] == 0:
        raise ConfigError(f"train.trainable={trainable} with train.frozen={frozen} leaves no parameter to train")
    return counts[0], counts[1]


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Shard both experts' attention and MLP projections of every decoder layer over `tp_mesh`.

    The layer keeps computing on plain tensors: column-wise outputs are the
    local heads (the model reshapes with view(L, -1, head_dim)), and row-wise
    outputs are all-reduced back to full rows. Norms and every other module
    stay unsharded on tp; `optim.global_grad_norm` handles the mixed meshes.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for layer in model.language_model.model.layers:
        plan = {}
        suffixes = ["", "_moe_gen"] if layer.is_mot else [""]
        for suffix in suffixes:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"self_attn.{name}{suffix}"] = ColwiseParallel()
            for name in ("q_norm", "k_norm"):
                if isinstance(getattr(layer.self_attn, name + suffix), nn.Identity):
                    continue
                plan[f"self_attn.{name}{suffix}"] = _head_sharded_norm_style()
            plan[f"self_attn.o_proj{suffix}"] = RowwiseParallel()
            plan[f"mlp{suffix}.gate_proj"] = ColwiseParallel()
            plan[f"mlp{suffix}.up_proj"] = ColwiseParallel()
            plan[f"mlp{suffix}.down_proj"] = RowwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
    logger.info("applied tensor parallelism (tp=%d) to %d decoder layers", tp_mesh.size(), len(model.language_model.model.layers))


def _head_sharded_norm_style():
    from torch.distributed.tensor import DTensor, Shard, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class HeadShardedNorm(ParallelStyle):
        """QK-norm over local heads: replicated weight on tp, input and output sharded on the head dim.

        Each tp rank normalises only its own heads, so its weight gradient is
        partial. Because the weight is a Replicate DTensor, DTensor autograd
        all-reduces that gradient over tp and every tp rank keeps identical weights.
        """

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            def to_dtensor(mod, inputs, mesh):
                return (DTensor.from_local(inputs[0], mesh, [Shard(1)], run_check=False), *inputs[1:])

            def to_local(mod, outputs, mesh):
                return outputs.to_local()

            return distribute_module(module, device_mesh, None, to_dtensor, to_local)

    return HeadShardedNorm()


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each decoder layer and ViT encoder layer with torchtitan's full or selective checkpointing."""
    if mode == "none":
        return
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    policy = FullAC(FullAC.Config()) if mode == "full" else SelectiveAC(SelectiveAC.Config(force_recompute_mm_shapes_by_fqns=[]))
    containers = [
        ("language_model.model.layers", model.language_model.model.layers),
        ("vit_model.vision_model.encoder.layers", model.vit_model.vision_model.encoder.layers),
    ]
    for prefix, layers in containers:
        for index, layer in list(layers.named_children()):
            layers.register_module(index, policy._wrap_block(layer, base_fqn=f"{prefix}.{index}"))
    logger.info("applied %s activation checkpointing", mode)


def apply_compile(model: nn.Module) -> None:
    """Compile each decoder layer in place (module names unchanged)."""
    for layer in model.language_model.model.layers:
        layer.compile(dynamic=True)
    logger.info("compiled %d decoder layers", len(model.language_model.model.layers))


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype, reshard: str) -> list[str]:
    """Shard `model` with FSDP2 units that never mix frozen and trainable parameters; return the unit names.

    Gradients are summed, not averaged, over the dp mesh: the loss is already
    divided by the global token count (token-weighted normalisation).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchtitan.distributed.fsdp import disable_fsdp_gradient_division, get_fsdp_reshard_after_forward_policy

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    reshard_after_forward = get_fsdp_reshard_after_forward_policy(reshard, pp_enabled=False)
    units: list[str] = []

    def shard(name: str, module: nn.Module | list[nn.Module]) -> None:
        modules = module if isinstance(module, list) else [module]
        flags = {p.requires_grad for m in modules for p in m.parameters()}
        if not flags:
            return
        if len(flags) > 1:
            if isinstance(module, list):
                for i, m in enumerate(module):
                    shard(f"{name}[{i}]", m)
                return
            # Mixed unit: shard its children separately; leftovers join the parent unit below.
            for child_name, child in module.named_children():
                shard(f"{name}.{child_name}", child)
            return
        fully_shard(module, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        units.append(name)

    llm = model.language_model.model
    shard("language_model.model.embed_tokens", llm.embed_tokens)
    for index, layer in enumerate(llm.layers):
        shard(f"language_model.model.layers.{index}", layer)
    final = [llm.norm, model.language_model.lm_head]
    if hasattr(llm, "norm_moe_gen"):
        final.insert(1, llm.norm_moe_gen)
    shard("final_norms_and_lm_head", final)
    shard("vit_model", model.vit_model)
    shard("connector", model.connector)
    # The latent path (vae2llm, time_embedder, llm2vae) stays in the root unit;
    # frozen leftovers of the root (the sin-cos tables, or the whole latent path
    # in alignment) are not sharded at all: they are small, need no gradient
    # reduction, and without their own collectives a pack without images
    # cannot desynchronise the ranks.
    leftover = [p for p in model.parameters() if not _is_dtensor(p)]
    ignored = {p for p in leftover if not p.requires_grad}
    fully_shard(
        model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored
    )
    units.append("root")
    disable_fsdp_gradient_division(model)
    if dist.is_initialized() and dist.get_backend() == "gloo":
        # gloo has no PREMUL_SUM/AVG reductions: reduce with SUM (the divide factor is 1 anyway).
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    logger.info("FSDP2 units on mesh %s: %s", dp_mesh.mesh_dim_names, ", ".join(units))
    return units


def _is_dtensor(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def parallelize_bagel(model: nn.Module, meshes: Meshes, train: TrainConfig, device_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """Apply the steps of the module docstring in order; return the same (now sharded) model."""
    from bagel.platform.train.context_parallel import apply_cp
    from bagel.platform.train.participation import install_participation

    apply_trainable(model, train.trainable, train.frozen)
    install_participation(model)
    if meshes.cp_mesh is not None:
        apply_cp(model, meshes.cp_mesh)
    if meshes.tp_mesh is not None:
        apply_tp(model, meshes.tp_mesh)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    if train.compile:
        if device_type == "cuda":
            apply_compile(model)
        else:
            logger.warning("train.compile=true is ignored on %s: compile runs on CUDA only", device_type)
    apply_fsdp(model, meshes.dp_mesh, compute_dtype, torch.float32, meshes.parallel.reshard_after_forward)
    return model
