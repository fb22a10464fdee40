"""The paper's experimental grid as one Ray Tune study, and its tables beside the published numbers.

    orestudy replicate                                  # Tables III and IV, paper settings, seed 231
    orestudy replicate --seeds 231,1,2,3,4 --backbones mobilenet_v2,mobilenet_v1
    orestudy replicate --only table4 --epochs 2         # a quick look on a budget, not a replication
    orestudy replicate ... --resume                     # the same command again continues it
    orestudy replicate ... --report-only                # the tables of a study as it stands
    orestudy replicate ... --reuse earlier/trials.jsonl # runs only what earlier studies did not
    orestudy replicate --address auto ...               # on a running Ray cluster

The grid is experiments/paper_grid.yaml, the published numbers experiments/published_results.yaml.
Tables (Markdown and CSV), the effects table, figures and the trials' portable records (trials.jsonl)
go to <output>/<name>/report/ and onto the study's MLflow run, whose nested children are the trials.
"""
from __future__ import annotations

import argparse
import sys

from . import cli
from .. import config
from ..config import WHERE, StudySettings
from ..studies.grid import GRID, PUBLISHED, STUDY_OWNED


def field_value(text: str) -> tuple[str, object]:
    """KEY=VALUE for a TrainConfig field, typed like the field."""
    key, _, value = text.partition("=")
    defaults = config.defaults()
    if key not in defaults or key in STUDY_OWNED:
        raise argparse.ArgumentTypeError(
            f"{key!r} is not a TrainConfig field the study leaves free; the grid, --epochs and --seeds set "
            f"{', '.join(STUDY_OWNED)}")
    kind = type(defaults[key])
    return key, value.lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=cli.prog("replicate"), description=__doc__,
                                formatter_class=cli.HelpFormatter)
    grid = p.add_argument_group("which trials")
    grid.add_argument("--grid", default=str(GRID), help="grid file (default: %(default)s)")
    grid.add_argument("--published", default=str(PUBLISHED), help="published numbers (default: %(default)s)")
    lists = cli.list_option()
    grid.add_argument("--only", nargs="+", action=lists, default=[], metavar="TABLE", help="e.g. table4")
    grid.add_argument("--backbones", nargs="+", action=lists, default=[], help="e.g. mobilenet_v2,mobilenet_v1")
    grid.add_argument("--regimes", nargs="+", action=lists, default=[], help="rows: scratch, tl, tl_da, tl_da_se")
    grid.add_argument("--schedules", nargs="+", action=lists, default=[], help="frozen, unfrozen, frozen10")
    grid.add_argument("--seeds", nargs="+", action=cli.list_option(int), default=[],
                      help="split and training seeds, each cell runs once per seed (default: the grid's, 231)")
    grid.add_argument("--epochs", type=int, default=0,
                      help="budget: epochs per trial instead of the paper's 20 (frozen epochs scale along)")
    grid.add_argument("--set", type=field_value, action="append", default=[], metavar="FIELD=VALUE",
                      dest="fields", help="any other TrainConfig field for every trial, e.g. image_size=128")
    cli.add_options(p, StudySettings, group_titles={WHERE: "where the study lives and how its trials run"})
    how = p.add_argument_group("how")
    how.add_argument("--resume", action="store_true", help="continue the interrupted study of the same command")
    how.add_argument("--reuse", action="append", default=[], metavar="TRIALS_JSONL",
                     help="finished trials of an earlier study (its report/trials.jsonl, from any machine): "
                          "a trial of the same configuration on the same data is not run again but reported; "
                          "repeatable")
    how.add_argument("--report-only", action="store_true",
                     help="write the report of the study as it stands (with --reuse records), running nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from ..studies import replication  # Ray and torch load only when a study runs

    selection = replication.Selection(args.grid, args.published, args.only, args.backbones, args.regimes,
                                      args.schedules, args.seeds, args.epochs, dict(args.fields))
    try:
        return replication.replicate(selection, cli.from_args(args, StudySettings), args.resume,
                                     tuple(args.reuse), args.report_only)
    except (OSError, ValueError) as err:  # FileNotFoundError / FileExistsError: a study missing or there
        hint = {FileNotFoundError: " (--resume and --report-only need a study started with the same options)",
                FileExistsError: " (--resume continues a study; --name starts another)"}.get(type(err), "")
        p.error(f"{err}{hint}")


if __name__ == "__main__":
    sys.exit(main())
