"""Statistics of studies: a cell's accuracy over seeds, and paired comparisons of two cells.

Every test and interval is scipy's (Student's t, the exact binomial for McNemar, Wilson's interval,
the permutation test; Holm's adjustment is a few lines of arithmetic on their p-values). What is
orestudy's own is only how trial records are paired: by seed (one split and one training seed per
trial) and, where records keep per-image outcomes, by image content hash.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.stats

TARGET_HALF_WIDTH = 0.015  # the 95 % interval half-width (1.5 points) a decided comparison should reach


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: where the accuracy of one model on one test
    split of n images could lie, from test-set sampling alone (better than the normal interval near 1)."""
    ci = scipy.stats.binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def accuracy_summary(accuracies: list[float], n_test: list[int], confidence: float = 0.95) -> dict:
    """Mean and sample standard deviation over seeds, and a confidence interval: Student's t over the
    seeds when there are two or more (it covers split, initialisation and test-sampling variation), or
    for a single run the Wilson interval of its one test split (test sampling only)."""
    values = np.asarray(accuracies, dtype=float)
    n, mean = len(values), float(values.mean())
    if n >= 2:
        std = float(values.std(ddof=1))
        low, high = t_interval(values, confidence)
        low, high, method = max(0.0, low), min(1.0, high), "t over seeds"
    else:
        std = float("nan")
        low, high = wilson_interval(round(mean * n_test[0]), n_test[0], confidence)
        method = f"Wilson, {n_test[0]} test images"
    return {"n": n, "mean": mean, "std": std, "ci_low": low, "ci_high": high, "ci_method": method}


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of values (nan with fewer than two)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:  # no spread: the interval is the value (scipy says so with a RuntimeWarning)
        return float(values[0]), float(values[0])
    ci = scipy.stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


# ---------------------------------------------------------------------------------------------------
# Paired comparisons

@dataclass
class Paired:
    """What two configurations scored on the same splits: per seed, test accuracy and macro-F1, and
    (where both records keep them) per-image correctness keyed by image content hash."""
    a: dict[int, float]
    b: dict[int, float]
    a_f1: dict[int, float] = field(default_factory=dict)
    b_f1: dict[int, float] = field(default_factory=dict)
    a_images: dict[int, dict[str, bool]] = field(default_factory=dict)
    b_images: dict[int, dict[str, bool]] = field(default_factory=dict)


def sign_flip_p(differences: np.ndarray) -> float:
    """Exact two-sided paired permutation p-value: every sign flip of the per-seed differences (2^n of
    them, exact up to n = 16; above that scipy draws them at random)."""
    if len(differences) < 2 or not np.any(differences):
        return 1.0
    result = scipy.stats.permutation_test(
        (differences,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples",
        alternative="two-sided", n_resamples=2**16, random_state=0)
    return float(result.pvalue)


def mcnemar(b_only: int, a_only: int) -> float:
    """McNemar's exact test: among images exactly one of the two gets right, is each as likely to be
    the one? (binomial with p = 1/2 on the discordant pairs)."""
    n = a_only + b_only
    return 1.0 if n == 0 else float(scipy.stats.binomtest(b_only, n, 0.5).pvalue)


def seeds_needed(differences: np.ndarray, half_width: float = TARGET_HALF_WIDTH, confidence: float = 0.95) -> int | None:
    """Seeds at which a paired t interval with the observed spread would be ±half_width wide (the
    smallest n with t(n-1) * sd / sqrt(n) <= half_width); None without a spread to go on."""
    if len(differences) < 2:
        return None
    sd = float(np.std(differences, ddof=1))
    if sd == 0:
        return len(differences)
    n = 2
    while scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


EQUIVALENCE_MARGIN = 0.015  # ±1.5 accuracy points: what a 171-photo test split resolves at about 10 seeds


def tost_p(differences: np.ndarray, margin: float) -> float:
    """Two one-sided paired t-tests (Schuirmann 1987): the larger of the p-values against "B - A <= -margin"
    and against "B - A >= +margin"; below alpha, B - A lies within ±margin (the 1 - 2 alpha interval is
    inside it). nan without a spread to test."""
    if len(differences) < 2 or np.std(differences) == 0:
        return float("nan")
    above = scipy.stats.ttest_1samp(differences, -margin, alternative="greater").pvalue
    below = scipy.stats.ttest_1samp(differences, margin, alternative="less").pvalue
    return float(max(above, below))


def paired_effect(pair: Paired, confidence: float = 0.95, margin: float = EQUIVALENCE_MARGIN) -> dict:
    """B - A over the seeds both ran, in accuracy points: mean difference with its paired t interval,
    the exact sign-flip p, McNemar's exact p on the pooled per-image discordant pairs (seeds where both
    kept per-image outcomes), the macro-F1 difference, the equivalence test's p at ±margin, and the
    seeds a ±1.5-point interval would need."""
    seeds = sorted(set(pair.a) & set(pair.b))
    d = np.array([pair.b[s] - pair.a[s] for s in seeds], dtype=float)
    low, high = t_interval(d, confidence)
    p_t = float(scipy.stats.ttest_1samp(d, 0.0).pvalue) if len(d) >= 2 and np.std(d) > 0 else float("nan")
    f1_seeds = [s for s in seeds if s in pair.a_f1 and s in pair.b_f1]
    f1 = np.array([pair.b_f1[s] - pair.a_f1[s] for s in f1_seeds], dtype=float)
    image_seeds = [s for s in seeds if s in pair.a_images and s in pair.b_images]
    a_only = b_only = 0
    for s in image_seeds:
        both = set(pair.a_images[s]) & set(pair.b_images[s])
        a_only += sum(pair.a_images[s][h] and not pair.b_images[s][h] for h in both)
        b_only += sum(pair.b_images[s][h] and not pair.a_images[s][h] for h in both)
    return {
        "n": len(seeds), "seeds": seeds, "differences": d.tolist(),
        "mean": float(d.mean()) if len(d) else float("nan"), "ci_low": low, "ci_high": high, "p_t": p_t,
        "margin": margin, "p_tost": tost_p(d, margin),
        "p_sign_flip": sign_flip_p(d) if len(d) else float("nan"),
        "macro_f1_mean": float(f1.mean()) if len(f1) else float("nan"),
        "macro_f1_ci": t_interval(f1, confidence),
        "mcnemar_seeds": len(image_seeds), "a_only": a_only, "b_only": b_only,
        "p_mcnemar": mcnemar(b_only, a_only) if image_seeds else float("nan"),
        "seeds_for_1_5_points": seeds_needed(d),
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan stays nan and counts for nothing)."""
    order = [i for i in np.argsort(p_values) if not math.isnan(p_values[i])]
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(effect: dict, p_adjusted: float, alpha: float = 0.05, p_tost_adjusted: float = float("nan")) -> str:
    """'better' / 'worse' (B against A) only where the Holm-adjusted paired-t p (the test behind the
    interval) is below alpha; else 'equivalent within ±m' where the Holm-adjusted equivalence test's p is
    (the difference is decided to be smaller than the margin); otherwise 'no difference shown', which
    decides nothing. The exact sign-flip p is reported beside it but does not decide: with n seeds it
    cannot go below 2 / 2^n (0.0625 at five)."""
    if effect["n"] >= 2 and not math.isnan(p_adjusted) and p_adjusted < alpha:
        if effect["ci_low"] > 0:
            return "better"
        if effect["ci_high"] < 0:
            return "worse"
    if effect["n"] >= 2 and not math.isnan(p_tost_adjusted) and p_tost_adjusted < alpha:
        return f"equivalent within ±{100 * effect['margin']:g}"
    return "no difference shown"
