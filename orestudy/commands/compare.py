"""The effects table of any trial records: every two configurations that differ in one factor, paired by seed.

    orestudy compare docs/results/*/trials.jsonl --output docs/results/mobilenet_effects
    orestudy compare runs/a/report/trials.jsonl runs/b/report/trials.jsonl --backbones mobilenet_v2
    orestudy compare runs/k1/trials.jsonl runs/k3/trials.jsonl --contrast runs/k1/best.jsonl runs/k3/best.jsonl

Writes effects.md, effects.csv and effects.png (paired differences per seed, one row per contrast) and
prints the table. A configuration found in several files counts once (the record that keeps per-image
outcomes wins), so overlapping studies can be given together. --contrast adds B - A for two files of
one configuration each, whatever they differ in (two searches' picks: their best.jsonl); A or B may
join several files with commas (one configuration's seeds from several studies).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import cli


def one_configuration(paths: str) -> list:
    """The finished trials of record files (several joined by commas: one configuration's seeds from
    several studies) that hold one configuration (over seeds)."""
    from ..studies import effects, study

    cells = effects.group(study.unique_records(study.read_records(*paths.split(","))))
    if len(cells) != 1:
        raise ValueError(f"{paths}: --contrast takes records of one configuration (on one data set); they "
                         f"have {len(cells)} finished")
    return next(iter(cells.values()))


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.ArgumentParser(prog=cli.prog("compare"), description=__doc__)
    p.add_argument("records", nargs="*", help="trials.jsonl files (a replicate or search report's)")
    p.add_argument("--output", type=Path, default=Path("runs/effects"), help="folder for the table and figure")
    p.add_argument("--backbones", nargs="+", action=cli.list_option(), default=[],
                   help="keep only these backbones' records (default: all)")
    p.add_argument("--factors", nargs="+", action=cli.list_option(), default=[],
                   help="keep only the contrasts of these factors, e.g. attention,curation (default: all)")
    p.add_argument("--contrast", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also B - A for two trials.jsonl files of one configuration each (repeatable); "
                        "several files joined by commas count as one (a configuration's seeds from several studies)")
    p.add_argument("--margin", type=float, default=1.5, help="equivalence margin in accuracy points: a contrast "
                   "whose difference two one-sided tests place within ±margin is 'equivalent within ±margin'")
    args = p.parse_args(argv)
    if not 0 < args.margin < 100:
        p.error(f"--margin must be in (0, 100) points, got {args.margin}")
    if not args.records and not args.contrast:
        p.error("give trials.jsonl files, --contrast A B, or both")
    from ..studies import effects, study

    try:
        records = study.read_records(*args.records)
        named = [(*(one_configuration(path) for path in pair), "contrast") for pair in args.contrast]
    except (OSError, ValueError) as err:
        p.error(str(err))
    rows = effects.effects(study.unique_records(
        [r for r in records if not args.backbones or r.config.get("backbone") in args.backbones]), named=named,
        factors=args.factors or None, margin=args.margin / 100)
    files = effects.write(args.output, rows)
    print(effects.markdown(rows) + "\n\n" + "\n".join(f"wrote {path}" for path in files))
    return rows


if __name__ == "__main__":
    main()
