"""`python -m ofa_ufo.training --config NAME_OR_FILE [--resume auto|never|DIR] [--demo] [key=value ...]`

Runs the trainer on an experiment config (`ofa_ufo/training/configs/*.yaml`, or any YAML file);
`key=value` pairs override config fields (values read as YAML). `--demo` trains every task on
generated demo scenes instead of the config's datasets. Exit codes: 0 done, 1 data or a checkpoint
that cannot be used (or a run stopped on a non-finite loss), 2 a bad config or command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ofa_ufo.data.sources import DataSourceError
from ofa_ufo.training.checkpoint import CheckpointError
from ofa_ufo.training.config import ConfigError, load_config
from ofa_ufo.training.step_batches import TrainingError
from ofa_ufo.training.trainer import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo.training", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a shipped config name (pretrain_ofa_tiny, finetune/vqav2) or a YAML path")
    parser.add_argument("--resume", default="auto",
                        help="auto: newest checkpoint in output_dir if any; never; or a checkpoint directory")
    parser.add_argument("--demo", action="store_true", help="train on generated demo scenes (no datasets needed)")
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
        train(config, resume=args.resume)
    except ConfigError as error:  # the command line or config is wrong: a usage error
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DataSourceError, CheckpointError, TrainingError) as error:  # the data or a checkpoint cannot be used
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
