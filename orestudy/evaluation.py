"""Evaluation: the one forward path of validation, test and prediction, and the metrics it yields.

No plotting or tracking here: training, predict, reports and the benchmarks all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from .device import autocast, to_device


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray


def batches(samples, labels, batch_size, make_inputs, generator: torch.Generator | None = None):
    """(inputs, labels) batches over samples; shuffled by generator when given."""
    order = torch.randperm(len(samples), generator=generator).tolist() if generator else range(len(samples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield make_inputs([samples[i] for i in idx]), torch.tensor([labels[i] for i in idx])


@torch.no_grad()
def infer(forward: Callable, loader, device, dtype):
    """(fp32 logits, rest) for each (inputs, rest) batch: the one forward path of evaluation (rest is
    the labels) and prediction (rest is what identifies the images)."""
    for inputs, rest in loader:
        with autocast(device, dtype):
            logits = forward(to_device(inputs, device))
        yield logits.float(), rest  # yielded outside autocast, so the caller's code never runs under it


@torch.no_grad()
def evaluate(forward: Callable, loader, device, dtype) -> Evaluation:
    """The one evaluation path: validation every epoch and the final test."""
    losses, labels, probs = [], [], []
    for logits, target in infer(forward, loader, device, dtype):
        target = target.to(device)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        labels.append(target.cpu())
        probs.append(logits.softmax(1).cpu())
    labels_np = torch.cat(labels).numpy()
    probs_np = torch.cat(probs).numpy()
    preds = probs_np.argmax(1)
    return Evaluation(sum(losses) / len(labels_np), float((preds == labels_np).mean()), labels_np, preds, probs_np)


def per_image(split: str, records, evaluation: Evaluation) -> list[list]:
    """[split, image content hash, true class index, softmax probabilities] per image: what lets two
    runs on the same split be compared image by image (McNemar), and thresholds, prediction sets and
    ensembles be calibrated on validation and checked on test later, from the records alone."""
    return [[split, rec.sha256, int(label), [round(float(p), 5) for p in probs]]
            for rec, label, probs in zip(records, evaluation.labels, evaluation.probabilities)]


def unknown_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The lowest top-1 probability above which validation predictions err at most target_error of the
    time (so the most photos get an answer); below it a prediction is reported as 'unknown'."""
    order = np.argsort(-confidence)
    errors = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(errors <= target_error)[0]
    return float(confidence[order][ok.max()]) if len(ok) else 1.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> dict:
    ids = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                     zero_division=0)
    return {
        "accuracy": float((labels == predictions).mean()),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "class_names": list(class_names),
    }


def test_metrics(evaluation: Evaluation, class_names: list[str], threshold: float) -> dict:
    """The test split's metrics, and what the stored 'unknown' threshold does to these unseen photos:
    how many get an answer, and how often it is right."""
    result = classification_metrics(evaluation.labels, evaluation.predictions, class_names)
    answered = evaluation.probabilities.max(1) >= threshold
    result.update({
        "test_loss": evaluation.loss, "unknown_threshold": threshold,
        "test_answered_share": float(answered.mean()),
        "test_answered_accuracy": float((evaluation.predictions == evaluation.labels)[answered].mean())
        if answered.any() else None})  # JSON has no NaN
    return result
