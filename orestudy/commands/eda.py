"""Exploratory data analysis of an ore image folder (the paper's section III, Fig. 1-4).

    orestudy eda --data ../shared/data/minerals --output runs/eda

Writes to the output folder, and logs as one MLflow run (experiment "orestudy-eda"):
class_counts.png (images per class, imbalance ratio), samples.png (four random photos per class),
sizes.png (width vs height by class, file formats and modes), rgb_histograms.png (each class's RGB
histogram), unreadable.csv, near_duplicates.csv, stats.json and summary.md, which ties them together;
and the label audit (orestudy.audit) in audit/. With --curation, the curated data is described.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli
from .. import config


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(prog=cli.prog("eda"), description=__doc__)
    parser.add_argument("--data", type=Path, default=config.default_data_root(),
                        help="image folder with one sub-folder per class (ORESTUDY_DATA sets the default)")
    parser.add_argument("--output", type=Path, default=Path("runs/eda"), help="folder for the report and figures")
    size = parser.add_argument("--image-size", type=int, default=224,
                               help="input size in pixels the mean/std are taken at")
    cli.deprecate(parser, "--input-size", size)
    parser.add_argument("--seed", type=int, default=0, help="which photo of each class is shown")
    parser.add_argument("--audit", action=argparse.BooleanOptionalAction, default=True,
                        help="run the label audit too (about a minute per thousand photos on a CPU)")
    parser.add_argument("--curation", default="", metavar="FILE", help="describe the data after this curation file")
    parser.add_argument("--cache", default=str(config.DEFAULT_CACHE), help="the audit's feature cache; '': none")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                        help="log the report as an MLflow run")
    parser.add_argument("--runs", help="folder whose mlflow.db the report is logged to, unless MLFLOW_TRACKING_URI "
                                       "is set (default: the folder holding --output, runs for runs/eda)")
    parser.add_argument("--experiment", default="orestudy-eda", help="MLflow experiment")
    args = parser.parse_args(argv)
    args.runs = args.runs or str(args.output.resolve().parent)  # beside the report, not in the working folder
    from .. import tracking
    from ..analysis.exploration import CHANNELS, run_eda

    try:
        stats = run_eda(args.data, args.output, args.image_size, args.seed, sys.stderr.isatty(), args.audit,
                        args.curation, args.cache)
    except (OSError, ValueError) as err:  # data.DataError among them: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    where = f"{args.output}/summary.md"
    if args.mlflow:
        metrics = {"n_images": stats["n_images"], "n_classes": len(stats["class_counts"]),
                   "imbalance_ratio": stats["imbalance_ratio"], "n_unreadable": len(stats["unreadable"]),
                   "n_near_duplicate_groups": len(stats["near_duplicate_groups"]),
                   "n_cross_class_groups": stats["cross_class_groups"],
                   **{f"mean_{c}": m for c, m in zip(CHANNELS, stats["mean"])},
                   **{f"std_{c}": s for c, s in zip(CHANNELS, stats["std"])},
                   **{f"images_{c}": n for c, n in stats["class_counts"].items()}}
        if stats["label_audit"]:
            metrics["n_label_issues"] = stats["label_audit"]["n_flagged"]
        params = {k: stats[k] for k in ("data", "input_size", "seed")} | {"curation": args.curation}
        run_id = tracking.log_folder(args.runs, args.experiment, f"eda-{Path(stats['data']).name}", params,
                                     metrics, args.output)
        where += f", MLflow run {run_id}"
    print(f"{stats['n_images']} images, {len(stats['class_counts'])} classes, imbalance ratio "
          f"{stats['imbalance_ratio']:.2f}, {len(stats['unreadable'])} unreadable, "
          f"{len(stats['near_duplicate_groups'])} near-duplicate groups"
          + (f", {stats['label_audit']['n_flagged']} flagged by the label audit" if stats["label_audit"] else "")
          + f" -> {where}", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
