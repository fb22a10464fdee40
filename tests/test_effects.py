"""The effects table: paired differences recovered from synthetic trial records, tests checked by hand."""
import numpy as np
import pytest
import scipy.stats

from orestudy.commands import compare
from orestudy.config import REPO_ROOT as REPO
from orestudy.studies import effects, stats, study


def record(seed: int, accuracy: float, attention: str = "none", per_image: bool = True, n: int = 1000) -> study.Trial:
    """A finished trial's record with n test images, round(accuracy * n) of them right."""
    right = round(accuracy * n)
    predictions = [["test", f"{seed}-{i:04d}", 0, [0.9, 0.1] if i < right else [0.2, 0.8]] for i in range(n)]
    metrics = {"accuracy": right / n, "macro_f1": right / n, "n_test": n}
    if per_image:
        metrics["predictions"] = predictions
    return study.Trial({"backbone": "mobilenet_v2", "regime": "tl_da", "attention": attention, "seed": seed}, "ok",
                       metrics, dataset="minerals-abc")


def planted(effect: float, seeds=range(8), noise: float = 0.03, per_image: bool = True) -> list[study.Trial]:
    rng = np.random.default_rng(0)
    base = 0.85 + rng.normal(0, noise, len(seeds))  # split-to-split spread, shared by both arms
    jitter = rng.normal(0, 0.005, len(seeds))
    jitter -= jitter.mean()  # the planted effect is exactly the mean paired difference (up to rounding)
    return ([record(s, b, "none", per_image) for s, b in zip(seeds, base)]
            + [record(s, b + effect + j, "se", per_image) for s, b, j in zip(seeds, base, jitter)])


def test_a_planted_paired_difference_is_recovered_and_called():
    (row,) = effects.effects(planted(0.03))
    assert row["factor"] == "attention" and row["n"] == 8 and "+SE" in row["b"]
    assert row["ci_low"] < 0.03 < row["ci_high"] and row["ci_low"] > 0
    assert row["verdict"] == "better" and row["p_holm"] < 0.05
    # the split spread (3 points) would hide it in unpaired cell intervals; pairing removes it
    assert row["ci_high"] - row["ci_low"] < 0.02


def test_a_curated_run_pairs_with_its_published_data_partner_on_the_published_test_split():
    published = [t for t in planted(0.0) if t.config["attention"] == "none"]
    curated = []
    for t in published:  # the same photos and labels: planted +2 points; its own curated split better still
        full = t.metrics["accuracy"] + 0.02
        curated.append(study.Trial(t.config, "ok", {"accuracy": full + 0.01, "macro_f1": full + 0.01,
                                                    "test_full_accuracy": full, "test_full_macro_f1": full},
                                   dataset="minerals-abc-curated-0123456789"))
    assert {r["factor"] for r in effects.effects(published + curated + planted(0.03))} == {"curation", "attention"}
    (row,) = effects.effects(published + curated + planted(0.03), factors=["curation"])
    assert row["factor"] == "curation" and row["n"] == 8 and row["b"].endswith(", curated data")
    assert row["mean"] == pytest.approx(0.02) and row["mcnemar_seeds"] == 0  # per seed only
    assert "tested on the published test split" in effects.markdown([row])  # what a curation row means
    assert "curation" not in effects.markdown(effects.effects(planted(0.03)))  # said only where one is shown


def test_no_effect_gives_no_verdict_of_difference():
    (row,) = effects.effects(planted(0.0))
    # the jitter (0.5 points) is far inside ±1.5: no difference, and the equivalence test decides that
    assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "equivalent within ±1.5"


def test_paired_interval_and_p_match_scipy_on_a_hand_case():
    a = {1: 0.80, 2: 0.85, 3: 0.90, 4: 0.82}
    b = {1: 0.83, 2: 0.86, 3: 0.94, 4: 0.82}
    e = stats.paired_effect(stats.Paired(a, b))
    reference = scipy.stats.ttest_rel([b[s] for s in a], [a[s] for s in a])
    ci = reference.confidence_interval()
    assert e["mean"] == pytest.approx(0.02) and e["p_t"] == pytest.approx(reference.pvalue)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert e["p_sign_flip"] == pytest.approx(0.25)  # 3 non-zero differences, all positive: 2 of 8 flips


def test_mcnemar_on_a_hand_made_discordant_table():
    # 10 discordant images: A alone right on 1, B alone right on 9 -> two-sided exact p = 22/1024
    assert stats.mcnemar(b_only=9, a_only=1) == pytest.approx(22 / 1024)
    assert stats.mcnemar(0, 0) == 1.0
    a = {1: {"x": True, "y": False, "z": True}}
    b = {1: {"x": True, "y": True, "z": True}}
    e = stats.paired_effect(stats.Paired({1: 2 / 3}, {1: 1.0}, a_images=a, b_images=b))
    assert (e["a_only"], e["b_only"], e["mcnemar_seeds"]) == (0, 1, 1)


def test_records_without_per_image_outcomes_still_compare(tmp_path):
    rows = effects.effects(planted(0.03, per_image=False))
    assert rows[0]["mcnemar_seeds"] == 0 and rows[0]["verdict"] == "better"
    assert "no per-image records" in effects.markdown(rows)
    path = tmp_path / "trials.jsonl"
    trials = planted(0.03, per_image=False) + planted(0.03)  # duplicates: per-image wins
    study.write_records(path, [t.record(t.dataset) for t in trials])
    (row,) = compare.main([str(path), "--output", str(tmp_path / "out")])
    assert row["mcnemar_seeds"] == 8
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"effects.md", "effects.csv", "effects.png"}


def test_a_named_contrast_pairs_two_configurations_that_differ_in_several_factors(tmp_path, capsys):
    trials = planted(0.03)
    for t in trials[8:]:  # the second arm differs in two factors: not a one-factor contrast
        t.config = {**t.config, "lr": 1e-3}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    study.write_records(a, [t.record(t.dataset) for t in trials[:8]])
    study.write_records(b, [t.record(t.dataset) for t in trials[8:]])
    assert compare.main([str(a), str(b), "--output", str(tmp_path / "none")]) == []
    (row,) = compare.main(["--contrast", str(a), str(b), "--output", str(tmp_path / "out")])
    assert row["factor"] == "contrast" and row["n"] == 8 and row["verdict"] == "better"
    assert row["mean"] == pytest.approx(0.03, abs=0.002) and row["mcnemar_seeds"] == 8
    both = tmp_path / "both.jsonl"
    study.write_records(both, [t.record(t.dataset) for t in trials])
    with pytest.raises(SystemExit):
        compare.main([str(a), "--contrast", str(a), str(both)])
    assert "both.jsonl: --contrast takes records of one configuration" in capsys.readouterr().err
    # One configuration's seeds from two studies, joined by a comma, are one arm.
    early, late = tmp_path / "early.jsonl", tmp_path / "late.jsonl"
    study.write_records(early, [t.record(t.dataset) for t in trials[:4]])
    study.write_records(late, [t.record(t.dataset) for t in trials[4:8]])
    (joined,) = compare.main(["--contrast", f"{early},{late}", str(b), "--output", str(tmp_path / "joined")])
    assert {k: joined[k] for k in ("n", "mean", "verdict")} == {k: row[k] for k in ("n", "mean", "verdict")}


def test_holm_and_seeds_needed():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    d = np.array([0.01, 0.03, -0.02, 0.04])
    n = stats.seeds_needed(d)
    t = scipy.stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
    assert t <= stats.TARGET_HALF_WIDTH < scipy.stats.t.ppf(0.975, n - 2) * d.std(ddof=1) / np.sqrt(n - 1)


def test_equivalence_is_two_one_sided_t_tests_and_decides_a_fourth_verdict():
    """TOST at ±m: the larger one-sided p, by hand from Student's t; a tight zero effect is 'equivalent',
    a wide one decides nothing, a large one is still 'better'."""
    import scipy.stats

    d = np.array([0.004, -0.003, 0.001, -0.002, 0.0, 0.003, -0.001, 0.002, -0.004, 0.001])
    se = d.std(ddof=1) / np.sqrt(len(d))
    by_hand = max(scipy.stats.t.sf((d.mean() + 0.015) / se, len(d) - 1), scipy.stats.t.cdf((d.mean() - 0.015) / se, len(d) - 1))
    assert stats.tost_p(d, 0.015) == pytest.approx(by_hand, rel=1e-9)

    def decided(differences):
        a = {s: 0.9 for s in range(len(differences))}
        effect = stats.paired_effect(stats.Paired(a, {s: 0.9 + x for s, x in enumerate(differences)}, {}, {}, {}, {}))
        return stats.verdict(effect, stats.holm([effect["p_t"]])[0], p_tost_adjusted=effect["p_tost"])
    assert decided(d) == "equivalent within ±1.5"
    assert decided(np.array([0.05, -0.04, 0.03, -0.05, 0.02])) == "no difference shown"
    assert decided(np.array([0.05, 0.04, 0.06, 0.05, 0.045])) == "better"


def test_the_se_block_on_a_frozen_mobilenet_v2_is_decided_equivalent_among_the_se_contrasts():
    """The paper's SE claim as its own family (the attention contrasts of the committed MobileNet records):
    −0.0 points over 10 seeds is decided equivalent within ±1.5; in the whole 22-contrast table Holm's
    adjustment leaves it undecided."""
    records = study.unique_records(study.read_records(*(
        REPO / "docs" / "results" / name / "trials.jsonl"
        for name in ("paper_grid_mobilenet_v2", "paper_grid_mobilenet_v1_frozen", "mobilenet_seeds"))))

    def se_frozen(rows):
        (row,) = [r for r in rows if (r["a"], r["b"]) == ("mobilenet_v2 tl_da, frozen", "mobilenet_v2 tl_da +SE r8, frozen")]
        return row
    row = se_frozen(effects.effects(records, factors=["attention"]))
    assert row["n"] == 10 and row["verdict"] == "equivalent within ±1.5" and row["p_tost_holm"] < 0.05
    assert se_frozen(effects.effects(records))["verdict"] == "no difference shown"


def test_a_t_interval_without_spread_is_the_value_and_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "precision loss" RuntimeWarning on identical values
        assert stats.t_interval(np.array([1 / 3, 1 / 3])) == (1 / 3, 1 / 3)


def test_a_record_rewritten_by_a_json_tool_is_the_same_configuration():
    """jq writes 0.0 as 0: the cell (and the computation) stays the same, as TrainConfig types it."""
    config = {"backbone": "mobilenet_v2", "aug_strength": 0.0, "lr": 1e-4, "seed": 1}
    rewritten = {**config, "aug_strength": 0, "seed": 2}
    assert effects.cell_key(rewritten) == effects.cell_key(config)
    assert study.computation_key({**rewritten, "seed": 1}) == study.computation_key(config)
