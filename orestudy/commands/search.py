"""Searches: Optuna's TPE proposes configurations, Ray Tune trains them as trials (ASHA stops the weak
ones early), both on validation accuracy alone (one split, or the mean over --folds K folds of the
non-test images); then the best configuration is retrained over several seeds and tested once per
seed, beside the space's baseline (the paper's recipe) on the same seeds, and compared with it, paired.

    orestudy search se_ablation_cpu --trials 30 --time-budget 6h
    orestudy search se_ablation_cpu --folds 3 --name se_ablation_cpu_k3   # a 3-fold objective
    orestudy search se_ablation_cpu --resume                 # continue an interrupted search
    orestudy search se_ablation_cpu --resume --trials 40     # or extend a finished one
    orestudy search se_ablation_cpu --reuse runs/other/trials.jsonl   # retrain only what no record holds

A search space is a YAML file in search_spaces/ (or any path): see orestudy/search_space.py.
Everything goes to <runs>/<name>/ (orestudy/search_study.py says what is there).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

from . import cli
from ..config import RETRAINING, SEARCH, WHERE, SearchSettings, StudySettings


def parser() -> argparse.ArgumentParser:
    from ..studies.search_space import available_spaces

    p = cli.ArgumentParser(prog=cli.prog("search"), description=__doc__)
    p.add_argument("space", help=f"a search space in search_spaces/ ({', '.join(available_spaces())}) or a YAML file")
    cli.add_options(p, SearchSettings, group_titles={SEARCH: "the search", RETRAINING: "retraining"})
    cli.add_options(p, StudySettings, group_titles={WHERE: "where the search lives and how its trials run"})
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    from ..studies import study
    from ..studies.search_space import SearchSpaceError, load_space
    from ..studies.search_study import run_search

    try:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"data folder not found: {args.data} (--data or ORESTUDY_DATA)")
        space = load_space(args.space)
        settings = cli.from_args(args, StudySettings, name=args.name or space.name)
        options = cli.from_args(args, SearchSettings)
        # Ctrl-C stops the whole search, not just Tune's part of it (after which the retraining would
        # start); the trials it cuts short stay "running" in the study, and --resume runs them first.
        with mock.patch.dict(os.environ, {"TUNE_DISABLE_SIGINT_HANDLER": "1"}), study.connected(settings.address or None):
            return run_search(space, settings, options)
    except (FileExistsError, FileNotFoundError, SearchSpaceError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # its MLflow runs ended KILLED; Ray stopped
        p.exit(130, f"{p.prog}: interrupted: the same command with --resume continues the search, re-running "
                    f"the trials it cut short first\n")


if __name__ == "__main__":
    main()
