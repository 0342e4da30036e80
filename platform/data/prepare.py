"""`bagel data prepare`: convert a source dataset into tar shards plus a manifest."""

from __future__ import annotations

import logging

from tqdm import tqdm

from bagel.platform.data.readers import detect_format, read_source
from bagel.platform.data.shards import ShardWriter

logger = logging.getLogger(__name__)


def prepare_dataset(
    src: str,
    dest: str,
    fmt: str = "auto",
    name: str = "",
    image_dir: str | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    storage_options: dict | None = None,
) -> str:
    """Write the samples of SRC (t2i parquet, VLM JSONL + images, or edit parquet) as shards under DEST.

    Returns the manifest URI. `name` defaults to DEST's last path component.
    """
    if fmt == "auto":
        fmt = detect_format(src, storage_options)
    name = name or dest.rstrip("/").rsplit("/", 1)[-1]
    writer = ShardWriter(dest, name, fmt, max_samples=samples_per_shard, max_bytes=max_shard_bytes, storage_options=storage_options)
    count = 0
    for key, record, images in tqdm(read_source(fmt, src, image_dir, storage_options), desc=f"prepare {name}", unit="sample", disable=None):
        writer.write(key, record, images)
        count += 1
    if count == 0:
        raise ValueError(f"{src} contains no samples in format {fmt}")
    uri = writer.close()
    logger.info("wrote %d samples in %d shards; manifest %s", count, len(writer.shards), uri)
    return uri
