"""What the model consumes: interleaved samples and the packed sequence built from them.

The data pipeline reads interleaved samples, decides which of them share a
pack, and calls `bagel.model.sequence` to lay each one out; the model reads
only `PackedSequence`. These types are the contract between the two sides.

Vocabulary (BAGEL's own):
- packed sequence: several samples concatenated into one sequence of length L
  (one pack per rank per micro-step, batch dimension 1);
- split: a run of consecutive tokens of one sample with one attention mode:
  "causal" (text), "full" (a ViT image or a clean VAE image, with its markers),
  "noise" (a noised VAE image that carries the MSE loss);
- und / gen expert: text and ViT tokens go to the understanding expert, VAE
  latent tokens (noised and clean) to the generation expert.
"""

import enum
from dataclasses import dataclass, field, fields

import torch


class ImageRole(str, enum.Enum):
    """Image representation that an image item feeds."""

    VIT = "vit"  # SigLIP patches for understanding; never carries a loss
    VAE_NOISED = "vae_noised"  # generation target: noised latents, MSE loss
    VAE_CLEAN = "vae_clean"  # clean latents as a condition (t = 0), no loss


@dataclass
class TextItem:
    """A text segment, already tokenised (without BOS/EOS, which the layout adds)."""

    token_ids: list[int]
    loss: bool  # next-token CE on this segment (and on its EOS)
    cfg_droppable: bool = False  # may be removed whole for classifier-free guidance


@dataclass
class ImageItem:
    """An image as a float tensor [3, H, W] in [-1, 1], already resized to its role's stride."""

    pixels: torch.Tensor
    role: ImageRole
    cfg_droppable: bool = False

    @property
    def loss(self) -> bool:
        return self.role is ImageRole.VAE_NOISED


Item = TextItem | ImageItem


@dataclass
class InterleavedSample:
    """One training sample: an ordered list of text and image items.

    `sample_id` is globally unique and stable across runs (dataset name, shard
    and key); resume tests checksum these ids.
    """

    sample_id: str
    items: list[Item]
    dataset: str = ""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of BAGEL's four special tokens in the tokenizer in use."""

    bos: int  # <|im_start|>, opens every text item
    eos: int  # <|im_end|>, closes every text item
    start_of_image: int  # <|vision_start|>, opens every image item
    end_of_image: int  # <|vision_end|>, closes every image item


@dataclass
class PackedSequence:
    """A packed sequence of length L = sum(sample_lens), on one rank, batch size 1.

    Index tensors hold positions in [0, L). Every position is exactly one of:
    text (incl. BOS/EOS and image markers), ViT patch, VAE latent token.
    """

    # Structure of the generalized causal mask.
    sample_lens: list[int]  # tokens per packed sample; attention never crosses samples
    split_lens: list[int]  # tokens per split, in order; sums to L
    attn_modes: list[str]  # "causal" | "full" | "noise", one per split
    sample_ids: list[str]  # InterleavedSample.sample_id, one per packed sample

    # RoPE: 1D ids restarting at 0 per sample; an image shares one id.
    position_ids: torch.Tensor  # long [L]

    # Text tokens (und expert).
    text_ids: torch.Tensor  # long [N_text]
    text_indexes: torch.Tensor  # long [N_text], positions in the sequence

    # ViT patches (und expert), patchified in (row, col, channel) order.
    vit_patches: torch.Tensor  # float [N_vit, 3 * patch * patch]
    vit_position_ids: torch.Tensor  # long [N_vit], r * vit_max_patches_per_side + c
    vit_token_seqlens: torch.Tensor  # long [n_vit_images], patches per image
    vit_indexes: torch.Tensor  # long [N_vit]

    # VAE latents (gen expert). Images are encoded by the frozen VAE on device.
    vae_images: list[torch.Tensor]  # per image: float [3, H, W] in [-1, 1]
    vae_latent_grids: list[tuple[int, int]]  # per image: (rows, cols) of 2x2 latent patches
    vae_indexes: torch.Tensor  # long [N_vae]; tokens of image i follow image i-1
    vae_position_ids: torch.Tensor  # long [N_vae], r * max_latent_size + c
    # Raw timestep per VAE token before sigmoid and shift: drawn once per noised
    # image (a standard normal), -inf for clean images (sigmoid gives t = 0).
    vae_timestep_logits: torch.Tensor  # float [N_vae]
    # Per image: seed of the generator that draws its posterior sample and its
    # flow-matching noise. Derived from the sample, not the rank, so a sample
    # gets the same noise under any parallel layout and after a resume.
    vae_noise_seeds: list[int]

    # Losses.
    ce_indexes: torch.Tensor  # long [N_ce], positions whose next token is predicted
    ce_labels: torch.Tensor  # long [N_ce]
    mse_indexes: torch.Tensor  # long [N_mse], positions of noised VAE tokens

    # Bookkeeping for metrics and CFG statistics.
    cfg_dropped: dict[str, int] = field(default_factory=dict)  # items dropped per kind

    @property
    def length(self) -> int:
        return sum(self.sample_lens)

    def to(self, device: torch.device | str) -> "PackedSequence":
        """Return a copy with every tensor (and every VAE image) on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
            elif f.name == "vae_images":
                value = [image.to(device, non_blocking=True) for image in value]
            moved[f.name] = value
        return PackedSequence(**moved)
