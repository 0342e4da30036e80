"""`bagel data` commands: demo, prepare, inspect."""

from __future__ import annotations

import argparse
import json

from bagel.platform.exit_codes import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group."""
    parser = subparsers.add_parser("data", help="prepare, inspect and generate training data")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    demo = commands.add_parser("demo", help="write the real demo dataset (t2i, vlm, edit) to DEST")
    demo.add_argument("dest", metavar="DEST", help="directory or URI (file://, s3://, memory://)")
    demo.add_argument("--max-side", type=int, default=256, help="long side of the stored photographs, px")
    demo.add_argument("--samples-per-shard", type=int, default=4)
    demo.set_defaults(func=_demo)

    prepare = commands.add_parser("prepare", help="convert a source dataset into tar shards and a manifest")
    prepare.add_argument("src", metavar="SRC", help="t2i parquet, VLM JSONL (with --image-dir) or edit parquet; file, directory or URI")
    prepare.add_argument("dest", metavar="DEST", help="output directory or URI")
    prepare.add_argument("--format", default="auto", choices=["auto", "t2i", "vlm", "edit"])
    prepare.add_argument("--name", default="", help="dataset name (default: DEST's last component)")
    prepare.add_argument("--image-dir", default=None, help="image folder of a VLM JSONL (default: the JSONL's folder)")
    prepare.add_argument("--samples-per-shard", type=int, default=1000)
    prepare.add_argument("--max-shard-mb", type=float, default=64.0)
    prepare.set_defaults(func=_prepare)

    inspect = commands.add_parser("inspect", help="print a manifest summary and decode a few samples")
    inspect.add_argument("uri", metavar="URI", help="manifest URI or the directory holding manifest.json")
    inspect.add_argument("--samples", type=int, default=3, help="samples to decode")
    inspect.add_argument("--tokenizer", default="byte", help="byte, qwen-offline or a tokenizer.json directory")
    inspect.add_argument("--model", default="tiny", help="model config whose image limits apply")
    inspect.add_argument("--verify", action="store_true", help="read every shard and check sizes and sha256 checksums")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(func=_inspect)


def _demo(args: argparse.Namespace) -> int:
    from bagel.platform.data.demo import write_demo
    from bagel.platform.data.storage import unreachable_endpoint_errors
    from bagel.platform.exit_codes import ExitCode

    # A failed connection to the S3 endpoint becomes a UsageError: one line and exit code 2, no traceback.
    with unreachable_endpoint_errors("bagel data demo: "):
        manifests = write_demo(args.dest, max_side=args.max_side, samples_per_shard=args.samples_per_shard)
    for task, uri in manifests.items():
        print(f"{task}: {uri}")
    return ExitCode.SUCCESS


def _prepare(args: argparse.Namespace) -> int:
    from bagel.platform.data.prepare import prepare_dataset
    from bagel.platform.data.storage import unreachable_endpoint_errors
    from bagel.platform.exit_codes import ExitCode

    with unreachable_endpoint_errors("bagel data prepare: "):
        try:
            uri = prepare_dataset(
                args.src, args.dest, args.format, args.name, args.image_dir, args.samples_per_shard, int(args.max_shard_mb * 2**20)
            )
        except UsageError:
            raise
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"bagel data prepare {args.src}: {error}") from error
    print(uri)
    return ExitCode.SUCCESS


def _inspect(args: argparse.Namespace) -> int:
    from bagel.platform.data.inspect import inspect_dataset
    from bagel.platform.data.storage import unreachable_endpoint_errors
    from bagel.platform.exit_codes import ExitCode

    with unreachable_endpoint_errors("bagel data inspect: "):
        report = inspect_dataset(args.uri, args.samples, args.tokenizer, args.model, args.verify)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"manifest {report['manifest']}  name={report['name']} kind={report['kind']}")
        print(f"  {report['num_samples']} samples, {report['num_shards']} shards, {report['num_bytes'] / 2**20:.2f} MiB")
        for sample in report["samples"]:
            print(f"  sample {sample['id']}: {sample['tokens']} tokens")
            for item in sample["items"]:
                print(f"    {item}")
        for error in report.get("errors", []):
            print(f"  error: {error}")
        if args.verify:
            print(f"  verify: {'ok' if report['verified'] else 'FAILED'}")
    return ExitCode.SUCCESS if not report.get("errors") else ExitCode.FAILURE
