"""`build_data_loader`: packed sequences for one data-parallel rank, with exact resume.

Units: rank r with W = max(1, num_workers) workers owns units r * W + w; each
unit streams its own shards (see `stream`) and packs its own samples (see
`packing`). The torch DataLoader hands out the workers' packs round-robin, so
the k-th pack a rank consumes comes from logical worker k mod W.

Exact resume: every pack travels with its unit's state after that pack. The
loader keeps the state of the last consumed pack per unit and the number of
packs consumed. In-flight (prefetched) packs are not part of that state, so a
resumed run builds them again. On resume, physical worker w plays logical worker
(w + consumed) mod W, so the round-robin continues where it stopped.

A saved state is only valid for the same dp_size, num_workers, seed and
datasets: anything else would silently repeat or skip samples, so
`load_state_dict` refuses it with an error that names the difference.

Metrics (`PackedDataLoader.metrics()`, cumulative over the run, resumes
included): "packs", "samples" (samples placed in packs), "tokens" (packed
tokens after CFG dropout), "samples/<dataset>", "records" (records read),
"skipped" (all bad records) and "skipped/<reason>" with reasons
corrupt_image, zero_size_image, image_too_large, missing_field, bad_record,
no_loss, too_long, invalid_layout, invalid_sample, truncated_shard,
unreadable_object; "retries"
(storage requests retried); "packs_missing_mandatory".
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bagel.model.inputs import PackedSequence
from bagel.platform.data.config import DataConfig
from bagel.platform.data.packing import UnitPacker
from bagel.platform.data.shards import DataError, Manifest, read_manifest
from bagel.platform.data.storage import FilesystemCache, RetryStats
from bagel.platform.data.stream import DatasetStream, WarningLimiter, shard_shortage_message
from bagel.platform.data.tokenizer import load_tokenizer
from bagel.platform.data.transforms import model_limits
from bagel.platform.data.transport import FlatPack, flatten_pack, unflatten_pack

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _identity(item):
    return item


def validate_config(config: DataConfig, model_config) -> None:
    """Check the data config against itself and the model; raises DataError naming the bad value."""
    try:
        config.validate()
    except ValueError as error:
        raise DataError(str(error)) from None
    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        raise DataError(f"data.tokenizer: {error}") from None
    if tokenizer.special_tokens != model_config.special_tokens:
        raise DataError(
            f"tokenizer {config.tokenizer!r} has special tokens {tokenizer.special_tokens}, but the model expects "
            f"{model_config.special_tokens}: use 'byte' for tiny and 'qwen-offline' or the model's tokenizer.json otherwise"
        )


def make_streams(config: DataConfig, model_config, manifests: dict[str, Manifest], unit: int, num_units: int,
                 retry_stats: RetryStats | None = None) -> dict[str, DatasetStream]:
    """Fresh dataset streams of one unit, with filesystems built in the calling process (s3fs is not fork-safe)."""
    filesystems = FilesystemCache(config.storage_options)
    warnings = WarningLimiter()
    tokenizer = load_tokenizer(config.tokenizer)
    limits = model_limits(model_config)
    return {
        d.name: DatasetStream(d, manifests[d.name], unit, num_units, config, model_config, tokenizer, limits,
                              filesystems, retry_stats or RetryStats(), warnings)
        for d in config.datasets
    }


class _UnitsDataset(IterableDataset):
    """Yields (logical worker, pack, unit state, retries) forever, in the worker processes."""

    def __init__(self, config, model_config, manifests, dp_rank, dp_size, unit_states, worker_offset) -> None:
        self.config, self.model_config, self.manifests = config, model_config, manifests
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.unit_states, self.worker_offset = unit_states, worker_offset

    def __iter__(self) -> Iterator[tuple[int, PackedSequence, dict]]:
        info = get_worker_info()
        num_workers = max(1, self.config.num_workers)
        physical = info.id if info is not None else 0
        logical = (physical + self.worker_offset) % num_workers
        unit = self.dp_rank * num_workers + logical
        num_units = self.dp_size * num_workers
        retry_stats = RetryStats()
        streams = make_streams(self.config, self.model_config, self.manifests, unit, num_units, retry_stats)
        packer = UnitPacker(
            streams, {d.name: d.weight for d in self.config.datasets}, [d.name for d in self.config.datasets if d.mandatory],
            self.config.packing.expected_tokens, self.config.packing.max_tokens, self.model_config, self.config.seed, unit,
        )
        saved = self.unit_states[logical]
        retries_before = 0
        if saved is not None:
            packer.load_state_dict(saved)
            retries_before = int(saved.get("retries", 0))
        while True:
            packed = packer.next_pack()
            state = packer.state_dict()
            state["retries"] = retries_before + retry_stats.retries
            # In a worker process the pack crosses to the trainer as one buffer (see `transport`).
            yield logical, packed if info is None else flatten_pack(packed), state


class PackedDataLoader:
    """Iterator of `PackedSequence` for one rank, with `state_dict`, `load_state_dict` and `metrics`."""

    def __init__(self, config: DataConfig, model_config, dp_rank: int, dp_size: int, manifests: dict[str, Manifest]) -> None:
        self.config, self.model_config = config, model_config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.manifests = manifests
        self.num_workers = max(1, config.num_workers)
        self._unit_states: list[dict | None] = [None] * self.num_workers
        self._consumed = 0
        self._iterator = None
        self._loader = None

    # ----- iteration -------------------------------------------------------------
    def _start(self) -> None:
        dataset = _UnitsDataset(
            self.config, self.model_config, self.manifests, self.dp_rank, self.dp_size,
            list(self._unit_states), self._consumed % self.num_workers,
        )
        if self.config.num_workers > 0:
            self._loader = DataLoader(
                dataset, batch_size=None, num_workers=self.config.num_workers, collate_fn=_identity,
                prefetch_factor=self.config.prefetch_factor, persistent_workers=False,
                multiprocessing_context="fork" if torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork") else None,
            )
            self._iterator = iter(self._loader)
        else:
            self._iterator = iter(dataset)

    def __iter__(self) -> "PackedDataLoader":
        return self

    def __next__(self) -> PackedSequence:
        if self._iterator is None:
            self._start()
        logical, packed, state = next(self._iterator)
        if isinstance(packed, FlatPack):
            packed = unflatten_pack(packed)
        expected = self._consumed % self.num_workers
        if logical != expected:  # the round-robin is what makes resume exact; never continue past a break in it
            raise RuntimeError(f"data worker order broke: got a pack of worker {logical}, expected {expected}")
        self._unit_states[logical] = state
        self._consumed += 1
        return packed

    def close(self) -> None:
        """Stop the worker processes (the next `next()` starts them again from the current state)."""
        self._iterator = None
        self._loader = None

    # ----- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's data position: plain ints, strings and lists (picklable, JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "seed": self.config.seed,
            "datasets": {name: m.digest for name, m in sorted(self.manifests.items())},
            "consumed": self._consumed,
            "units": [None if s is None else dict(s) for s in self._unit_states],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` was taken; refuses a state from a different layout or data."""
        if self.config.ignore_saved_state:
            logger.warning(
                "data.ignore_saved_state=true: the data stream starts afresh (saved at %s packs consumed); "
                "samples seen before this resume are seen again", state.get("consumed"),
            )
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("dp_size", "num_workers", "seed"):
            if state[key] != mine[key]:
                raise DataError(
                    f"cannot resume the data stream: it was saved with {key}={state[key]}, this run has {key}={mine[key]}. "
                    f"Data positions are per (rank, worker) unit, so a different layout would repeat or skip samples; "
                    f"resume with data-parallel size {state['dp_size']} and data.num_workers={state['num_workers']} "
                    f"(0 and 1 are the same layout) and seed {state['seed']}, or set data.ignore_saved_state=true "
                    f"to start the data stream afresh"
                )
        if state["dp_rank"] != self.dp_rank:
            raise DataError(f"data state of rank {state['dp_rank']} loaded on rank {self.dp_rank}: load each rank's own state")
        if state["datasets"] != mine["datasets"]:
            raise DataError(
                f"cannot resume the data stream: the datasets changed (saved {state['datasets']}, now {mine['datasets']})"
            )
        self.close()
        self._consumed = int(state["consumed"])
        self._unit_states = [None if s is None else dict(s) for s in state["units"]]

    # ----- metrics ---------------------------------------------------------------
    def metrics(self) -> dict[str, int]:
        """Cumulative counters (see the module docstring for the keys)."""
        total: Counter = Counter()
        for state in self._unit_states:
            if state is None:
                continue
            total.update(state.get("counters", {}))
            total["retries"] += int(state.get("retries", 0))
            for stream in state["streams"].values():
                for key, value in stream.get("counters", {}).items():
                    if key == "records" or key.startswith("skipped/"):
                        total[key] += value
        total["skipped"] = sum(v for k, v in total.items() if k.startswith("skipped/"))
        for key in ("packs", "samples", "tokens", "records", "retries"):
            total.setdefault(key, 0)
        return dict(total)


def build_data_loader(config: DataConfig, model_config, dp_rank: int, dp_size: int) -> PackedDataLoader:
    """Validate the config, read every manifest and check shard counts, before any GPU work.

    Raises DataError (a UsageError: exit code 2) for a missing or empty
    manifest, a dataset with fewer shards than dp_size * num_workers, or a
    tokenizer that does not match the model.
    """
    config = DataConfig.from_dict(config)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    validate_config(config, model_config)
    units = dp_size * max(1, config.num_workers)
    manifests = {}
    for dataset in config.datasets:
        manifest = read_manifest(dataset.uri, config.storage_options, config.retry)
        if len(manifest.shards) < units:
            raise DataError(shard_shortage_message(dataset.name, len(manifest.shards), units))
        manifests[dataset.name] = manifest
        logger.info("dataset %s: %d samples in %d shards (%s)", dataset.name, manifest.num_samples, len(manifest.shards), manifest.uri)
    return PackedDataLoader(config, model_config, dp_rank, dp_size, manifests)
