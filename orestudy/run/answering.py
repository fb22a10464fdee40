"""Answers that speak: a target error and a set coverage chosen when the model is asked, not when it was
trained, from the calibration data the checkpoint keeps.

A checkpoint keeps its calibration photos' softmax, labels and content hashes (`calibration_data`, in
best.pt's `best["calibration"]`). From them, at any target error and delta:

- `certify`: the guaranteed "unknown" threshold (evaluation.selective_threshold, exactly what training
  computes), or, where the target cannot be certified, the smallest target that can and what limits
  it: the number of calibration photos (no model could do better with so few) or the model's errors;
- `set_quantile`: the prediction sets' cut-off, with the marginal guarantee of split conformal
  (coverage >= C on average over calibrations) or the training-conditional one (coverage >= C with
  confidence 1 - delta over the calibration draw: Vovk 2012, "Conditional validity of inductive
  conformal predictors"; the binomial-quantile rank of Bates et al. 2021, "Distribution-free,
  risk-controlling prediction sets"), the default, since a user has one calibration, not the average
  of many.

The calibration is rows of photos, so a later calibration with more photos (all non-test photos of a
cross-validated model) is the same record with more rows (`Calibration.extended`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binom

from .evaluation import NO_ANSWER, conformal_scores, error_upper_bound, selective_threshold

# The default target at predict time, chosen from the committed records (docs/results/answer_targets):
# at 5 % and delta 0.1 the paper recipe answers nothing on 4 of its 5 seeds (42 of the 50 MobileNet
# records), at 10 % it answers 85 % of the test photos (67-95 %) and meets the target on all 5.
DEFAULT_TARGET_ERROR = 0.10
DEFAULT_DELTA = 0.10
DEFAULT_COVERAGE = 0.95
GUARANTEES = ("conditional", "marginal")


def pct(x: float) -> str:
    """0.1 -> '10 %', 0.0433 -> '4.3 %' (the docs' way of writing a share)."""
    return f"{100 * x:.1f}".removesuffix(".0") + " %"
DEFAULT_GUARANTEE = "conditional"
TARGET_STEP = 0.001  # the smallest certifiable target is searched at this resolution


# ---------------------------------------------------------------------------------------------------
# The calibration record

@dataclass
class Calibration:
    """Calibration photos' softmax (n, classes), true class indices and content hashes, and where they
    came from (one line per source: 'validation split, seed 231, hash')."""
    probabilities: np.ndarray
    labels: np.ndarray
    photos: list[str]
    sources: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1) if self.n else np.zeros(0)

    @property
    def correct(self) -> np.ndarray:
        return self.probabilities.argmax(1) == self.labels if self.n else np.zeros(0, bool)

    @property
    def scores(self) -> np.ndarray:
        """Split-conformal (LAC) nonconformity scores, sorted: 1 - p(true class)."""
        return conformal_scores(self.probabilities, self.labels) if self.n else np.zeros(0)

    def extended(self, other: "Calibration") -> "Calibration":
        """These photos and other's, a photo (by content hash) counted once: what a model calibrated on
        more photos (e.g. every fold's validation photos) keeps."""
        seen = set(self.photos)
        keep = [i for i, sha in enumerate(other.photos) if sha not in seen]
        return Calibration(np.concatenate([self.probabilities, other.probabilities[keep]]),
                           np.concatenate([self.labels, other.labels[keep]]),
                           self.photos + [other.photos[i] for i in keep], self.sources + other.sources)

    def to_dict(self) -> dict:
        return {"version": 1, "probabilities": self.probabilities.astype(np.float32), "labels": self.labels.tolist(),
                "photos": list(self.photos), "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, stored: dict) -> "Calibration":
        return cls(np.asarray(stored["probabilities"], dtype=np.float64), np.asarray(stored["labels"], dtype=int),
                   list(stored["photos"]), list(stored.get("sources", [])))

    @classmethod
    def of(cls, meta: dict) -> "Calibration | None":
        """A checkpoint's calibration, or None for a checkpoint trained before they kept one."""
        stored = meta.get("best", {}).get("calibration")
        return None if stored is None else cls.from_dict(stored)


def calibration_data(probabilities: np.ndarray, labels, photos: list[str], source: str) -> dict:
    """What best.pt keeps under best['calibration']."""
    return Calibration(np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=int), list(photos),
                       [source]).to_dict()


# ---------------------------------------------------------------------------------------------------
# The guaranteed "unknown" at a target chosen now

def search_steps(n: int) -> int:
    """k of selective_threshold's union bound: the most thresholds its binary search tries."""
    return max(1, int(np.ceil(np.log2(n + 1))))


def size_floor(n: int, delta: float) -> float:
    """The smallest target any model could certify from n calibration photos: all of them answered and
    none wrong, bounded at delta / k as selective_threshold bounds it."""
    return error_upper_bound(0, n, delta / search_steps(n)) if n else 1.0


@dataclass
class Certificate:
    """The guaranteed 'unknown' at one target error and delta."""
    target_error: float
    delta: float
    threshold: float               # the lowest top-1 probability answered; NO_ANSWER when not certified
    bound: float                   # the answered error's upper bound on calibration (1.0 when not certified)
    n: int                         # calibration photos
    errors: int                    # of them, top-1 wrong
    answered_share: float          # of the calibration photos, the share at or above the threshold
    smallest: float | None         # the smallest certifiable target (None: none up to 50 %)
    floor: float                   # size_floor(n, delta): what no model could beat with n photos
    stored: bool = False           # a checkpoint without calibration data: its stored threshold, as trained

    @property
    def certified(self) -> bool:
        return self.threshold < NO_ANSWER

    @property
    def limit(self) -> str:
        """What stops a lower target: 'calibration size' where even an error-free model could not do
        (much) better with these photos, else 'accuracy'."""
        if self.smallest is None or self.smallest <= self.floor + 2 * TARGET_STEP:
            return "calibration size"
        return "accuracy"

    def note(self) -> str:
        """One line for the terminal and the page."""
        if self.stored:
            if not self.certified:
                return (f"no threshold meets {pct(self.target_error)} at delta {self.delta:g} (the checkpoint "
                        f"keeps no calibration data to say what would; every photo is 'unknown')")
            return (f"the checkpoint's stored threshold {self.threshold:.3f} (error <= {pct(self.target_error)} "
                    f"with confidence {1 - self.delta:g}, as trained)")
        if self.certified:
            return (f"answers at top-1 probability >= {self.threshold:.3f}: error among answered photos <= "
                    f"{pct(self.target_error)} with confidence {1 - self.delta:g} (calibration: {self.n} photos, "
                    f"{pct(self.answered_share)} of them answered, bound {pct(self.bound)})")
        smallest = ("none up to 50 %" if self.smallest is None else f"{pct(self.smallest)}")
        if self.limit == "calibration size":
            why = (f"limited by the calibration size: with {self.n} photos no model can certify less than "
                   f"{pct(self.floor)}")
        else:
            why = (f"limited by the model's accuracy: {self.errors} of its {self.n} calibration photos are "
                   f"wrong (an error-free model could certify {pct(self.floor)} with {self.n} photos)")
        return (f"target error {pct(self.target_error)} cannot be certified at delta {self.delta:g}; the smallest "
                f"this model can certify is {smallest}, {why}. Every photo is 'unknown' at this target; "
                f"top classes and the prediction set still stand")


def smallest_certifiable(confidence: np.ndarray, correct: np.ndarray, delta: float, upto: float = 0.5) -> float | None:
    """The smallest target error (on a TARGET_STEP grid) that selective_threshold certifies from these
    photos, or None if none up to `upto` is."""
    for step in range(1, int(round(upto / TARGET_STEP)) + 1):
        target = round(step * TARGET_STEP, 6)
        if selective_threshold(confidence, correct, target, delta)[0] < NO_ANSWER:
            return target
    return None


def certify(calibration: Calibration, target_error: float, delta: float) -> Certificate:
    """The threshold training would have stored for this target and delta (the same function on the
    same photos), with what to say when it cannot be met."""
    confidence, correct = calibration.confidence, calibration.correct
    threshold, bound = selective_threshold(confidence, correct, target_error, delta)
    answered = float((confidence >= threshold).mean()) if calibration.n else 0.0
    smallest = smallest_certifiable(confidence, correct, delta) if calibration.n else None
    return Certificate(target_error, delta, threshold, bound, calibration.n, int((~correct).sum()), answered,
                       smallest, size_floor(calibration.n, delta))


def stored_certificate(meta: dict) -> Certificate | None:
    """A checkpoint without calibration data: the threshold it was trained with (None if none)."""
    best = meta.get("best", {})
    if best.get("unknown_threshold") is None:
        return None
    n = len(best.get("conformal_scores") or [])
    return Certificate(best.get("unknown_target_error", 0.05), best.get("unknown_delta", 0.1),
                       best["unknown_threshold"], best.get("unknown_error_bound", 1.0), n, 0, float("nan"), None,
                       size_floor(n, best.get("unknown_delta", 0.1)), stored=True)


# ---------------------------------------------------------------------------------------------------
# Prediction sets with a marginal or a training-conditional guarantee

def conditional_rank(n: int, coverage: float, delta: float) -> int:
    """The rank k (1-based) of the calibration score to cut at so that the set's coverage is >= coverage
    with probability >= 1 - delta over the draw of the n calibration photos. The coverage of the cut
    at the k-th smallest of n exchangeable (continuous) scores is Beta(k, n + 1 - k), and
    P(Beta(k, n + 1 - k) < C) = P(Binomial(n, C) >= k): the smallest k with that <= delta. n + 1
    (every class) when n is too small."""
    if n == 0:
        return 1
    return int(binom.ppf(1 - delta, n, coverage)) + 1


def marginal_rank(n: int, coverage: float) -> int:
    """Split conformal's rank, ceil((n + 1) C): coverage >= C on average over calibrations."""
    return int(math.ceil((n + 1) * coverage))


def set_quantile(scores: np.ndarray, coverage: float, delta: float, guarantee: str = DEFAULT_GUARANTEE) -> float:
    """The cut-off on 1 - p: a class is in a photo's set when 1 - p(class) <= it (inf: every class)."""
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    scores = np.sort(np.asarray(scores, dtype=float))
    rank = conditional_rank(len(scores), coverage, delta) if guarantee == "conditional" else marginal_rank(len(scores), coverage)
    return float(scores[rank - 1]) if 1 <= rank <= len(scores) else float("inf")


def sets_at(probabilities: np.ndarray, quantile: float) -> np.ndarray:
    """(photos, classes) booleans: the classes with 1 - p <= quantile, the top-1 class always in."""
    sets = 1.0 - probabilities <= quantile
    if len(sets):
        sets[np.arange(len(sets)), probabilities.argmax(1)] = True
    return sets


def set_note(n: int, coverage: float, delta: float, guarantee: str, quantile: float) -> str:
    if guarantee == "conditional":
        promise = f"hold the true class for >= {pct(coverage)} of photos, with confidence {1 - delta:g} over the calibration"
    else:
        promise = f"hold the true class for {pct(coverage)} of photos on average over calibrations"
    every = "; too few calibration photos: every class" if math.isinf(quantile) else ""
    return f"prediction sets ({guarantee}) {promise} ({n} calibration photos{every})"


# ---------------------------------------------------------------------------------------------------
# What a trained model keeps for answering (training.finish, and the ready model's build)

def keep(model, records: dict, labels: dict, val_probabilities: np.ndarray, input_size: int, mean, std, root: str,
         source: str, device=None, dtype=None, batch_size: int = 32) -> dict:
    """best.pt's 'calibration' (the validation photos' softmax, labels and hashes) and 'novelty' (the
    training photos' features as the bank, the validation photos' scores) for a trained model."""
    import os

    import torch

    from . import novelty

    device = device or torch.device("cpu")
    cal = calibration_data(val_probabilities, labels["val"], [r.sha256 for r in records["val"]], source)
    features = {split: novelty.record_features(model, records[split], input_size, mean, std, device, dtype, batch_size)
                for split in ("train", "val")}
    scorer = novelty.fit(features["train"], labels["train"], [os.path.relpath(r.path, root) for r in records["train"]],
                         [r.sha256 for r in records["train"]], features["val"])
    return {"calibration": cal, "novelty": scorer.to_dict()}


# ---------------------------------------------------------------------------------------------------
# The rules predict and the page answer by

@dataclass
class Rules:
    """How photos are answered: the 'unknown' threshold (None: never), the sets' cut-off (None: no
    sets), the novelty scorer (None: none stored), and a line about each."""
    threshold: float | None
    quantile: float | None
    novelty: object | None          # novelty.Novelty
    certificate: Certificate | None
    notes: list[str]
    target_error: float = DEFAULT_TARGET_ERROR
    delta: float = DEFAULT_DELTA
    coverage: float | None = DEFAULT_COVERAGE
    guarantee: str = DEFAULT_GUARANTEE

    def header(self) -> dict:
        """What a predictions file says about how it was answered."""
        c = self.certificate
        return {"target_error": self.target_error, "delta": self.delta, "unknown_threshold": self.threshold,
                "certified": None if c is None else c.certified, "error_bound": None if c is None else c.bound,
                "smallest_certifiable_target": None if c is None else c.smallest,
                "certification_limit": None if c is None or c.certified else c.limit,
                "coverage": self.coverage, "set_guarantee": self.guarantee if self.coverage else None,
                "set_quantile": None if self.quantile is None or math.isinf(self.quantile) else self.quantile,
                "novelty_threshold": None if self.novelty is None or math.isinf(self.novelty.threshold) else self.novelty.threshold,
                "novelty_pass_share": None if self.novelty is None else self.novelty.pass_share,
                "novelty_k": None if self.novelty is None else self.novelty.k, "notes": self.notes}


class NoCalibration(ValueError):
    """The checkpoint keeps nothing to form what was asked for (prediction sets)."""


def rules_for(meta: dict, source: str, target_error: float = DEFAULT_TARGET_ERROR, delta: float = DEFAULT_DELTA,
              coverage: float | None = DEFAULT_COVERAGE, guarantee: str = DEFAULT_GUARANTEE,
              pass_share: float | None = None, sets_required: bool = False, use_novelty: bool = True) -> Rules:
    """The rules at the target error, delta, coverage and guarantee asked for, from the checkpoint's
    calibration data; a checkpoint trained before it kept any falls back on its stored threshold and
    conformal scores, with a one-line note. sets_required: raise NoCalibration when sets cannot be
    formed (--coverage given explicitly), rather than leave them out with a note."""
    from . import novelty as novelty_scores

    classes = len(meta["class_names"])
    calibration, notes = Calibration.of(meta), []
    if calibration is not None:
        certificate = certify(calibration, target_error, delta)
        scores = calibration.scores
    else:
        certificate = stored_certificate(meta)
        scores = meta.get("best", {}).get("conformal_scores")
        kept = ("its stored threshold" if certificate is None or certificate.certified
                else "its stored threshold (none met its target: every photo 'unknown')")
        if certificate is None:
            kept = "no threshold at all (every photo is named)"
        notes.append(f"note: {source} keeps no calibration data (trained before it was kept), so "
                     + (f"{kept}, for {pct(certificate.target_error)} at delta {certificate.delta:g}, is used; "
                        if certificate else f"{kept}; ")
                     + "--target-error and --delta need a model trained since")
    if certificate is not None:
        notes.append(certificate.note())
    quantile = None
    if coverage:
        if scores is None:
            message = (f"{source} stores no conformal calibration (it predates prediction sets), so it cannot give "
                       f"--coverage sets; retrain it, or leave out --coverage")
            if sets_required:
                raise NoCalibration(message)
            notes.append(f"note: {message.split(', so')[0]}: no prediction sets")
            coverage = None
        else:
            quantile = set_quantile(np.asarray(scores), coverage, delta, guarantee)
            notes.append(set_note(len(scores), coverage, delta, guarantee, quantile))
    scorer = novelty_scores.Novelty.of(meta, pass_share) if use_novelty else None
    notes.append(novelty_scores.note(scorer, classes))
    if calibration is None and certificate is not None:  # what the stored threshold was made for
        target_error, delta = certificate.target_error, certificate.delta
    return Rules(None if certificate is None else certificate.threshold, quantile, scorer, certificate, notes,
                 target_error, delta, coverage, guarantee)
