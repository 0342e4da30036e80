"""Small generated datasets for tests and benchmarks (the demo dataset is the real one).

`write_text_dataset` writes "interleaved" records of text only (cheap to
decode, so mixture and packing statistics run fast); `write_image_dataset`
writes t2i records with small generated images, with hooks to corrupt chosen
records for the bad-input tests.
"""

from __future__ import annotations

import io
import random
from typing import Any

from bagel.platform.data.shards import ShardWriter


def write_text_dataset(dest: str, name: str, num_samples: int, samples_per_shard: int, seed: int = 0,
                       min_words: int = 3, max_words: int = 40, storage_options: dict[str, Any] | None = None) -> str:
    """Text-only samples: a prompt (no loss) and an answer (CE loss) of random lengths; returns the manifest URI."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    writer = ShardWriter(dest, name, "interleaved", max_samples=samples_per_shard, storage_options=storage_options)
    for index in range(num_samples):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        items = [{"text": f"{name} {index}: {prompt}", "loss": False, "cfg": True}, {"text": answer, "loss": True}]
        writer.write(f"s{index:06d}", {"kind": "interleaved", "items": items}, [])
    return writer.close()


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """Encode a PNG of random pixels."""
    import numpy as np
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_dataset(dest: str, name: str, num_samples: int, samples_per_shard: int,
                        bad: dict[int, str] | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """t2i samples with 32x32 images; `bad` maps sample index to a fault:
    "corrupt_image", "zero_size_image", "missing_field" or "too_long"."""
    bad = bad or {}
    writer = ShardWriter(dest, name, "t2i", max_samples=samples_per_shard, storage_options=storage_options)
    for index in range(num_samples):
        image = png_bytes(32, 32, index)
        record: dict = {"kind": "t2i", "captions": [f"picture number {index}"], "images": ["png"]}
        fault = bad.get(index)
        if fault == "corrupt_image":
            image = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4
        elif fault == "zero_size_image":
            image = b""
        elif fault == "missing_field":
            del record["captions"]
        elif fault == "too_long":
            record["captions"] = ["word " * 5000]
        writer.write(f"s{index:06d}", record, [(image, "png")])
    return writer.close()
