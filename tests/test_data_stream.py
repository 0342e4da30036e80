"""Streaming, mixing, packing, exact resume and bad input of the data loader (file://, memory://, SeaweedFS)."""

import hashlib
import http.client
import json
import logging
import os
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bagel.model.configs import get_model_config
from bagel.model.sequence import ATTN_MODES
from bagel.platform.data.config import DataConfig
from bagel.platform.data.loader import build_data_loader, make_streams
from bagel.platform.data.shards import DataError, read_manifest
from bagel.platform.data.synthetic import write_image_dataset, write_text_dataset
from bagel.platform.data.transforms import SampleError

TINY = get_model_config("tiny")


def _config(datasets, **overrides):
    raw = {"num_workers": 0, "shuffle_buffer": 8, "seed": 3, "datasets": datasets,
           "packing": {"expected_tokens": 300, "max_tokens": 400, "max_tokens_per_sample": 300}}
    raw.update(overrides)
    return DataConfig.from_dict(raw)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _ids(packs):
    return [sample_id for p in packs for sample_id in p.sample_ids]


def _digest(packs):
    """Checksum of sample ids and the random draws that depend on the sample seed."""
    h = hashlib.sha256()
    for p in packs:
        h.update(json.dumps(p.sample_ids).encode())
        h.update(p.text_ids.numpy().tobytes())
        h.update(p.vae_timestep_logits.numpy().tobytes())
        h.update(json.dumps(p.vae_noise_seeds).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {
        "a": write_text_dataset(f"file://{root}/a", "a", 60, 6, seed=1, max_words=12),
        "b": write_text_dataset(f"file://{root}/b", "b", 40, 5, seed=2, max_words=12),
    }


@pytest.fixture(scope="module")
def demo_s3(s3_server, tmp_path_factory):
    from bagel.platform.data.demo import write_demo

    bucket = s3_server.make_bucket("stream-demo")
    return write_demo(f"{bucket}/demo", storage_options=s3_server.storage_options)


def test_packing_invariants_and_no_sample_lost(text_data):
    """Every sample of an epoch is packed exactly once; packs respect the budget and the mask structure."""
    config = _config([{"name": "a", "uri": text_data["a"]}])
    loader = build_data_loader(config, TINY, 0, 1)
    packs = _take(loader, 40)
    ids = _ids(packs)
    first_epoch = ids[:60]
    assert sorted(first_epoch) == sorted(set(first_epoch))
    assert len(set(first_epoch)) == 60
    budget = config.packing
    for p in packs:
        assert p.length <= budget.max_tokens
        assert sum(p.split_lens) == p.length == len(p.position_ids)
        assert set(p.attn_modes) <= set(ATTN_MODES)
        assert len(p.attn_modes) == len(p.split_lens)
        # Splits never straddle samples: the cumulative split ends include every sample end.
        ends, acc = set(), 0
        for n in p.split_lens:
            acc += n
            ends.add(acc)
        acc = 0
        for n in p.sample_lens:
            acc += n
            assert acc in ends
        # Position ids restart at 0 at every sample start.
        start = 0
        for n in p.sample_lens:
            assert int(p.position_ids[start]) == 0
            start += n
        assert len(p.text_ids) == len(p.text_indexes)
        assert len(p.ce_labels) == len(p.ce_indexes)
    metrics = loader.metrics()
    assert metrics["samples"] == len(ids)
    assert metrics["packs"] == 40
    assert metrics["skipped"] == 0


def test_determinism_and_seed(text_data):
    datasets = [{"name": "a", "uri": text_data["a"]}, {"name": "b", "uri": text_data["b"]}]
    one = _take(build_data_loader(_config(datasets), TINY, 0, 1), 12)
    two = _take(build_data_loader(_config(datasets), TINY, 0, 1), 12)
    other = _take(build_data_loader(_config(datasets, seed=4), TINY, 0, 1), 12)
    assert _digest(one) == _digest(two)
    assert _ids(one) != _ids(other)


def test_mixture_weights_and_mandatory(text_data):
    datasets = [{"name": "a", "uri": text_data["a"], "weight": 3.0}, {"name": "b", "uri": text_data["b"], "weight": 1.0}]
    loader = build_data_loader(_config(datasets, packing={"expected_tokens": 2000, "max_tokens": 2400,
                                                          "max_tokens_per_sample": 300}), TINY, 0, 1)
    _take(loader, 60)
    m = loader.metrics()
    n = m["samples/a"] + m["samples/b"]
    share = m["samples/a"] / n
    # Binomial standard deviation at p = 0.75 is sqrt(p (1-p) / n); allow 4 of them.
    assert n > 500, (share, n)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, (share, n)

    datasets = [{"name": "a", "uri": text_data["a"], "weight": 1.0}, {"name": "b", "uri": text_data["b"], "weight": 0.0, "mandatory": True}]
    loader = build_data_loader(_config(datasets), TINY, 0, 1)
    for p in _take(loader, 20):
        assert any(s.startswith("b/") for s in p.sample_ids)
    assert loader.metrics().get("packs_missing_mandatory", 0) == 0


@pytest.mark.parametrize("storage", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_exact_resume_three_times_across_epoch_wrap(storage, text_data, request, monkeypatch):
    """Three successive resumes (through JSON) see exactly the uninterrupted sequence, past an epoch end."""
    uris = text_data
    if storage == "s3":
        server = request.getfixturevalue("s3_server")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        bucket = server.make_bucket("resume-text")
        uris = {
            "a": write_text_dataset(f"{bucket}/a", "a", 60, 6, seed=1, max_words=12, storage_options=server.storage_options),
            "b": write_text_dataset(f"{bucket}/b", "b", 40, 5, seed=2, max_words=12, storage_options=server.storage_options),
        }
    datasets = [{"name": "a", "uri": uris["a"], "weight": 1.0}, {"name": "b", "uri": uris["b"], "weight": 1.0, "mandatory": True}]
    config = _config(datasets, num_workers=2)
    total = 36  # b has 40 samples, ~2 per pack from two units: wraps its epoch
    reference = _take(build_data_loader(config, TINY, 0, 1), total)
    resumed, state = [], None
    for stop in (7, 16, 25, total):
        loader = build_data_loader(config, TINY, 0, 1)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        resumed += _take(loader, stop - len(resumed))
        state = loader.state_dict()
        loader.close()
    assert _digest(resumed) == _digest(reference)
    epochs = [u["streams"]["b"]["epoch"] for u in state["units"]]
    assert max(epochs) >= 1  # the run wrapped b's epoch


def test_world_size_change_refused(text_data):
    datasets = [{"name": "a", "uri": text_data["a"]}]
    loader = build_data_loader(_config(datasets), TINY, 0, 2)
    _take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="dp_size=2, this run has dp_size=1"):
        build_data_loader(_config(datasets), TINY, 0, 1).load_state_dict(state)
    with pytest.raises(DataError, match="num_workers=1, this run has num_workers=2"):
        build_data_loader(_config(datasets, num_workers=2), TINY, 0, 2).load_state_dict(state)


def test_too_few_shards_fail_at_start(text_data):
    datasets = [{"name": "b", "uri": text_data["b"]}]  # 8 shards
    with pytest.raises(DataError, match=r"dataset b has 8 shards, fewer than data-parallel ranks x workers = 12"):
        build_data_loader(_config(datasets, num_workers=3), TINY, 0, 4)


def test_missing_uri_and_empty_manifest_fail_at_start(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data_loader(_config([{"name": "x", "uri": f"file://{tmp_path}/missing"}]), TINY, 0, 1)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "bagel-shards/1", "shards": []}))
    with pytest.raises(DataError, match="lists no samples"):
        build_data_loader(_config([{"name": "x", "uri": str(tmp_path)}]), TINY, 0, 1)


def _bad_dataset(root):
    bad = {1: "corrupt_image", 4: "zero_size_image", 7: "missing_field", 10: "too_long"}
    uri = write_image_dataset(f"file://{root}/bad", "bad", 24, 3, bad=bad)
    manifest = read_manifest(uri)
    shards = [root / "bad" / s.uri for s in manifest.shards]
    # Truncated shard: cut shard 5 (samples 15-17) in the middle of its second sample's image.
    with tarfile.open(shards[5]) as tar:
        member = tar.getmember("s000016.0.png")
    data = shards[5].read_bytes()
    shards[5].write_bytes(data[: member.offset_data + member.size // 2])
    # Unreadable object: shard 7 (samples 21-23) is gone.
    shards[7].unlink()
    return uri


def test_bad_input_classified_by_reason(tmp_path):
    """Each fault of one epoch is classified under its reason, exactly once."""
    uri = _bad_dataset(tmp_path)
    config = _config([{"name": "bad", "uri": uri}], shuffle_buffer=4)
    loader = build_data_loader(config, TINY, 0, 1)
    stream = make_streams(config, TINY, loader.manifests, unit=0, num_units=1)["bad"]
    reasons, good = Counter(), []
    for entry in stream.epoch_entries(0):
        try:
            good.append(stream.prepare(0, entry).sample.sample_id)
        except SampleError as error:
            reasons[error.reason] += 1
    assert reasons["corrupt_image"] == reasons["zero_size_image"] == reasons["missing_field"] == reasons["too_long"] == 1
    assert reasons["unreadable_object"] == 3
    assert reasons["truncated_shard"] == 2  # the cut shard keeps its first sample only
    assert len(good) + sum(reasons.values()) == 24
    assert len(set(good)) == len(good)


def test_bad_input_is_skipped_and_training_continues(tmp_path, caplog):
    uri = _bad_dataset(tmp_path)
    config = _config([{"name": "bad", "uri": uri}], skip_threshold=0.5)
    loader = build_data_loader(config, TINY, 0, 1)
    with caplog.at_level(logging.WARNING):
        packs = _take(loader, 6)  # about two epochs of the 14-15 good samples
    m = loader.metrics()
    epochs = m["records"] / 24
    assert epochs >= 1
    for reason, per_epoch in (("corrupt_image", 1), ("zero_size_image", 1), ("missing_field", 1), ("too_long", 1),
                              ("unreadable_object", 3)):
        assert per_epoch <= m[f"skipped/{reason}"] <= per_epoch * (int(epochs) + 1)
    assert m["skipped"] == sum(v for k, v in m.items() if k.startswith("skipped/"))
    assert not any(s.endswith(("s000001", "s000004", "s000007", "s000010")) for s in _ids(packs))
    text = caplog.text
    assert "s000001" in text
    assert "shard-00000.tar" in text  # warnings name the sample key and the shard
    assert "shard-00007.tar" in text


def test_skip_threshold_stops_with_dataset_name(tmp_path):
    uri = _bad_dataset(tmp_path)
    config = _config([{"name": "bad", "uri": uri}], skip_threshold=0.01, skip_min_samples=5, shuffle_buffer=1)
    loader = build_data_loader(config, TINY, 0, 1)
    with pytest.raises(DataError, match=r"dataset bad .* unusable, more than skip_threshold=1.0%"):
        _take(loader, 20)


@pytest.mark.s3
def test_s3_streaming_two_ranks_two_workers(demo_s3, s3_server, monkeypatch):
    """2 ranks x 2 workers on SeaweedFS: every (rank, worker) produces packs, ranks read disjoint shards."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    datasets = [{"name": "vlm", "uri": demo_s3["vlm"], "weight": 1.0}, {"name": "edit", "uri": demo_s3["edit"], "weight": 1.0}]
    config = _config(datasets, num_workers=2, packing={"expected_tokens": 384, "max_tokens": 512, "max_tokens_per_sample": 384})
    per_rank = []
    for rank in range(2):
        loader = build_data_loader(config, TINY, rank, 2)
        packs = _take(loader, 4)
        state = loader.state_dict()
        loader.close()
        assert all(unit is not None and unit["pack_index"] == 2 for unit in state["units"])  # both workers produced
        assert all(s["epoch"] == 0 for unit in state["units"] for s in unit["streams"].values())
        assert all(p.length <= 512 for p in packs) and all(p.vae_images or p.vit_patches.numel() for p in packs)
        per_rank.append({(s.split("/")[0], s.split("/")[1]) for s in _ids(packs)})
    assert not per_rank[0] & per_rank[1]  # (dataset, shard) pairs: epoch 0 shards never shared between ranks


class _SlowDownProxy:
    """A loopback HTTP proxy in front of the S3 server that returns 503 SlowDown to the next N GETs.

    Stand-in for a throttling S3 endpoint (neither SeaweedFS nor moto throttles on demand).
    """

    def __init__(self, target: str, failures: int) -> None:
        host, port = target.replace("http://", "").split(":")
        proxy = self
        self.remaining = failures
        self.answered_503 = 0
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                if self.command == "GET":
                    with lock:
                        throttle = proxy.remaining > 0
                        if throttle:
                            proxy.remaining -= 1
                            proxy.answered_503 += 1
                    if throttle:
                        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.s3
def test_throttling_is_retried_and_counted(s3_server, monkeypatch):
    bucket = s3_server.make_bucket("throttle")
    uri = write_text_dataset(f"{bucket}/text", "t", 12, 3, max_words=12, storage_options=s3_server.storage_options)
    proxy = _SlowDownProxy(s3_server.endpoint_url, failures=0)
    try:
        for key, value in s3_server.env.items():
            monkeypatch.setenv(key, value)
        options = {"key": s3_server.key, "secret": s3_server.secret, "client_kwargs": {"endpoint_url": proxy.url}}
        config = _config([{"name": "t", "uri": uri}], storage_options=options,
                         retry={"max_attempts": 8, "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "budget_s": 30})
        loader = build_data_loader(config, TINY, 0, 1)
        proxy.remaining = 4  # the next 4 GETs (shard reads) are throttled
        ids = []
        while len(ids) < 12:
            ids += next(loader).sample_ids
        m = loader.metrics()
        assert proxy.answered_503 == 4
        assert m["retries"] == 4
        assert m["skipped"] == 0
        assert len(set(ids[:12])) == 12

        # A server that keeps throttling past the attempts: the shard is counted unreadable, nothing hangs.
        proxy.remaining = 10_000
        config = _config([{"name": "t", "uri": uri}], storage_options=options, skip_threshold=1.0,
                         retry={"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.01, "budget_s": 5})
        with pytest.raises(DataError):
            build_data_loader(config, TINY, 0, 1)  # the manifest itself cannot be read
    finally:
        proxy.close()


def test_memory_filesystem_with_workers():
    """memory:// works with forked workers (they inherit the parent's in-memory store)."""
    uri = write_text_dataset("memory://bagel-test/mem", "mem", 20, 4, max_words=8)
    config = _config([{"name": "mem", "uri": uri}], num_workers=2)
    loader = build_data_loader(config, TINY, 0, 1)
    ids = _ids(_take(loader, 4))
    loader.close()
    assert ids and all(s.startswith("mem/") for s in ids)


def test_sample_randomness_does_not_depend_on_the_layout(tmp_path):
    """A sample gets the same noise seeds and timestep logits with 1 or 2 ranks (seeded by its global index)."""
    uri = write_image_dataset(f"file://{tmp_path}/img", "img", 16, 2)
    config = _config([{"name": "img", "uri": uri}], packing={"expected_tokens": 1, "max_tokens": 400, "max_tokens_per_sample": 300})

    def per_sample(rank, dp_size, packs):
        out = {}
        for p in _take(build_data_loader(config, TINY, rank, dp_size), packs):
            assert len(p.sample_ids) == 1  # expected_tokens=1: one sample per pack
            out[p.sample_ids[0]] = (p.vae_noise_seeds, p.vae_timestep_logits.tolist(), p.text_ids.tolist())
        return out

    single = per_sample(0, 1, 16)  # one epoch: all 16 samples
    split = {**per_sample(0, 2, 8), **per_sample(1, 2, 8)}
    assert set(single) == set(split)
    assert len(single) == 16
    assert all(single[k] == split[k] for k in single)


def test_skip_threshold_raised_from_a_worker(tmp_path):
    uri = _bad_dataset(tmp_path)
    config = _config([{"name": "bad", "uri": uri}], num_workers=2, skip_threshold=0.01, skip_min_samples=5)
    loader = build_data_loader(config, TINY, 0, 1)
    with pytest.raises(DataError, match="dataset bad"):
        _take(loader, 20)
    loader.close()


def test_exact_resume_with_images(tmp_path):
    """Resume of packs with images: same sample ids, pixels, timesteps and noise seeds."""
    uri = write_image_dataset(f"file://{tmp_path}/img", "img", 12, 3)
    config = _config([{"name": "img", "uri": uri}], num_workers=2)
    reference = _take(build_data_loader(config, TINY, 0, 1), 6)
    first = build_data_loader(config, TINY, 0, 1)
    head = _take(first, 3)
    state = first.state_dict()
    first.close()
    second = build_data_loader(config, TINY, 0, 1)
    second.load_state_dict(state)
    tail = _take(second, 3)
    second.close()
    assert _digest(head + tail) == _digest(reference)
    for a, b in zip(head + tail, reference):
        assert all((x == y).all() for x, y in zip(a.vae_images, b.vae_images))


def test_config_errors_name_the_value(text_data):
    with pytest.raises(ValueError, match=r"unknown keys \['shufle_buffer'\]"):
        DataConfig.from_dict({"datasets": [], "shufle_buffer": 3})
    with pytest.raises(DataError, match="data.datasets is empty"):
        build_data_loader(DataConfig(), TINY, 0, 1)
    bad_packing = _config([{"name": "a", "uri": text_data["a"]}], packing={"expected_tokens": 600, "max_tokens": 512})
    with pytest.raises(DataError, match="expected_tokens <= max_tokens"):
        build_data_loader(bad_packing, TINY, 0, 1)
    qwen = _config([{"name": "a", "uri": text_data["a"]}], tokenizer="qwen-offline")
    with pytest.raises(DataError, match="use 'byte' for tiny"):
        build_data_loader(qwen, TINY, 0, 1)


def test_ignore_saved_state_starts_afresh(text_data):
    datasets = [{"name": "a", "uri": text_data["a"]}]
    loader = build_data_loader(_config(datasets), TINY, 0, 2)
    _take(loader, 3)
    state = loader.state_dict()
    fresh = build_data_loader(_config(datasets, ignore_saved_state=True), TINY, 0, 1)
    fresh.load_state_dict(state)
    reference = build_data_loader(_config(datasets, ignore_saved_state=True), TINY, 0, 1)
    assert _ids(_take(fresh, 3)) == _ids(_take(reference, 3))
