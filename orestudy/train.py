"""Run one configuration from the command line.

    python -m orestudy.train --backbone mobilenet_v2 --regime tl_da --attention se --freeze-epochs 10
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from .training import TrainConfig, run_experiment


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One --option per config field, typed from its default."""
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default, metavar=type(default).__name__.upper())


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    result = run_experiment(config)
    print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "best_epoch", "best_val_accuracy",
                                             "wall_seconds", "run_dir")}, indent=2))
    return result


if __name__ == "__main__":
    main()
