"""Single-process trainer invariants: frozen weights, EMA closed form, global clipping, accumulation."""

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn as nn

from bagel.platform.config import RunConfig, SpikeConfig, TrainConfig
from bagel.platform.train.ema import ModelEMA
from bagel.platform.train.optim import clip_grad_norm_, global_grad_norm
from bagel.platform.train.spike import SpikeMonitor


def make_trainer(**train_fields):
    from bagel.platform.train.trainer import Trainer

    config = RunConfig()
    config.model.name = "tiny"
    config.train = TrainConfig(steps=4, spike=SpikeConfig(policy="off"), **train_fields)
    config.optim.lr = 1e-3
    config.metrics.tensorboard = False
    config.metrics.gpu_health = False
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def capture_grads(trainer) -> dict[str, torch.Tensor]:
    """Record every gradient (after clipping, as passed to the optimizer) at the next optimizer step."""
    captured: dict[str, torch.Tensor] = {}
    optimizers = trainer.step_fn.optimizers
    original_step = optimizers.step

    def step(*args, **kwargs):
        for name, param in trainer.model.named_parameters():
            if param.grad is not None:
                captured[name] = param.grad.full_tensor().clone()
        return original_step(*args, **kwargs)

    optimizers.step = step
    return captured


def layouts(config, seed: int, kinds: list[str]):
    from bagel.model.sequence import layout_sample
    from bagel.model.testing import random_sample

    rng = random.Random(seed)
    return [
        layout_sample(random_sample(f"s{seed}-{i}", rng, config, kind), config, rng, noise_seed=seed * 100 + i)
        for i, kind in enumerate(kinds)
    ]


def test_alignment_keeps_frozen_weights_bit_identical() -> None:
    from bagel.model.testing import random_pack

    trainer = make_trainer(trainable=["connector\\."])
    before = full_state(trainer.model)
    for step in (1, 2):
        trainer.step_fn.run(step, [random_pack(trainer.model_config, seed=step, num_samples=2, kinds=["vlm", "vlm"])])
    after = full_state(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed and all(name.startswith("connector.") for name in changed)
    assert {"connector.fc1.weight", "connector.fc2.weight"} <= set(changed)
    trainer.close()


def test_accumulation_equals_one_pack_of_both() -> None:
    """Two micro-batches of a step give the update of one pack holding both (token-weighted means)."""
    from bagel.model.sequence import pack

    first = make_trainer()
    second = make_trainer()
    grads = [capture_grads(first), capture_grads(second)]
    config = first.model_config
    a = layouts(config, 1, ["t2i", "vlm"])
    b = layouts(config, 2, ["edit", "text", "vlm"])
    accumulated = first.step_fn.run(1, [pack(copy.deepcopy(a)), pack(copy.deepcopy(b))])
    together = second.step_fn.run(1, [pack(copy.deepcopy(a) + copy.deepcopy(b))])
    assert accumulated.ce_tokens == together.ce_tokens
    assert accumulated.mse_tokens == together.mse_tokens
    assert accumulated.total == pytest.approx(together.total, rel=1e-6)
    assert accumulated.ce == pytest.approx(together.ce, rel=1e-6)
    assert accumulated.mse == pytest.approx(together.mse, rel=1e-6)
    assert accumulated.grad_norm == pytest.approx(together.grad_norm, rel=1e-5)
    # Gradients, not updated weights: with BAGEL's eps 1e-15 Adam's first update is
    # lr * sign(grad), which turns rounding noise in exactly-zero gradients (ViT key
    # biases: softmax ignores a shift shared by all keys) into +-lr differences.
    assert grads[0]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_ema_matches_closed_form() -> None:
    model = nn.Linear(3, 2)
    decay = 0.9
    ema = ModelEMA(model, decay)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = []
    for k in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * k)
        history.append({name: p.detach().clone() for name, p in model.named_parameters()})
        ema.update()
    for name in start:
        expected = decay**3 * start[name] + (1 - decay) * sum(
            decay ** (3 - k) * history[k - 1][name] for k in range(1, 4)
        )
        torch.testing.assert_close(ema.state_dict()[name], expected, rtol=1e-6, atol=1e-6)
        assert ema.state_dict()[name].dtype == torch.float32


def test_ema_only_trainable() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert sorted(ModelEMA(model, 0.99).state_dict()) == ["1.bias", "1.weight"]


def test_clip_uses_global_norm() -> None:
    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2, 3))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0, 0.0])
    params[1].grad = torch.full((2, 3), 2.0)
    expected = (9.0 + 6 * 4.0) ** 0.5
    assert float(global_grad_norm(params)) == pytest.approx(expected)
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert float(norm) == pytest.approx(expected)
    assert float(global_grad_norm(params)) == pytest.approx(1.0, rel=1e-5)
    # Clipping scales every gradient by the same factor.
    assert float(params[0].grad[0] / params[1].grad[0, 0]) == pytest.approx(1.5)


def test_spike_policy_skips_and_names_term() -> None:
    monitor = SpikeMonitor(SpikeConfig(policy="skip", warmup_steps=2, factor=3.0, max_consecutive=2))
    assert monitor.check(1, {"total": 1.0, "ce": 2.0, "mse": 0.5}).action == "ok"
    assert monitor.check(2, {"total": 1.0, "ce": 2.0, "mse": 0.5}).action == "ok"
    spike = monitor.check(3, {"total": 3.0, "ce": 2.0, "mse": 2.5})
    assert spike.action == "skip"
    assert spike.reason.startswith("mse=")
    nan = monitor.check(4, {"total": float("nan"), "ce": 2.0, "mse": None})
    assert nan.action == "stop"  # the second consecutive skip reaches max_consecutive
    assert "not finite" in nan.reason


def test_non_finite_names_term_before_total() -> None:
    monitor = SpikeMonitor(SpikeConfig(policy="stop"))
    decision = monitor.check(1, {"total": float("nan"), "ce": 2.0, "mse": float("nan")})
    assert decision.reason.startswith("mse=nan")


def test_spike_policy_stop() -> None:
    monitor = SpikeMonitor(SpikeConfig(policy="stop"))
    decision = monitor.check(1, {"total": float("inf"), "ce": None, "mse": 1.0})
    assert decision.action == "stop"
    assert "total=inf" in decision.reason


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_same_step(mode: str) -> None:
    from bagel.model.testing import random_pack

    from bagel.model.configs import get_model_config

    packs = [random_pack(get_model_config("tiny"), seed=7, num_samples=3)]
    reference = make_trainer().step_fn.run(1, copy.deepcopy(packs))
    checkpointed = make_trainer(activation_checkpointing=mode).step_fn.run(1, copy.deepcopy(packs))
    assert checkpointed.total == pytest.approx(reference.total, rel=1e-6)
    assert checkpointed.grad_norm == pytest.approx(reference.grad_norm, rel=1e-6)


def test_generation_only_finetune_freezes_und_expert() -> None:
    """Freezing the understanding expert's block weights (names without `_moe_gen`) trains only the rest."""
    from bagel.model.testing import random_pack

    und_block = r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_(proj|norm)\.|mlp\.|input_layernorm\.|post_attention_layernorm\.)"
    trainer = make_trainer(frozen=[und_block])
    before = full_state(trainer.model)
    # Two steps: llm2vae starts at zero, so the MSE gradient reaches the gen expert from step 2 on.
    for step in (1, 2):
        trainer.step_fn.run(step, [random_pack(trainer.model_config, seed=step, num_samples=2, kinds=["t2i", "edit"])])
    after = full_state(trainer.model)
    und = [name for name in before if re_match(und_block, name)]
    assert und
    for name in und:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"],
                           after["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"])


def re_match(pattern: str, name: str) -> bool:
    import re

    return re.match(pattern, name) is not None


def test_cp_chunks_cover_sequence_once() -> None:
    from bagel.platform.train.context_parallel import chunk_bounds

    for length in (7, 8, 64, 65):
        for cp in (1, 2, 3, 4):
            bounds = [chunk_bounds(length, cp, rank) for rank in range(cp)]
            assert bounds[0][0] == 0
            assert bounds[-1][1] == length
            for (_, end), (start, _) in zip(bounds, bounds[1:]):
                assert end == start
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_cp_loss_positions_split_exactly() -> None:
    from bagel.model.configs import get_model_config
    from bagel.model.testing import random_pack
    from bagel.platform.train.context_parallel import shard_loss_positions

    packed = random_pack(get_model_config("tiny"), seed=5, num_samples=3, kinds=["t2i", "vlm", "edit"])
    shards = [shard_loss_positions(packed, 2, rank) for rank in range(2)]
    assert torch.equal(torch.cat([s.ce_indexes for s in shards]), packed.ce_indexes)
    assert torch.equal(torch.cat([s.ce_labels for s in shards]), packed.ce_labels)
    assert torch.equal(torch.cat([s.mse_indexes for s in shards]), packed.mse_indexes)
