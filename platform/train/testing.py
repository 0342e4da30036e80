"""Parity harness: train the tiny model for a few steps on fixed synthetic packs under any layout.

Run under torchrun (or as one process):

    python -m bagel.platform.train.testing --layout dp_shard=2 --steps 3 --out result.json

Every layout sees the same global batch per step: `global_packs` packs, split
over the data-parallel ranks, the rest made up by gradient accumulation. The
packs are built with `bagel.model.testing.random_pack` from fixed seeds, so no
data-pipeline detail enters the comparison.
"""

import argparse
import json
import logging
import os

import torch
import torch.distributed as dist

from bagel.platform.config import ParallelConfig, RunConfig, SpikeConfig, TrainConfig

logger = logging.getLogger(__name__)


def parity_packs(model_config, step: int, global_packs: int) -> list:
    """Return the `global_packs` packs of step `step` (a pure function of its arguments)."""
    from bagel.model.testing import random_pack

    # Step 1 gives one pack without ViT tokens and one without VAE tokens, so data-parallel
    # ranks run different image paths (the case that desynchronises FSDP collectives).
    kinds_by_step = [
        [["t2i", "text"], ["vlm", "text"]],
        [["vlm", "text"], ["t2i", "edit"]],
        [["edit", "t2i"], ["vlm", "vlm", "text"]],
    ]
    kinds = kinds_by_step[(step - 1) % len(kinds_by_step)]
    return [
        random_pack(
            model_config, seed=1000 * step + index, num_samples=len(kinds[index % 2]), kinds=kinds[index % 2]
        )
        for index in range(global_packs)
    ]


def run(parallel: ParallelConfig, steps: int, global_packs: int, train: TrainConfig | None = None) -> dict:
    """Train and return {"loss": [...], "ce": [...], "mse": [...], "grad_norm": [...]} per step."""
    from bagel.platform.train.trainer import Trainer

    config = RunConfig(parallel=parallel)
    config.model.name = "tiny"
    config.train = train or TrainConfig(steps=steps, spike=SpikeConfig(policy="off"))
    config.train.steps = steps
    config.optim.lr = 1e-3
    config.metrics.tensorboard = False
    config.metrics.gpu_health = False
    trainer = Trainer(config)
    trainer.setup()
    dp_size, dp_rank = trainer.meshes.dp_size, trainer.meshes.dp_rank
    if global_packs % dp_size:
        raise ValueError(f"global_packs={global_packs} does not divide by the data-parallel size {dp_size}")
    accum = global_packs // dp_size
    history: dict[str, list] = {"loss": [], "ce": [], "mse": [], "grad_norm": []}
    for step in range(1, steps + 1):
        packs = parity_packs(trainer.model_config, step, global_packs)
        mine = packs[dp_rank * accum : (dp_rank + 1) * accum]
        result = trainer.step_fn.run(step, mine)
        history["loss"].append(result.total)
        history["ce"].append(result.ce)
        history["mse"].append(result.mse)
        history["grad_norm"].append(result.grad_norm)
    trainer.close()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="", help="comma-separated degrees, e.g. dp_shard=2,tp=2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-packs", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes the history to")
    args = parser.parse_args()
    degrees = dict(item.split("=") for item in args.layout.split(",") if item)
    parallel = ParallelConfig(**{key: int(value) for key, value in degrees.items()})
    if "dp_shard" not in degrees:
        parallel.dp_shard = -1
    history = run(parallel, args.steps, args.global_packs)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as handle:
            json.dump(history, handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
