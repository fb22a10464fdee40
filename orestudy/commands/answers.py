"""How far the answers of trained runs can be trusted, from their trial records alone.

    orestudy answers docs/results/mobilenet_seeds/trials.jsonl --output runs/answers

For every record that keeps per-image softmax (validation and test), this calibrates on its validation
split as training does (the guaranteed "unknown" threshold, the conformal scores) and checks on its
test split: the share of photos answered and their error against the target, and the prediction sets'
coverage and mean size. Beside it, the point-estimate threshold used before the guarantee, on the same
photos. Writes answers.md and answers.csv (one row per record) and prints the table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import cli
from .. import config


def main(argv: list[str] | None = None) -> list[dict]:
    defaults = config.defaults()
    p = cli.ArgumentParser(prog=cli.prog("answers"), description=__doc__)
    p.add_argument("records", nargs="+", help="trials.jsonl files whose records keep per-image softmax")
    p.add_argument("--output", type=Path, default=Path("runs/answers"), help="folder (default: %(default)s)")
    p.add_argument("--target-error", type=float, default=defaults["unknown_target_error"],
                   help="most error allowed among answered photos (default: %(default)s)")
    p.add_argument("--delta", type=float, default=defaults["unknown_delta"],
                   help="the target holds with confidence 1 - delta (default: %(default)s)")
    p.add_argument("--coverage", type=float, default=defaults["set_coverage"],
                   help="prediction sets' coverage (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("target_error", "delta", "coverage"):
        if not 0.0 < getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    from ..studies import study
    from ..studies.answer_checks import answers, write

    try:
        records = study.read_records(*args.records)
    except (OSError, ValueError) as err:
        p.error(str(err))
    rows = answers(records, args.target_error, args.delta, args.coverage)
    if not rows:
        p.error("no record keeps per-image predictions (records written before them cannot be calibrated)")
    print(write(args.output, rows, args.target_error, args.delta, args.coverage)
          + f"\n\nwrote {args.output / 'answers.md'} and {args.output / 'answers.csv'}")
    return rows


if __name__ == "__main__":
    main()
