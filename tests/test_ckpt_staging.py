"""Host staging buffers reused across asynchronous saves, and the read pass that checksums while it reads."""

import hashlib

import fsspec
import torch

from bagel.platform.checkpoint.reader import _BufferStream, read_verified
from bagel.platform.checkpoint.staging import ReusedBufferStager


def test_stager_reuses_buffers_and_copies_values():
    stager = ReusedBufferStager(pin_memory=False)
    source = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "progress": {"step": 1}}
    first = stager.stage(source)
    source["model"]["w"].add_(10.0)
    source["progress"]["step"] = 2
    second = stager.stage(source)

    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert second["model"]["w"].data_ptr() != source["model"]["w"].data_ptr()
    assert torch.equal(second["model"]["w"], torch.arange(6.0).reshape(2, 3) + 10.0)
    assert second["progress"]["step"] == 2


def test_stager_rebuilds_on_structure_change():
    stager = ReusedBufferStager(pin_memory=False)
    first = stager.stage({"w": torch.zeros(4)})
    grown = stager.stage({"w": torch.ones(8), "extra": torch.ones(2)})

    assert grown["w"].shape == (8,)
    assert grown["w"].data_ptr() != first["w"].data_ptr()
    assert torch.equal(grown["w"], torch.ones(8))
    assert torch.equal(grown["extra"], torch.ones(2))


def test_read_verified_hashes_while_reading(tmp_path):
    data = bytes(range(256)) * 40_000  # ~10 MB: more than one 8 MiB read
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    fs = fsspec.filesystem("file")

    content, sha256, read = read_verified(fs, str(path), len(data))

    assert read == len(data)
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert bytes(content) == data


def test_read_verified_reports_wrong_sizes(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"x" * 100)
    fs = fsspec.filesystem("file")

    assert read_verified(fs, str(path), 120)[2] == 100
    assert read_verified(fs, str(path), 80)[2] == 81


def test_buffer_stream_reads_and_seeks():
    stream = _BufferStream(bytearray(b"0123456789"))
    stream.seek(3)
    assert stream.read(4) == b"3456"
    target = bytearray(5)
    assert stream.readinto(target) == 3
    assert bytes(target[:3]) == b"789"
    assert stream.seek(-2, 2) == 8
    assert stream.read() == b"89"
