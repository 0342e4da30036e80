"""Readers for BAGEL's three source formats; each yields (key, record, images) for `ShardWriter`.

- t2i parquet: columns `image` (encoded bytes) and `captions` (a JSON string
  holding a dict, or a list, of alternative captions).
- VLM SFT JSONL plus an image folder: per line `image` (a path relative to the
  folder, or a list of them) and `conversations` ([{from, value}] with
  `<image>` placeholders). Video lines are not supported and are reported.
- edit/interleaved parquet: columns `image_list` (list of encoded images) and
  `instruction_list` (one entry per transition, each a list of alternatives).

SRC may be a file, a directory of such files, or an fsspec URI of either.
Records keep the source's texts untouched; see `bagel.platform.data.records`
for the record kinds.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from bagel.platform.data.shards import DataError
from bagel.platform.data.storage import new_filesystem

logger = logging.getLogger(__name__)

# (key, record, [(image bytes, extension)])
SourceSample = tuple[str, dict, list[tuple[bytes, str]]]

# The parquet columns or JSONL fields each format reads, with what they contain.
SOURCE_FIELDS: dict[str, dict[str, str]] = {
    "t2i": {
        "image": "encoded image bytes",
        "captions": "a JSON string holding a dict or list of alternative captions",
    },
    "vlm": {
        "conversations": "a list of {from, value} turns with <image> placeholders",
        "image": "optional: an image path relative to the image folder, or a list of them",
    },
    "edit": {
        "image_list": "a list of encoded images",
        "instruction_list": "per transition, a list of alternative instructions",
    },
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"t2i": ("image", "captions"), "vlm": ("conversations",), "edit": ("image_list", "instruction_list")}
_CONTAINER = {"t2i": "parquet columns", "vlm": "JSONL fields", "edit": "parquet columns"}


def expected_fields(fmt: str) -> str:
    """Describe the columns or fields that format `fmt` reads, e.g. "t2i parquet columns image (...), captions (...)"."""
    listed = ", ".join(f"{name} ({meaning})" for name, meaning in SOURCE_FIELDS[fmt].items())
    return f"{fmt} {_CONTAINER[fmt]} {listed}"


def check_fields(fmt: str, where: str, present: list[str]) -> None:
    """Raise DataError naming the missing fields, the ones `where` has and the expected ones."""
    missing = [name for name in REQUIRED_FIELDS[fmt] if name not in present]
    if not missing:
        return
    kind = _CONTAINER[fmt].split()[1]
    raise DataError(
        f"{where} lacks the {kind} {', '.join(missing)} of --format {fmt}: it has {kind} "
        f"{', '.join(present) or '(none)'}; expected {expected_fields(fmt)}"
    )


def image_extension(data: bytes) -> str:
    """File extension of encoded image bytes from their magic number ("img" when unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    return "img"


def _list_files(src: str, suffixes: tuple[str, ...], storage_options: dict | None) -> tuple[Any, list[str]]:
    fs, path = new_filesystem(src, storage_options)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(suffixes))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {src}")
    return fs, files


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"expected encoded image bytes, got {type(value).__name__}")
    return bytes(value)


def detect_format(src: str, storage_options: dict | None = None) -> str:
    """Guess "t2i", "vlm" or "edit" from the files at SRC."""
    import pyarrow.parquet as pq

    if src.rstrip("/").endswith((".jsonl", ".json")):
        return "vlm"
    formats = "; ".join(expected_fields(fmt) for fmt in SOURCE_FIELDS)
    fs, path = new_filesystem(src, storage_options)
    if fs.isdir(path):
        found = fs.find(path)
        if any(p.endswith(".jsonl") for p in found):
            return "vlm"
        if not any(p.endswith(".parquet") for p in found):
            raise FileNotFoundError(f"no .parquet or .jsonl files under {src}; the source formats are: {formats}")
    _, files = _list_files(src, (".parquet",), storage_options)
    with fs.open(files[0], "rb") as f:
        names = set(pq.ParquetFile(f).schema_arrow.names)
    for fmt in ("t2i", "edit"):
        if set(REQUIRED_FIELDS[fmt]) <= names:
            return fmt
    raise DataError(
        f"cannot tell the format of {src}: its parquet columns are {', '.join(sorted(names)) or '(none)'}; "
        f"expected {formats}. Rename the columns or pass --format"
    )


def read_t2i_parquet(src: str, storage_options: dict | None = None) -> Iterator[SourceSample]:
    import pyarrow.parquet as pq

    fs, files = _list_files(src, (".parquet",), storage_options)
    for file_index, file in enumerate(files):
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            check_fields("t2i", f"parquet file {file}", parquet.schema_arrow.names)
            row = 0
            for batch in parquet.iter_batches(batch_size=256, columns=["image", "captions"]):
                for image, captions in zip(batch.column("image").to_pylist(), batch.column("captions").to_pylist()):
                    key = f"f{file_index:04d}r{row:07d}"
                    row += 1
                    if isinstance(captions, str):
                        try:
                            captions = json.loads(captions)
                        except ValueError:
                            captions = [captions]
                    if isinstance(captions, dict):
                        captions = [captions[k] for k in sorted(captions)]
                    data = _as_bytes(image)
                    yield key, {"kind": "t2i", "captions": captions, "images": [image_extension(data)]}, [
                        (data, image_extension(data))
                    ]


# Malformed JSONL lines warned about one by one per file; the rest are counted in one summary line.
_LINE_WARNINGS = 5


def _vlm_line_problem(entry: object) -> str:
    """Return why a parsed JSONL line is not a VLM sample, or "" when it is one."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    missing = [name for name in REQUIRED_FIELDS["vlm"] if name not in entry]
    if missing:
        return f"lacks the fields {', '.join(missing)} (it has {', '.join(entry) or 'none'})"
    if not isinstance(entry["conversations"], list):
        return f"has a conversations field of type {type(entry['conversations']).__name__}, not a list"
    return ""


def read_vlm_jsonl(src: str, image_dir: str | None = None, storage_options: dict | None = None) -> Iterator[SourceSample]:
    """Yield the VLM samples of every JSONL file under `src`.

    A line that is not JSON or not a VLM sample is skipped with a warning, so
    one bad line does not stop a large conversion. A file in which no line is
    a sample raises DataError with the first problem and the expected fields.
    """
    fs, files = _list_files(src, (".jsonl",), storage_options)
    for file_index, file in enumerate(files):
        folder = image_dir or file.rsplit("/", 1)[0]
        image_fs, image_root = new_filesystem(folder, storage_options) if image_dir else (fs, folder)
        yielded, skipped, first_problem = 0, 0, ""
        with fs.open(file, "rt", encoding="utf-8") as f:
            for line_index, line in enumerate(f):
                if not line.strip():
                    continue
                key = f"f{file_index:04d}l{line_index:07d}"
                try:
                    entry = json.loads(line)
                except ValueError as error:
                    problem = f"is not JSON ({error})"
                else:
                    problem = _vlm_line_problem(entry)
                if not problem and "video" in entry:
                    problem = "is a video sample, which is not supported"
                if problem:
                    skipped += 1
                    first_problem = first_problem or f"line {line_index + 1} {problem}"
                    if skipped <= _LINE_WARNINGS:
                        logger.warning("%s line %d %s; skipped", file, line_index + 1, problem)
                    continue
                paths = entry.get("image", [])
                paths = [paths] if isinstance(paths, str) else list(paths)
                images = []
                for rel in paths:
                    with image_fs.open(f"{image_root.rstrip('/')}/{rel}", "rb") as image_file:
                        data = image_file.read()
                    images.append((data, image_extension(data)))
                record = {
                    "kind": "vlm",
                    "conversations": entry["conversations"],
                    "images": [ext for _, ext in images],
                }
                yielded += 1
                yield key, record, images
        if skipped > _LINE_WARNINGS:
            logger.warning("%s: %d lines skipped in all (the first %d are listed above)", file, skipped, _LINE_WARNINGS)
        if skipped and not yielded:
            raise DataError(f"{file} contains no VLM sample: {first_problem}; expected {expected_fields('vlm')}")


def read_edit_parquet(src: str, storage_options: dict | None = None) -> Iterator[SourceSample]:
    import pyarrow.parquet as pq

    fs, files = _list_files(src, (".parquet",), storage_options)
    for file_index, file in enumerate(files):
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            check_fields("edit", f"parquet file {file}", parquet.schema_arrow.names)
            row = 0
            for batch in parquet.iter_batches(batch_size=64, columns=["image_list", "instruction_list"]):
                for image_list, instruction_list in zip(
                    batch.column("image_list").to_pylist(), batch.column("instruction_list").to_pylist()
                ):
                    key = f"f{file_index:04d}r{row:07d}"
                    row += 1
                    images = [(_as_bytes(x), "") for x in image_list]
                    images = [(data, image_extension(data)) for data, _ in images]
                    instructions = [[s] if isinstance(s, str) else list(s) for s in instruction_list]
                    record = {"kind": "edit", "instructions": instructions, "images": [ext for _, ext in images]}
                    yield key, record, images


def read_source(fmt: str, src: str, image_dir: str | None = None, storage_options: dict | None = None) -> Iterator[SourceSample]:
    """Samples of SRC in format "t2i", "vlm" or "edit" ("auto" detects it)."""
    if fmt == "auto":
        fmt = detect_format(src, storage_options)
    if fmt == "t2i":
        return read_t2i_parquet(src, storage_options)
    if fmt == "vlm":
        return read_vlm_jsonl(src, image_dir, storage_options)
    if fmt == "edit":
        return read_edit_parquet(src, storage_options)
    raise ValueError(f"unknown source format {fmt!r}: use t2i, vlm, edit or auto")
