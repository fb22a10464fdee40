"""Prediction: a trained model's answers for image files, streamed batch by batch, with the "unknown"
answer and, on request, prediction sets (the library of `orestudy predict`)."""
from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import data, files, models
from . import answering, ensembling, novelty as novelty_scores
from .evaluation import NO_ANSWER, infer

UNKNOWN = "unknown"
NOVEL = novelty_scores.NOVEL
SIMILAR = 3  # nearest training photos kept per photo as evidence


@dataclass
class Prediction:
    path: str
    answer: str                     # a class name, "unknown" (not confident enough) or "" (unreadable)
    confidence: float               # top-1 probability; nan when unreadable
    top: list[tuple[str, float]]    # the top-k classes, most likely first
    error: str = ""                 # why the file could not be read
    set: list[str] = field(default_factory=list)  # the prediction set, with --coverage; most likely first
    novelty: float = float("nan")   # the k-th nearest training photo's distance (novelty.py); nan: none stored
    novel: bool = False             # above the novelty threshold: answered "not one of these"
    similar: list[dict] = field(default_factory=list)  # the nearest training photos: label, photo, distance


# ---------------------------------------------------------------------------------------------------
# The model and its preprocessing

class CheckpointError(ValueError):
    """A file that is not a readable orestudy checkpoint."""


def checkpoint_file(source: str) -> Path:
    """best.pt of a run folder, a checkpoint file, or the best.pt artifact of an MLflow run / model."""
    if source.startswith(("runs:/", "models:/")):
        from .. import tracking  # only URIs need mlflow; it is slow to import

        return tracking.download_checkpoint(source)
    path = Path(source)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run folder, a best.pt or an MLflow runs:/ URI)")
    return path


def load_eager(source: str, device: torch.device = torch.device("cpu")) -> tuple[models.OreClassifier, dict]:
    """(the checkpoint's model in eval mode, its metadata), as trained: what heat maps differentiate."""
    path = checkpoint_file(source)
    try:
        return models.load_checkpoint(path, device)
    except Exception as err:  # unpickling, a missing key, a mismatched state dict: each means "not one of ours"
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a readable orestudy checkpoint ({type(err).__name__}: {reason})") from err


def exported_description(source: str) -> Path | None:
    """The JSON orestudy export wrote beside an exported file (model.onnx.json), or None."""
    described = Path(f"{source}.json")
    return described if Path(source).is_file() and described.is_file() else None


class Exported(torch.nn.Module):
    """An exported file (ONNX through onnxruntime, or TorchScript) as a model: it outputs the log of the
    file's probabilities, whose softmax gives them back, so it takes the checkpoint's path through
    predict. Its flips, if any, are inside the graph (exporting.py); it runs in fp32 on the CPU."""

    def __init__(self, file: Path, fmt: str):
        super().__init__()
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
            self.run = lambda x: torch.from_numpy(session.run(None, {"input": x.float().cpu().numpy()})[0])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                self.run = torch.jit.load(str(file), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.float().cpu()).float().clamp_min(1e-30).log()


def load_exported(source: str) -> tuple[Exported, dict]:
    """(the exported file as a model, metadata in a checkpoint's shape) from the file and its JSON."""
    described = json.loads(exported_description(source).read_text())
    keys = ("unknown_threshold", "unknown_target_error", "unknown_delta", "unknown_error_bound", "calibration")
    meta = {"backbone": f"exported {described['format']}", "class_names": described["class_names"],
            "input_size": described["centre_crop"], "mean": described["mean"], "std": described["std"],
            "exported": {"file": source, "flips": described.get("flips", False)},
            "best": {k: described[k] for k in keys if described.get(k) is not None}}
    try:
        return Exported(Path(source), described["format"]).eval(), meta
    except Exception as err:  # onnxruntime and torch.jit raise many types for a damaged file
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{source} is not a readable exported model ({type(err).__name__}: {reason})") from err


def load_model(source: str, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype | None = None, features: bool = False,
               flips: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model ready for inference, checkpoint metadata): see models.for_inference. An ensemble's folder
    (orestudy ensemble) gives its members' weighted mean; an exported file with its JSON (orestudy
    export) runs through onnxruntime or TorchScript. features: the model outputs [logits |
    penultimate features] (novelty.WithFeatures; flips averages the logits over flips as --tta does),
    where the checkpoint keeps a novelty score (meta['best']['novelty']); ensembles never do."""
    if ensembling.is_ensemble(source):
        return ensembling.load_ensemble(source, device, dtype)
    if exported_description(source):
        return load_exported(source)
    model, meta = load_eager(source, device)
    return ready(model, meta, device, dtype, features and "novelty" in meta["best"], flips), meta


def ready(model: models.OreClassifier, meta: dict, device: torch.device, dtype: torch.dtype | None,
          features: bool = False, flips: bool = False) -> torch.nn.Module:
    """The eager model made fast for inference; features: outputting [logits | features] (see load_model)."""
    return models.for_inference(novelty_scores.WithFeatures(model, flips) if features else model, meta["input_size"],
                                device, dtype)


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


def predict(model: torch.nn.Module, meta: dict, paths: list[str], threshold: float | None, top_k: int = 3,
            tta: bool = False, batch_size: int = 32, device: torch.device = torch.device("cpu"),
            dtype: torch.dtype | None = None, scores: np.ndarray | None = None,
            coverage: float | None = None, *, quantile: float | None = None,
            novelty: novelty_scores.Novelty | None = None) -> Iterator[Prediction]:
    """One Prediction per path, in order, streamed batch by batch. Sets: with a quantile (answering.
    set_quantile), or with conformal scores and a coverage (split conformal's marginal cut-off).
    novelty: the model is load_model(..., features=True)'s (its flips already inside), and a photo
    farther than the novelty threshold from the training photos is answered "not one of these"
    before any class is named; each photo keeps its nearest training photos as evidence."""
    names = meta["class_names"]
    k = min(top_k, len(names))
    forward = model if novelty is not None else models.Flipped(model) if tta else model
    if quantile is None and coverage:
        quantile = answering.set_quantile(scores, coverage, 0.0, "marginal")
    batches = prefetched(decoded_batches(paths, batch_size, meta["input_size"], meta["mean"], meta["std"]))
    for output, (chunk, errors) in infer(forward, batches, device, dtype):
        logits, feats = (output[:, :len(names)], output[:, len(names):]) if novelty is not None else (output, None)
        probs = logits.softmax(1).cpu().numpy()
        sets = answering.sets_at(probs, quantile) if quantile is not None else np.zeros_like(probs, dtype=bool)
        if novelty is not None and len(probs):
            distances, neighbours = novelty.neighbours(feats.cpu().numpy())
            score = distances[:, novelty.k - 1]
        else:
            distances = neighbours = score = [None] * len(probs)
        rows = iter(zip(probs.tolist(), sets, score, distances, neighbours))
        for path, error in zip(chunk, errors):
            if error:
                yield Prediction(path, "", float("nan"), [], error)
                continue
            p, in_set, nov, dist, near = next(rows)
            ranked = sorted(zip(names, p, in_set), key=lambda item: -item[1])
            top = [(name, q) for name, q, _ in ranked[:k]]
            novel = bool(nov is not None and nov > novelty.threshold)
            confident = threshold is None or top[0][1] >= threshold  # the threshold is the lowest accepted
            similar = [] if nov is None else [
                {"index": int(i), "label": names[novelty.labels[i]], "photo": novelty.photos[i],
                 "sha256": novelty.hashes[i], "distance": float(d)} for d, i in zip(dist[:SIMILAR], near[:SIMILAR])]
            yield Prediction(path, NOVEL if novel else top[0][0] if confident else UNKNOWN, top[0][1], top,
                             set=[name for name, _, member in ranked if member],
                             novelty=float("nan") if nov is None else float(nov), novel=novel, similar=similar)


# ---------------------------------------------------------------------------------------------------
# Output

def csv_row(pred: Prediction, k: int, sets: bool, novelty: bool = False) -> list:
    top = pred.top + [("", "")] * (k - len(pred.top))  # an unreadable file has no classes
    return [pred.path, pred.answer, "" if pred.error else pred.confidence, *([" or ".join(pred.set)] if sets else []),
            *(["" if pred.error else round(pred.novelty, 5)] if novelty else []),
            *[x for name, p in top for x in (name, p)], pred.error]


def write_output(path: Path, preds: list[Prediction], k: int, header: dict, sets: bool = False,
                 novelty: bool = False) -> None:
    """CSV (one row per file, top-k as columns) or JSON (with the model's details and, per photo, the
    nearest training photos), by the suffix; sets: with each photo's prediction set (a 'set' column of
    names joined by ' or ', a 'set' list in JSON); novelty: with each photo's novelty score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        rows = [{"path": p.path, "answer": p.answer, "confidence": None if p.error else p.confidence,
                 **({"set": p.set} if sets else {}),
                 **({"novelty": None if p.error else p.novelty, "novel": p.novel, "similar": p.similar} if novelty else {}),
                 "top_k": [{"class": c, "probability": q} for c, q in p.top], "error": p.error} for p in preds]
        files.write_json_atomic(path, {**header, "predictions": rows}, indent=1)  # odd name bytes as \udcXX
        return
    # A file name that is not UTF-8 is written as its own bytes (surrogateescape), so the path in the
    # CSV opens the file it names; whole or not at all (files.replaced).
    with files.replaced(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "answer", "confidence", *(["set"] if sets else []), *(["novelty"] if novelty else []),
                         *[f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "p")], "error"])
        writer.writerows(csv_row(p, k, sets, novelty) for p in preds)


ANSWER_WIDTH = len(NOVEL)


def table_line(pred: Prediction, width: int) -> str:
    name = pred.path if len(pred.path) <= width else "..." + pred.path[-(width - 3):]
    if pred.error:
        return f"{name:<{width}}  {'UNREADABLE':<{ANSWER_WIDTH}} {pred.error}"
    line = f"{name:<{width}}  {pred.answer:<{ANSWER_WIDTH}} " + "  ".join(f"{c} {p:.3f}" for c, p in pred.top)
    return line + (f"   set: {' or '.join(pred.set)}" if pred.set else "")


def summary_line(preds: list[Prediction], threshold: float | None, coverage: float | None, seconds: float) -> str:
    unreadable = sum(bool(p.error) for p in preds)
    unknown = sum(p.answer == UNKNOWN for p in preds)
    novel = sum(p.novel for p in preds)
    rule = ("no threshold stored" if threshold is None else "the target error cannot be certified"
            if threshold >= NO_ANSWER else f"top-1 probability < {threshold:.3f}")
    if coverage:
        sizes = [len(p.set) for p in preds if not p.error]
        rule += f"; mean set size {np.mean(sizes) if sizes else 0:.2f} at coverage {coverage:g}"
    return (f"{len(preds)} files: {len(preds) - unreadable - unknown - novel} named, {unknown} unknown ({rule}), "
            f"{novel} not one of these, {unreadable} unreadable; {len(preds) / max(seconds, 1e-9):.1f} images/s")


def opened(source: str, device: torch.device, precision: str, tta: bool | None):
    """(model, meta, device, dtype, tta, eager) of any source predict takes: an exported file (fp32 on the
    CPU, its flips inside), an ensemble folder (ready), or a checkpoint (eager: made ready once the rules
    say whether it outputs features), at the precision it was calibrated in where precision is auto."""
    from .. import device as devices

    if exported_description(source):
        if precision == "bf16" or tta is not None:
            raise ValueError(f"{source} is an exported file: it runs in fp32 on the CPU, with the flips it was "
                             f"exported with; leave out --precision bf16 and --tta / --no-tta")
        return *load_exported(source), torch.device("cpu"), None, False, False
    if ensembling.is_ensemble(source):
        dtype = devices.pick_precision(precision, device)
        return *load_model(source, device, dtype), device, dtype, tta, False
    model, meta = load_eager(source, device)
    trained = meta.get("config", {}).get("precision", "auto")
    if precision == "auto" and trained in ("fp32", "bf16"):  # as the checkpoint was calibrated
        precision = trained
    return model, meta, device, devices.pick_precision(precision, device), tta, True


def predict_files(source: str, inputs: list[str], top_k: int = 3, tta: bool | None = None, coverage: float | None = None,
                  batch_size: int = 32, output: Path | None = None, runs: str = "runs", device: str = "auto",
                  precision: str = "fp32", threads: int = 0, *, target_error: float = answering.DEFAULT_TARGET_ERROR,
                  delta: float = answering.DEFAULT_DELTA, guarantee: str = answering.DEFAULT_GUARANTEE,
                  pass_share: float | None = None, sets_required: bool = True) -> list[Prediction]:
    """`orestudy predict`: the model at source on every image under inputs, as a table on the terminal
    (and a CSV or JSON file at output), with the rules it answered by and a summary line. The target
    error, delta, coverage (None: no sets) and set guarantee are applied now, from the calibration
    data the checkpoint keeps (answering.rules_for). Raises FileNotFoundError, CheckpointError or
    ValueError for a model it cannot use (NoCalibration, a ValueError, for sets it cannot form when
    sets_required)."""
    from tqdm import tqdm

    from .. import device as devices

    if source.startswith(("runs:/", "models:/")):
        from .. import tracking

        tracking.use_store(runs)
    devices.set_threads(threads)
    model, meta, torch_device, dtype, tta, eager = opened(source, devices.pick_device(device), precision, tta)
    if tta is None:  # as the run was evaluated, and its threshold and sets calibrated
        tta = bool(meta.get("best", {}).get("tta", False))
    rules = answering.rules_for(meta, source, target_error, delta, coverage, guarantee, pass_share, sets_required)
    if eager:
        model = ready(model, meta, torch_device, dtype, rules.novelty is not None, tta)
    if rules.threshold is None:
        unknown_threshold(meta, source)  # its warning
    for line in rules.notes:
        print(line, file=sys.stderr)
    paths = list_images(inputs)
    k = min(top_k, len(meta["class_names"]))
    width = min(60, max([len(p) for p in paths] + [4]))
    print(f"{'file':<{width}}  {'answer':<{ANSWER_WIDTH}} top {k} (probability)"
          + (f"   set ({rules.coverage:g} coverage)" if rules.coverage else ""))
    started, preds = time.time(), []
    stream = predict(model, meta, paths, rules.threshold, k, tta, batch_size, torch_device, dtype,
                     quantile=rules.quantile, novelty=rules.novelty)
    for pred in tqdm(stream, total=len(paths), unit="image", disable=not sys.stderr.isatty()):
        tqdm.write(table_line(pred, width))  # keeps the table and the bar apart on a terminal
        preds.append(pred)
    if output is not None:
        header = {"model": source, "classes": meta["class_names"], "input_size": meta["input_size"],
                  "mean": meta["mean"], "std": meta["std"],
                  **{key: meta["best"].get(key) for key in ("unknown_target_error", "unknown_delta", "unknown_error_bound")},
                  **rules.header(), "tta": meta["exported"]["flips"] if "exported" in meta else tta}
        write_output(output, preds, k, header, sets=rules.coverage is not None, novelty=rules.novelty is not None)
    print(summary_line(preds, rules.threshold, rules.coverage, time.time() - started) + (f" -> {output}" if output else ""),
          file=sys.stderr)
    return preds
