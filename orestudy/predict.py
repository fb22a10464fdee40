"""Classify ore photos with a trained model.

    python -m orestudy.predict --model runs/<run name> photo.jpg folder/ ...
    python -m orestudy.predict --model runs:/<mlflow run id> --top-k 3 --tta --output predictions.csv folder/

The model is a run folder, its best.pt, or an MLflow URI (runs:/<id>, models:/<name>/<version>), whose
best.pt is fetched. Preprocessing (input size, resize, centre crop, mean/std) comes from the checkpoint,
exactly as in validation. A photo whose top-1 probability is below the checkpoint's "unknown"
threshold (chosen on the validation split for a target error rate) is answered "unknown": a 7-class
model would otherwise name a rock it has never seen. Unreadable files get a row with the error.
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
    from tqdm import tqdm

    from . import device as devices
    from .prediction import UNKNOWN, list_images, load_model, predict, table_line, unknown_threshold, write_output

    if args.model.startswith(("runs:/", "models:/")):
        from . import tracking

        tracking.use_store(args.runs)

    devices.set_threads(args.threads)
    device = devices.pick_device(args.device)
    dtype = devices.pick_precision(args.precision, device)
    try:
        model, meta = load_model(args.model, device, dtype)
    except FileNotFoundError as err:
        parser.error(str(err))
    threshold = unknown_threshold(meta, args.model)
    paths = list_images(args.images)
    k = min(args.top_k, len(meta["class_names"]))
    width = min(60, max([len(p) for p in paths] + [4]))

    print(f"{'file':<{width}}  {'answer':<14} top {k} (probability)")
    started = time.time()
    preds = []
    stream = predict(model, meta, paths, threshold, k, args.tta, args.batch_size, device, dtype)
    for pred in tqdm(stream, total=len(paths), unit="image", disable=not sys.stderr.isatty()):
        tqdm.write(table_line(pred, width))  # keeps the table and the bar apart on a terminal
        preds.append(pred)
    seconds = time.time() - started
    if args.output is not None:
        header = {"model": args.model, "classes": meta["class_names"], "input_size": meta["input_size"],
                  "mean": meta["mean"], "std": meta["std"], "unknown_threshold": threshold,
                  "unknown_target_error": meta["best"].get("unknown_target_error"), "tta": args.tta}
        write_output(args.output, preds, k, header)
    unreadable = sum(bool(p.error) for p in preds)
    unknown = sum(p.answer == UNKNOWN for p in preds)
    rule = f"top-1 probability < {threshold:.3f}" if threshold is not None else "no threshold stored"
    print(f"{len(preds)} files: {len(preds) - unreadable - unknown} named, {unknown} unknown ({rule}), "
          f"{unreadable} unreadable; "
          f"{len(preds) / max(seconds, 1e-9):.1f} images/s" + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    return preds


if __name__ == "__main__":
    main()
