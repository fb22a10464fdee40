"""The paper's grid as a Ray Tune study: grid expansion, statistics, skipped and failed trials, resume."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import scipy.stats
import yaml

from orestudy.commands import replicate
from orestudy.studies import effects, grid as grids, grid_report, stats, study
from orestudy.config import REPO_ROOT
from conftest import with_ctrl_c

# Three tiny cells: one trains, one needs ImageNet weights that are not here, one reads a folder that
# does not exist (a trial that raises).
TINY_GRID = {
    "paper": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "dropout": 0.5, "reduction": 4, "image_size": 64},
    "seeds": [1],
    "schedules": {"frozen": 2, "unfrozen": 0, "half": 1},
    "tables": {"tiny": {"title": "Tiny table", "cells": [
        {"backbone": "mobilenet_v2", "regime": "scratch", "schedule": "unfrozen"},
        {"backbone": "resnet50", "regime": "tl", "schedule": "frozen"},
        {"backbone": "mobilenet_v2", "regime": "scratch", "schedule": "half", "data": "/nonexistent/minerals"},
    ]}},
}


def tiny_study(folder: Path, tmp: Path, *extra: str, grid: dict = TINY_GRID) -> list[str]:
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return ["--grid", str(path), "--data", str(folder), "--runs", str(tmp / "runs"),
            "--cache", str(tmp / "cache"), "--max-failures", "1", *extra]


def mlflow_runs(output: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("orestudy").experiment_id])


def study_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "TUNE_DISABLE_SIGINT_HANDLER")}
    return {**env, "ORESTUDY_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


# ---------------------------------------------------------------------------------------------------
# The grid

def paper_grid():
    return yaml.safe_load(grids.GRID.read_text()), yaml.safe_load(grids.PUBLISHED.read_text())


def test_paper_grid_has_the_papers_tables_and_the_v1_rows():
    grid, published = paper_grid()
    cells = grids.grid_cells(grid)
    table3 = [c for c in cells if c.table == "table3"]
    table4 = [c for c in cells if c.table == "table4"]
    assert len(table3) == 6 * 3 and len(table4) == 2 * 3 * 3
    assert {c.backbone for c in table4} == {"mobilenet_v2", "mobilenet_v1"}
    assert {c.row for c in table4} == {"tl", "tl_da", "tl_da_se"}
    assert all(c.schedule == ("unfrozen" if c.regime == "scratch" else "frozen") for c in table3)

    shared = {**grid["paper"], "mlflow": False}
    configs = grids.trial_configs(grid, cells, [231], shared)
    assert len(configs) == 36 - 4  # Table IV's frozen TL and TL+DA rows are Table III's: run once
    assert {(c["epochs"], c["lr"], c["batch_size"], c["dropout"], c["reduction"], c["seed"]) for c in configs} \
        == {(20, 1e-4, 32, 0.5, 8, 231)}
    assert len(grids.trial_configs(grid, cells, [231, 1, 2, 3, 4], shared)) == 5 * 32
    every_trial = {json.dumps(c, sort_keys=True) for c in configs}
    for cell in cells:  # every cell finds its trial
        assert sum(json.dumps(c, sort_keys=True) in every_trial and grids.belongs(c, cell, grid)
                   for c in configs) == 1

    def value(source, table, backbone, row, schedule):
        (cell,) = [c for c in cells if (c.table, c.backbone, c.row, c.schedule) == (table, backbone, row, schedule)]
        return grid_report.published_value(published, source, cell)

    assert value("zhou2022", "table3", "alexnet", "tl", "frozen") is None
    assert value("replication", "table3", "alexnet", "tl", "frozen") == 0.812
    assert value("zhou2022", "table4", "mobilenet_v2", "tl_da_se", "frozen10") == 0.9689
    assert value("replication", "table4", "mobilenet_v2", "tl_da_se", "frozen") == 0.9319
    assert value("replication", "table4", "mobilenet_v2", "tl_da_se", "unfrozen") == 0.9005
    assert value("replication", "table4", "mobilenet_v2", "tl_da_se", "frozen10") is None


def test_a_row_without_a_field_another_row_sets_does_not_take_its_trials():
    """experiments/crossfit_grid.yaml: the single model's row sets no `folds`, the cross-fitted row folds 3;
    each row finds its own five trials only, and the effects and answers tables tell them apart."""
    grid = grids.load_grid(REPO_ROOT / "experiments/crossfit_grid.yaml")
    single, crossfit = grids.grid_cells(grid)
    configs = grids.trial_configs(grid, [single, crossfit], [231, 1, 2, 3, 4], {**grid["paper"]})
    assert [sum(grids.belongs(c, cell, grid) for c in configs) for cell in (single, crossfit)] == [5, 5]
    assert all(grids.belongs(c, crossfit, grid) == (c["folds"] == 3) for c in configs)
    assert effects.cell_label(configs[0]) == "mobilenet_v2 tl_da +ECA r8, frozen 4/15, top 3 units trained"
    assert effects.cell_label(configs[1]).endswith("top 3 units trained, cross-fitted over 3 folds")


def test_a_grids_settings_may_take_a_recipe_file_under_its_own_values(tmp_path):
    """paper.recipe names a recipe file beside the grid: its values are the base, the grid's own win, and
    its cell fields are left to the rows and schedules; a recipe that cannot be read names its file."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("backbone: efficientnet_lite0\nfreeze_epochs: 4\nlr: 0.002\nepochs: 9\n")
    grid = {**TINY_GRID, "paper": {"recipe": "recipes/r.yaml", "epochs": 3}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert grids.load_grid(tmp_path / "grid.yaml")["paper"] == {"lr": 0.002, "epochs": 3}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**grid, "paper": {"recipe": "recipes/none.yaml"}}))
    with pytest.raises(ValueError, match="none.yaml: cannot read the recipe"):
        grids.load_grid(tmp_path / "grid.yaml")


def test_filters_and_budget_scale_the_freezing_schedule():
    grid, _ = paper_grid()
    cells = grids.select(grids.grid_cells(grid), only=["table4"], backbones=["mobilenet_v2"])
    configs = grids.trial_configs(grid, cells, [231, 1], {**grid["paper"], "epochs": 2})
    assert len(configs) == 9 * 2
    assert sorted({c["freeze_epochs"] for c in configs}) == [0, 1, 2]  # unfrozen, frozen10 -> 1 of 2, frozen
    assert [c["seed"] for c in configs[:9]] == [231] * 9  # every cell once before any repeat
    # One epoch: frozen for "the first 10 of 20" is frozen throughout, the same trial as "frozen".
    tl = grids.select(cells, rows=["tl"], schedules=["frozen", "frozen10"])
    (one,) = grids.trial_configs(grid, tl, [231], {**grid["paper"], "epochs": 1})
    assert all(grids.belongs(one, cell, grid) for cell in tl)


def test_committed_records_stay_the_paper_grids_trials():
    """The committed records predate split_method and were split by shuffle; the paper grid pins
    shuffle, so its trials still find them (and a hash-split trial does not)."""
    grid, _ = paper_grid()
    cells = grids.select(grids.grid_cells(grid), only=["table4"], backbones=["mobilenet_v2"])
    configs = grids.trial_configs(grid, cells, [231, 1, 2], grid["paper"])
    records = study.read_records(REPO_ROOT / "docs/results/paper_grid_mobilenet_v2/trials.jsonl")
    assert all("split_method" not in r.config for r in records)
    to_run, reused = study.reusable(configs, records, records[0].dataset)
    assert to_run == [] and len(reused) == len(configs) == 27
    hashed = [{**c, "split_method": "hash"} for c in configs]
    assert study.reusable(hashed, records, records[0].dataset)[0] == hashed


def test_records_of_the_same_computation_on_the_same_data_stand_in_for_trials(tmp_path):
    grid, _ = paper_grid()
    cells = grids.select(grids.grid_cells(grid), only=["table4"], backbones=["mobilenet_v2"], rows=["tl"])
    here = {**grid["paper"], "epochs": 20, "data": "/here/minerals", "output": "/here/runs", "threads": 2}
    first, second, third = grids.trial_configs(grid, cells, [231], here)
    elsewhere = {**first, "data": "/elsewhere/minerals", "output": "/elsewhere/runs", "threads": 16,
                 "parent_run": "abc"}
    del elsewhere["aug_bank"]  # a record from before a field existed: the field's default stands in

    def outcome(config, status):
        return study.Trial(config, status, {"status": status, "accuracy": 0.9, "time_total_s": 1},
                           [{"epoch": 1, "val_accuracy": 0.8, "config/lr": 1e-4}])

    records = [outcome(elsewhere, "ok").record("minerals-abc"),
               outcome(second, "failed: out of memory").record("minerals-abc"),
               outcome(third, "ok").record("minerals-changed")]
    assert "data" not in records[0]["config"] and records[0]["history"] == [{"epoch": 1, "val_accuracy": 0.8}]
    path = tmp_path / "trials.jsonl"
    study.write_records(path, records)
    to_run, reused = study.reusable([first, second, third], study.read_records(path), "minerals-abc")
    assert to_run == [second, third]  # a failed trial and one on other data run again
    assert [r.config for r in reused] == [first] and reused[0].metrics["accuracy"] == 0.9 and reused[0].reused
    # A (saved) study's trials, one per config still to run: the one that ran, and one never started
    # (Tune keeps no config for it); its trial of the reused config drops out.
    never = study.Trial(None, study.UNFINISHED)
    rows = study.planned(to_run, [outcome(first, "unfinished"), never, outcome({**second, "output": "/x"}, "ok")])
    assert [r.status for r in rows] == ["ok", study.UNFINISHED] and rows[1].config == third
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"trials.jsonl, line 4"):
        study.read_records(path)


def test_the_beyond_grid_report_has_its_ensemble_row_and_compares_every_row_with_the_reference(tmp_path):
    """Synthetic trials of the beyond grid's cpu table over three seeds: the report adds the ensemble of
    each seed's four rows (from the records), and pairs every row and the ensemble with the paper recipe."""
    import numpy as np

    grid, published = yaml.safe_load((REPO_ROOT / "experiments/beyond_grid.yaml").read_text()), paper_grid()[1]
    cells = grids.select(grids.grid_cells(grid), only=["cpu"])
    assert [c.reference for c in cells] == [True, False, False, False, False]
    configs = grids.trial_configs(grid, cells, [1, 2, 3], grid["paper"])
    labels = np.random.default_rng(0).integers(0, 7, 40)

    def trial(config, skill):
        rng = np.random.default_rng(config["seed"] * 100 + len(str(config)))
        rows = []
        for i, y in enumerate(labels):
            probs = rng.dirichlet(np.ones(7)) * 0.5
            probs[y if rng.random() < skill else (y + 1) % 7] += 0.5
            rows.append(["val" if i % 2 else "test", f"{i:064d}", int(y), probs.round(5).tolist()])
        test = [r for r in rows if r[0] == "test"]
        accuracy = float(np.mean([np.argmax(r[3]) == r[2] for r in test]))
        return study.Trial(config, "ok", {"status": "ok", "accuracy": accuracy, "macro_f1": accuracy, "n_test": 20,
                                          "predictions": rows, "class_names": list("abcdefg"),
                                          "confusion_matrix": np.eye(7, dtype=int).tolist(), "best_epoch": 1,
                                          "wall_seconds": 60},
                           [{"epoch": e, "frozen": 1, "train_loss": 1 / e, "train_accuracy": 0.5, "val_loss": 1 / e,
                             "val_accuracy": 0.5} for e in (1, 2)])

    trials = [trial(c, 0.6 if c["attention"] == "se" else 0.8) for c in configs]
    text, files = grid_report.write_report(grid, published, cells, trials, 20, tmp_path, "beyond", "fake")
    table = pd.read_csv(tmp_path / "cpu.csv")
    assert list(table["model"]) == ["MobileNetV2 (reference)", "MobileNet V1", "MobileNetV2", "EfficientNet-Lite0",
                                    "EfficientNet-Lite2", "Ensemble of the other rows"]
    assert list(table["n"]) == [3] * 6
    effects = pd.read_csv(tmp_path / "effects.csv")
    against = effects[effects["factor"] == "vs reference"]
    assert len(against) == 5 and (against["a"] == against["a"].iloc[0]).all()
    assert against["b"].iloc[-1].startswith("ensemble of mobilenet_v1 + mobilenet_v2")
    records = study.read_records(tmp_path / "trials.jsonl")
    assert len(records) == 18 and sum("members" in r.config for r in records) == 3
    assert len(study.unique_records(records)) == 18
    assert "Ensemble of the other rows" in text


def test_accuracy_summary_t_over_seeds_and_wilson_for_one_run():
    values = [0.90, 0.93, 0.88, 0.95, 0.91]
    s = stats.accuracy_summary(values, [171] * 5)
    half = scipy.stats.t.ppf(0.975, 4) * s["std"] / 5 ** 0.5
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.914) and s["ci_method"] == "t over seeds"
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.914 - half, 0.914 + half))
    one = stats.accuracy_summary([180 / 193], [193])
    assert one["n"] == 1 and one["ci_method"] == "Wilson, 193 test images"
    assert one["ci_low"] < 180 / 193 < one["ci_high"]
    assert 0.03 < (one["ci_high"] - one["ci_low"]) / 2 < 0.04  # the "±3 pp" for one split
    assert stats.wilson_interval(50, 50)[1] == pytest.approx(1.0)


def test_bad_options_are_named(image_folder, capsys):
    for argv, message in ((["--backbones", "resnet51"], "unknown ['resnet51']"),
                          (["--set", "seed=3"], "'seed' is not a TrainConfig field the study leaves free"),
                          (["--set", "image_size=big"], "invalid field_value value"),
                          (["--data", "/nonexistent"], "data folder not found"),
                          (["--resume", "--name", "never-ran"], "no study to resume")):
        with pytest.raises(SystemExit):
            replicate.main(["--data", str(image_folder), *argv])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# A study: trained, skipped and failing cells side by side

@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    from conftest import png_folder

    tmp = tmp_path_factory.mktemp("study")
    folder = png_folder(tmp / "minerals")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORESTUDY_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp / "empty_torch_home"))  # no cached ImageNet weights for resnet50
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = replicate.main(tiny_study(folder, tmp, "--name", "tiny"))
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exported it
    return code, tmp


@pytest.mark.slow
def test_study_reports_ok_skipped_and_failed_cells(tiny_results):
    code, tmp = tiny_results
    assert code == 0
    rows = {(r["backbone"], r["schedule"]): r for r in
            pd.read_csv(tmp / "runs" / "tiny" / "report" / "tiny.csv").to_dict("records")}
    ok = rows[("mobilenet_v2", "unfrozen")]
    (manifest,) = (tmp / "runs" / "tiny" / "splits").glob("*.csv")  # the split the study saved (a hash split's size varies)
    n_test = int((pd.read_csv(manifest)["split"] == "test").sum())
    assert ok["status"] == "ok" and ok["n"] == 1 and ok["ci_method"] == f"Wilson, {n_test} test images"
    assert ok["ci_low"] <= ok["mean"] <= ok["ci_high"]
    skipped = rows[("resnet50", "frozen")]
    assert skipped["status"] == study.SKIPPED_OFFLINE and skipped["n"] == 0 and pd.isna(skipped["mean"])
    failed = rows[("mobilenet_v2", "half")]
    assert failed["status"].startswith("failed: ") and "data folder not found" in failed["status"]
    report = (tmp / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "| MobileNetV2 | Scratch | trained |" in report and "skipped: weights unavailable offline" in report
    assert (tmp / "runs" / "tiny" / "report" / "learning_curves_mobilenet_v2.png").exists()
    # The portable record keeps every validation and test image's outcome, for paired comparisons later.
    (record,) = [r for r in study.read_records(tmp / "runs" / "tiny" / "report" / "trials.jsonl") if r.status == "ok"]
    test = [row for row in record.metrics["predictions"] if row[0] == "test"]
    assert len(test) == record.metrics["n_test"]
    correct = sum(label == max(range(len(probs)), key=probs.__getitem__) for _, _, label, probs in test)
    assert correct / len(test) == pytest.approx(record.metrics["accuracy"])


@pytest.mark.slow
def test_trials_report_epochs_and_checkpoints_through_tune(tiny_results):
    _, tmp = tiny_results
    trial_dirs = {d.name.rsplit("_", 2)[0]: d for d in (tmp / "runs" / "ray_results" / "tiny").iterdir() if d.is_dir()}
    for seed in TINY_GRID["seeds"]:
        trained = trial_dirs[f"mobilenet_v2_scratch_f0_e2_s{seed}"]
        results = [json.loads(line) for line in (trained / "result.json").read_text().splitlines()]
        assert [r.get("epoch") for r in results] == [1, 2, None] and results[-1]["status"] == "ok"
        (final,) = trained.glob("checkpoint_*")  # num_to_keep=1: the finished run's folder
        assert {"best.pt", "metrics.json", "history.csv"} <= {p.name for p in final.iterdir()}
        assert [r["epoch"] for r in json.loads((final / study.EPOCHS_FILE).read_text())] == [1, 2]
        # A skip is one report and no error: it used none of the retries.
        skipped = trial_dirs[f"resnet50_tl_f2_e2_s{seed}"]
        (only,) = [json.loads(line) for line in (skipped / "result.json").read_text().splitlines()]
        assert only["status"] == study.SKIPPED_OFFLINE and "resnet50" in only["reason"]
        assert not (skipped / "error.txt").exists()
        # A trial that raises is tried 1 + max_failures times, then reported failed.
        failing = trial_dirs[f"mobilenet_v2_scratch_f1_e2_s{seed}"]
        assert (failing / "error.txt").read_text().count("Failure #") == 2


@pytest.mark.slow
def test_a_trials_epochs_are_its_checkpoints_not_tunes_copy_of_its_reports(tiny_results, tmp_path):
    """Tune hands a retried trial the storage's copy of its reports (result.json), which can lack the last
    ones before a node was lost: the study's records take a trial's epochs from its checkpoint."""
    import shutil
    from ray import tune

    _, tmp = tiny_results
    copy = shutil.copytree(tmp / "runs" / "ray_results" / "tiny", tmp_path / "tiny")
    for results in copy.glob("mobilenet_v2_scratch_f0_e2_s*/result.json"):  # epoch 2's report lost
        lines = results.read_text().splitlines(keepends=True)
        results.write_text(lines[0] + lines[-1])
    trials = study.outcomes(tune.Tuner.restore(str(copy), study.train_trial).get_results())
    ok = [t for t in trials if t.status == "ok"]
    assert len(ok) == len(TINY_GRID["seeds"]) and all([r["epoch"] for r in t.history] == [1, 2] for t in ok)


@pytest.mark.slow
def test_study_is_a_parent_mlflow_run_with_a_child_per_trained_trial(tiny_results):
    _, tmp = tiny_results
    runs = mlflow_runs(tmp / "runs")
    (parent,) = [r for r in runs if r.info.run_name == "tiny"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [r.info.run_name for r in children if r.info.status == "FINISHED"] == ["mobilenet_v2_scratch_f0_e2_s1"]
    assert all("test/accuracy" in r.data.metrics for r in children if r.info.status == "FINISHED")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/ok"] == 1
    # The study's run names its best configuration, its score and the report, as its description.
    (child,) = [r for r in children if r.info.status == "FINISHED"]
    assert parent.data.metrics["best/test_accuracy"] == child.data.metrics["test/accuracy"]
    assert parent.data.tags["orestudy.best"].startswith("mobilenet_v2 scratch")
    assert parent.data.tags["mlflow.note.content"][:500] == (tmp / "runs" / "tiny" / "report" / "report.md").read_text()[:500]
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}").list_artifacts(
        parent.info.run_id)}
    assert {"report.md", "tiny.csv", "learning_curves_mobilenet_v2.png"} <= artifacts


@pytest.mark.slow
def test_a_finished_study_is_not_started_again(tiny_results, capsys):
    _, tmp = tiny_results
    with pytest.raises(SystemExit):
        replicate.main(tiny_study(tmp / "minerals", tmp, "--name", "tiny"))
    assert "a study already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_a_later_study_reuses_finished_trials_and_a_report_needs_no_rerun(tiny_results, monkeypatch):
    _, tmp = tiny_results
    report = tmp / "runs" / "tiny" / "report"
    records = study.read_records(report / "trials.jsonl")
    assert sorted(r.status.split(":")[0] for r in records) == ["failed", "ok", "skipped"]
    (ok,) = [r for r in records if r.status == "ok"]
    assert ok.dataset.startswith("minerals-") and [h["epoch"] for h in ok.history] == [1, 2]
    assert ok.metrics["precision"] in ("torch.bfloat16", "fp32") and "data" not in ok.config

    monkeypatch.setenv("ORESTUDY_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The trained cell again, under another name: nothing to run, the same numbers.
    code = replicate.main(tiny_study(tmp / "minerals", tmp, "--name", "tiny-again", "--schedules", "unfrozen",
                                     "--reuse", str(report / "trials.jsonl")))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert code == 0 and not (tmp / "runs" / "ray_results" / "tiny-again").exists()
    (again,) = pd.read_csv(tmp / "runs" / "tiny-again" / "report" / "tiny.csv").to_dict("records")
    before = pd.read_csv(report / "tiny.csv").set_index("schedule").loc["unfrozen"]
    assert again["status"] == "ok" and again["mean"] == before["mean"]
    text = (tmp / "runs" / "tiny-again" / "report" / "report.md").read_text()
    assert "1 of them ran in earlier studies" in text and re.search(r"took \d+\.\d\d h of training in all", text)

    (report / "tiny.csv").unlink()
    assert replicate.main(tiny_study(tmp / "minerals", tmp, "--name", "tiny", "--report-only")) == 0
    assert pd.read_csv(report / "tiny.csv").set_index("schedule").loc["unfrozen"]["mean"] == before["mean"]

    # Records alone, under a name no study has (a study run in parts): what they hold, the rest not run yet.
    assert replicate.main(tiny_study(tmp / "minerals", tmp, "--name", "tiny-parts", "--report-only",
                                     "--reuse", str(report / "trials.jsonl"))) == 0
    parts = pd.read_csv(tmp / "runs" / "tiny-parts" / "report" / "tiny.csv").set_index("schedule")
    assert parts.loc["unfrozen"]["mean"] == before["mean"] and parts.loc["half"]["status"] == study.UNFINISHED


# ---------------------------------------------------------------------------------------------------
# Interrupt a study after its first trial and during its second, then resume it

def finished_trials(output: str) -> list[str]:
    return re.findall(r"\[study\] trial (\S+) finished: ok", output)


def reported_epochs(trial_folders: Path, name: str) -> list[int]:
    """The epochs Tune has taken in from a trial (its result.json rows), in order."""
    return [int(e) for f in trial_folders.glob(f"{name}_*/result.json")
            for e in re.findall(r'"epoch": (\d+)', f.read_text())]


@pytest.mark.slow
def test_interrupted_study_resumes_without_rerunning_finished_trials_or_epochs(image_folder, tmp_path):
    """Ctrl-C once one trial has finished and the next has reported an epoch: --resume keeps the
    finished trial and continues the other after its last reported epoch, in the same MLflow run."""
    grid = {**TINY_GRID, "paper": {**TINY_GRID["paper"], "epochs": 4},
            "tables": {"tiny": {"title": "Tiny", "cells": TINY_GRID["tables"]["tiny"]["cells"][:1]}}}
    names = [f"mobilenet_v2_scratch_f0_e4_s{s}" for s in (1, 2)]
    trial_folders = tmp_path / "runs" / "ray_results" / "resumable"
    command = [sys.executable, "-m", "orestudy.replicate", "--seeds", "1,2", "--name", "resumable",
               *tiny_study(image_folder, tmp_path, grid=grid)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=study_env(),
                             cwd=REPO_ROOT, start_new_session=True, preexec_fn=with_ctrl_c)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(first.stdout.readline, "")), daemon=True)
    reader.start()

    def second_trial_started() -> bool:
        done = finished_trials("".join(lines))
        return len(done) == 1 and any(reported_epochs(trial_folders, n) for n in names if n not in done)

    try:
        deadline = time.time() + 300
        while not second_trial_started():
            assert first.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)  # Ctrl-C
        first.wait(timeout=180)
        reader.join(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = "".join(lines)
    (done,) = finished_trials(before)
    (stopped,) = [n for n in names if n != done]
    last = max(reported_epochs(trial_folders, stopped))
    assert first.returncode == 1 and "--resume" in before and 1 <= last < 4, before[-3000:]
    # Ctrl-C leaves no MLflow run RUNNING: the study's and the stopped trial's are KILLED.
    assert {r.info.run_name: r.info.status for r in mlflow_runs(tmp_path / "runs")} == \
        {"resumable": "KILLED", done: "FINISHED", stopped: "KILLED"}

    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=study_env(), cwd=REPO_ROOT,
                            timeout=300)
    after = second.stdout + second.stderr
    assert second.returncode == 0, after[-3000:]
    assert finished_trials(after) == [stopped] and f"[{done}] epoch" not in after
    assert f"[{stopped}] resuming after epoch {last}/4" in after
    assert [int(e) for e in re.findall(rf"\[{stopped}\] epoch (\d)/4", after)] == list(range(last + 1, 5))
    assert "n=2; 95% CI" in (tmp_path / "runs" / "resumable" / "report" / "report.md").read_text()
    records = study.read_records(tmp_path / "runs" / "resumable" / "report" / "trials.jsonl")
    assert all([h["epoch"] for h in r.history] == [1, 2, 3, 4] for r in records) and len(records) == 2

    runs = mlflow_runs(tmp_path / "runs")
    (parent,) = [r for r in runs if r.info.run_name == "resumable"]  # the resumed study kept its run
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == names  # one run each, the stopped one continued
    assert all(r.info.status == "FINISHED" for r in children)
    # Started from the repository, the artifacts are beside the store all the same.
    assert all(r.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri()) for r in runs)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/accuracy")] == [1, 2, 3, 4]


def test_a_trial_whose_run_finished_before_the_study_was_cut_is_reported_not_run_again(tmp_path, monkeypatch, capsys):
    """Its driver killed between a trial's last report and Tune taking in its end, a resumed study hands the
    trial its last checkpoint: the finished run folder (holding the final report), or an epoch's training
    state of a run whose folder has the final report since. Either is reported again; a run that has not
    finished is not."""
    reports = []
    monkeypatch.setattr(study.tune, "report", lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)))
    config = study.TrainConfig(seed=5)
    final = {"status": "ok", "accuracy": 0.75, "run_dir": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    assert not study.reported_again(config, None, None)
    assert not study.reported_again(config, {"run_dir": str(tmp_path / "run"), "epoch": 3}, None)  # unfinished
    assert study.reported_again(config, None, final)  # the checkpoint is the run folder already
    (tmp_path / "run" / study.FINAL_REPORT).write_text(json.dumps(final))
    assert study.reported_again(config, {"run_dir": str(tmp_path / "run"), "epoch": 3}, None)
    assert [(metrics, checkpoint and checkpoint.path) for metrics, checkpoint in reports] == [
        ({**final, "reported_again": True}, None), ({**final, "reported_again": True}, str(tmp_path / "run"))]
    assert capsys.readouterr().err.count(f"[{config.run_name()}] finished before the study was cut") == 2
