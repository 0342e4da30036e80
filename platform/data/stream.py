"""One dataset's deterministic, resumable sample stream for one (rank, worker) unit.

Order, for unit u of U = dp_size * num_workers units:
- epoch e shuffles the manifest's shard list with a seed from (data seed,
  dataset, e) and gives unit u the shards u, u + U, u + 2U, ... of that order
  (every shard is used; units differ by at most one shard);
- the unit reads its shards front to back and shuffles the records in
  consecutive windows of `shuffle_buffer` records, each window with its own
  seed. A window is the bounded shuffle buffer: memory stays at one window of
  encoded records, and the position inside an epoch is a single integer, so
  resuming reopens one shard at one record and refills one window;
- after the last record of its shards the unit starts epoch e + 1.

State is (epoch, records consumed in the epoch, counters): a few integers.

Each record has a global index (its position in the manifest's shard order),
and the sample's seed comes from (data seed, epoch, dataset, global index):
CFG dropout, caption choice, edit spans, timesteps and noise of a sample do
not depend on the rank, the worker or the parallel layout.

Bad records are skipped and counted by reason; the position still advances,
so a resume skips them again without recounting (counters are part of the
state). A shard that cannot be opened counts its manifest sample count as
"unreadable_object"; a shard that ends early counts the records it lacks as
"truncated_shard".
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from bagel.model.inputs import ImageRole, InterleavedSample, TextItem
from bagel.model.sequence import derive_seed, estimate_tokens
from bagel.platform.data.config import DataConfig, DatasetConfig
from bagel.platform.data.records import build_sample
from bagel.platform.data.shards import DataError, Manifest, RawRecord, iter_shard
from bagel.platform.data.storage import FilesystemCache, RetryStats, ShardReader
from bagel.platform.data.tokenizer import Tokenizer
from bagel.platform.data.transforms import RoleLimits, SampleError

logger = logging.getLogger(__name__)

# Seed streams (second argument of derive_seed) for the things a sample draws.
_PLAN, _LAYOUT, _NOISE = 0, 1, 2
_FIT_ATTEMPTS = 4  # builds of one sample while shrinking its images to the token cap


def name_key(name: str) -> int:
    """Hash a dataset name to an integer that is the same in every process and Python run."""
    return zlib.crc32(name.encode("utf-8"))


def sample_seed(data_seed: int, epoch: int, dataset: str, global_index: int) -> int:
    """Derive the seed of one sample occurrence from (data seed, epoch, dataset, global index) only."""
    return derive_seed(derive_seed(derive_seed(data_seed, epoch), name_key(dataset)), global_index)


@dataclass
class Entry:
    """One record position: where it is, and the record or why it is unusable."""

    global_index: int  # index in the manifest's shard order (shard offset + index in shard)
    shard: int  # manifest shard index
    raw: RawRecord | None
    reason: str = ""  # skip reason when raw is None


@dataclass
class PreparedSample:
    """A decoded sample ready to lay out, with its seeds and exact token count."""

    sample: InterleavedSample
    num_tokens: int  # estimate_tokens: exact before CFG dropout
    layout_seed: int  # seeds random.Random for layout_sample (CFG dropout, timesteps)
    noise_seed: int


class WarningLimiter:
    """Logs at most one warning per reason every `interval_s`, with the number suppressed."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter = Counter()

    def warn(self, reason: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < self.interval_s:
            self._suppressed[reason] += 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        suffix = f" ({suppressed} more like it since the last warning)" if suppressed else ""
        logger.warning(message + suffix, *args)


class DatasetStream:
    """The sample stream of one dataset for one unit; see the module docstring."""

    def __init__(
        self,
        dataset: DatasetConfig,
        manifest: Manifest,
        unit: int,
        num_units: int,
        config: DataConfig,
        model_config,
        tokenizer: Tokenizer,
        limits: dict[ImageRole, RoleLimits],
        filesystems: FilesystemCache,
        retry_stats: RetryStats,
        warnings: WarningLimiter,
    ) -> None:
        if len(manifest.shards) < num_units:
            raise DataError(shard_shortage_message(dataset.name, len(manifest.shards), num_units))
        self.dataset, self.manifest, self.unit, self.num_units = dataset, manifest, unit, num_units
        self.config, self.model_config, self.tokenizer, self.limits = config, model_config, tokenizer, limits
        self.filesystems, self.retry_stats, self.warnings = filesystems, retry_stats, warnings
        self.transforms = {
            ImageRole.VIT: dataset.vit_transform,
            ImageRole.VAE_NOISED: dataset.vae_transform,
            ImageRole.VAE_CLEAN: dataset.vae_transform,
        }
        offsets, total = [], 0
        for shard in manifest.shards:
            offsets.append(total)
            total += shard.num_samples
        self.shard_offsets = offsets
        self.epoch = 0
        self.pos = 0  # records consumed in this epoch
        self.counters: Counter = Counter()  # "records", "samples", "skipped/<reason>"
        self._entries: Iterator[Entry] | None = None
        self._good_in_epoch = 0

    # ----- order -----------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> list[int]:
        """Manifest shard indexes this unit reads in `epoch`, in reading order."""
        order = list(range(len(self.manifest.shards)))
        random.Random(derive_seed(derive_seed(self.config.seed, name_key(self.dataset.name)), epoch)).shuffle(order)
        return order[self.unit :: self.num_units]

    def epoch_length(self, epoch: int) -> int:
        return sum(self.manifest.shards[s].num_samples for s in self.epoch_shards(epoch))

    def _sequential(self, epoch: int, start: int) -> Iterator[Entry]:
        """Records of this unit's shards in reading order, from record `start` of the epoch.

        The next shard is opened on a prefetch thread when the current one
        starts: its size is requested and then its first block. So shard
        boundaries do not stall the stream, and the parsing thread waits for a
        size request only at the first shard.
        """
        plan = []
        skip = start
        for shard in self.epoch_shards(epoch):
            count = self.manifest.shards[shard].num_samples
            if skip >= count:
                skip -= count
                continue
            plan.append((shard, skip))
            skip = 0
        upcoming = ShardReader.pool().submit(self._open, plan[0][0]) if plan else None
        for index, (shard, skip) in enumerate(plan):
            current = upcoming.result()  # _open catches storage errors and returns them
            upcoming = ShardReader.pool().submit(self._open, plan[index + 1][0]) if index + 1 < len(plan) else None
            yield from self._read_shard(shard, skip, current)

    def _open(self, shard: int) -> ShardReader | Exception:
        """Open a shard and request its first block; an error is returned, to be reported at the shard's turn."""
        try:
            fs, path = self.filesystems.get(self.manifest.shard_uri(shard))
            reader = ShardReader(
                fs, path, self.config.read_ahead_bytes, self.config.retry, self.retry_stats, depth=self.config.read_ahead_blocks
            )
            reader.prefetch(0)
            return reader
        except Exception as error:  # storage errors that survived the retries
            return error

    def _read_shard(self, shard: int, skip: int, opened: ShardReader | Exception) -> Iterator[Entry]:
        info = self.manifest.shards[shard]
        uri = self.manifest.shard_uri(shard)
        base = self.shard_offsets[shard]
        produced = skip
        reason = detail = ""
        try:
            if isinstance(opened, Exception):
                raise opened
            reader = opened
            with reader:
                if reader.size < info.num_bytes:
                    self.warnings.warn(
                        "truncated_shard", "dataset %s: shard %s has %d bytes, the manifest says %d",
                        self.dataset.name, uri, reader.size, info.num_bytes,
                    )
                for raw in iter_shard(reader, skip):
                    if produced >= info.num_samples:
                        self.warnings.warn(
                            "extra_records", "dataset %s: shard %s holds more samples than its manifest count %d; extra ones ignored",
                            self.dataset.name, uri, info.num_samples,
                        )
                        break
                    yield Entry(base + produced, shard, raw)
                    produced += 1
        except (tarfile.TarError, EOFError) as error:
            reason = "truncated_shard"
            detail = str(error)
        except DataError:
            raise
        except Exception as error:  # storage errors that survived the retries: the object is unreadable
            reason = "unreadable_object"
            detail = f"{type(error).__name__}: {error}"
        if produced < info.num_samples:
            reason = reason or "truncated_shard"
            if produced == skip and reason == "unreadable_object":
                self.warnings.warn(reason, "dataset %s: cannot read shard %s (%s); its %d samples are skipped",
                                   self.dataset.name, uri, detail, info.num_samples - produced)
            else:
                self.warnings.warn(reason, "dataset %s: shard %s ends after %d of %d samples (%s)",
                                   self.dataset.name, uri, produced, info.num_samples, detail or "short read")
            for index in range(produced, info.num_samples):
                yield Entry(base + index, shard, None, reason)

    def _windows(self, epoch: int, start: int) -> Iterator[Entry]:
        """Records of the epoch in shuffled-window order, from position `start`."""
        window_size = max(1, self.config.shuffle_buffer)
        total = self.epoch_length(epoch)
        window = start // window_size
        sequential = self._sequential(epoch, window * window_size)
        offset = start - window * window_size
        while window * window_size < total:
            size = min(window_size, total - window * window_size)
            records = [next(sequential) for _ in range(size)]
            order = list(range(size))
            if window_size > 1:
                seed = derive_seed(derive_seed(derive_seed(self.config.seed, name_key(self.dataset.name)), epoch), 1_000_003 + window)
                random.Random(seed).shuffle(order)
            for k in order[offset:]:
                yield records[k]
            offset = 0
            window += 1

    # ----- samples ---------------------------------------------------------------
    def next_entry(self) -> tuple[int, Entry]:
        """Return the epoch and the next record position, starting the next epoch when one ends."""
        while True:
            if self._entries is None:
                self._entries = self._windows(self.epoch, self.pos)
            try:
                entry = next(self._entries)
            except StopIteration:
                if self._good_in_epoch == 0 and self.pos > 0 and self.counters["samples"] == 0:
                    raise DataError(f"dataset {self.dataset.name}: no usable sample in a whole epoch; see the skip warnings")
                logger.info("dataset %s: unit %d starts epoch %d", self.dataset.name, self.unit, self.epoch + 1)
                self.epoch += 1
                self.pos = 0
                self._good_in_epoch = 0
                self._entries = None
                continue
            self.pos += 1
            return self.epoch, entry

    def epoch_entries(self, epoch: int, start: int = 0) -> Iterator[Entry]:
        """Iterate the unit's record positions of `epoch` in reading order (shuffled windows), from `start`."""
        return self._windows(epoch, start)

    def prepare(self, epoch: int, entry: Entry) -> PreparedSample:
        """Decode one record into a sample with its seeds; raises SampleError(reason) when unusable."""
        max_tokens = self.config.packing.max_tokens_per_sample
        seed = sample_seed(self.config.seed, epoch, self.dataset.name, entry.global_index)
        if entry.raw is None:
            raise SampleError(entry.reason)
        if entry.raw.bad_reason:
            raise SampleError(entry.raw.bad_reason)
        # A sample over the token cap is rebuilt with smaller images (the same
        # plan: the planning generator restarts from its seed) before it counts
        # as too long. Only text that alone exceeds the cap is skipped.
        shrink = 1.0
        for _ in range(_FIT_ATTEMPTS):
            sample = build_sample(
                f"{self.dataset.name}/{entry.shard:05d}/{entry.raw.key}", self.dataset.name, entry.raw.record,
                entry.raw.images, random.Random(derive_seed(seed, _PLAN)), self.tokenizer, self.transforms, self.limits,
                max_text_chars=max_tokens * 16, shrink=shrink,
            )
            try:
                num_tokens = estimate_tokens(sample, self.model_config)
            except ValueError as error:
                raise SampleError("invalid_layout", str(error)) from error
            if num_tokens <= max_tokens:
                return PreparedSample(sample, num_tokens, derive_seed(seed, _LAYOUT), derive_seed(seed, _NOISE))
            fixed = sum(len(i.token_ids) + 2 if isinstance(i, TextItem) else 2 for i in sample.items)
            image_tokens = num_tokens - fixed
            if image_tokens <= 0 or fixed >= max_tokens:
                break
            shrink *= math.sqrt((max_tokens - fixed) / image_tokens) * 0.97
        raise SampleError("too_long", f"{num_tokens} tokens > max_tokens_per_sample={max_tokens}")

    def next_sample(self) -> PreparedSample:
        """Return the next usable sample. Bad records are counted, logged (rate-limited) and skipped."""
        while True:
            epoch, entry = self.next_entry()
            self.counters["records"] += 1
            key = entry.raw.key if entry.raw is not None else f"#{entry.global_index}"
            try:
                prepared = self.prepare(epoch, entry)
            except SampleError as error:
                self._skip(error, self.manifest.shards[entry.shard].uri, key)
                continue
            except Exception as error:  # a record that breaks a decoder in an unforeseen way is bad input too
                self._skip(SampleError("invalid_sample", f"{type(error).__name__}: {error}"), self.manifest.shards[entry.shard].uri, key)
                continue
            self.counters["samples"] += 1
            self._good_in_epoch += 1
            return prepared

    def _skip(self, error: SampleError, shard_uri: str, key: str) -> None:
        self.counters[f"skipped/{error.reason}"] += 1
        skipped = sum(v for k, v in self.counters.items() if k.startswith("skipped/"))
        records = self.counters["records"]
        self.warnings.warn(error.reason, "dataset %s: skipped sample %s of shard %s: %s", self.dataset.name, key, shard_uri, error)
        threshold = self.config.skip_threshold
        if (records >= self.config.skip_min_samples or self.epoch > 0) and skipped > threshold * records:
            reasons = {k.split("/", 1)[1]: v for k, v in self.counters.items() if k.startswith("skipped/")}
            raise DataError(
                f"dataset {self.dataset.name} ({self.manifest.uri}): {skipped} of {records} samples "
                f"({skipped / records:.1%}) are unusable, more than skip_threshold={threshold:.1%}; reasons {reasons}. "
                f"Fix or re-prepare the data, or raise data.skip_threshold"
            )

    # ----- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "counters": dict(self.counters), "good_in_epoch": self._good_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.counters = Counter(state.get("counters", {}))
        self._good_in_epoch = int(state.get("good_in_epoch", 0))
        self._entries = None


def shard_shortage_message(name: str, num_shards: int, num_units: int) -> str:
    return (
        f"dataset {name} has {num_shards} shards, fewer than data-parallel ranks x workers = {num_units}: "
        f"some (rank, worker) pair would get no data. Re-prepare it with more, smaller shards "
        f"(bagel data prepare --samples-per-shard), or lower data.num_workers"
    )
