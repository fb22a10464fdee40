"""Train one configuration and test it once.

    orestudy train --backbone mobilenet_v2 --regime tl_da --attention se --freeze-epochs 10
    orestudy train --resume runs/mobilenet_v2_tl_da_se8_f10_e20_s231   # after Ctrl-C or a crash
    orestudy train --config experiments/recipes/paper.yaml --seed 1   # a recipe file, one option changed
"""
from __future__ import annotations

import argparse
import json
import sys

from . import cli
from ..config import STUDY, WHERE, TrainConfig, grid_row, read_recipe

RESUME_OPTIONS = ("threads", "device", "progress")  # how a resumed run runs may change, not what it computes


def pre_parser() -> argparse.ArgumentParser:
    """--config alone, read before the options so that they override the file."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    return parser


def argument_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=cli.prog("train"), description=__doc__)
    cli.add_options(p, TrainConfig, exclude=("parent_run", "evaluate_test"),
                    group_titles={WHERE: "where the run lives and how it is watched", STUDY: "set by studies"},
                    more_help={"regime": "; or a grid row's name, the regime with an --attention: tl_da_se is "
                                         "tl_da with se (replicate --regimes names them so)"})
    p.add_argument("--config", metavar="RECIPE_YAML", help="a recipe: YAML of the options above by their "
                   "field names (experiments/recipes/paper.yaml); options given here override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR after its last "
                   "finished epoch (its last.pt), as its config.json says; only --threads, --device and "
                   "--progress may be given beside it")
    return p


def config_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The run's config from its options; --regime as a grid row (tl_da_se) sets --attention too."""
    regime, attention = grid_row(args.regime)
    if attention:
        if args.attention not in (attention, parser.get_default("attention")):
            parser.error(f"--regime {args.regime} is --regime {regime} --attention {attention}, not --attention "
                         f"{args.attention}")
        args.regime, args.attention = regime, attention
    try:
        return cli.from_args(args, TrainConfig)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser()
    recipe, _ = pre_parser().parse_known_args(argv)
    if recipe.config:
        try:
            parser.set_defaults(**read_recipe(recipe.config))  # the file's values, under the command line's
        except ValueError as err:
            parser.error(str(err))
    args = parser.parse_args(argv)
    changed = {k: v for k, v in vars(args).items() if k not in ("resume", "config") and v != parser.get_default(k)}
    if args.resume and args.config:
        parser.error("--resume takes the run's configuration from its config.json: drop --config")
    if args.resume and set(changed) - set(RESUME_OPTIONS):
        parser.error(f"--resume takes the run's configuration from its config.json: drop "
                     f"{', '.join(cli.option_name(parser, k) for k in sorted(set(changed) - set(RESUME_OPTIONS)))}")
    config, state = config_from(parser, args), None
    from .. import data, models  # torch loads only when a run starts
    from ..run import reports, training

    if args.resume:
        try:
            config, state = training.resumable(args.resume, **changed)
        except (OSError, ValueError) as err:
            parser.error(str(err))
    try:
        result = training.run_experiment(config, resume=state)
    # A name taken, the data set as it stands, a backbone or configuration that cannot run, a loss gone
    # NaN: one line, no traceback (the MLflow run, if one began, ended FAILED).
    except (training.RunFolderExists, data.DataError, models.UnknownBackbone, models.WeightsUnavailable,
            training.ConfigError, FloatingPointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except training.Interrupted as stop:
        parser.exit(130, f"{parser.prog}: interrupted after epoch {stop.epoch}: " + (
            f"`orestudy train --resume {stop.run_dir}` continues it\n" if stop.run_dir else
            "a cross-validation's folds continue only as a study's trial (orestudy search --folds)\n"))
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted before the run began: no run folder was made\n")
    if "per_class" in result:  # a run that did not evaluate the test split has none
        print(f"test split of {result['run_dir']}:\n{reports.per_class_table(result)}")
    print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "best_epoch", "best_val_accuracy",
                                             "fold_best_val_accuracy", "wall_seconds", "run_dir") if k in result},
                     indent=2))
    print(next_steps(result), file=sys.stderr)
    return result


def next_steps(result: dict) -> str:
    """Where the run is, and the commands that use it next."""
    lines = [f"run folder: {result['run_dir']}"]
    if result.get("mlflow_run"):
        lines[0] += f" (MLflow run {result['mlflow_run']})"
    if "folds" not in result or "accuracy" in result:  # a run, or the cross-fitted model of the folds
        lines.append(f"next: orestudy predict --model {result['run_dir']} PHOTO_OR_FOLDER ...")
    if result.get("mlflow_uri"):
        lines.append(f"      mlflow ui --backend-store-uri {result['mlflow_uri']}   # then {result['mlflow_url']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
