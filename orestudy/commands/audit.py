"""Label audit: which photos' labels the other photos contradict (confident learning, cleanlab).

    orestudy audit --data ../shared/data/minerals --output runs/audit
    orestudy audit --curation experiments/curation_minerals.csv   # audit the curated data
    orestudy audit --model runs/<run>                             # a trained run's backbone

Out-of-fold probabilities for every image (a logistic regression on frozen, flip-averaged ImageNet
features, K folds grouped by near-duplicates), then cleanlab's find_label_issues. Writes
label_issues.csv (every image, most suspect first: path, content hash, given and suggested label,
label quality, rank, flagged), label_issues.png (the most suspect photos, given -> suggested),
cross_class_duplicates.csv and summary.md; logs them as one MLflow run (experiment orestudy-eda).
With --model, the checkpoint has seen its training photos' labels, mistakes included, so it finds
fewer of them there. Look at each flagged photo before curating: a flag is a question.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli
from .. import config


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(prog=cli.prog("audit"), description=__doc__)
    parser.add_argument("--data", type=Path, default=config.default_data_root(),
                        help="image folder with one sub-folder per class (ORESTUDY_DATA sets the default)")
    parser.add_argument("--output", type=Path, default=Path("runs/audit"), help="folder for the audit's files")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed (default: %(default)s)")
    parser.add_argument("--backbone", default="mobilenet_v2", choices=config.BACKBONES,
                        help="frozen ImageNet backbone whose features are used (default: %(default)s)")
    parser.add_argument("--model", default="", metavar="RUN_DIR", help="a trained run's folder: its best.pt's "
                                                                       "backbone instead of the ImageNet one")
    parser.add_argument("--image-size", type=int, default=0,
                        help="input size in pixels; 0: the backbone's own (default: %(default)s)")
    parser.add_argument("--top", type=int, default=36, help="flagged photos in the montage (default: %(default)s)")
    parser.add_argument("--curation", default="", metavar="FILE", help="audit the data after this curation file")
    parser.add_argument("--cache", default=str(config.DEFAULT_CACHE), help="feature cache folder; '': memory only")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True, help="log the audit as an MLflow run")
    parser.add_argument("--runs", help="folder whose mlflow.db the audit is logged to, unless MLFLOW_TRACKING_URI "
                                       "is set (default: the folder holding --output, runs for runs/audit)")
    parser.add_argument("--experiment", default="orestudy-eda", help="MLflow experiment")
    args = parser.parse_args(argv)
    args.runs = args.runs or str(args.output.resolve().parent)  # beside the audit, not in the working folder
    if args.folds < 2 or args.top < 1:
        parser.error("--folds must be >= 2 and --top >= 1")
    from ..analysis import label_audit  # torch, cleanlab and mlflow load only when an audit runs
    from .. import tracking

    try:
        stats = label_audit.run_audit(args.data, args.output, args.folds, args.seed, args.backbone, args.model,
                                      args.top, args.curation, args.cache, args.image_size,
                                      progress=sys.stderr.isatty())
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    where = f"{args.output}/summary.md"
    if args.mlflow:
        params = {k: stats[k] for k in ("data", "features", "folds", "seed")} | {"curation": args.curation}
        metrics = {k: stats[k] for k in ("n_images", "n_flagged", "flagged_share", "oof_accuracy", "cross_class_groups")}
        where += ", MLflow run " + tracking.log_folder(args.runs, args.experiment, f"audit-{args.data.name}", params,
                                                       metrics, args.output)
    print(f"{stats['n_flagged']} of {stats['n_images']} images flagged (out-of-fold accuracy "
          f"{stats['oof_accuracy']:.3f}) -> {where}", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
