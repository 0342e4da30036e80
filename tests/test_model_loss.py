"""Loss normalisation: 2 gloo ranks with one pack each equal the single-rank global token mean."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagel.model.bagel import build_model
from bagel.model.configs import get_model_config
from bagel.model.inputs import PackedSequence
from bagel.model.loss import LossSums, all_reduce_token_counts, normalize
from bagel.model.sequence import layout_sample, pack
from bagel.model.testing import random_sample
from bagel.model.vae import FrozenVAE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _packs(config):
    """Two per-rank packs with different CE/MSE token counts, and one pack holding all their samples."""
    import random

    rng = random.Random(21)
    kinds = [["vlm", "t2i", "text"], ["edit", "vlm"]]
    layouts = [
        [layout_sample(random_sample(f"r{r}-{i}", rng, config, kind), config, rng, noise_seed=100 * r + i)
         for i, kind in enumerate(rank_kinds)]
        for r, rank_kinds in enumerate(kinds)
    ]
    return [pack(rank_layouts) for rank_layouts in layouts], pack(layouts[0] + layouts[1])


def _loss_and_grads(packed: PackedSequence, world_group: bool):
    config = get_model_config("tiny")
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    vae = FrozenVAE(config)
    latents = vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)
    sums: LossSums = model(packed, latents)
    if world_group:
        ce_global, mse_global = all_reduce_token_counts(sums.ce_tokens, sums.mse_tokens)
    else:
        ce_global, mse_global = sums.ce_tokens, sums.mse_tokens
    terms = normalize(sums, ce_global, mse_global, config.ce_weight, config.mse_weight)
    terms.total.backward()
    values = torch.stack([terms.total.detach(), terms.ce.detach(), terms.mse.detach()])
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return values, grads, (ce_global, mse_global)


def _worker(rank: int, port: int, packs, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        values, grads, counts = _loss_and_grads(packs[rank], world_group=True)
        # Summing each rank's share gives the global mean; summing gradients gives its gradient.
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        dist.all_reduce(grads, op=dist.ReduceOp.SUM)
        if rank == 0:
            torch.save({"values": values, "grads": grads, "counts": counts}, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_loss_equals_global_mean(tmp_path):
    config = get_model_config("tiny")
    rank_packs, joint_pack = _packs(config)
    assert rank_packs[0].ce_indexes.numel() != rank_packs[1].ce_indexes.numel()
    assert rank_packs[0].mse_indexes.numel() != rank_packs[1].mse_indexes.numel()

    result_path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(_free_port(), rank_packs, result_path), nprocs=2, join=True)
    distributed = torch.load(result_path)

    values, grads, counts = _loss_and_grads(joint_pack, world_group=False)
    assert distributed["counts"] == counts
    torch.testing.assert_close(distributed["values"], values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distributed["grads"], grads, rtol=1e-4, atol=1e-6)


def test_normalize_matches_token_mean():
    ce_per_token = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mse_per_token = torch.tensor([0.5, 1.5])
    sums = LossSums(ce_sum=ce_per_token.sum(), ce_tokens=4, mse_sum=mse_per_token.sum(), mse_tokens=2)
    terms = normalize(sums, 4, 2, ce_weight=0.25, mse_weight=1.0)
    torch.testing.assert_close(terms.ce, ce_per_token.mean())
    torch.testing.assert_close(terms.mse, mse_per_token.mean())
    torch.testing.assert_close(terms.total, 0.25 * ce_per_token.mean() + mse_per_token.mean())


def test_normalize_rejects_local_counts_above_global():
    sums = LossSums(ce_sum=torch.tensor(1.0), ce_tokens=4, mse_sum=torch.tensor(0.0), mse_tokens=0)
    with pytest.raises(ValueError, match="all-reduce the counts"):
        normalize(sums, 2, 0, 1.0, 1.0)


def test_token_counts_without_process_group():
    assert all_reduce_token_counts(3, 5) == (3, 5)
