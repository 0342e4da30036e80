"""Held-out loss of promoted weights: the mean weighted loss over a few packs of a held-out data mixture.

The packs come from the `data` section of a stage config (dp rank 0 of 1);
point it at manifests that training did not read to get a true held-out
figure. The loss is BAGEL's training objective, ce_weight * mean CE + mse_weight * mean MSE, with the token counts
summed over all packs first, exactly as the trainer weights micro-batches.
Without `model.vae_path` the VAE is the trainer's seeded random one, so the
MSE term is comparable between checkpoints of the same config only.
"""

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


def heldout_loss_function(run_config: Any, model_config: Any, packs: int) -> Callable[[dict[str, torch.Tensor]], float]:
    """Return a function mapping a weight dict to its held-out loss over `packs` packs (CPU, no grad)."""
    if packs < 1:
        raise ValueError(f"held-out packs={packs} is invalid: use 1 or more")

    def compute(weights: dict[str, torch.Tensor]) -> float:
        from bagel.model.bagel import Bagel
        from bagel.model.vae import FrozenVAE
        from bagel.platform.data.loader import build_data_loader

        with torch.device("meta"):
            model = Bagel(model_config)
        model.load_state_dict(weights, strict=True, assign=True)
        model.eval()
        if run_config.model.vae_path:
            vae = FrozenVAE.from_file(model_config, run_config.model.vae_path)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run_config.train.seed + 1)
                vae = FrozenVAE(model_config)

        loader = build_data_loader(run_config.data, model_config, 0, 1)
        ce_sum = mse_sum = 0.0
        ce_tokens = mse_tokens = 0
        try:
            iterator = iter(loader)
            with torch.no_grad():
                for _ in range(packs):
                    packed = next(iterator)
                    latents = None
                    if packed.vae_indexes.numel():
                        latents = vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)
                    sums = model(packed, latents)
                    ce_sum += float(sums.ce_sum)
                    mse_sum += float(sums.mse_sum)
                    ce_tokens += sums.ce_tokens
                    mse_tokens += sums.mse_tokens
        finally:
            if hasattr(loader, "close"):
                loader.close()
        total = 0.0
        if ce_tokens:
            total += model_config.ce_weight * ce_sum / ce_tokens
        if mse_tokens:
            total += model_config.mse_weight * mse_sum / mse_tokens
        logger.info("held-out loss over %d packs: %.4f (%d CE tokens, %d MSE tokens)", packs, total, ce_tokens, mse_tokens)
        return total

    return compute
