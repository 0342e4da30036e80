"""One optimizer step: token-weighted gradient accumulation, global clipping, spike policy, EMA.

Normalisation (BAGEL's per-token means, but weighted over the whole step):
first the CE and MSE token counts of ALL micro-batches of the step are summed
over the loss mesh (data-parallel and cp ranks). Then each micro-batch's loss
sums are divided by those global counts. FSDP sums (does not average)
gradients, so the update is the gradient of the step's global per-token mean
however the tokens are split over ranks and micro-batches.
"""

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from bagel.model.inputs import PackedSequence
from bagel.model.loss import normalize
from bagel.platform.train.context_parallel import shard_loss_positions
from bagel.platform.train.mesh import Meshes, all_reduce_sum
from bagel.platform.train.optim import clip_grad_norm_
from bagel.platform.train.spike import SpikeDecision, SpikeMonitor

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Losses of one step, identical on every rank (None = term absent in the whole step)."""

    total: float
    ce: float | None
    mse: float | None
    grad_norm: float
    decision: SpikeDecision
    tokens: int  # tokens of all packs of the step, over all data-parallel ranks
    ce_tokens: int
    mse_tokens: int
    flops: float  # training FLOPs of this rank's packs (for MFU)
    compute_s: float  # forward + backward + optimizer seconds on this rank


class TrainStep:
    """Run optimizer steps of `model` on lists of packs (one list entry per micro-batch)."""

    def __init__(
        self,
        model: nn.Module,
        vae: nn.Module | None,
        optimizers,
        lr_scheduler,
        meshes: Meshes,
        device: torch.device,
        ce_weight: float,
        mse_weight: float,
        max_grad_norm: float,
        spike: SpikeMonitor,
        ema=None,
        flops_fn=None,
    ) -> None:
        self.model = model
        self.vae = vae
        self.optimizers = optimizers
        self.lr_scheduler = lr_scheduler
        self.meshes = meshes
        self.device = device
        self.ce_weight = ce_weight
        self.mse_weight = mse_weight
        self.max_grad_norm = max_grad_norm
        self.spike = spike
        self.ema = ema
        self.flops_fn = flops_fn
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # Counts travel as float64 so one all-reduce carries counts and loss sums (exact below 2**53).
        self._count_device = device

    def _prepare(self, packs: list[PackedSequence]) -> list[tuple[PackedSequence, torch.Tensor | None]]:
        """Move packs to the device, encode their VAE images, and keep this cp rank's loss positions."""
        prepared = []
        cp = self.meshes.parallel.cp
        for packed in packs:
            packed = packed.to(self.device)
            latents = None
            if packed.vae_indexes.numel():
                if self.vae is None:
                    raise ValueError("the pack has VAE images but the trainer has no VAE")
                latents = self.vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)
            if cp > 1:
                packed = shard_loss_positions(packed, cp, self.meshes.cp_rank)
            prepared.append((packed, latents))
        return prepared

    def run(self, step: int, packs: list[PackedSequence]) -> StepResult:
        """Forward/backward every micro-batch in `packs`, then clip, check and apply the update."""
        begin = time.perf_counter()
        prepared = self._prepare(packs)
        cp = self.meshes.parallel.cp
        local_ce = sum(p.ce_indexes.numel() for p, _ in prepared)
        local_mse = sum(p.mse_indexes.numel() for p, _ in prepared)
        # Each cp rank receives the whole pack, so token totals count it once per cp group.
        local_tokens = sum(p.length for p, _ in prepared) / cp
        counts = torch.tensor([local_ce, local_mse, local_tokens], dtype=torch.float64, device=self._count_device)
        all_reduce_sum(counts, self.meshes.loss_group)
        ce_global, mse_global, tokens_global = int(counts[0]), int(counts[1]), int(round(float(counts[2])))

        ce_part = torch.zeros((), dtype=torch.float64, device=self.device)
        mse_part = torch.zeros((), dtype=torch.float64, device=self.device)
        flops = 0.0
        last = len(prepared) - 1
        for index, (packed, latents) in enumerate(prepared):
            # Reduce-scatter gradients only after the last micro-batch.
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(index == last)
            sums = self.model(packed, latents)
            terms = normalize(sums, ce_global, mse_global, self.ce_weight, self.mse_weight)
            terms.total.backward()
            if terms.ce is not None:
                ce_part += terms.ce.detach().double()
            if terms.mse is not None:
                mse_part += terms.mse.detach().double()
            if self.flops_fn is not None:
                flops += self.flops_fn(packed) / cp
        parts = torch.stack([ce_part, mse_part])
        all_reduce_sum(parts, self.meshes.loss_group)
        ce = float(parts[0]) if ce_global > 0 else None
        mse = float(parts[1]) if mse_global > 0 else None
        total = 0.0
        if ce is not None:
            total += self.ce_weight * ce
        if mse is not None:
            total += self.mse_weight * mse

        grad_norm = float(clip_grad_norm_(self.trainable, self.max_grad_norm))
        decision = self.spike.check(step, {"total": total, "ce": ce, "mse": mse, "grad_norm": grad_norm})
        if decision.action == "ok":
            self.optimizers.step()
            if self.ema is not None:
                self.ema.update()
        self.lr_scheduler.step()
        self.optimizers.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(
            total=total,
            ce=ce,
            mse=mse,
            grad_norm=grad_norm,
            decision=decision,
            tokens=tokens_global,
            ce_tokens=ce_global,
            mse_tokens=mse_global,
            flops=flops,
            compute_s=time.perf_counter() - begin,
        )
