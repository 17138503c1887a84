"""`python -m ofa_ufo.training --config NAME_OR_FILE [--resume auto|never|DIR] [--demo] [key=value ...]`

Runs the trainer on an experiment config (`ofa_ufo/training/configs/*.yaml`, or any YAML file);
`key=value` pairs override config fields (values read as YAML). `--demo` trains every task on
generated demo scenes instead of the config's datasets. `--plan [--nodes N --gpus G] [--micro-batch M]
[--examples N]` trains nothing: it prints what the run needs per process and how to launch it
(`ofa_ufo.training.plan`, docs/training.md). Exit codes: 0 done, 1 data or a checkpoint
that cannot be used (or a run stopped on a non-finite loss), 2 a bad config or command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ofa_ufo.data.sources import DataSourceError
from ofa_ufo.training.checkpoint import CheckpointError
from ofa_ufo.training.config import ConfigError, TrainConfig, load_config
from ofa_ufo.training.plan import Cluster, format_plan, make_plan
from ofa_ufo.training.step_batches import TrainingError
from ofa_ufo.training.trainer import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.training", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a shipped config name (pretrain_ofa_tiny, finetune/vqav2) or a YAML path")
    parser.add_argument("--resume", default="auto",
                        help="auto: newest checkpoint in output_dir if any; never; or a checkpoint directory")
    parser.add_argument("--demo", action="store_true", help="train on generated demo scenes (no datasets needed)")
    _add_plan_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config fields to override")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.demo:
            config.data = {}
        image = config.model_overrides.get("image_size")
        size = f"image size {image} px" if image else "the model's image size"
        print(f"config {args.config or '(defaults)'}: model {config.model}, {size}, tasks "
              f"{config.tasks}, {config.max_steps} steps x {config.global_batch} samples, output {config.output_dir}")
        if args.plan:
            print(_plan(config, args))
        else:
            train(config, resume=args.resume)
    except ConfigError as error:  # the command line or config is wrong: a usage error
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DataSourceError, CheckpointError, TrainingError) as error:  # the data or a checkpoint cannot be used
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    plan = parser.add_argument_group("--plan: size the run and print its launch command instead of training")
    plan.add_argument("--plan", action="store_true", help="print parameters, memory, batch, throughput, launch")
    plan.add_argument("--nodes", type=int, default=1, help="machines the run is planned for (default 1)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per machine (default 1)")
    plan.add_argument("--micro-batch", type=int, default=None,
                      help="samples per GPU and micro-batch (default: the config's batch_size over the processes)")
    plan.add_argument("--examples", type=int, default=None,
                      help="training examples per epoch, where the config's data cannot be counted")


def _plan(config: TrainConfig, args: argparse.Namespace) -> str:
    """The `--plan` report of `config` (a ConfigError for a bad --nodes/--gpus/--micro-batch/--examples)."""
    for name in ("micro_batch", "examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    overrides = ["--demo", *args.overrides] if args.demo else args.overrides
    plan = make_plan(config, args.config or "", overrides, Cluster(args.nodes, args.gpus), args.micro_batch,
                     args.examples)
    return format_plan(plan)


if __name__ == "__main__":
    raise SystemExit(main())
