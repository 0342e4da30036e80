"""The frozen FLUX VAE that turns VAE images into 64-dim latent tokens.

The autoencoder itself is torchtitan's FLUX `AutoEncoder`. torchtitan 0.3's
`torchtitan.models.flux` package imports transformers (for its text
encoders) when it is imported, so this module loads only the autoencoder's
own source file, which needs nothing beyond torchtitan's common modules.
"""

import importlib.util
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from bagel.model.configs import BagelConfig
from bagel.model.sequence import derive_seed

logger = logging.getLogger(__name__)

# Stream numbers for derive_seed(image_seed, stream): the posterior sample and
# the flow-matching noise of one image use independent generators.
POSTERIOR_STREAM = 0
FLOW_NOISE_STREAM = 1

_MODULE_NAME = "bagel.model._torchtitan_flux_autoencoder"


def _autoencoder_module():
    """Import torchtitan's flux/model/autoencoder.py without running the flux package's __init__."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    import torchtitan

    path = Path(torchtitan.__file__).parent / "models" / "flux" / "model" / "autoencoder.py"
    if not path.is_file():
        raise ImportError(f"torchtitan at {Path(torchtitan.__file__).parent} has no {path.name}: install torchtitan==0.3.0")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def build_autoencoder(config: BagelConfig) -> nn.Module:
    """Build torchtitan's FLUX AutoEncoder with the shapes of `config.vae` (random weights)."""
    module = _autoencoder_module()
    vae = config.vae
    ae_config = module.AutoEncoder.Config(
        resolution=vae.resolution,
        in_channels=vae.in_channels,
        ch=vae.ch,
        out_ch=vae.out_ch,
        ch_mult=tuple(vae.ch_mult),
        num_res_blocks=vae.num_res_blocks,
        z_channels=vae.z_channels,
        scale_factor=vae.scale_factor,
        shift_factor=vae.shift_factor,
    )
    return ae_config.build()


def patchify_latents(z: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut latents [C, h, w] into tokens [(h/p)*(w/p), p*p*C] flattened in (p, q, c) order."""
    channels, height, width = z.shape
    rows, cols = height // patch, width // patch
    x = z.reshape(channels, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    return x.reshape(rows * cols, patch * patch * channels)


def unpatchify_latents(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """Invert patchify_latents: tokens [rows*cols, p*p*C] -> latents [C, rows*p, cols*p]."""
    rows, cols = grid
    x = tokens.reshape(rows, cols, patch, patch, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, rows * patch, cols * patch)


class FrozenVAE(nn.Module):
    """FLUX autoencoder, frozen, encoding images into BAGEL latent tokens.

    Each image is encoded on its own, so its latents do not depend on which
    images share its pack. The released code instead zero-pads a batch to its
    largest image, which changes border latents slightly.
    """

    def __init__(self, config: BagelConfig, autoencoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.ae = autoencoder if autoencoder is not None else build_autoencoder(config)
        self.ae.requires_grad_(False)
        self.ae.eval()

    def train(self, mode: bool = True) -> "FrozenVAE":
        # Always frozen: the autoencoder stays in eval mode whatever mode the caller requests.
        return super().train(False)

    @classmethod
    def from_file(cls, config: BagelConfig, path: str | Path, device: torch.device | str = "cpu") -> "FrozenVAE":
        """Load FLUX `ae.safetensors` strictly; errors name the missing, unexpected or mis-shaped key."""
        from safetensors.torch import load_file

        vae = cls(config)
        state = load_file(str(path), device=str(device))
        expected = vae.ae.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} for the FLUX VAE")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{path}: key {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                )
        vae.ae.load_state_dict(state, strict=True)
        logger.info("loaded the FLUX VAE from %s", path)
        return vae.to(device)

    @torch.no_grad()
    def encode_latents(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """Encode one image [3, H, W] in [-1, 1] into scaled latents [z_channels, H/8, W/8].

        The posterior sample uses a generator seeded from `seed`, so the result
        does not depend on the process's global RNG or on the pack layout.
        """
        weight = next(self.ae.parameters())
        moments = self.ae.encoder(image[None].to(device=weight.device, dtype=weight.dtype))
        mean, logvar = torch.chunk(moments.float(), 2, dim=1)
        generator = torch.Generator(device=mean.device).manual_seed(derive_seed(seed, POSTERIOR_STREAM))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        vae = self.config.vae
        return (vae.scale_factor * (z - vae.shift_factor))[0]

    @torch.no_grad()
    def encode_tokens(
        self, images: list[torch.Tensor], grids: list[tuple[int, int]], seeds: list[int]
    ) -> torch.Tensor:
        """Encode images into latent tokens [N_vae, 64] in PackedSequence.vae_indexes order (float32)."""
        if not (len(images) == len(grids) == len(seeds)):
            raise ValueError(f"{len(images)} images, {len(grids)} grids and {len(seeds)} seeds: they must match")
        patch = self.config.latent_patch_size
        tokens = []
        for image, grid, seed in zip(images, grids, seeds):
            z = self.encode_latents(image, seed)
            expected = (grid[0] * patch, grid[1] * patch)
            if tuple(z.shape[1:]) != expected:
                raise ValueError(f"image {tuple(image.shape)} encodes to latents {tuple(z.shape[1:])}, expected {expected}")
            tokens.append(patchify_latents(z, patch))
        if not tokens:
            device = next(self.ae.parameters()).device
            return torch.zeros(0, self.config.latent_channels, device=device)
        return torch.cat(tokens)
