"""Answers at a target chosen when asked (run/answering.py): the threshold training would have stored,
the smallest certifiable target and what limits it, and prediction sets whose coverage holds with
confidence 1 - delta over the calibration draw (training-conditional), on synthetic scores whose truth
is known."""
import numpy as np
import pytest
from scipy.stats import binom

from orestudy.run import answering, evaluation
from test_answers import calibrated_draw


def calibration(probs, labels) -> answering.Calibration:
    return answering.Calibration(probs, labels, [f"{i:064x}" for i in range(len(labels))], ["synthetic"])


def test_a_target_chosen_now_gives_trainings_threshold():
    """certify on the kept rows is evaluation.calibration (what training stores) at any target."""
    probs, labels = calibrated_draw(np.random.default_rng(10), 400)
    cal = calibration(probs, labels)
    for target in (0.02, 0.05, 0.1, 0.2):
        stored = evaluation.calibration(probs, labels, target, 0.1)
        got = answering.certify(cal, target, 0.1)
        assert (got.threshold, got.bound) == (stored["unknown_threshold"], stored["unknown_error_bound"])
    np.testing.assert_allclose(cal.scores, evaluation.conformal_scores(probs, labels))


def test_the_kept_rows_survive_a_checkpoint_round_trip():
    probs, labels = calibrated_draw(np.random.default_rng(11), 50)
    kept = answering.calibration_data(probs, labels, [f"{i:064x}" for i in range(50)], "validation split of x")
    back = answering.Calibration.of({"best": {"calibration": kept}})
    np.testing.assert_allclose(back.probabilities, probs, atol=1e-6)
    assert back.labels.tolist() == labels.tolist() and back.sources == ["validation split of x"]
    assert answering.Calibration.of({"best": {}}) is None


def test_more_calibration_photos_are_rows_added_once():
    """A model calibrated later on more photos (every fold's validation) keeps one record, a photo once."""
    probs, labels = calibrated_draw(np.random.default_rng(12), 60)
    a = answering.Calibration(probs[:40], labels[:40], [f"{i}" for i in range(40)], ["fold 0"])
    b = answering.Calibration(probs[30:], labels[30:], [f"{i}" for i in range(30, 60)], ["fold 1"])
    both = a.extended(b)
    assert both.n == 60 and both.photos == [f"{i}" for i in range(60)] and both.sources == ["fold 0", "fold 1"]
    np.testing.assert_allclose(both.probabilities, probs)


def accurate(rng, n: int, accuracy: float, classes: int = 7):
    """n photos of a model right on `accuracy` of them, its errors spread over its confidence."""
    labels = rng.integers(0, classes, n)
    probs = rng.dirichlet(np.full(classes, 0.3), n)
    correct = rng.uniform(size=n) < accuracy
    top = np.where(correct, labels, (labels + 1 + rng.integers(0, classes - 1, n)) % classes)
    probs[np.arange(n), top] += 1.5
    return probs / probs.sum(1, keepdims=True), labels


def test_an_uncertifiable_target_names_the_smallest_certifiable_one_and_its_limit():
    # About 170 photos of a 90 % model: 5 % cannot be met; the smallest target that can is named, and is met
    probs, labels = accurate(np.random.default_rng(13), 170, 0.9)
    cal = calibration(probs, labels)
    five = answering.certify(cal, 0.05, 0.1)
    assert not five.certified and five.threshold == evaluation.NO_ANSWER and five.smallest is not None
    assert five.smallest > 0.05 and answering.certify(cal, five.smallest, 0.1).certified
    assert not answering.certify(cal, five.smallest - answering.TARGET_STEP, 0.1).certified
    assert five.limit == "accuracy" and five.floor < five.smallest  # an error-free model could do better
    note = five.note()
    assert "cannot be certified" in note and answering.pct(five.smallest) in note and "accuracy" in note
    # 30 error-free photos: the number of photos is what limits, and the smallest target is its floor
    probs, labels = accurate(np.random.default_rng(14), 30, 1.0)
    small = answering.certify(calibration(probs, labels), 0.05, 0.1)
    assert not small.certified and small.limit == "calibration size"
    assert small.smallest == pytest.approx(small.floor, abs=2 * answering.TARGET_STEP)
    assert "calibration size" in small.note() and "30 photos" in small.note()


def test_a_checkpoint_without_calibration_falls_back_on_its_stored_threshold():
    meta = {"class_names": ["a", "b"], "best": {"unknown_threshold": 0.8, "unknown_target_error": 0.05,
                                                "unknown_delta": 0.1, "unknown_error_bound": 0.04,
                                                "conformal_scores": [0.1, 0.2, 0.3]}}
    rules = answering.rules_for(meta, "old.pt", target_error=0.2)
    assert rules.threshold == 0.8 and rules.target_error == 0.05 and rules.certificate.stored
    assert rules.notes[0].startswith("note: old.pt keeps no calibration data") and len(rules.notes[0].splitlines()) == 1
    assert rules.quantile == np.inf  # 3 scores are too few for a 95 % set: every class
    with pytest.raises(answering.NoCalibration):
        answering.rules_for({"class_names": ["a"], "best": {}}, "older.pt", coverage=0.9, sets_required=True)
    quiet = answering.rules_for({"class_names": ["a"], "best": {}}, "older.pt", coverage=0.9)
    assert quiet.coverage is None and quiet.threshold is None


def test_conditional_rank_is_the_binomial_quantile():
    """The k-th smallest of n scores covers Beta(k, n + 1 - k): P(coverage < C) = P(Binomial(n, C) >= k)."""
    for n, c, delta in ((170, 0.95, 0.1), (192, 0.9, 0.05), (1000, 0.95, 0.1)):
        k = answering.conditional_rank(n, c, delta)
        assert binom.sf(k - 1, n, c) <= delta < binom.sf(k - 2, n, c)
        assert k >= answering.marginal_rank(n, c)  # a guarantee per calibration costs a larger cut-off
    assert answering.conditional_rank(20, 0.95, 0.1) == 21  # too few: every class


def true_coverage(quantile: float, test_probs, test_labels) -> float:
    sets = answering.sets_at(test_probs, quantile)
    return float(sets[np.arange(len(test_labels)), test_labels].mean())


def test_conditional_sets_cover_with_confidence_1_minus_delta_over_calibration_draws():
    """Over repeated calibration draws of 170 photos, the true coverage (on a large fixed draw) falls
    below C in at most delta of them for conditional sets (up to the binomial error of the draw
    count), while marginal sets fall below in far more: coverage >= C on average only."""
    coverage, delta, draws = 0.9, 0.1, 300
    rng = np.random.default_rng(15)
    test_probs, test_labels = calibrated_draw(np.random.default_rng(99), 100_000)
    below = {"conditional": 0, "marginal": 0}
    covered = {"conditional": [], "marginal": []}
    for _ in range(draws):
        probs, labels = calibrated_draw(rng, 170)
        scores = evaluation.conformal_scores(probs, labels)
        for guarantee in below:
            c = true_coverage(answering.set_quantile(scores, coverage, delta, guarantee), test_probs, test_labels)
            below[guarantee] += c < coverage
            covered[guarantee].append(c)
    assert below["conditional"] <= binom.ppf(0.999, draws, delta)
    assert below["marginal"] > 2 * below["conditional"] and below["marginal"] > 0.25 * draws
    assert np.mean(covered["marginal"]) >= coverage - 0.005  # the marginal promise, on average
    # sets of both are nested: the conditional one never leaves out a class the marginal one holds
    probs, labels = calibrated_draw(rng, 170)
    scores = evaluation.conformal_scores(probs, labels)
    q = {g: answering.set_quantile(scores, coverage, delta, g) for g in below}
    assert q["conditional"] >= q["marginal"]
    assert (answering.sets_at(test_probs[:500], q["marginal"]) <= answering.sets_at(test_probs[:500], q["conditional"])).all()


def test_marginal_sets_are_split_conformal():
    probs, labels = calibrated_draw(np.random.default_rng(16), 300)
    scores = evaluation.conformal_scores(probs[:150], labels[:150])
    for c in (0.5, 0.9, 0.99):
        expected = evaluation.prediction_sets(probs[150:], scores, c)
        assert (answering.sets_at(probs[150:], answering.set_quantile(scores, c, 0.1, "marginal")) == expected).all()
    with pytest.raises(ValueError, match="guarantee"):
        answering.set_quantile(scores, 0.9, 0.1, "pointwise")


def test_predicts_defaults_are_the_libraries():
    from orestudy.commands import predict, serve

    for parser in (predict.argument_parser(), serve.argument_parser()):
        defaults = {a.dest: a.default for a in parser._actions}
        assert defaults["target_error"] == answering.DEFAULT_TARGET_ERROR
        assert defaults["delta"] == answering.DEFAULT_DELTA and defaults["sets"] == answering.DEFAULT_GUARANTEE


def cross_fitted_draw(rng, n: int, folds: int = 3, noise: float = 1.0, classes: int = 4):
    """n photos, each scored by every one of `folds` fold models: calibrated_draw's truth with each
    model's own noise on the logits. (per-model probabilities (folds, n, classes), labels)."""
    probs, labels = calibrated_draw(rng, n, classes)
    logits = np.log(np.clip(probs, 1e-12, None))[None] + rng.normal(0, noise, (folds, n, classes))
    member = np.exp(logits - logits.max(2, keepdims=True))
    return member / member.sum(2, keepdims=True), labels


def test_cross_fitted_calibration_holds_for_the_fold_models_mean_over_draws():
    """The cross-fitted model's calibration (ensembling.build_crossfit): every non-test photo scored by
    the one fold model that did not train on it, the rules then applied to the fold models' mean. Over
    repeated draws of 680 photos (3 folds), the mean's conditional 90 % sets cover >= 90 % and its
    answers stay within a 10 % error in all but about delta of them, as for a single model's own
    validation photos."""
    coverage, target, delta, draws, folds = 0.9, 0.10, 0.1, 150, 3
    rng = np.random.default_rng(7)
    test_members, test_labels = cross_fitted_draw(np.random.default_rng(99), 100_000, folds)
    test_probs = test_members.mean(0)
    uncovered = over_target = 0
    for _ in range(draws):
        members, labels = cross_fitted_draw(rng, 680, folds)
        fold = np.arange(len(labels)) % folds  # photo i validated by fold model i mod 3
        oof = members[fold, np.arange(len(labels))]
        q = answering.set_quantile(evaluation.conformal_scores(oof, labels), coverage, delta, "conditional")
        uncovered += true_coverage(q, test_probs, test_labels) < coverage
        certificate = answering.certify(calibration(oof, labels), target, delta)
        answered = test_probs.max(1) >= certificate.threshold
        over_target += answered.any() and (test_probs.argmax(1) != test_labels)[answered].mean() > target
    assert uncovered <= binom.ppf(0.999, draws, delta) and over_target <= binom.ppf(0.999, draws, delta)
