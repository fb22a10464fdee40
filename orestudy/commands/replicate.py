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
go to <runs>/<name>/report/ and onto the study's MLflow run, whose nested children are the trials.
"""
from __future__ import annotations

import argparse
import sys

from . import cli
from .. import config
from ..config import HOW, SELECTION, WHERE, ReplicationSettings, StudySettings
from ..studies.grid import STUDY_OWNED


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
    p = cli.ArgumentParser(prog=cli.prog("replicate"), description=__doc__)
    which, where, how = (p.add_argument_group(title) for title in
                         ("which trials", "where the study lives and how its trials run", "how"))
    cli.add_options(p, ReplicationSettings, exclude=("fields",), groups={SELECTION: which, HOW: how})
    meta = cli.field_metadata(ReplicationSettings, "fields")
    which.add_argument("--set", type=field_value, action="append", default=[], dest="fields",
                       metavar=meta["metavar"], help=meta["help"])
    cli.add_options(p, StudySettings, groups={WHERE: where})
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from ..studies import replication  # Ray and torch load only when a study runs

    try:
        return replication.replicate(cli.from_args(args, ReplicationSettings, fields=dict(args.fields)),
                                     cli.from_args(args, StudySettings))
    except (OSError, ValueError) as err:  # FileNotFoundError / FileExistsError: a study missing or there
        hint = {FileNotFoundError: " (--resume and --report-only need a study started with the same options)",
                FileExistsError: " (--resume continues a study; --name starts another)"}.get(type(err), "")
        p.error(f"{err}{hint}")


if __name__ == "__main__":
    sys.exit(main())
