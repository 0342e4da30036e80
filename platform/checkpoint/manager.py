"""Training checkpoints: asynchronous sharded saves, commit protocol, retention and resume.

How the training loop uses it (every rank runs the same calls, in the same order)::

    from bagel.platform.checkpoint import CheckpointManager, GoodputTracker
    from bagel.platform.checkpoint.states import ModelState, OptimizerState, PerRankState, RNGState, TrainProgress
    from bagel.platform.preemption import PreemptionHandler, inject_fault

    preemption = PreemptionHandler(config.preemption)      # first: SIGTERM during setup is not lost
    preemption.install()
    goodput = GoodputTracker(layout, rank=rank, storage_options=config.checkpoint.storage_options)
    ckpt = CheckpointManager(config.checkpoint, layout, init_from=config.run.init_from, goodput=goodput)

    progress = TrainProgress()
    states = {                                   # the keys are the checkpoint's top-level names
        "model": ModelState(model),              # FSDP2/TP model: DTensors reshard on load
        "ema": ModelState(ema_model),            # or any Stateful returning {fqn: tensor}
        "optimizer": OptimizerState(model, optimizer),
        "lr_schedule": lr_scheduler,             # torch LRScheduler is Stateful; same on every rank
        "dataloader": PerRankState("dataloader", data_loader, dp_rank, dp_size),
        "rng": PerRankState("rng", RNGState(), rank, world_size),
        "progress": progress,                    # step and tokens seen
    }
    info = ckpt.resume(states)                   # latest complete checkpoint, else run.init_from, else fresh
    goodput.resumed(progress.step)               # after resume: progress.step is the step to continue from

    for step in range(progress.step + 1, total_steps + 1):
        goodput.step_started()
        ...one optimizer step...
        progress.step, progress.tokens_seen = step, progress.tokens_seen + tokens
        goodput.heartbeat(step)
        inject_fault(step)                       # test hook; a no-op unless BAGEL_FAULT_* is set
        if preemption.should_stop():             # collective: the same result on every rank
            ckpt.save(step, states, blocking=True)   # within preemption.deadline_remaining()
            ckpt.close(); goodput.finish()
            ...flush metrics...
            raise SystemExit(ExitCode.PREEMPTED)
        if ckpt.should_save(step, last_step=step == total_steps):   # collective when interval_seconds > 0
            ckpt.save(step, states, extra={"tokens_seen": progress.tokens_seen})
    ckpt.close()                                  # waits for the last asynchronous save
    goodput.finish()

With `info.source == "init_from"` only the keys in `init_keys` (model and EMA)
were loaded: the optimizer, schedule and data position start fresh, as the
next stage should.

Layout: `{layout.checkpoints_dir}/step-00001000/` holds the DCP shard files
(`__{rank}_{i}.distcp`), DCP's `.metadata` and, written last, MANIFEST (see
`manifest.py`). Only a directory with a MANIFEST whose sizes match (and, on
resume, whose checksums match) is ever loaded.
"""

import logging
import re
import threading
import zlib
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.goodput import GoodputTracker
from bagel.platform.checkpoint.listing import CheckpointEntry, inspect_checkpoint, scan_checkpoints, step_dir_name
from bagel.platform.checkpoint.manifest import check_checksums
from bagel.platform.checkpoint.reader import WholeFileReader
from bagel.platform.checkpoint.staging import ReusedBufferStager
from bagel.platform.checkpoint.states import PerRankState, TrainProgress, saved_rank_count
from bagel.platform.checkpoint.writer import ManifestWriter
from bagel.platform.exit_codes import UsageError
from bagel.platform.layout import StageLayout

logger = logging.getLogger(__name__)

# States a stage takes from the previous stage's promoted checkpoint.
DEFAULT_INIT_KEYS = ("model", "ema")


@dataclass
class ResumeInfo:
    source: str  # "checkpoint" (this run and stage), "init_from" (a promoted checkpoint) or "fresh"
    uri: str | None  # the checkpoint loaded, None for a fresh start
    step: int  # the step of the loaded checkpoint (0 for init_from and fresh)
    saved_world_size: int | None = None  # ranks that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # the MANIFEST's extra fields
    skipped: list[str] = field(default_factory=list)  # newer checkpoints passed over, with the reason


class CheckpointManager:
    """Save and restore a dict of `Stateful` objects for one run and stage (see the module docstring)."""

    def __init__(
        self,
        config: CheckpointConfig,
        layout: StageLayout,
        *,
        init_from: str = "",
        init_keys: tuple[str, ...] = DEFAULT_INIT_KEYS,
        optional_keys: tuple[str, ...] = (),
        goodput: GoodputTracker | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.init_from = init_from.rstrip("/")
        self.init_keys = init_keys
        # States that a checkpoint written before they existed may lack: they keep their
        # fresh values on resume (with a warning) instead of failing the load.
        self.optional_keys = optional_keys
        self.goodput = goodput
        self.storage_options = dict(config.storage_options)
        self.root = layout.checkpoints_dir

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # A gloo group of its own: the background save and the agreement
        # collectives must not interleave with training collectives on NCCL,
        # and DCP's async save needs a CPU backend.
        self._pg = dist.new_group(backend="gloo") if self.distributed else None

        self._future: Future | None = None
        self._read_cache: dict[str, Any] = {}  # checked file contents kept for the next load
        # Host buffers of asynchronous saves, reused from one save to the next.
        self._stager = ReusedBufferStager() if config.reuse_staging_buffers else None
        self._committed_event = threading.Event()
        self._pending_step: int | None = None
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()

    # Resume.

    def resume(self, states: dict[str, Any]) -> ResumeInfo:
        """Load the latest complete checkpoint of this run and stage, else `init_from`, else nothing.

        Logs which, with the URI and step. Checkpoints newer than the one loaded
        (interrupted or damaged saves) are deleted, because this run writes
        those steps again.
        """
        candidates = self._broadcast(self._list_candidates() if self.rank == 0 else None)
        skipped: list[str] = []
        info: ResumeInfo | None = None
        for entry in candidates:
            if not entry.complete:
                skipped.append(f"{entry.uri}: {entry.status}")
                logger.warning("checkpoint %s skipped: %s", entry.uri, entry.status)
                continue
            problems = self._verify_checksums(entry)
            if problems:
                skipped.append(f"{entry.uri}: checksum mismatch: {'; '.join(problems)}")
                logger.error("checkpoint %s is corrupt and skipped: %s", entry.uri, "; ".join(problems))
                continue
            self._load(entry, states)
            info = ResumeInfo("checkpoint", entry.uri, entry.step, entry.manifest.world_size, entry.manifest.extra, skipped)
            logger.info(
                "resumed from checkpoint %s at step %d (saved by %d ranks, now %d)",
                entry.uri,
                entry.step,
                entry.manifest.world_size,
                self.world_size,
            )
            break

        if info is None and self.init_from:
            entry = self._broadcast(inspect_checkpoint(self.init_from, self.storage_options) if self.rank == 0 else None)
            if not entry.complete:
                raise UsageError(
                    f"run.init_from={self.init_from} is not a complete checkpoint ({entry.status}): "
                    "promote the previous stage first or fix the URI"
                )
            problems = self._verify_checksums(entry)
            if problems:
                raise UsageError(f"run.init_from={self.init_from} is corrupt: {'; '.join(problems)}")
            subset = {key: states[key] for key in self.init_keys if key in states}
            self._load(entry, subset)
            info = ResumeInfo("init_from", entry.uri, 0, entry.manifest.world_size, entry.manifest.extra, skipped)
            logger.info("started from the promoted checkpoint %s (run.init_from), loading %s", entry.uri, ", ".join(subset))

        if info is None:
            info = ResumeInfo("fresh", None, 0, skipped=skipped)
            logger.info("no checkpoint in %s and no run.init_from: starting from fresh initialisation", self.root)

        self._remove_newer_than(info.step if info.source == "checkpoint" else 0, candidates)
        self._last_saved_step = info.step if info.source == "checkpoint" else None
        self._last_save_time = time.monotonic()
        return info

    def latest_complete(self) -> CheckpointEntry | None:
        """Return the newest committed checkpoint whose file sizes match its MANIFEST (no checksum pass)."""
        return next((entry for entry in scan_checkpoints(self.root, self.storage_options) if entry.complete), None)

    # Save.

    def should_save(self, step: int, *, last_step: bool = False) -> bool:
        """Return whether to save after `step`; the same result on every rank.

        Collective (a one-element all-reduce) when `interval_seconds` is set,
        because the ranks' clocks disagree on when an interval ends.
        """
        if not self.config.enable or step == self._last_saved_step:
            return False
        if last_step and self.config.save_final:
            return True
        if self.config.interval_steps and step % self.config.interval_steps == 0:
            return True
        if self.config.interval_seconds:
            due = time.monotonic() - self._last_save_time >= self.config.interval_seconds
            return self._any_rank(due)
        return False

    def save(self, step: int, states: dict[str, Any], *, blocking: bool = False, extra: dict[str, Any] | None = None) -> None:
        """Save `states` as the checkpoint of `step`; collective over all ranks.

        Asynchronous (unless `blocking` or `config.async_save` is False): returns
        once the state is copied to host memory, and the upload continues in a
        background thread. A save first waits for the previous one. A blocking
        save raises if it fails; a failed background save is logged and the
        previous complete checkpoint stays the resume point.
        """
        if step == self._last_saved_step:
            if blocking:
                self.wait()
            return
        begin = time.monotonic()
        self.wait()

        uri = storage.join(self.root, step_dir_name(step))
        # Counters of a TrainProgress go into the MANIFEST even when the caller
        # passes no `extra`, so promotion can report tokens for any checkpoint.
        counters = {"tokens_seen": state.tokens_seen for state in states.values() if isinstance(state, TrainProgress)}
        writer = ManifestWriter(
            uri,
            step=step,
            world_size=self.world_size,
            extra={**counters, **(extra or {})},
            thread_count=self.config.io_threads,
            **self.storage_options,
        )
        if self.config.async_save and not blocking:
            future = dcp.async_save(states, storage_writer=writer, process_group=self._pg, async_stager=self._stager)
            self._future = future
            self._pending_step = step
            # Commit bookkeeping (log, purge) runs in the upload thread as soon
            # as the upload ends; wait() also waits for it.
            self._committed_event = threading.Event()
            future.add_done_callback(lambda done: self._on_done(done, step, uri, begin, self._committed_event))
        else:
            dcp.save(states, storage_writer=writer, process_group=self._pg)
            self._committed(step, uri, begin)

        stall = time.monotonic() - begin
        logger.info("checkpoint step %d: training blocked %.2f s (%s)", step, stall, "async" if self._future else "sync")
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if self.goodput is not None:
            self.goodput.add_checkpoint_stall(stall)
            self.goodput.saved(step)

    def wait(self) -> None:
        """Block until the background save (if any) has committed or failed."""
        if self._future is None:
            return
        future, step = self._future, self._pending_step
        self._future = None
        self._pending_step = None
        begin = time.monotonic()
        try:
            future.result()
            self._committed_event.wait()
        except Exception as error:  # noqa: BLE001 - any save failure leaves the previous checkpoint valid
            logger.error("background save of checkpoint step %s failed; the previous checkpoint stays the resume point: %s", step, error)
            if self._last_saved_step == step:
                self._last_saved_step = None
        waited = time.monotonic() - begin
        if self.goodput is not None and waited > 0:
            self.goodput.add_checkpoint_stall(waited)

    def close(self) -> None:
        """Wait for the last save and free the staging buffers. Call it before the process exits, or the save is lost."""
        self.wait()
        if self._stager is not None:
            self._stager.close()

    # Internals.

    def _on_done(self, future: Future, step: int, uri: str, begin: float, event: threading.Event) -> None:
        try:
            if future.exception() is None:
                self._committed(step, uri, begin)
        finally:
            event.set()

    def _committed(self, step: int, uri: str, begin: float) -> None:
        if self.rank != 0:
            return
        logger.info("checkpoint step %d committed to %s in %.2f s", step, uri, time.monotonic() - begin)
        try:
            self._purge(step)
        except OSError as error:
            logger.warning("could not delete old checkpoints in %s: %s", self.root, error)

    def _purge(self, committed_step: int) -> None:
        """Delete complete checkpoints beyond the newest `keep_latest`, and interrupted saves older than `committed_step`."""
        fs, _ = storage.open_fs(self.root, self.storage_options)
        complete_seen = 0
        for entry in scan_checkpoints(self.root, self.storage_options):
            if entry.step > committed_step:
                continue
            if entry.complete:
                complete_seen += 1
                if not self.config.keep_latest or complete_seen <= self.config.keep_latest:
                    continue
            elif entry.step == committed_step:
                continue
            logger.info("deleting checkpoint %s (%s)", entry.uri, "beyond keep_latest" if entry.complete else entry.status)
            storage.remove_tree(fs, storage.open_fs(entry.uri, self.storage_options)[1])

    def _list_candidates(self) -> list[CheckpointEntry]:
        return scan_checkpoints(self.root, self.storage_options)

    def _verify_checksums(self, entry: CheckpointEntry) -> list[str]:
        """Hash this rank's share of the files and return every rank's problems.

        A rank checks the shard files its own rank number wrote (the ones it
        reads back when the layout is unchanged) and keeps their content for
        the load; the other files are spread round-robin.
        """
        self._read_cache = {}
        if not self.config.verify_checksums:
            return []
        fs, path = storage.open_fs(entry.uri, self.storage_options)
        names = [name for name in sorted(entry.manifest.files) if _writer_rank(name, self.world_size) == self.rank]
        problems = check_checksums(fs, path, entry.manifest, names, keep=self._read_cache)
        if not self.distributed:
            return problems
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, problems, group=self._pg)
        return [problem for rank_problems in gathered for problem in rank_problems or []]

    def _load(self, entry: CheckpointEntry, states: dict[str, Any]) -> None:
        reader = WholeFileReader(entry.uri, cache=self._read_cache, **self.storage_options)
        keys = list(reader.read_metadata().state_dict_metadata)
        missing = [name for name in states if not any(key == name or key.startswith(name + ".") for key in keys)]
        absent_optional = [name for name in missing if name in self.optional_keys]
        if absent_optional:
            logger.warning("checkpoint %s has no state for %s: it starts fresh", entry.uri, ", ".join(absent_optional))
            states = {name: state for name, state in states.items() if name not in absent_optional}
            missing = [name for name in missing if name not in absent_optional]
        if missing:
            raise UsageError(
                f"checkpoint {entry.uri} has no state for {', '.join(missing)} "
                f"(it contains {', '.join(sorted({key.split('.', 1)[0] for key in keys}))})"
            )
        for name, state in states.items():
            if isinstance(state, PerRankState):
                state.saved_size = saved_rank_count(keys, name)
        begin = time.monotonic()
        dcp.load(states, storage_reader=reader, process_group=self._pg)
        self._read_cache = {}
        logger.info("loaded %s from %s in %.2f s", ", ".join(states), entry.uri, time.monotonic() - begin)

    def _remove_newer_than(self, step: int, candidates: list[CheckpointEntry]) -> None:
        if self.rank == 0:
            fs, _ = storage.open_fs(self.root, self.storage_options)
            for entry in candidates:
                if entry.step > step:
                    logger.warning("deleting checkpoint %s newer than the resume point (%s)", entry.uri, entry.status)
                    storage.remove_tree(fs, storage.open_fs(entry.uri, self.storage_options)[1])
        if self.distributed:
            dist.barrier(group=self._pg)

    def _broadcast(self, value: Any) -> Any:
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, group=self._pg)
        return holder[0]

    def _any_rank(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._pg)
        return bool(tensor.item())


_SHARD_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


def _writer_rank(name: str, world_size: int) -> int:
    """Return the rank that checks file `name`: for a shard `__{r}_{i}.distcp`, rank r (mod world size)."""
    match = _SHARD_FILE.match(name)
    if match is not None:
        return int(match.group(1)) % world_size
    return zlib.crc32(name.encode()) % world_size
