"""Make every rank run the optional image paths of `Bagel` in every forward pass.

`Bagel.forward` runs the ViT and connector only for packs with ViT tokens, and
vae2llm/time_embedder only for packs with VAE tokens. Under FSDP2 a unit that
runs on one rank but not on another issues an all-gather (forward) and a
reduce-scatter (backward) that the other rank never matches, and the ranks
hang. So before the decoder runs, each path that did not run in this forward
runs once on one dummy token, and its output enters the decoder input
multiplied by 0: the forward result is unchanged, the gradients it adds are
zero, and every rank issues the same collectives in the same order (the ViT
and connector units come right before the decoder on every rank, and the
latent path lives in the root unit, which has no collectives of its own).
"""

import torch
import torch.nn as nn


def install_participation(model: nn.Module) -> None:
    """Register the hooks on `model` (a `Bagel`); call before any parallelisation wraps it."""
    ran: dict[str, bool] = {}

    def reset(module, args, kwargs=None):
        ran.clear()

    def mark(name):
        def hook(module, args, output):
            ran[name] = True

        return hook

    model.register_forward_pre_hook(reset)
    model.vit_model.register_forward_hook(mark("vit"))
    model.vae2llm.register_forward_hook(mark("latent"))

    def add_missing_paths(module, args):
        inputs_embeds, *rest = args
        extra = None
        if not ran.get("vit"):
            config = model.config.vit
            patches = torch.zeros(1, config.patch_dim, device=inputs_embeds.device)
            position_ids = torch.zeros(1, dtype=torch.long, device=inputs_embeds.device)
            extra = model.connector(model.vit_model(patches, position_ids, [1])).sum()
        if not ran.get("latent"):
            latents = torch.zeros(1, model.config.latent_channels, device=inputs_embeds.device)
            weight_dtype = model.vae2llm.weight.dtype
            t = torch.zeros(1, device=inputs_embeds.device)
            latent = (model.vae2llm(latents.to(weight_dtype)) + model.time_embedder(t)).sum()
            extra = latent if extra is None else extra + latent
        if extra is None:
            return None
        return (inputs_embeds + 0.0 * extra.to(inputs_embeds.dtype), *rest)

    model.language_model.model.register_forward_pre_hook(add_missing_paths)
