"""Answers one can trust: the guaranteed 'unknown' threshold and the conformal prediction sets, on
synthetic scores whose truth is known, and the records-only report."""
import json

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from orestudy import config
from orestudy.run import evaluation
from orestudy.commands import answers


def calibrated_draw(rng, n: int, classes: int = 4):
    """n photos of a calibrated classifier: Dirichlet softmax (mostly confident, as a trained one), the
    true class drawn from it (so a photo with top-1 probability c is right with probability c)."""
    probs = rng.dirichlet(np.full(classes, 0.1), n)
    labels = (probs.cumsum(1) < rng.uniform(size=(n, 1))).sum(1).clip(max=classes - 1)
    return probs, labels


def true_risk(thresholds: list[float]) -> np.ndarray:
    """The true error among answered photos of calibrated_draw at each threshold (0 when none are),
    by Monte Carlo on one large fixed draw: calibrated, so the mean of 1 - top-1 over those answered."""
    confidence = calibrated_draw(np.random.default_rng(12345), 400_000)[0].max(1)
    return np.array([(1 - confidence[confidence >= t]).mean() if t < evaluation.NO_ANSWER else 0.0
                     for t in thresholds])


def test_clopper_pearson_bound_is_scipys_exact_interval():
    for errors, n, delta in ((0, 45, 0.0125), (3, 100, 0.05), (10, 20, 0.1), (0, 1, 0.1)):
        expected = binomtest(errors, n, alternative="less").proportion_ci(1 - delta, method="exact").high
        assert evaluation.error_upper_bound(errors, n, delta) == pytest.approx(expected, rel=1e-9)
    assert evaluation.error_upper_bound(5, 5, 0.1) == 1.0 and evaluation.error_upper_bound(0, 0, 0.1) == 1.0


def test_guaranteed_threshold_holds_the_target_in_at_least_1_minus_delta_of_draws():
    """On repeated validation draws, the true error among answered photos exceeds the target in at most
    delta of them (plus binomial sampling error of the draw count), while the threshold answers some."""
    target, delta, draws = 0.05, 0.1, 300
    rng = np.random.default_rng(0)
    thresholds = []
    for _ in range(draws):
        probs, labels = calibrated_draw(rng, 1000)
        thresholds.append(evaluation.selective_threshold(probs.max(1), probs.argmax(1) == labels, target, delta)[0])
    failures = (true_risk(thresholds) > target).sum()
    assert failures <= binom.ppf(0.999, draws, delta)  # at most delta of the draws, up to sampling error
    assert np.mean([t < evaluation.NO_ANSWER for t in thresholds]) > 0.9  # and it does answer


def test_point_estimate_threshold_misses_the_target_far_more_often():
    """The contrast the guarantee is for: the old rule's true error exceeds the target in about half
    the draws."""
    rng = np.random.default_rng(1)
    thresholds = []
    for _ in range(100):
        probs, labels = calibrated_draw(rng, 1000)
        thresholds.append(evaluation.point_threshold(probs.max(1), probs.argmax(1) == labels, 0.05))
    assert (true_risk(thresholds) > 0.05).sum() > 20


def test_threshold_edge_cases():
    confidence = np.linspace(0.5, 1.0, 200)
    # every prediction right: everything is answered, with the bound of 0 errors in 200
    threshold, bound = evaluation.selective_threshold(confidence, np.ones(200, bool), 0.05, 0.1)
    assert threshold == 0.5 and bound == pytest.approx(evaluation.error_upper_bound(0, 200, 0.1 / 8))
    # half of them wrong at every confidence: nothing qualifies, nothing is answered
    assert evaluation.selective_threshold(confidence, np.arange(200) % 2 == 0, 0.05, 0.1) == (evaluation.NO_ANSWER, 1.0)
    # too few photos to promise 5 % even without an error
    assert evaluation.selective_threshold(confidence[:30], np.ones(30, bool), 0.05, 0.1)[0] == evaluation.NO_ANSWER
    assert evaluation.selective_threshold(np.array([]), np.array([], bool), 0.05, 0.1)[0] == evaluation.NO_ANSWER
    assert evaluation.NO_ANSWER > 1.0  # above every probability, so it answers none
    # the wrong photos are the least confident: the threshold sits just above them
    correct = confidence > 0.7
    threshold, _ = evaluation.selective_threshold(confidence, correct, 0.05, 0.1)
    assert 0.7 < threshold < 0.8


def test_conformal_sets_cover_at_least_the_nominal_level():
    """Over many calibration/test draws, the sets hold the true class at >= the nominal coverage minus
    sampling error, and are never empty."""
    rng = np.random.default_rng(2)
    for coverage in (0.8, 0.95):
        covered, sizes = [], []
        for _ in range(200):
            probs, labels = calibrated_draw(rng, 300)
            scores = evaluation.conformal_scores(probs[:150], labels[:150])
            sets = evaluation.prediction_sets(probs[150:], scores, coverage)
            assert sets.sum(1).min() >= 1
            covered.append(sets[np.arange(150), labels[150:]].mean())
            sizes.append(sets.sum(1).mean())
        se = np.std(covered) / np.sqrt(len(covered))
        assert np.mean(covered) >= coverage - 3 * se
        assert np.mean(sizes) < 2  # and informative: far fewer than all 4 classes


def test_conformal_sets_grow_with_coverage_and_take_all_classes_past_what_n_allows():
    probs, labels = calibrated_draw(np.random.default_rng(3), 40)
    scores = evaluation.conformal_scores(probs[:19], labels[:19])
    small, large = (evaluation.prediction_sets(probs[19:], scores, c) for c in (0.5, 0.9))
    assert (small <= large).all() and small.sum() < large.sum()
    assert evaluation.prediction_sets(probs[19:], scores, 0.96).all()  # ceil(20 * 0.96) = 20 > 19 scores


def test_config_rejects_out_of_range_answer_settings():
    for name, value in (("unknown_delta", 0.0), ("unknown_target_error", 1.0), ("set_coverage", 1.5)):
        with pytest.raises(ValueError, match=name):
            config.TrainConfig(**{name: value})


def test_old_records_take_the_defaults():
    """A committed record's config (from before these fields) still loads, as study.computation_key
    loads it, and computes what the defaults compute."""
    old = json.loads(open(config.REPO_ROOT / "docs/results/mobilenet_seeds/trials.jsonl").readline())["config"]
    assert "unknown_delta" not in old
    loaded = config.TrainConfig.from_dict(config.computation(old))
    assert (loaded.unknown_delta, loaded.set_coverage) == (0.1, 0.95)


def record(seed: int, rng, n: int = 1000) -> dict:
    probs, labels = calibrated_draw(rng, 2 * n)
    rows = [["val" if i < n else "test", f"{i:064x}", int(y), list(map(float, p))]
            for i, (p, y) in enumerate(zip(probs, labels))]
    return {"dataset": "synthetic", "status": "ok", "history": [],
            "config": config.computation_of(config.TrainConfig(seed=seed)),
            "metrics": {"accuracy": 0.5, "predictions": rows}}


def test_answers_from_records_alone(tmp_path, capsys):
    rng = np.random.default_rng(4)
    path = tmp_path / "trials.jsonl"
    old = {**record(9, rng), "metrics": {"accuracy": 0.5}}  # no per-image rows: left out
    path.write_text("\n".join(json.dumps(r) for r in (record(1, rng), record(2, rng), old)) + "\n")
    rows = answers.main([str(path), "--output", str(tmp_path / "out")])
    assert [r["seed"] for r in rows] == [1, 2] and all(r["n_val"] == r["n_test"] == 1000 for r in rows)
    for r in rows:
        assert 0 < r["answered_share"] < r["point_answered_share"] <= 1 and r["threshold"] > r["point_threshold"]
        assert r["within_target"] == (r["answered_error"] <= 0.05) and r["bound"] <= 0.05
        assert 0.85 < r["set_coverage"] <= 1 and 1 <= r["mean_set_size"] < 4
    assert (tmp_path / "out" / "answers.csv").read_text().count("\n") == 3
    assert "| configuration | seeds |" in (tmp_path / "out" / "answers.md").read_text()
    with pytest.raises(SystemExit):
        answers.main([str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in capsys.readouterr().err
