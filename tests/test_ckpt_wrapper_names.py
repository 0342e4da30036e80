"""Checkpoints key parameters by clean names, so activation checkpointing may differ between save and load.

The tests run the tiny model in one process (a world of one, gloo). A run
with activation checkpointing on saves through `Trainer.fit`. A run with it
off resumes that checkpoint, and another starts from it through
`run.init_from`, directly and after promotion. The same is checked the other way round. Model, EMA and
optimizer state must arrive intact.
"""

import copy
import signal

import pytest
import torch
from torch.distributed.tensor import DTensor

from bagel.platform.checkpoint import CheckpointConfig, CheckpointManager
from bagel.platform.checkpoint.listing import inspect_checkpoint
from bagel.platform.checkpoint.promote import promote_checkpoint
from bagel.platform.checkpoint.states import TrainProgress, clean_fqn
from bagel.platform.config import RunConfig, SpikeConfig, TrainConfig
from bagel.platform.exit_codes import ExitCode

STEPS = 2


def make_trainer(storage: str, run: str, activation_checkpointing: str, init_from: str = ""):
    from bagel.platform.train.trainer import Trainer

    config = RunConfig()
    config.model.name = "tiny"
    # A fast EMA, so after two steps it differs from the weights it tracks.
    config.train = TrainConfig(
        steps=STEPS, ema=0.5, activation_checkpointing=activation_checkpointing, spike=SpikeConfig(warmup_steps=20)
    )
    config.optim.lr = 1e-3
    config.checkpoint = CheckpointConfig(interval_steps=STEPS, async_save=False)
    config.metrics.tensorboard = False
    config.metrics.gpu_health = False
    config.run.storage = storage
    config.run.name = run
    config.run.init_from = init_from
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def weights(trainer) -> dict[str, torch.Tensor]:
    return {clean_fqn(name): full(param) for name, param in trainer.model.named_parameters()}


def ema(trainer) -> dict[str, torch.Tensor]:
    return {name: full(tensor) for name, tensor in trainer.ema.state_dict().items()}


def optimizer_moments(trainer) -> dict[str, torch.Tensor]:
    optimizer = trainer.optimizers.optimizers[0]
    names = {param: clean_fqn(name) for name, param in trainer.model.named_parameters()}
    return {names[param]: full(state["exp_avg"]) for param, state in optimizer.state.items()}


def load(trainer, init_from: str = ""):
    """Resume `trainer` the way `fit` does, without training a step."""
    manager = CheckpointManager(trainer.config.checkpoint, trainer.config.run.layout, init_from=init_from)
    return manager.resume(trainer.checkpoint_states(TrainProgress()))


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("saved_with", "loaded_with"), [("full", "none"), ("none", "full")])
def test_resume_across_activation_checkpointing(tmp_path, restore_sigterm, saved_with, loaded_with):
    from bagel.model.configs import get_model_config
    from bagel.model.testing import random_pack

    storage = tmp_path.as_uri()
    saver = make_trainer(storage, "saver", saved_with)
    wrapped = [name for name, _ in saver.model.named_parameters() if "_checkpoint_wrapped_module" in name]
    assert bool(wrapped) == (saved_with == "full")
    packs = [random_pack(get_model_config("tiny"), seed=11 + step, num_samples=2) for step in range(STEPS)]
    assert saver.fit(data=copy.deepcopy(packs)) == ExitCode.SUCCESS
    saved_weights, saved_ema, saved_moments = weights(saver), ema(saver), optimizer_moments(saver)
    assert all(not name.count("_checkpoint_wrapped_module") for name in saved_ema)
    assert any(not torch.equal(saved_ema[name], saved_weights[name]) for name in saved_ema)
    checkpoint = saver.config.run.layout.checkpoints_dir + f"/step-{STEPS:08d}"

    # Resume the same run with the other setting: every state, optimizer included.
    resumer = make_trainer(storage, "saver", loaded_with)
    assert bool([n for n, _ in resumer.model.named_parameters() if "_checkpoint_wrapped_module" in n]) == (loaded_with == "full")
    info = load(resumer)
    assert (info.source, info.step) == ("checkpoint", STEPS)
    for loaded, saved in [(weights(resumer), saved_weights), (ema(resumer), saved_ema), (optimizer_moments(resumer), saved_moments)]:
        assert set(loaded) == set(saved)
        assert [name for name in saved if not torch.equal(loaded[name], saved[name])] == []
    # The loss-spike monitor's running means resume too, so its decisions match an uninterrupted run.
    assert saver.spike.accepted == STEPS
    assert resumer.spike.means == saver.spike.means
    assert resumer.spike.accepted == STEPS

    # Start other runs (run.init_from) from the training checkpoint and from its
    # promoted copy, which the next stage uses: model and EMA only.
    promoted = promote_checkpoint(inspect_checkpoint(checkpoint), storage, get_model_config("tiny"), {"stage": "pretrain"})
    for index, source in enumerate([checkpoint, promoted.uri]):
        starter = make_trainer(storage, f"starter-{index}", loaded_with, init_from=source)
        info = load(starter, init_from=source)
        assert info.source == "init_from"
        for loaded, saved in [(weights(starter), saved_weights), (ema(starter), saved_ema)]:
            assert set(loaded) == set(saved)
            assert [name for name in saved if not torch.equal(loaded[name], saved[name])] == [], source
        assert optimizer_moments(starter) == {}
