"""Mixing and packing for one (rank, worker) unit: samples from weighted datasets into token-budget packs.

Each pack is filled in this order:
1. waiting samples of mandatory datasets, then one fresh sample of every
   mandatory dataset the pack still lacks;
2. the other waiting samples, oldest first;
3. draws of a dataset by weight until the pack contains >= expected_tokens.
A sample that would push the pack past max_tokens waits for the next pack:
unlike BAGEL's reference packer, no sample is ever dropped. A waiting sample
always fits an empty pack (every sample is <= max_tokens_per_sample <=
max_tokens), so every pack makes progress. If the mandatory samples together
exceed max_tokens, the ones that do not fit wait (never dropped) and the pack
is counted under "packs_missing_mandatory".

Mixture draws use a generator seeded from (data seed, unit, pack index), so
the state is the pack index, the datasets' stream states and the list of
waiting samples' datasets. A waiting sample is stored as its dataset only: the
saved stream state is the one from before it was read, and a resumed unit
reads it again.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from bagel.model.inputs import PackedSequence
from bagel.model.sequence import derive_seed, layout_sample, pack
from bagel.platform.data.stream import DatasetStream, PreparedSample

_MIX_STREAM = 0x6D6978  # seed stream of mixture draws


@dataclass
class _Waiting:
    dataset: str
    sample: PreparedSample
    stream_state_before: dict  # the dataset stream's state before this sample was read


class UnitPacker:
    """Builds the packs of one unit from its dataset streams; `state_dict` resumes it exactly."""

    def __init__(self, streams: dict[str, DatasetStream], weights: dict[str, float], mandatory: list[str],
                 expected_tokens: int, max_tokens: int, model_config, seed: int, unit: int) -> None:
        self.streams, self.model_config = streams, model_config
        self.names = sorted(streams)
        self.mandatory = sorted(mandatory)
        self.draw_names = [n for n in self.names if weights.get(n, 0) > 0]
        total = sum(weights[n] for n in self.draw_names)
        if not self.draw_names or total <= 0:
            raise ValueError("the data mixture needs at least one dataset with weight > 0")
        self.cumulative = []
        acc = 0.0
        for name in self.draw_names:
            acc += weights[name] / total
            self.cumulative.append(acc)
        self.expected_tokens, self.max_tokens = expected_tokens, max_tokens
        self.seed, self.unit = seed, unit
        self.pack_index = 0
        self.waiting: list[_Waiting] = []
        self._to_reread: list[str] = []  # datasets of waiting samples to read again after a resume
        self.counters: Counter = Counter()  # "packs", "tokens", "packs_missing_mandatory"

    # ----- pulling ---------------------------------------------------------------
    def _pull(self, name: str) -> _Waiting:
        stream = self.streams[name]
        before = stream.state_dict()
        return _Waiting(name, stream.next_sample(), before)

    def _draw(self, rng: random.Random) -> str:
        u = rng.random()
        for name, edge in zip(self.draw_names, self.cumulative):
            if u < edge:
                return name
        return self.draw_names[-1]

    def next_pack(self) -> PackedSequence:
        if self._to_reread:
            self.waiting = [self._pull(name) for name in self._to_reread]
            self._to_reread = []
        rng = random.Random(derive_seed(derive_seed(derive_seed(self.seed, _MIX_STREAM), self.unit), self.pack_index))
        placed: list[PreparedSample] = []
        tokens = 0
        still_waiting: list[_Waiting] = []

        def offer(item: _Waiting) -> bool:
            nonlocal tokens
            if tokens + item.sample.num_tokens <= self.max_tokens:
                placed.append(item.sample)
                tokens += item.sample.num_tokens
                return True
            still_waiting.append(item)
            return False

        waiting, self.waiting = self.waiting, []
        present: set[str] = set()
        for item in [w for w in waiting if w.dataset in self.mandatory]:
            if offer(item):
                present.add(item.dataset)
        for name in self.mandatory:
            if name not in present:
                if offer(self._pull(name)):
                    present.add(name)
        for item in [w for w in waiting if w.dataset not in self.mandatory]:
            offer(item)
        while tokens < self.expected_tokens and not still_waiting:
            offer(self._pull(self._draw(rng)))
        if len(present) < len(self.mandatory):
            self.counters["packs_missing_mandatory"] += 1
        self.waiting = still_waiting
        layouts = [layout_sample(p.sample, self.model_config, random.Random(p.layout_seed), p.noise_seed) for p in placed]
        packed = pack(layouts)
        self.pack_index += 1
        self.counters["packs"] += 1
        self.counters["tokens"] += packed.length
        self.counters["samples"] += len(placed)
        for p in placed:
            self.counters[f"samples/{p.sample.dataset}"] += 1
        return packed

    # ----- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints and strings: pack index, counters, stream states with waiting samples unread."""
        streams = {name: stream.state_dict() for name, stream in self.streams.items()}
        for item in reversed(self.waiting):  # the earliest waiting sample of a dataset decides its state
            streams[item.dataset] = item.stream_state_before
        return {
            "pack_index": self.pack_index,
            "waiting": [item.dataset for item in self.waiting] or list(self._to_reread),
            "streams": streams,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pack_index = int(state["pack_index"])
        self.counters = Counter(state.get("counters", {}))
        for name, stream_state in state["streams"].items():
            if name not in self.streams:
                raise ValueError(f"saved data state has dataset {name!r}, which this config does not list")
            self.streams[name].load_state_dict(stream_state)
        self.waiting = []
        self._to_reread = list(state.get("waiting", []))
