"""ShardReader's bounded read-ahead queue: byte-exact reads across blocks, seeks inside and outside the queue."""

import random

import fsspec

from bagel.platform.data.config import RetryConfig
from bagel.platform.data.storage import ShardReader


def test_reads_match_object_with_seeks():
    data = random.Random(0).randbytes(100_000)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/readahead/object.bin", data)
    rng = random.Random(1)
    with ShardReader(fs, "/readahead/object.bin", 4096, RetryConfig(), depth=3) as reader:
        assert reader.read(10_000) == data[:10_000]
        for _ in range(200):
            start = rng.randrange(0, len(data))
            size = rng.randrange(0, 20_000)
            reader.seek(start)
            assert reader.read(size) == data[start : start + size]
        reader.seek(len(data) - 5)
        assert reader.read() == data[-5:]
        assert reader.read(10) == b""


def test_queue_depth_is_bounded():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/readahead/bounded.bin", bytes(64 * 4096))
    with ShardReader(fs, "/readahead/bounded.bin", 4096, RetryConfig(), depth=2) as reader:
        reader.read(1)
        assert len(reader._ahead) == 2
        reader.read(4096)
        assert len(reader._ahead) == 2
        assert [start for start, _ in reader._ahead] == [2 * 4096, 3 * 4096]
