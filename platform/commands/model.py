"""`bagel model` commands."""

import argparse
import json

from bagel.platform.exit_codes import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` command group with its `summary` sub-command."""
    parser = subparsers.add_parser("model", help="inspect model configs")
    commands = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    summary = commands.add_parser(
        "summary",
        help="parameter counts, FLOPs per token and training-state bytes of a model config",
        description="Build the model on the meta device (no memory) and print its sizes.",
    )
    summary.add_argument("--config", required=True, help="model config name: tiny, small or bagel-7b-mot")
    summary.add_argument(
        "--seq-len", type=int, default=32768, help="packed sample length in tokens for the attention FLOPs"
    )
    summary.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    summary.set_defaults(func=run_summary)
    parser.set_defaults(func=lambda args: _print_help(parser))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return ExitCode.USAGE_ERROR


def _human(value: float, unit: str = "") -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def _gib(value: int) -> str:
    if value < 2**30:
        return f"{value / 2**20:.2f} MiB"
    return f"{value / 2**30:.2f} GiB"


def run_summary(args: argparse.Namespace) -> int:
    from bagel.model.configs import get_model_config
    from bagel.model.flops import (
        count_parameters,
        llm_flops_per_token,
        meta_model,
        training_memory,
        vit_flops_per_token,
    )

    try:
        config = get_model_config(args.config)
    except ValueError as error:
        print(f"error: {error}")
        return ExitCode.USAGE_ERROR
    if args.seq_len < 1:
        print(f"error: --seq-len={args.seq_len} is invalid: use a positive number of tokens")
        return ExitCode.USAGE_ERROR

    counts = count_parameters(meta_model(config))
    memory = training_memory(counts)
    flops = llm_flops_per_token(config, args.seq_len)
    dense_flops = llm_flops_per_token(config, 0)
    # ViT FLOPs for the largest image the position table admits.
    vit_image_tokens = config.vit_max_num_patch_per_side**2
    vit_flops = vit_flops_per_token(config, vit_image_tokens)
    report = {
        "config": args.config,
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "active_params_per_token": counts.active_per_token,
        "und_expert_params": counts.und_expert,
        "gen_expert_params": counts.gen_expert,
        "embed_tokens_params": counts.embed_tokens,
        "lm_head_params": counts.lm_head,
        "vit_params": counts.vit,
        "connector_params": counts.connector,
        "latent_module_params": counts.latent_modules,
        "position_table_params": counts.position_tables,
        "seq_len": args.seq_len,
        "flops_per_token_6n": dense_flops,
        "flops_per_token": flops,
        "vit_flops_per_patch": vit_flops,
        "vit_image_patches": vit_image_tokens,
        "bytes_weights_fp32": memory.weights_fp32,
        "bytes_weights_bf16": memory.weights_bf16,
        "bytes_grads_fp32": memory.grads_fp32,
        "bytes_adam_fp32": memory.adam_fp32,
        "bytes_ema_fp32": memory.ema_fp32,
        "bytes_training_state": memory.total,
    }
    if args.json:
        print(json.dumps(report))
        return ExitCode.SUCCESS

    rows = [
        ("total parameters", _human(counts.total), f"{counts.total:,}"),
        ("trainable (minus sin-cos tables)", _human(counts.trainable), f"{counts.trainable:,}"),
        ("active per token (one expert + embed + lm_head)", _human(counts.active_per_token), ""),
        ("  und expert (layers + norm)", _human(counts.und_expert), ""),
        ("  gen expert (layers + norm_moe_gen)", _human(counts.gen_expert), ""),
        ("  embed_tokens / lm_head", f"{_human(counts.embed_tokens)} / {_human(counts.lm_head)}", ""),
        ("  ViT / connector", f"{_human(counts.vit)} / {_human(counts.connector)}", ""),
        ("  vae2llm + llm2vae + time_embedder", _human(counts.latent_modules), ""),
        ("  sin-cos tables (frozen)", _human(counts.position_tables), ""),
        ("FLOPs per LLM token, 6N (N = one expert's matmuls + lm_head)", _human(dense_flops), ""),
        (f"FLOPs per LLM token, 6N + attention at {args.seq_len} tokens", _human(flops), ""),
        (f"FLOPs per ViT patch (+ connector) in a {vit_image_tokens}-patch image", _human(vit_flops), ""),
        ("weights fp32 / bf16", f"{_gib(memory.weights_fp32)} / {_gib(memory.weights_bf16)}", ""),
        ("grads fp32", _gib(memory.grads_fp32), ""),
        ("Adam state fp32 (m + v)", _gib(memory.adam_fp32), ""),
        ("EMA fp32", _gib(memory.ema_fp32), ""),
        ("training state total (unsharded)", _gib(memory.total), ""),
    ]
    print(f"model config: {args.config}")
    width = max(len(label) for label, _, _ in rows)
    for label, value, exact in rows:
        print(f"{label:<{width}}  {value:>20}  {exact}".rstrip())
    return ExitCode.SUCCESS
