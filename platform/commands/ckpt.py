"""`bagel ckpt` commands: list, promote, find-promoted, import and export checkpoints.

`promote` and `find-promoted` print exactly one JSON line on stdout,
`{"uri": ..., "digest": ..., "reused": ...}` (`{}` when find-promoted finds
nothing), which the pipeline passes between stages; logs go to stderr.
"""

import argparse
import json
import logging
from typing import Any

from bagel.platform.exit_codes import ExitCode, UsageError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ckpt` command group."""
    parser = subparsers.add_parser("ckpt", help="list, promote, import and export checkpoints")
    commands = parser.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="show the checkpoints under a URI with step, completeness and size")
    listing.add_argument("uri", help="a checkpoint, a run's checkpoints/ folder, a stage folder, promoted/ or a storage root")
    listing.add_argument("--json", action="store_true", help="print one JSON object per checkpoint instead of a table")
    listing.set_defaults(func=_list)

    promote = commands.add_parser("promote", help="validate a stage's final checkpoint and publish it for the next stage")
    _add_config_arguments(promote)
    promote.add_argument("--run", required=True, help="run name whose stage checkpoint to promote")
    promote.add_argument("--next-config", default="", help="the next stage's config: weights are checked against its model")
    promote.add_argument("--checkpoint", default="", help="promote this checkpoint URI instead of the stage's latest complete one")
    promote.add_argument("--heldout-config", default="", help="stage config whose data section is the held-out mixture for a loss check")
    promote.add_argument("--heldout-packs", type=int, default=4, help="packs of held-out data to evaluate (default: 4)")
    promote.set_defaults(func=_promote)

    find = commands.add_parser("find-promoted", help="print the promoted checkpoint trained with the same config digest, or {}")
    _add_config_arguments(find)
    find.set_defaults(func=_find_promoted)

    importer = commands.add_parser("import", help="publish released BAGEL weights (ema.safetensors + configs) as a promoted checkpoint")
    importer.add_argument("directory", help="directory with ema.safetensors, llm_config.json and vit_config.json")
    importer.add_argument("--storage", required=True, help="storage root URI (file:// or s3://)")
    importer.add_argument("--model", default="bagel-7b-mot", help="base model config for fields the JSON files lack (default: bagel-7b-mot)")
    importer.set_defaults(func=_import)

    exporter = commands.add_parser("export", help="write a promoted checkpoint in the released safetensors layout")
    exporter.add_argument("uri", help="promoted checkpoint URI")
    exporter.add_argument("directory", help="output directory (local)")
    exporter.add_argument("--weights", default="ema", choices=("ema", "model"), help="which weights to export (default: ema)")
    exporter.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="tensor dtype (default: bfloat16)")
    exporter.set_defaults(func=_export)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="stage config: a packaged name such as tiny/pretrain, or a YAML path")
    parser.add_argument("--storage", required=True, help="storage root URI (file:// or s3://)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `bagel train`")


def _list(args: argparse.Namespace) -> int:
    from bagel.platform.checkpoint.listing import find_checkpoints

    entries = find_checkpoints(args.uri)
    if args.json:
        for entry in entries:
            print(json.dumps({"uri": entry.uri, "step": entry.step, "complete": entry.complete, "status": entry.status, "size_bytes": entry.size_bytes}))
        return ExitCode.SUCCESS
    if not entries:
        print(f"no checkpoints under {args.uri}")
        return ExitCode.SUCCESS
    print(f"{'STEP':>10}  {'SIZE':>10}  {'STATUS':<26}  URI")
    for entry in entries:
        print(f"{entry.step:>10}  {_human(entry.size_bytes):>10}  {entry.status:<26}  {entry.uri}")
    return ExitCode.SUCCESS


def _load_stage(args: argparse.Namespace, run: str | None) -> tuple[Any, dict[str, Any]]:
    from bagel.platform.config import build_run_config, load_config_dict

    overrides = [*args.overrides, f"run.storage={args.storage}"]
    if run is not None:
        overrides.append(f"run.name={run}")
    mapping = load_config_dict(args.config, overrides)
    config = build_run_config(mapping)
    config.validate()
    return config, mapping


def stage_config_digest(config: Any) -> tuple[str, dict[str, str]]:
    """Return (config digest, data manifest digests) of a loaded stage config."""
    from bagel.platform.checkpoint.digest import checkpoint_content_digest, config_digest, data_manifest_digests

    options = dict(getattr(config.checkpoint, "storage_options", {}) or {})
    plain = config.to_dict()
    manifests = data_manifest_digests(plain, getattr(config.data, "storage_options", None) or None)
    init_digest = checkpoint_content_digest(config.run.init_from, options)
    return config_digest(plain, init_digest, manifests), manifests


def _promote(args: argparse.Namespace) -> int:
    from bagel.model.configs import apply_overrides, get_model_config
    from bagel.platform.checkpoint.listing import inspect_checkpoint, scan_checkpoints
    from bagel.platform.checkpoint.promote import PromotionError, promote_checkpoint

    try:
        config, _ = _load_stage(args, args.run)
        next_model = config.model
        if args.next_config:
            from bagel.platform.config import load_run_config

            next_model = load_run_config(args.next_config, [f"run.storage={args.storage}"]).model
        model_config = apply_overrides(get_model_config(next_model.name), next_model.overrides)
        options = dict(config.checkpoint.storage_options or {})
        if args.checkpoint:
            source = inspect_checkpoint(args.checkpoint, options)
        else:
            complete = [entry for entry in scan_checkpoints(config.run.layout.checkpoints_dir, options) if entry.complete]
            if not complete:
                raise UsageError(f"no complete checkpoint in {config.run.layout.checkpoints_dir}: train the stage first")
            source = complete[0]
        digest, manifests = stage_config_digest(config)
        metadata = {
            "stage": config.run.stage,
            "source_run": config.run.name,
            "config_digest": digest,
            "data_manifests": manifests,
            "model": {"name": next_model.name, "overrides": next_model.overrides},
        }
        heldout = None
        if args.heldout_config:
            from bagel.platform.checkpoint.heldout import heldout_loss_function
            from bagel.platform.config import load_run_config

            heldout_config = load_run_config(args.heldout_config, [f"run.storage={args.storage}"])
            heldout = heldout_loss_function(heldout_config, model_config, args.heldout_packs)
        result = promote_checkpoint(source, args.storage, model_config, metadata, heldout_loss=heldout, storage_options=options)
    except (PromotionError, UsageError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR
    print(json.dumps(result.to_json()))
    return ExitCode.SUCCESS


def _find_promoted(args: argparse.Namespace) -> int:
    from bagel.platform.checkpoint.promote import find_promoted

    try:
        config, _ = _load_stage(args, None)
        digest, _ = stage_config_digest(config)
        found = find_promoted(args.storage, digest, dict(config.checkpoint.storage_options or {}))
    except (UsageError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR
    if found is None:
        logger.info("no promoted checkpoint with config digest %s under %s", digest, args.storage)
    print(json.dumps(found.to_json() if found else {}))
    return ExitCode.SUCCESS


def _import(args: argparse.Namespace) -> int:
    from bagel.platform.checkpoint.official import import_official

    try:
        result = import_official(args.directory, args.storage, model_name=args.model)
    except (FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR
    print(json.dumps(result.to_json()))
    return ExitCode.SUCCESS


def _export(args: argparse.Namespace) -> int:
    import torch

    from bagel.platform.checkpoint.official import export_official

    try:
        directory = export_official(args.uri, args.directory, weights_name=args.weights, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR
    print(json.dumps({"directory": str(directory)}))
    return ExitCode.SUCCESS


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"

