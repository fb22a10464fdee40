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
Everything goes to <output>/<name>/ (orestudy/search_study.py says what is there).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from unittest import mock

from . import cli
from ..config import WHERE, StudySettings


def duration(text: str) -> float:
    """Seconds from '5400', '90m', '6h' or '1h30m'."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 5400, 90m, 6h, 1h30m)")
    h, m, s = (float(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def parser() -> argparse.ArgumentParser:
    from ..studies.search_space import available_spaces

    p = argparse.ArgumentParser(prog=cli.prog("search"), description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("space", help=f"a search space in search_spaces/ ({', '.join(available_spaces())}) or a YAML file")
    s = p.add_argument_group("the search")
    s.add_argument("--trials", type=int, default=0, help="finished trials the search should have in all (default: "
                   "the space's budget.trials); a resumed search runs only the missing ones")
    s.add_argument("--folds", type=int, default=0, help="a trial's objective is the mean best validation accuracy "
                   "over K grouped, stratified folds of the non-test images (default: the space's budget.folds, 1)")
    s.add_argument("--time-budget", type=duration, default=0.0, metavar="DURATION",
                   help="stop searching after this long (5400, 90m, 6h): running trials are cut, and re-run first "
                        "by --resume; the retraining follows (default: no limit)")
    s.add_argument("--resume", action="store_true", help="continue the search with this name")
    s.add_argument("--sampler-seed", type=int, default=0, help="TPE's seed (default: %(default)s)")
    r = p.add_argument_group("retraining")
    r.add_argument("--seeds", nargs="*", action=cli.list_option(int), default=[1, 2, 3, 4, 5],
                   help="retrain the best configuration once per seed (split and training seed) and test it; "
                        "none: no retraining (default: 1,2,3,4,5)")
    r.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain the space's baseline (the paper recipe) beside the best")
    r.add_argument("--baseline-seeds", nargs="+", action=cli.list_option(int), default=[],
                   help="the baseline's seeds, when fewer than --seeds are affordable (default: the same)")
    r.add_argument("--reuse", action="append", default=[], metavar="TRIALS_JSONL",
                   help="finished trials of earlier studies (a replicate report's or a search's trials.jsonl, from "
                        "any machine): a retraining run of the same configuration, seed and data is not run again "
                        "but read from its record; repeatable")
    cli.add_options(p, StudySettings, group_titles={WHERE: "where the search lives and how its trials run"})
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    from ..studies import study
    from ..studies.search_space import SearchSpaceError, load_space
    from ..studies.search_study import SearchSettings, run_search

    try:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"data folder not found: {args.data} (--data or ORESTUDY_DATA)")
        space = load_space(args.space)
        settings = cli.from_args(args, StudySettings, name=args.name or space.name)
        options = SearchSettings(args.trials, args.time_budget, tuple(args.seeds), args.baseline,
                                 tuple(args.baseline_seeds), args.resume, args.sampler_seed, args.folds,
                                 tuple(args.reuse))
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
