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
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from . import data, device as devices, ensemble, models
from .evaluation import infer

UNKNOWN = "unknown"


@dataclass
class Prediction:
    path: str
    answer: str                     # a class name, "unknown" (not confident enough) or "" (unreadable)
    confidence: float               # top-1 probability; nan when unreadable
    top: list[tuple[str, float]]    # the top-k classes, most likely first
    error: str = ""                 # why the file could not be read


# ---------------------------------------------------------------------------------------------------
# The model and its preprocessing

def checkpoint_file(source: str) -> Path:
    """best.pt of a run folder, a checkpoint file, or the best.pt artifact of an MLflow run / model."""
    if source.startswith(("runs:/", "models:/")):
        from . import tracking  # only URIs need mlflow; it is slow to import

        return tracking.download_checkpoint(source)
    path = Path(source)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run folder, a best.pt or an MLflow runs:/ URI)")
    return path


def load_model(source: str, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict]:
    """(model ready for inference, checkpoint metadata): see models.for_inference. An ensemble's folder
    (orestudy.ensemble) gives its members' weighted mean."""
    if ensemble.is_ensemble(source):
        return ensemble.load_ensemble(source, device, dtype)
    model, meta = models.load_checkpoint(checkpoint_file(source), device)
    return models.for_inference(model, meta["input_size"], device, dtype), meta


def unknown_threshold(meta: dict, source: str) -> float | None:
    """The stored threshold, or None (with a warning) for a checkpoint written before thresholds were."""
    threshold = meta["best"].get("unknown_threshold")
    if threshold is None:
        print(f"warning: {source} stores no 'unknown' threshold (it predates them), so every photo will be "
              f"named as one of the {len(meta['class_names'])} classes, however unlike them it is. Retrain "
              f"for a threshold chosen on validation.", file=sys.stderr)
    return threshold


def eval_input(path: str | Path, input_size: int) -> torch.Tensor:
    """uint8 CHW: the validation view, without load_base's per-process cache, which would keep every
    predicted image in memory."""
    return data.eval_view(data.decode_base(path, input_size), input_size)


def list_images(inputs: list[str]) -> list[str]:
    """Files given, plus every (non-hidden) file under the folders given; names are not trusted, so
    everything is tried as an image and what is not one is reported."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            paths.append(item)  # a missing file is reported in its row, not here
    return paths


def decoded_batches(paths: list[str], batch_size: int, input_size: int, mean, std) -> Iterator:
    """(normalised inputs of the readable files, (paths, errors)) per batch of paths: only one batch of
    images is in memory at a time."""
    for start in range(0, len(paths), batch_size):
        chunk, images, errors = paths[start:start + batch_size], [], []
        for path in chunk:
            try:
                images.append(eval_input(path, input_size))
                errors.append("")
            except Exception as err:  # PIL raises many types for bad files; each is reported, not fatal
                errors.append(f"{type(err).__name__}: {err}")
        inputs = torch.stack(images) if images else torch.empty(0, 3, input_size, input_size, dtype=torch.uint8)
        yield data.normalize(inputs, mean, std), (chunk, errors)


def prefetched(items: Iterator) -> Iterator:
    """items, each made in a background thread while the caller works on the one before: PIL's decoding
    and torch's resize release the GIL, so the next batch decodes while the model runs on this one."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(next, items, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, items, None)
            yield item


def with_flips(model: torch.nn.Module):
    """Test-time augmentation: the log of the softmax averaged over the image and its horizontal and
    vertical flips, a logit whose softmax is that average (so it takes the same path as the model)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        logits = model(torch.cat([x, x.flip(-1), x.flip(-2)])).float()
        return logits.softmax(1).view(3, n, logits.shape[1]).mean(0).log()  # n may be 0
    return forward


def predict(model: torch.nn.Module, meta: dict, paths: list[str], threshold: float | None, top_k: int = 3,
            tta: bool = False, batch_size: int = 32, device: torch.device = torch.device("cpu"),
            dtype: torch.dtype | None = None) -> Iterator[Prediction]:
    """One Prediction per path, in order, streamed batch by batch."""
    names = meta["class_names"]
    k = min(top_k, len(names))
    forward = with_flips(model) if tta else model
    batches = prefetched(decoded_batches(paths, batch_size, meta["input_size"], meta["mean"], meta["std"]))
    for logits, (chunk, errors) in infer(forward, batches, device, dtype):
        probs = iter(logits.softmax(1).cpu().tolist())
        for path, error in zip(chunk, errors):
            if error:
                yield Prediction(path, "", float("nan"), [], error)
                continue
            top = sorted(zip(names, next(probs)), key=lambda item: -item[1])[:k]
            confident = threshold is None or top[0][1] >= threshold  # the threshold is the lowest accepted
            yield Prediction(path, top[0][0] if confident else UNKNOWN, top[0][1], top)


# ---------------------------------------------------------------------------------------------------
# Output

def csv_row(pred: Prediction, k: int) -> list:
    top = pred.top + [("", "")] * (k - len(pred.top))  # an unreadable file has no classes
    return [pred.path, pred.answer, "" if pred.error else pred.confidence,
            *[x for name, p in top for x in (name, p)], pred.error]


def write_output(path: Path, preds: list[Prediction], k: int, header: dict) -> None:
    """CSV (one row per file, top-k as columns) or JSON (with the model's details), by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        rows = [{"path": p.path, "answer": p.answer, "confidence": None if p.error else p.confidence,
                 "top_k": [{"class": c, "probability": q} for c, q in p.top], "error": p.error} for p in preds]
        path.write_text(json.dumps({**header, "predictions": rows}, indent=1))
        return
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "answer", "confidence", *[f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "p")],
                         "error"])
        writer.writerows(csv_row(p, k) for p in preds)


def table_line(pred: Prediction, width: int) -> str:
    name = pred.path if len(pred.path) <= width else "..." + pred.path[-(width - 3):]
    if pred.error:
        return f"{name:<{width}}  {'UNREADABLE':<14} {pred.error}"
    return f"{name:<{width}}  {pred.answer:<14} " + "  ".join(f"{c} {p:.3f}" for c, p in pred.top)


def main(argv: list[str] | None = None) -> list[Prediction]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint file, or MLflow URI (runs:/<id>, models:/<name>/<version>)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--tta", action="store_true",
                        help="average over the image and its horizontal and vertical flips (3x the compute; the "
                             "threshold was chosen without it, so expect a few more 'unknown' answers)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="also write the predictions to this .csv or .json file")
    parser.add_argument("--runs", default="runs",
                        help="folder whose mlflow.db resolves MLflow URIs, unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.output is not None and args.output.suffix not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
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
