"""Evaluation: the one forward path of validation, test and prediction, and the metrics it yields.

No plotting or tracking here: training, predict, reports and the benchmarks all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from ..device import autocast, to_device


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


def mixture(probabilities: np.ndarray, weights, labels: np.ndarray) -> Evaluation:
    """The Evaluation of weighted mean probabilities (members, images, classes) against labels: an
    ensemble's, or test-time augmentation's (one model over several views, equal weights)."""
    mean = np.tensordot(np.asarray(weights, dtype=float), probabilities, axes=1)
    predictions = mean.argmax(1)
    loss = float(-np.log(mean[np.arange(len(labels)), labels] + 1e-12).mean())
    return Evaluation(loss, float((predictions == labels).mean()), labels, predictions, mean)


def per_image(split: str, records, evaluation: Evaluation) -> list[list]:
    """[split, image content hash, true class index, softmax probabilities] per image: what lets two
    runs on the same split be compared image by image (McNemar), and thresholds, prediction sets and
    ensembles be calibrated on validation and checked on test later, from the records alone."""
    return [[split, rec.sha256, int(label), [round(float(p), 5) for p in probs]]
            for rec, label, probs in zip(records, evaluation.labels, evaluation.probabilities)]


# ---------------------------------------------------------------------------------------------------
# Answers one can trust: an "unknown" with a guarantee, and prediction sets. Both are calibrated on the
# validation split's softmax and stored in best.pt; the test split only checks them.

NO_ANSWER = float(np.nextafter(1.0, 2.0))  # a threshold above every probability: no photo is answered


def error_upper_bound(errors: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson (exact binomial) upper bound on an error rate seen as errors in n:
    the true rate is below it with confidence 1 - delta. The Beta quantile is that bound's closed
    form (scipy's binomtest(...).proportion_ci gives the same, 100x slower). 1.0 when n is 0."""
    return 1.0 if errors >= n else float(beta.ppf(1 - delta, errors + 1, n - errors))


def selective_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float,
                        delta: float) -> tuple[float, float]:
    """(threshold, bound): the lowest top-1 probability to answer from such that, with confidence
    1 - delta, the error among answered photos is at most target_error; bound is that error's upper
    bound. Geifman & El-Yaniv (2017) SGR: a binary search over the sorted validation confidences, each
    tried threshold bounded by Clopper-Pearson at delta / k, k = ceil(log2(m + 1)) the most thresholds
    the search tries (a union bound over them). The search only tries thresholds that answer at least
    the photos zero errors would need to meet the target: the bound grows again as fewer are answered,
    and on a few hundred photos the paper's search (made for tens of thousands) walks into that end and
    answers nothing. (NO_ANSWER, 1.0) when no tried threshold's bound meets the target: too few
    validation photos to promise it, so every photo is 'unknown'."""
    index = np.argsort(confidence, kind="stable")
    order, wrong = confidence[index], ~correct[index]
    errors_from = np.append(np.cumsum(wrong[::-1])[::-1], 0)  # errors among order[z:]
    steps = max(1, int(np.ceil(np.log2(len(order) + 1))))
    fewest = int(np.ceil(np.log(delta / steps) / np.log1p(-target_error)))  # (1 - target)^n <= delta / k
    best, low, high = (NO_ANSWER, 1.0), 0, max(0, len(order) - fewest + 1)
    while low < high:  # the first z whose threshold order[z] meets the target, if the bound falls with z
        z = (low + high) // 2
        first = int(np.searchsorted(order, order[z]))  # ties with order[z] are answered too
        bound = error_upper_bound(int(errors_from[first]), len(order) - first, delta / steps)
        if bound <= target_error:
            best, high = (float(order[z]), bound), z  # met: try answering more
        else:
            low = z + 1
    return best


def point_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The rule before the guarantee: the lowest top-1 probability above which validation predictions
    err at most target_error of the time, a point estimate (kept to show, in answers.py, how far it
    misses on unseen photos)."""
    order = np.argsort(-confidence)
    errors = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(errors <= target_error)[0]
    return float(confidence[order][ok.max()]) if len(ok) else NO_ANSWER


# Split-conformal prediction sets (LAC: Sadinle, Lei & Wasserman 2019), written out rather than taken
# from MAPIE or crepes: those fit an sklearn-style estimator, while ours are the softmax evaluate()
# already gives, and the method is a quantile of n numbers.

def conformal_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Nonconformity of each calibration photo, 1 - p(true class), sorted: kept in best.pt, so sets of
    any coverage can be formed later without the calibration photos."""
    return np.sort(1.0 - probabilities[np.arange(len(labels)), labels])


def prediction_sets(probabilities: np.ndarray, scores: np.ndarray, coverage: float) -> np.ndarray:
    """(photos, classes) booleans: the classes whose 1 - p is within the ceil((n+1) coverage)-th
    smallest calibration score, a set that holds the true class with probability >= coverage for an
    exchangeable photo (every class when n is too small for that coverage). The top-1 class is always
    in: an empty set would say nothing, and adding a class can only raise coverage."""
    rank = int(np.ceil((len(scores) + 1) * coverage))
    quantile = scores[rank - 1] if rank <= len(scores) else np.inf
    sets = 1.0 - probabilities <= quantile
    sets[np.arange(len(sets)), probabilities.argmax(1)] = True
    return sets


def calibration(probabilities: np.ndarray, labels: np.ndarray, target_error: float, delta: float) -> dict:
    """What best.pt keeps from the validation split for answering: the guaranteed 'unknown' threshold
    with its target, delta and bound, and the conformal scores."""
    threshold, bound = selective_threshold(probabilities.max(1), probabilities.argmax(1) == labels,
                                           target_error, delta)
    return {"unknown_threshold": threshold, "unknown_target_error": target_error, "unknown_delta": delta,
            "unknown_error_bound": bound,
            "conformal_scores": [float(s) for s in conformal_scores(probabilities, labels)]}


def answer_metrics(probabilities: np.ndarray, labels: np.ndarray, calibrated: dict, coverage: float) -> dict:
    """What the calibration does to unseen photos: the share answered, their error and whether it is
    within the target, and the prediction sets' coverage and mean size at the given coverage."""
    answered = probabilities.max(1) >= calibrated["unknown_threshold"]
    correct = probabilities.argmax(1) == labels
    error = float(1.0 - correct[answered].mean()) if answered.any() else None  # JSON has no NaN
    sets = prediction_sets(probabilities, np.asarray(calibrated["conformal_scores"]), coverage)
    return {"test_answered_share": float(answered.mean()),
            "test_answered_accuracy": None if error is None else 1.0 - error, "test_answered_error": error,
            "test_answered_error_within_target": error is None or error <= calibrated["unknown_target_error"],
            "set_coverage": coverage, "test_set_coverage": float(sets[np.arange(len(labels)), labels].mean()),
            "test_mean_set_size": float(sets.sum(1).mean())}


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


def test_metrics(evaluation: Evaluation, class_names: list[str], calibrated: dict, coverage: float) -> dict:
    """The test split's metrics, and what the answering calibrated on validation does to these photos."""
    result = classification_metrics(evaluation.labels, evaluation.predictions, class_names)
    result.update({"test_loss": evaluation.loss, "unknown_threshold": calibrated["unknown_threshold"],
                   "unknown_error_bound": calibrated["unknown_error_bound"],
                   **answer_metrics(evaluation.probabilities, evaluation.labels, calibrated, coverage)})
    return result
