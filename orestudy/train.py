"""Train one configuration and test it once.

    python -m orestudy.train --backbone mobilenet_v2 --regime tl_da --attention se --freeze-epochs 10
"""
from __future__ import annotations

import argparse
import json

from . import cli
from .config import STUDY, WHERE, TrainConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=cli.prog("train"), description=__doc__,
                                     formatter_class=cli.HelpFormatter)
    cli.add_options(parser, TrainConfig, exclude=("parent_run", "evaluate_test"),
                    group_titles={WHERE: "where the run lives and how it is watched", STUDY: "set by studies"})
    args = parser.parse_args(argv)
    try:
        config = cli.from_args(args, TrainConfig)
    except ValueError as err:
        parser.error(str(err))
    from . import reports
    from .data import DataError  # torch loads only when a run starts
    from .training import run_experiment

    try:
        result = run_experiment(config)
    except DataError as err:  # the data set as it stands cannot be trained on: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if "per_class" in result:  # a run that did not evaluate the test split has none
        print(f"test split of {result['run_dir']}:\n{reports.per_class_table(result)}")
    print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "best_epoch", "best_val_accuracy",
                                             "fold_best_val_accuracy", "wall_seconds", "run_dir") if k in result},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
