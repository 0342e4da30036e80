"""`bagel train` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bagel train --config CONFIG [key=value ...]`."""
    parser = subparsers.add_parser(
        "train",
        help="train one BAGEL stage (run it under torchrun for several processes)",
        description="Train one stage from a stage config, resuming from the run's latest checkpoint.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="packaged config name such as tiny/pretrain, or a YAML file path",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import logging
    import sys

    from bagel.platform.exit_codes import ExitCode, UsageError

    logger = logging.getLogger("bagel.train")
    try:
        from bagel.platform.config import load_run_config

        config = load_run_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
            return ExitCode.SUCCESS
        from bagel.platform.train.trainer import Trainer

        trainer = Trainer(config)
        trainer.setup()
        code = trainer.fit()
        import torch.distributed as dist

        if dist.is_initialized():
            # Leave together: torchrun stops the other ranks as soon as one exits non-zero (75 included),
            # which would cut rank 0's last TensorBoard upload short.
            dist.barrier()
    except UsageError as error:
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR
    except Exception as error:
        from bagel.platform.train.spike import TrainingDiverged

        if not isinstance(error, TrainingDiverged):
            raise
        logger.error("training diverged, not retried: %s", error)
        return ExitCode.DIVERGED
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return code
