"""Classify ore photos with a trained model.

    python -m orestudy.predict --model runs/<run name> photo.jpg folder/ ...
    python -m orestudy.predict --model runs:/<mlflow run id> --top-k 3 --tta --output predictions.csv folder/

The model is a run folder, its best.pt, or an MLflow URI (runs:/<id>, models:/<name>/<version>), whose
best.pt is fetched. Preprocessing (input size, resize, centre crop, mean/std) comes from the checkpoint,
exactly as in validation. A photo whose top-1 probability is below the checkpoint's "unknown"
threshold is answered "unknown": a 7-class model would otherwise name a rock it has never seen. The
threshold was chosen on the validation split so that, with confidence 1 - delta, the error among
answered photos is at most the target (5 % and 0.1 by default; see the checkpoint). With --coverage C,
each photo also gets a prediction set: the fewest classes that hold the true one with probability C
("malachite or chrysocolla"), calibrated on the validation split (split-conformal). Unreadable files
get a row with the error.

    python -m orestudy.predict --model runs/<run name> --coverage 0.95 --output sets.json folder/
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import cli


def main(argv: list[str] | None = None) -> list:
    """prediction.Prediction per file, in order."""
    parser = argparse.ArgumentParser(prog=cli.prog("predict"), description=__doc__,
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (read recursively)")
    parser.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint file, or MLflow URI (runs:/<id>, models:/<name>/<version>)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per photo, most likely first")
    parser.add_argument("--tta", action="store_true",
                        help="average over the image and its horizontal and vertical flips (3x the compute; the "
                             "threshold was chosen without it, so expect a few more 'unknown' answers)")
    parser.add_argument("--coverage", type=float, metavar="C",
                        help="also give each photo its prediction set: the fewest classes that hold the true one "
                             "with probability C, e.g. 0.95 (calibrated on the validation split, without --tta)")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass")
    parser.add_argument("--output", type=Path, help="also write the predictions to this .csv or .json file (default: none)")
    parser.add_argument("--runs", default="runs",
                        help="folder whose mlflow.db resolves MLflow URIs, unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: CUDA when present")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.output is not None and args.output.suffix not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    if args.coverage is not None and not 0.0 < args.coverage < 1.0:
        parser.error(f"--coverage must be in (0, 1), got {args.coverage}")
    from tqdm import tqdm

    from . import device as devices
    from .prediction import (CheckpointError, calibration_scores, list_images, load_model, predict, summary_line,
                             table_line, unknown_threshold, write_output)

    if args.model.startswith(("runs:/", "models:/")):
        from . import tracking

        tracking.use_store(args.runs)

    devices.set_threads(args.threads)
    device = devices.pick_device(args.device)
    dtype = devices.pick_precision(args.precision, device)
    try:
        model, meta = load_model(args.model, device, dtype)
    except (FileNotFoundError, CheckpointError) as err:
        parser.error(str(err))
    threshold = unknown_threshold(meta, args.model)
    try:
        scores = calibration_scores(meta, args.model) if args.coverage else None
    except ValueError as err:
        parser.error(str(err))
    paths = list_images(args.images)
    k = min(args.top_k, len(meta["class_names"]))
    width = min(60, max([len(p) for p in paths] + [4]))

    print(f"{'file':<{width}}  {'answer':<14} top {k} (probability)"
          + (f"   set ({args.coverage:g} coverage)" if args.coverage else ""))
    started = time.time()
    preds = []
    stream = predict(model, meta, paths, threshold, k, args.tta, args.batch_size, device, dtype, scores, args.coverage)
    for pred in tqdm(stream, total=len(paths), unit="image", disable=not sys.stderr.isatty()):
        tqdm.write(table_line(pred, width))  # keeps the table and the bar apart on a terminal
        preds.append(pred)
    if args.output is not None:
        header = {"model": args.model, "classes": meta["class_names"], "input_size": meta["input_size"],
                  "mean": meta["mean"], "std": meta["std"], "unknown_threshold": threshold,
                  **{key: meta["best"].get(key) for key in ("unknown_target_error", "unknown_delta",
                                                             "unknown_error_bound")},
                  "coverage": args.coverage, "tta": args.tta}
        write_output(args.output, preds, k, header, sets=args.coverage is not None)
    print(summary_line(preds, threshold, args.coverage, time.time() - started)
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return preds


if __name__ == "__main__":
    main()
