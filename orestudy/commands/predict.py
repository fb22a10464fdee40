"""Classify ore photos with a trained model.

    orestudy predict photo.jpg folder/ ...                       # the ready model (models/minerals7)
    orestudy predict --model runs/<run name> --target-error 0.05 --output predictions.csv folder/
    orestudy predict --model runs:/<mlflow run id> --top-k 3 --tta folder/

The model is a run folder, its best.pt, an exported file with its JSON (model.onnx: answers, sets and
the target error as from the checkpoint; no novelty bank, so no "not one of these"), or an MLflow URI
(runs:/<id>, models:/<name>/<version>), whose best.pt is fetched; without --model, the ready model shipped in models/ (it says so). Preprocessing
(input size, resize, centre crop, mean/std) comes from the checkpoint, exactly as in validation.

Each photo gets, in this order:
- "not one of these" when it is farther from every training photo (in the model's feature space) than
  95 % of in-distribution photos are: a photo of none of the classes the model knows;
- its answer at the target error asked for: a class, or "unknown" below the threshold that keeps the
  error among answered photos at most --target-error with confidence 1 - --delta; computed now from
  the calibration photos the checkpoint keeps. Where that target cannot be certified, it says so and
  names the smallest target this model can certify and what limits it;
- its top classes and its prediction set: the classes that hold the true one for >= --coverage of
  photos, with confidence 1 - --delta over the calibration draw (--sets conditional, the default) or
  on average over calibrations (--sets marginal, split conformal).
Unreadable files get a row with the error. A checkpoint trained before calibration data were kept
answers with its stored threshold (one line says so).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import cli


def argument_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=cli.prog("predict"), description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (read recursively)")
    parser.add_argument("--model", metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint file, exported file (model.onnx with its model.onnx.json, from "
                             "orestudy export), or MLflow URI (runs:/<id>, models:/<name>/<version>); "
                             "default: the ready model in models/ (its card: models/minerals7/README.md)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per photo, most likely first")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over the image and its horizontal and vertical flips (3x the compute); "
                             "default: as the run was evaluated (its tta choice), for which its 'unknown' "
                             "threshold and prediction sets were calibrated")
    parser.add_argument("--target-error", type=float, default=0.10, metavar="E",
                        help="most error allowed among answered photos; below the threshold that keeps it with "
                             "confidence 1 - delta a photo is 'unknown' (10 %%: chosen from the committed records, "
                             "docs/usage/geologist.md)")
    parser.add_argument("--delta", type=float, default=0.10,
                        help="the guarantees hold with confidence 1 - delta over the draw of the calibration photos")
    parser.add_argument("--coverage", type=float, metavar="C",
                        help="each photo's prediction set holds the true class for >= C of photos; 0: no sets "
                             "(default: 0.95, left out with a note for a checkpoint that keeps no calibration)")
    parser.add_argument("--sets", default="conditional", choices=("conditional", "marginal"),
                        help="conditional: coverage >= C with confidence 1 - delta over the calibration draw "
                             "(Vovk 2012); marginal: >= C on average over calibrations (split conformal)")
    parser.add_argument("--novelty-pass", type=float, metavar="S",
                        help="share of in-distribution photos the 'not one of these' threshold passes "
                             "(default: the checkpoint's, 0.95)")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass")
    parser.add_argument("--output", type=Path, help="also write the predictions to this .csv or .json file (default: none)")
    parser.add_argument("--runs", default="runs", help="the runs folder, whose MLflow store (RUNS/mlflow.db) "
                                                       "resolves MLflow URIs, unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--device", type=cli.device, default="auto", help="cpu, cuda, cuda:N; auto: CUDA when present")
    parser.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"),
                        help="fp32: the answers the MLflow model and the exported file give, to the last digit; "
                             "bf16 / auto (bf16 on CUDA and on CPUs with native bf16): faster, probabilities "
                             "differ by up to about 0.02")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    return parser


def main(argv: list[str] | None = None) -> list:
    """prediction.Prediction per file, in order."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.output is not None and args.output.suffix not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    if args.coverage is not None and not 0.0 <= args.coverage < 1.0:
        parser.error(f"--coverage must be in [0, 1), got {args.coverage}")
    for name in ("target_error", "delta", "novelty_pass"):
        value = getattr(args, name)
        if value is not None and not 0.0 < value < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    from ..run import ready
    from ..run.prediction import CheckpointError, predict_files

    source = args.model or ready.default_model()
    coverage = 0.95 if args.coverage is None else args.coverage or None
    try:
        return predict_files(source, args.images, args.top_k, args.tta, coverage, args.batch_size,
                             args.output, args.runs, args.device, args.precision, args.threads,
                             target_error=args.target_error, delta=args.delta, guarantee=args.sets,
                             pass_share=args.novelty_pass, sets_required=args.coverage is not None)
    except (FileNotFoundError, CheckpointError, ValueError) as err:  # a bad --model: one line
        parser.error(str(err))


if __name__ == "__main__":
    main()
