"""CheckpointManager in one process: commit protocol, damaged checkpoints, retention, async staging, resume order.

Each test runs against a local `file://` root and against the loopback
SeaweedFS server (`s3_server` fixture), through the same fsspec code path.
"""

import logging

import pytest
import torch
from torch import nn

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.listing import find_checkpoints, scan_checkpoints
from bagel.platform.checkpoint.manager import CheckpointManager
from bagel.platform.checkpoint.manifest import MANIFEST_NAME, read_manifest
from bagel.platform.checkpoint.states import ModelState, PerRankState, TrainProgress
from bagel.platform.exit_codes import UsageError
from bagel.platform.layout import StageLayout


def make_states(seed: int) -> tuple[nn.Module, TrainProgress, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    progress = TrainProgress()
    return model, progress, {"model": ModelState(model), "progress": progress}


def make_manager(root: str, options: dict, run: str = "r1", **overrides) -> CheckpointManager:
    settings = {"interval_steps": 1, "keep_latest": 0, **overrides}
    config = CheckpointConfig(storage_options=options, **settings)
    return CheckpointManager(config, StageLayout(root, run, "pretrain"))


def save_steps(manager: CheckpointManager, steps: list[int], model: nn.Module, progress: TrainProgress, states: dict) -> dict[int, dict]:
    """Save a checkpoint per step with distinct weights and return the weights saved at each step."""
    saved = {}
    for step in steps:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        progress.step = step
        manager.save(step, states, extra={"tokens_seen": step * 10})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    manager.close()
    return saved


def assert_weights(model: nn.Module, expected: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def checkpoint_path(manager: CheckpointManager, step: int, options: dict) -> tuple:
    fs, path = storage.open_fs(f"{manager.root}/step-{step:08d}", options)
    return fs, path


def test_manifest_lists_every_file_with_size(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options)
    save_steps(manager, [3], model, progress, states)

    fs, path = checkpoint_path(manager, 3, options)
    manifest = read_manifest(fs, path)
    files = storage.list_sizes(fs, path)
    assert manifest.step == 3
    assert manifest.extra == {"tokens_seen": 30}
    assert set(files) == set(manifest.files) | {MANIFEST_NAME}
    assert ".metadata" in manifest.files
    for name, record in manifest.files.items():
        assert files[name] == record.size, name
        assert storage.sha256_file(fs, storage.join(path, name)) == record.sha256, name


def test_resume_takes_latest_complete(store, caplog):
    root, options = store
    model, progress, states = make_states(0)
    saved = save_steps(make_manager(root, options), [1, 2], model, progress, states)

    model2, progress2, states2 = make_states(1)
    with caplog.at_level(logging.INFO, logger="bagel.platform.checkpoint"):
        info = make_manager(root, options).resume(states2)
    assert (info.source, info.step) == ("checkpoint", 2)
    assert progress2.step == 2
    assert_weights(model2, saved[2])
    assert "resumed from checkpoint" in caplog.text
    assert "step-00000002" in caplog.text


def test_missing_manifest_falls_back(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options)
    saved = save_steps(manager, [1, 2], model, progress, states)
    fs, path = checkpoint_path(manager, 2, options)
    fs.rm(storage.join(path, MANIFEST_NAME))

    model2, progress2, states2 = make_states(1)
    info = make_manager(root, options).resume(states2)
    assert (info.source, info.step) == ("checkpoint", 1)
    assert "no MANIFEST" in info.skipped[0]
    assert_weights(model2, saved[1])
    # The interrupted save is removed, because the run writes step 2 again.
    assert [entry.step for entry in scan_checkpoints(manager.root, options)] == [1]


def test_truncated_shard_falls_back(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options)
    saved = save_steps(manager, [1, 2], model, progress, states)
    fs, path = checkpoint_path(manager, 2, options)
    shard = storage.join(path, "__0_0.distcp")
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[: len(data) // 2])

    entry = scan_checkpoints(manager.root, options)[0]
    assert not entry.complete
    assert "__0_0.distcp has" in entry.status

    model2, progress2, states2 = make_states(1)
    info = make_manager(root, options).resume(states2)
    assert info.step == 1
    assert_weights(model2, saved[1])


def test_corrupt_shard_detected_by_checksum(store, caplog):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options)
    saved = save_steps(manager, [1, 2], model, progress, states)
    fs, path = checkpoint_path(manager, 2, options)
    shard = storage.join(path, "__0_0.distcp")
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    fs.pipe_file(shard, bytes(data))

    assert scan_checkpoints(manager.root, options)[0].complete  # sizes still match
    model2, progress2, states2 = make_states(1)
    with caplog.at_level(logging.ERROR, logger="bagel.platform.checkpoint"):
        info = make_manager(root, options).resume(states2)
    assert info.step == 1
    assert "checksum mismatch" in info.skipped[0]
    assert "__0_0.distcp" in info.skipped[0]
    assert "corrupt" in caplog.text
    assert_weights(model2, saved[1])


def test_keep_latest_purges_older(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options, keep_latest=2)
    save_steps(manager, [1, 2, 3, 4], model, progress, states)
    entries = scan_checkpoints(manager.root, options)
    assert [entry.step for entry in entries] == [4, 3]
    assert all(entry.complete for entry in entries)


def test_async_save_snapshots_state(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options, async_save=True)
    progress.step = 5
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    manager.save(5, states)
    # The loop continues while the upload runs: later updates must not leak in.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-3.0)
    progress.step = 6
    manager.close()

    model2, progress2, states2 = make_states(1)
    info = make_manager(root, options).resume(states2)
    assert info.step == 5
    assert progress2.step == 5
    assert_weights(model2, expected)


def test_init_from_then_fresh(store, caplog):
    root, options = store
    model, progress, states = make_states(0)
    source = make_manager(root, options, run="source")
    saved = save_steps(source, [7], model, progress, states)
    promoted_like = f"{source.root}/step-00000007"

    model2, progress2, states2 = make_states(1)
    manager = CheckpointManager(
        CheckpointConfig(storage_options=options), StageLayout(root, "next", "sft"), init_from=promoted_like
    )
    with caplog.at_level(logging.INFO, logger="bagel.platform.checkpoint"):
        info = manager.resume(states2)
    assert (info.source, info.step) == ("init_from", 0)
    assert progress2.step == 0  # only the model came from init_from
    assert_weights(model2, saved[7])
    assert "run.init_from" in caplog.text

    model3, progress3, states3 = make_states(2)
    fresh = make_manager(root, options, run="other").resume(states3)
    assert (fresh.source, fresh.uri) == ("fresh", None)


def test_init_from_incomplete_is_usage_error(store):
    root, options = store
    manager = CheckpointManager(
        CheckpointConfig(storage_options=options), StageLayout(root, "next", "sft"), init_from=f"{root}/promoted/nothing"
    )
    _, _, states = make_states(0)
    with pytest.raises(UsageError, match="run.init_from=.*promoted/nothing"):
        manager.resume(states)


def test_should_save_intervals(tmp_path):
    manager = make_manager(f"file://{tmp_path}", {}, interval_steps=3)
    assert [step for step in range(1, 10) if manager.should_save(step)] == [3, 6, 9]
    assert manager.should_save(10, last_step=True)
    timed = make_manager(f"file://{tmp_path}", {}, interval_steps=0, interval_seconds=0.05)
    assert not timed.should_save(1)
    timed._last_save_time -= 0.1  # as if 0.1 s had passed since the last save
    assert timed.should_save(2)


def test_list_finds_checkpoints_under_root(store):
    root, options = store
    model, progress, states = make_states(0)
    manager = make_manager(root, options)
    save_steps(manager, [1, 2], model, progress, states)
    fs, path = checkpoint_path(manager, 2, options)
    fs.rm(storage.join(path, MANIFEST_NAME))

    entries = find_checkpoints(root, options)
    assert [(entry.step, entry.complete) for entry in entries] == [(2, False), (1, True)]
    assert all(entry.size_bytes > 0 for entry in entries)


def test_per_rank_state_refuses_unsupported_reshard():
    class PositionOnly:
        def state_dict(self):
            return {"position": 3}

        def load_state_dict(self, state):
            self.loaded = state

    saved = PerRankState("dataloader", PositionOnly(), rank=0, size=2).state_dict()
    resumed = PerRankState("dataloader", PositionOnly(), rank=0, size=4)
    resumed.saved_size = 2
    with pytest.raises(UsageError, match="'dataloader' was saved by 2 ranks and cannot be restored on 4"):
        resumed.load_state_dict({"rank0": saved["rank0"], "rank1": saved["rank0"]})

    same = PerRankState("dataloader", PositionOnly(), rank=0, size=2)
    same.saved_size = 2
    same.load_state_dict(saved)
    assert same.inner.loaded == {"position": 3}


def test_optional_state_absent_from_checkpoint(tmp_path, caplog):
    """A state added after a checkpoint was written keeps its fresh value; any other missing state fails."""
    root = f"file://{tmp_path}/store"
    model, progress, states = make_states(0)
    save_steps(make_manager(root, {}), [1], model, progress, states)

    _, resumed_progress, resumed = make_states(1)
    extra = TrainProgress(step=7)
    resumed["added"] = extra
    manager = CheckpointManager(
        CheckpointConfig(interval_steps=1), StageLayout(root, "r1", "pretrain"), optional_keys=("added",)
    )
    with caplog.at_level(logging.WARNING):
        info = manager.resume(resumed)
    assert info.step == 1
    assert resumed_progress.step == 1
    assert extra.step == 7
    assert "no state for added" in caplog.text

    strict = CheckpointManager(CheckpointConfig(interval_steps=1), StageLayout(root, "r1", "pretrain"))
    with pytest.raises(UsageError, match="no state for added"):
        strict.resume(make_states(2)[2] | {"added": TrainProgress()})
