"""`bagel data inspect`: a manifest's summary, a few decoded samples, optional checksum verification."""

from __future__ import annotations

import hashlib
import random

from bagel.model.inputs import ImageItem, TextItem
from bagel.model.sequence import estimate_tokens
from bagel.platform.data.config import ImageTransformConfig, RetryConfig
from bagel.platform.data.records import build_sample
from bagel.platform.data.shards import iter_shard, read_manifest
from bagel.platform.data.storage import ShardReader, new_filesystem
from bagel.platform.data.tokenizer import load_tokenizer
from bagel.platform.data.transforms import SampleError, model_limits


def inspect_dataset(uri: str, num_samples: int = 3, tokenizer_spec: str = "byte", model: str = "tiny", verify: bool = False) -> dict:
    """Summary dict: manifest facts, `samples` (decoded item descriptions), `errors`, `verified`."""
    from bagel.model.configs import get_model_config

    manifest = read_manifest(uri)
    model_config = get_model_config(model)
    tokenizer = load_tokenizer(tokenizer_spec)
    limits = model_limits(model_config)
    transforms = {role: ImageTransformConfig() for role in limits}
    report = {
        "manifest": manifest.uri, "name": manifest.name, "kind": manifest.kind, "digest": manifest.digest,
        "num_samples": manifest.num_samples, "num_shards": len(manifest.shards), "num_bytes": manifest.num_bytes,
        "samples": [], "errors": [],
    }
    retry = RetryConfig()
    for shard_index in range(len(manifest.shards)):
        if len(report["samples"]) >= num_samples:
            break
        fs, path = new_filesystem(manifest.shard_uri(shard_index))
        with ShardReader(fs, path, 1 << 20, retry) as reader:
            for raw in iter_shard(reader):
                if len(report["samples"]) >= num_samples:
                    break
                sample_id = f"{manifest.name}/{shard_index:05d}/{raw.key}"
                try:
                    if raw.bad_reason:
                        raise SampleError(raw.bad_reason)
                    sample = build_sample(sample_id, manifest.name, raw.record, raw.images, random.Random(0), tokenizer,
                                          transforms, limits, max_text_chars=1 << 20)
                except SampleError as error:
                    report["errors"].append(f"{sample_id}: {error}")
                    continue
                items = []
                for item in sample.items:
                    if isinstance(item, TextItem):
                        text = tokenizer.decode(item.token_ids)
                        items.append(f"text loss={item.loss} cfg={item.cfg_droppable} {len(item.token_ids)} tokens: {text[:70]!r}")
                    elif isinstance(item, ImageItem):
                        _, h, w = item.pixels.shape
                        items.append(f"image {item.role.value} cfg={item.cfg_droppable} {w}x{h} px")
                report["samples"].append({"id": sample_id, "tokens": estimate_tokens(sample, model_config), "items": items})
    if verify:
        ok = True
        for shard_index, info in enumerate(manifest.shards):
            fs, path = new_filesystem(manifest.shard_uri(shard_index))
            data = fs.cat_file(path)
            if len(data) != info.num_bytes or (info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256):
                ok = False
                report["errors"].append(f"shard {info.uri}: size or sha256 differs from the manifest")
        report["verified"] = ok
    return report
