"""Streaming and packing throughput of the data pipeline, each against a baseline measured in the same run.

1. Streaming: the demo shards, replicated into ~16 MB shards up to --megabytes,
   on a SeaweedFS server started on 127.0.0.1 (or --endpoint). The loader's
   read path (one unit's stream: ranged reads of --read-ahead-mb with
   --read-ahead-blocks requests in flight, tar parsing, JSON parsing of each
   record, the shuffle window; images stay encoded, their decoding is part of
   line 2) is timed against a raw sequential s3fs read of the same objects
   (the same bytes) in reads of the same size, one request at a time. Both
   paths connect their filesystem before the clock starts, so the figures are
   steady-state streaming rates; the connection setup is printed apart.
   Goal: ratio >= 0.8.
2. Packing: tokens/s of one unit's full sample path (decode, resize,
   tokenise, mix, lay out, pack) on the demo data, against the tokens/s of a
   `tiny` training step (VAE encode + forward + backward) on the same packs.
   Goal: ratio >= 10.

    python bench/data_stream.py [--megabytes 200] [--rounds 3] [--packs 40] [--read-ahead-blocks 2] [--endpoint URL] [--packing-only]
"""

import argparse
import contextlib
import statistics
import tempfile
import time

import fsspec

from bagel.model.configs import get_model_config
from bagel.platform.data.config import DataConfig, RetryConfig
from bagel.platform.data.demo import write_demo
from bagel.platform.data.loader import build_data_loader, make_streams
from bagel.platform.data.loopback_s3 import S3Server, seaweedfs_server
from bagel.platform.data.shards import ShardWriter, iter_shard, read_manifest
from bagel.platform.data.storage import ShardReader, new_filesystem


def _demo_records(root: str) -> list:
    records = []
    for task in ("t2i", "vlm", "edit"):
        manifest = read_manifest(f"{root}/{task}")
        for index in range(len(manifest.shards)):
            fs, path = new_filesystem(manifest.shard_uri(index))
            with ShardReader(fs, path, 1 << 20, RetryConfig()) as reader:
                records.extend(iter_shard(reader))
    return records


def _replicate(records: list, dest: str, megabytes: float, options: dict) -> str:
    """Write the records again and again into ~16 MB shards until the dataset reaches `megabytes`."""
    writer = ShardWriter(dest, "bench", "mixed", max_samples=10**9, max_bytes=16 * 2**20, storage_options=options)
    written, copy = 0, 0
    while written < megabytes * 2**20:
        for raw in records:
            images = [(raw.images[i], "jpg") for i in sorted(raw.images)]
            writer.write(f"c{copy:04d}{raw.key.replace('-', '')}", raw.record, images)
            written += sum(len(b) for b, _ in images) + 600
        copy += 1
    return writer.close()


def _stream_rate(manifest, options: dict, read_ahead: int, blocks: int) -> tuple[float, float, int, float]:
    """(MB/s, samples/s, samples, connect s) of the loader's read path: one unit's stream over every shard.

    That is shard opening with read-ahead (the next shard's first block
    requested early), tar parsing, JSON parsing and the shuffle window; images
    stay encoded. The unit's filesystem is connected first, outside the timing,
    as the raw read's is.
    """
    config = DataConfig.from_dict({
        "num_workers": 0, "storage_options": options, "read_ahead_bytes": read_ahead, "read_ahead_blocks": blocks,
        "datasets": [{"name": "bench", "uri": manifest.uri}],
    })
    stream = make_streams(config, get_model_config("tiny"), {"bench": manifest}, unit=0, num_units=1)["bench"]
    connect_start = time.perf_counter()
    fs, path = stream.filesystems.get(manifest.uri)
    fs.info(path)
    connect = time.perf_counter() - connect_start
    count, start = 0, time.perf_counter()
    for entry in stream.epoch_entries(0):
        count += entry.raw is not None
    elapsed = time.perf_counter() - start
    return manifest.num_bytes / 2**20 / elapsed, count / elapsed, count, connect


def _unit_count(args) -> int:
    manifest, options, read_ahead, blocks, unit, num_units = args
    config = DataConfig.from_dict({
        "num_workers": 0, "storage_options": options, "read_ahead_bytes": read_ahead, "read_ahead_blocks": blocks,
        "datasets": [{"name": "bench", "uri": manifest.uri}],
    })
    stream = make_streams(config, get_model_config("tiny"), {"bench": manifest}, unit=unit, num_units=num_units)["bench"]
    return sum(entry.raw is not None for entry in stream.epoch_entries(0))


def _parallel_stream_rate(manifest, options: dict, read_ahead: int, blocks: int, workers: int) -> float:
    """MB/s of `workers` processes streaming disjoint shards, as the loader's DataLoader workers do (connection setup included)."""
    import multiprocessing

    jobs = [(manifest, options, read_ahead, blocks, unit, workers) for unit in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_unit_count, jobs)
        elapsed = time.perf_counter() - start
    return manifest.num_bytes / 2**20 / elapsed


def _raw_rate(manifest, options: dict, block: int) -> float:
    """MB/s of a plain sequential s3fs read of the same objects, one `block`-sized request at a time."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.info(manifest.uri)  # connect before timing, as the pipeline's filesystem is connected before its timing
    start = time.perf_counter()
    for index in range(len(manifest.shards)):
        with fs.open(manifest.shard_uri(index), "rb", block_size=block, cache_type="none") as f:
            while f.read(block):
                pass
    return manifest.num_bytes / 2**20 / (time.perf_counter() - start)


def _pack_rate(demo_root: str, packs: int, workers: int) -> tuple[float, list]:
    """(tokens/s, packs) of the loader over the demo data, after one warm-up pack.

    workers = 0: one unit in this process, as a DataLoader worker runs it (one
    torch thread); workers > 0: the configured loader with that many worker
    processes, packs crossing the process boundary as in training.
    """
    import torch

    config = DataConfig.from_dict({
        "num_workers": workers, "datasets": [
            {"name": task, "uri": f"{demo_root}/{task}", "weight": 1.0} for task in ("t2i", "vlm", "edit")
        ],
    })
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # what torch sets in every DataLoader worker
    try:
        loader = build_data_loader(config, get_model_config("tiny"), 0, 1)
        for _ in range(max(1, workers)):
            next(loader)  # warm-up: worker start, tokenizer, first shard open
        produced, start = [], time.perf_counter()
        for _ in range(packs):
            produced.append(next(loader))
        rate = sum(p.length for p in produced) / (time.perf_counter() - start)
        loader.close()
    finally:
        torch.set_num_threads(threads)
    return rate, produced


def _step_rate(produced: list, threads: int) -> float:
    """Median tokens/s of a `tiny` training step (VAE encode + forward + backward) over up to 8 of the packs."""
    import torch

    from bagel.model.bagel import build_model
    from bagel.model.loss import normalize
    from bagel.model.vae import FrozenVAE

    model_config = get_model_config("tiny")
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = FrozenVAE(model_config)
    model = build_model(model_config, seed=0)

    def step(packed):
        latents = vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)
        sums = model(packed, latents)
        normalize(sums, sums.ce_tokens, sums.mse_tokens, model_config.ce_weight, model_config.mse_weight).total.backward()
        model.zero_grad(set_to_none=True)

    try:
        step(produced[0])
        rates = []
        for packed in produced[1 : 1 + min(8, len(produced) - 1)]:
            start = time.perf_counter()
            step(packed)
            rates.append(packed.length / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(default_threads)
    return statistics.median(rates)


def _packing_vs_step(demo_root: str, packs: int, workers: int) -> None:
    """Print packing tokens/s against the tiny step's tokens/s, per core and for the whole loader."""
    import torch

    cores = torch.get_num_threads()
    unit_rate, produced = _pack_rate(demo_root, packs, workers=0)
    step_one = _step_rate(produced, threads=1)
    print(f"packing, 1 unit on 1 thread (decode + resize + layout + pack): {unit_rate:10.0f} tokens/s over {packs} packs")
    print(f"tiny training step on 1 thread (VAE + fwd + bwd):            {step_one:10.0f} tokens/s")
    print(f"ratio packing/step per core: {unit_rate / step_one:.1f} (goal >= 10)")
    if workers > 0:
        loader_rate, _ = _pack_rate(demo_root, packs, workers=workers)
        step_all = _step_rate(produced, threads=cores)
        print(f"loader with data.num_workers={workers}:                            {loader_rate:10.0f} tokens/s over {packs} packs")
        print(f"tiny training step on {cores} threads:                            {step_all:10.0f} tokens/s")
        print(f"ratio loader/step on this machine: {loader_rate / step_all:.1f} (goal >= 10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200.0, help="size of the replicated streaming dataset")
    parser.add_argument("--block-mb", type=float, default=None,
                        help="MB per read of the raw sequential path (default: --read-ahead-mb, so both use the same request size)")
    parser.add_argument("--read-ahead-mb", type=float, default=DataConfig.read_ahead_bytes / 2**20,
                        help="MB per ranged request of the pipeline (data.read_ahead_bytes)")
    parser.add_argument("--read-ahead-blocks", type=int, default=DataConfig.read_ahead_blocks,
                        help="requests in flight ahead of the parser (data.read_ahead_blocks)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/pipeline streaming rounds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel streaming line (1 = skip)")
    parser.add_argument("--packs", type=int, default=40, help="packs timed in the packing measurement")
    parser.add_argument("--loader-workers", type=int, default=DataConfig.num_workers,
                        help="DataLoader workers of the whole-loader packing line (0 = skip it)")
    parser.add_argument("--packing-only", action="store_true", help="time only line 2 (packing against the tiny training step); starts no S3 server")
    parser.add_argument("--endpoint", default="", help="use this S3 endpoint (credentials testing/testing) instead of starting SeaweedFS")
    args = parser.parse_args()
    read_ahead = int(args.read_ahead_mb * 2**20)
    block = int(args.block_mb * 2**20) if args.block_mb else read_ahead

    with tempfile.TemporaryDirectory() as tmp:
        write_demo(f"{tmp}/demo")
        if args.packing_only:
            _packing_vs_step(f"{tmp}/demo", args.packs, args.loader_workers)
            return
        records = _demo_records(f"{tmp}/demo")
        server_cm = contextlib.nullcontext(S3Server(args.endpoint)) if args.endpoint else seaweedfs_server()
        with server_cm as server:
            bucket = server.make_bucket("bench-data")
            options = server.storage_options
            start = time.perf_counter()
            uri = _replicate(records, f"{bucket}/replicated", args.megabytes, options)
            manifest = read_manifest(uri, options)
            print(f"dataset: {manifest.num_samples} samples, {len(manifest.shards)} shards, "
                  f"{manifest.num_bytes / 2**20:.0f} MB (written in {time.perf_counter() - start:.1f} s)")
            _raw_rate(manifest, options, block)  # warm-up of the server's caches for both paths
            # Alternate the two paths so that load from other processes hits both alike.
            ratios = []
            for round_index in range(args.rounds):
                raw = _raw_rate(manifest, options, block)
                mbs, sps, count, connect = _stream_rate(manifest, options, read_ahead, args.read_ahead_blocks)
                ratios.append(mbs / raw)
                print(f"round {round_index}: raw sequential s3fs read {raw:7.1f} MB/s | pipeline streaming read "
                      f"{mbs:7.1f} MB/s, {sps:6.0f} samples/s ({count} samples; connect {connect:.2f} s, untimed) | "
                      f"ratio {mbs / raw:.2f}")
            print(f"ratio streaming/raw, same bytes, {args.read_ahead_mb:g} MB pipeline / {block / 2**20:g} MB raw requests, "
                  f"{args.read_ahead_blocks} in flight (median of {args.rounds} rounds): "
                  f"{statistics.median(ratios):.2f} (goal >= 0.8)")
            if args.workers > 1:
                raw = _raw_rate(manifest, options, block)
                parallel = _parallel_stream_rate(manifest, options, read_ahead, args.read_ahead_blocks, args.workers)
                print(f"pipeline streaming read, {args.workers} worker processes: {parallel:7.1f} MB/s | "
                      f"raw sequential {raw:7.1f} MB/s | ratio {parallel / raw:.2f}")
        _packing_vs_step(f"{tmp}/demo", args.packs, args.loader_workers)


if __name__ == "__main__":
    main()
