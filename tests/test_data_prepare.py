"""Tokenizers, source-format readers, shard preparation and the demo dataset, on file:// and SeaweedFS."""

import hashlib
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel.model.inputs import ImageRole, TextItem
from bagel.platform.data.config import RetryConfig
from bagel.platform.data.demo import PHOTOS, write_demo
from bagel.platform.data.inspect import inspect_dataset
from bagel.platform.data.prepare import prepare_dataset
from bagel.platform.data.shards import DataError, iter_shard, read_manifest
from bagel.platform.data.storage import ShardReader, new_filesystem
from bagel.platform.data.synthetic import png_bytes
from bagel.platform.data.tokenizer import load_tokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("byte")
    text = "Ein Bild: 猫 <|im_start|>"
    ids = tok.encode(text)
    assert max(ids) < 256  # special-token text stays plain bytes
    assert tok.decode(ids) == text
    assert (tok.special_tokens.bos, tok.special_tokens.eos) == (256, 257)
    assert tok.vocab_size == 512


def test_qwen_offline_tokenizer_matches_qwen25_ids():
    tok = load_tokenizer("qwen-offline")
    # Qwen2.5's tokenizer encodes "Hello world" as [9707, 1879].
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.special_tokens.bos == 151644
    assert tok.special_tokens.end_of_image == 151653
    assert 151644 not in tok.encode("<|im_start|>")
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"


def test_tokenizer_json_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "a": 1, "cat": 2, "<|im_start|>": 3, "<|im_end|>": 4, "<|vision_start|>": 5, "<|vision_end|>": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("a cat") == [1, 2]
    assert (loaded.special_tokens.bos, loaded.special_tokens.eos) == (3, 4)
    assert (loaded.special_tokens.start_of_image, loaded.special_tokens.end_of_image) == (5, 6)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("no-such-tokenizer")


def _write_sources(root):
    """The three source formats, small: t2i parquet, VLM JSONL + image folder, edit parquet."""
    images = [png_bytes(40, 24 + 8 * i, i) for i in range(6)]
    t2i = root / "t2i.parquet"
    pq.write_table(
        pa.table({"image": images, "captions": [json.dumps({"a": f"caption {i}", "b": f"other {i}"}) for i in range(6)]}),
        t2i,
    )
    vlm_dir = root / "vlm"
    (vlm_dir / "img").mkdir(parents=True)
    lines = []
    for i in range(5):
        (vlm_dir / "img" / f"{i}.png").write_bytes(images[i])
        lines.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"}, {"from": "gpt", "value": f"Noise number {i}."}]})
    (vlm_dir / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    edit = root / "edit.parquet"
    pq.write_table(
        pa.table({"image_list": [images[i : i + 3] for i in range(4)],
                  "instruction_list": [[[f"step {i} a", f"step {i} b"], [f"next {i}"]] for i in range(4)]}),
        edit,
    )
    return images, str(t2i), str(vlm_dir / "train.jsonl"), str(edit)


def _read_all(manifest):
    out = []
    for index in range(len(manifest.shards)):
        fs, path = new_filesystem(manifest.shard_uri(index))
        with ShardReader(fs, path, 4096, RetryConfig()) as reader:
            out.extend(iter_shard(reader))
    return out


def _round_trip(tmp_path, dest_root, storage_options=None):
    images, t2i, vlm, edit = _write_sources(tmp_path)
    uris = {
        "t2i": prepare_dataset(t2i, f"{dest_root}/t2i", samples_per_shard=4, storage_options=storage_options),
        "vlm": prepare_dataset(vlm, f"{dest_root}/vlm", samples_per_shard=2, storage_options=storage_options),
        "edit": prepare_dataset(edit, f"{dest_root}/edit", samples_per_shard=3, storage_options=storage_options),
    }
    t2i_m, vlm_m, edit_m = (read_manifest(uris[k], storage_options) for k in ("t2i", "vlm", "edit"))
    assert (t2i_m.kind, vlm_m.kind, edit_m.kind) == ("t2i", "vlm", "edit")
    assert [s.num_samples for s in t2i_m.shards] == [4, 2]
    assert vlm_m.num_samples == 5
    assert len(vlm_m.shards) == 3
    assert edit_m.num_samples == 4
    t2i_records = _read_all(t2i_m)
    assert [r.images[0] for r in t2i_records] == images  # image bytes are stored unchanged
    assert t2i_records[2].record["captions"] == ["caption 2", "other 2"]
    vlm_records = _read_all(vlm_m)
    assert vlm_records[3].images[0] == images[3]
    assert vlm_records[3].record["conversations"][1]["value"] == "Noise number 3."
    edit_records = _read_all(edit_m)
    assert [edit_records[1].images[k] for k in range(3)] == images[1:4]
    assert edit_records[1].record["instructions"] == [["step 1 a", "step 1 b"], ["next 1"]]
    # Sizes and checksums in the manifest describe the stored bytes.
    for manifest in (t2i_m, vlm_m, edit_m):
        for index, shard in enumerate(manifest.shards):
            fs, path = new_filesystem(manifest.shard_uri(index), storage_options)
            data = fs.cat_file(path)
            assert len(data) == shard.num_bytes
            assert hashlib.sha256(data).hexdigest() == shard.sha256
    return uris


def test_prepare_round_trip_file(tmp_path):
    uris = _round_trip(tmp_path, f"file://{tmp_path}/out")
    report = inspect_dataset(uris["edit"], num_samples=2, verify=True)
    assert report["verified"] and not report["errors"]
    roles = [item.split()[1] for item in report["samples"][0]["items"] if item.startswith("image")]
    assert roles[:2] == ["vae_clean", "vit"]
    assert roles[-1] == "vae_noised"


@pytest.mark.s3
def test_prepare_round_trip_s3(tmp_path, s3_server, monkeypatch):
    bucket = s3_server.make_bucket("prepare-rt")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    _round_trip(tmp_path, f"{bucket}/data", s3_server.storage_options)


def test_missing_and_empty_manifest_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(f"file://{tmp_path}/nowhere/manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "bagel-shards/1", "name": "x", "shards": []}))
    with pytest.raises(DataError, match="lists no samples"):
        read_manifest(str(tmp_path))


def test_demo_dataset_is_real_and_small(tmp_path):
    manifests = write_demo(str(tmp_path / "demo"))
    assert set(manifests) == {"t2i", "vlm", "edit"}
    total = sum(read_manifest(uri).num_bytes for uri in manifests.values())
    assert total < 8 * 2**20
    t2i = read_manifest(manifests["t2i"])
    assert t2i.num_samples == len(PHOTOS) >= 15
    vlm_report = inspect_dataset(manifests["vlm"], num_samples=2)
    items = vlm_report["samples"][0]["items"]
    assert any("loss=True" in item for item in items) and any("image vit" in item for item in items)


@pytest.mark.s3
def test_demo_to_s3_then_inspect_cli(s3_server):
    """`bagel data demo s3://...` then `bagel data inspect` against the loopback SeaweedFS."""
    bucket = s3_server.make_bucket("demo-cli")
    env = dict(os.environ, **s3_server.env)
    demo = subprocess.run([sys.executable, "-m", "bagel.platform", "data", "demo", f"{bucket}/demo"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert f"edit: {bucket}/demo/edit/manifest.json" in demo.stdout
    inspect = subprocess.run([sys.executable, "-m", "bagel.platform", "data", "inspect", f"{bucket}/demo/t2i",
                              "--samples", "2", "--verify", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["num_samples"] == len(PHOTOS)
    assert report["verified"]
    assert report["samples"][0]["items"][0].startswith("text loss=False cfg=True")
    assert "image vae_noised" in report["samples"][0]["items"][1]
