import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import ray

from orestudy import environment, tracking
from orestudy.commands import search
from orestudy.studies import search_report, search_space, search_study, study
from orestudy.config import REPO_ROOT

TINY_SPACE = """
description: tiny search on generated images
params:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  dropout: {type: float, low: 0.0, high: 0.5}
  attention: {type: categorical, choices: [none, se, cbam, eca]}
  reduction: {type: categorical, choices: [2, 4]}
fixed: {regime: scratch, image_size: 64, batch_size: 8, freeze_epochs: 1}
budget: {epochs: 2, grace_epochs: 1, reduction_factor: 2, trials: 1}
baseline: {attention: se, reduction: 4, lr: 1.0e-3, epochs: 2}
"""


@pytest.mark.parametrize("name", ["se_ablation", "se_ablation_cpu"])
def test_shipped_spaces_load(name):
    space = search_space.load_space(name)
    assert {"attention", "reduction", "freeze_epochs", "aug_strength", "lr", "dropout"} <= set(space.params)
    assert space.baseline_config()["attention"] == "se" and space.trials >= 30
    # reports name a shipped space from the repository's root, the same on every machine
    assert environment.from_repo(space.path) == f"search_spaces/{name}.yaml"


@pytest.mark.parametrize("text, where", [
    ("params: {lr: {type: loguniform, low: 1e-5, high: 1.0e-3}}\nbudget: {epochs: 3}", "params.lr: .*1.0e-4"),
    ("params: {attention: {type: categorical, choices: [se, sqex]}}\nbudget: {epochs: 3}", "params.attention: .*sqex"),
    ("params: {seed: {type: int, low: 1, high: 3}}\nbudget: {epochs: 3}", "params.seed: cannot be searched"),
    ("params: {dropout: {type: uniform, low: 0, high: 1}}\nbudget: {epochs: 3}", "params.dropout.type"),
    ("params: {dropout: {type: float, low: 0, high: 0.5}}\nfixed: {data: /x}\nbudget: {epochs: 3}", "fixed.data"),
    ("params: {dropout: {type: float, low: 0, high: 0.5}}\nbudget: {epochs: 3, grace_epochs: 4}", "budget.grace_epochs"),
    ("params: {dropout: {type: float, low: 0, high: 0.5}}", "budget: missing"),
])
def test_space_errors_name_file_and_key(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(search_space.SearchSpaceError, match=f"bad.yaml: {where}"):
        search_space.load_space(str(path))


def test_the_cpu_spaces_baseline_is_the_replications_paper_recipe():
    """So search --reuse takes the committed TL+DA+SE frozen-10 records for the baseline's seeds."""
    space = search_space.load_space("se_ablation_cpu")
    records = study.read_records(REPO_ROOT / "docs/results/uncurated_default/trials.jsonl")
    baseline = [{**space.baseline_config(), "seed": r.config["seed"], "name": "baseline"} for r in records]
    to_run, reused = study.reusable(baseline, records, records[0].dataset)
    assert to_run == [] and [r.metrics["accuracy"] for r in reused] == [r.metrics["accuracy"] for r in records]


@pytest.fixture
def ray_local():
    study.connect()
    yield
    ray.shutdown()


def finished_params(found):
    return [tuple(sorted(t.params.items())) for t in search_report.finished(found)]


@pytest.mark.slow
def test_tiny_search_resumes_and_retrains(image_folder, tmp_path, monkeypatch, ray_local, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(TINY_SPACE)
    out = tmp_path / "runs"
    common = [str(space_file), "--runs", str(out), "--data", str(image_folder), "--cache", str(tmp_path / "cache"),
              "--experiment", "tiny-search"]

    search.main(common + ["--seeds"])  # 1 trial (the space's budget), no retraining
    storage = f"sqlite:///{out / 'tiny' / 'optuna.db'}"
    found = optuna.load_study(study_name="tiny", storage=storage)
    assert len(search_report.finished(found)) == 1
    with pytest.raises(SystemExit):  # a search that exists is only continued on purpose
        search.main(common + ["--seeds"])
    assert "--resume continues it" in capsys.readouterr().err

    # A session that runs out of time leaves its trial running in the study (as a killed one would):
    # resuming runs that configuration again first, then new ones up to the target; no finished
    # configuration is run twice (a sampler seeded as in the first session would propose that
    # session's first configuration again).
    search.main(common + ["--resume", "--trials", "3", "--time-budget", "3s", "--seeds"])
    found = optuna.load_study(study_name="tiny", storage=storage)
    (interrupted,) = [t for t in found.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(search_report.finished(found)) == 1
    summary = search.main(common + ["--resume", "--trials", "3", "--seeds", "1", "2", "--baseline-seeds", "2"])
    found = optuna.load_study(study_name="tiny", storage=storage)
    assert len(search_report.finished(found)) == 3
    assert len(set(finished_params(found))) == 3
    retry = [t for t in found.trials if t.user_attrs.get("retry_of") == interrupted.number]
    assert len(retry) == 1 and retry[0].params == interrupted.params and retry[0].state in search_report.FINISHED
    sessions = summary["sessions"]  # one entry a session, the time-limited one included
    assert [s["trials_finished"] for s in sessions] == [1, 0, 2] and all(s["search_seconds"] > 0 for s in sessions)
    assert summary["search_seconds"] == pytest.approx(sum(s["search_seconds"] for s in sessions))

    # Search trials are validated, never tested; only the retraining runs see the test split.
    for t in search_report.finished(found):
        run_dir = out / "tiny" / search_report.trial_name("tiny", t.number)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "accuracy" not in metrics and "confusion_matrix" not in metrics
        assert not (run_dir / "confusion_matrix.png").exists()
    best = summary["best"]
    assert best["val_accuracy"] == max(t.value for t in found.trials if t.state == optuna.trial.TrialState.COMPLETE)
    seeds = {label.split()[0]: sorted(s["per_seed"]) for label, s in summary["retrained"].items()}
    assert seeds == {"best": [1, 2], "baseline": [2]}  # the costlier baseline on fewer seeds
    assert all(0 <= a <= 1 for s in summary["retrained"].values() for a in s["per_seed"].values())
    report = (out / "tiny" / "report.md").read_text()
    assert "Best configuration" in report and "mean ± std" in report and "No search trial evaluated the test" in report
    assert "On the seeds both ran (2)" in report
    for figure in ("parallel_coordinate.png", "slice.png", "retrained.png"):
        assert (out / "tiny" / figure).stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tiny-search")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tiny"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = [r for r in children if r.info.run_name.startswith("tiny-")]
    retrain_runs = [r for r in children if r.info.run_name.endswith(("-s1", "-s2"))]
    assert len(retrain_runs) == 3  # best on seeds 1, 2; the baseline on 2
    status = {r.info.run_name: r.info.status for r in trial_runs}
    assert all(status[search_report.trial_name("tiny", t.number)] in ("FINISHED", "KILLED") for t in search_report.finished(found))
    assert "RUNNING" not in status.values()  # a trial Tune stopped (ASHA, time budget) ends its run as KILLED
    assert not any(k.startswith("test/") for r in trial_runs for k in r.data.metrics)
    assert all("test/accuracy" in r.data.metrics for r in retrain_runs)
    assert parent.data.tags["orestudy.best"] == best["trial"] and parent.data.metrics["best/val_accuracy"] == best["val_accuracy"]
    assert parent.data.tags["mlflow.note.content"][:500] == (out / "tiny" / "report.md").read_text()[:500]
    assert parent.data.metrics["best/test_accuracy_mean"] == pytest.approx(summary["retrained"][
        next(label for label in summary["retrained"] if label.startswith("best"))]["mean"])
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # A later search (the K = 3 one beside a K = 1 one, say) takes the baseline's seed from these records
    # instead of training it again; its own pick is retrained.
    again = search.main(common + ["--name", "tiny_again", "--seeds", "2", "--reuse", str(out / "tiny" / "trials.jsonl")])
    assert again["retrained"]["baseline (paper recipe)"]["per_seed"] == summary["retrained"]["baseline (paper recipe)"]["per_seed"]
    assert not (out / "tiny_again" / "baseline-s2").exists()
    assert (out / "tiny_again" / "baseline.jsonl").read_text() == (out / "tiny" / "baseline.jsonl").read_text()
    assert any(p.name.startswith("best") and p.name.endswith("-s2") for p in (out / "tiny_again").iterdir())
    assert {label.split()[0]: s["reused"] for label, s in again["retrained"].items()} == {"best": 0, "baseline": 1}
    assert "(1 of its seeds read from earlier records, not run again)" in (out / "tiny_again" / "report.md").read_text()


@pytest.mark.slow
def test_a_cross_validated_search_reports_the_fold_mean_and_spread(image_folder, tmp_path, monkeypatch, ray_local):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space_file = tmp_path / "cv.yaml"
    space_file.write_text(TINY_SPACE.replace("trials: 1}", "trials: 1, folds: 2}"))
    assert search_space.load_space(str(space_file)).folds == 2
    out = tmp_path / "runs"
    summary = search.main([str(space_file), "--runs", str(out), "--data", str(image_folder), "--cache",
                           str(tmp_path / "cache"), "--no-mlflow", "--seeds"])
    best = summary["best"]
    assert len(best["fold_best_val_accuracy"]) == 2
    assert best["val_accuracy"] == pytest.approx(sum(best["fold_best_val_accuracy"]) / 2)
    for fold in (0, 1):  # each fold its own run, validated only
        metrics = json.loads((out / "cv" / f"{best['trial']}-fold{fold}" / "metrics.json").read_text())
        assert "accuracy" not in metrics
    assert "fold range" in (out / "cv" / "report.md").read_text()
    with pytest.raises(SystemExit):  # the same search cannot continue with another objective
        search.main([str(space_file), "--runs", str(out), "--data", str(image_folder), "--resume", "--folds", "3",
                     "--no-mlflow", "--seeds"])


def test_backbone_without_weights_is_refused_before_searching(tmp_path, monkeypatch):
    from orestudy import models

    monkeypatch.setenv("ORESTUDY_OFFLINE", "1")  # no download attempt
    try:
        models.create_model("vgg16", 2, "imagenet")
        pytest.skip("vgg16's ImageNet weights are installed here")
    except models.WeightsUnavailable:
        pass
    path = tmp_path / "vgg.yaml"
    path.write_text("params: {backbone: {type: categorical, choices: [mobilenet_v2, vgg16]}}\n"
                    "fixed: {regime: tl}\nbudget: {epochs: 2}")
    with pytest.raises(search_space.SearchSpaceError, match="vgg.yaml: params: backbone vgg16: ImageNet weights"):
        search_space.check_weights(search_space.load_space(str(path)))


def test_trials_stopped_early_are_pruned_not_complete(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(storage=storage, study_name="s", direction="maximize")
    space = search_space.load_space("se_ablation_cpu")
    searcher = search_study.TPESearch(space.params, metric=search_study.METRIC, mode="max", study_name="s", storage=storage,
                                search="s", epochs=3)
    configs = [searcher.suggest(trial_id) for trial_id in ("a", "b")]
    assert [c["config"]["name"] for c in configs] == ["s-000", "s-001"]
    assert set(configs[0]["config"]) == set(space.params) | {"name"}
    last = {"best_epoch": 1, "best_val_loss": 0.4}
    searcher.on_trial_complete("a", {**last, search_study.METRIC: 0.8, "epoch": 1})  # ASHA stopped it at epoch 1
    searcher.on_trial_complete("b", {**last, search_study.METRIC: 0.7, "epoch": 3})
    a, b = optuna.load_study(study_name="s", storage=storage).trials
    assert (a.state, a.value, a.user_attrs["epochs_run"]) == (optuna.trial.TrialState.PRUNED, 0.8, 1)
    assert (b.state, b.value, b.user_attrs["epochs_run"]) == (optuna.trial.TrialState.COMPLETE, 0.7, 3)
    assert search_report.best_trial(optuna.load_study(study_name="s", storage=storage)).number == b.number


def test_a_killed_session_keeps_the_time_of_the_trials_it_finished(tmp_path):
    # Each trial's end rewrites the session's entry, so a search killed mid-trial (no end of session) is
    # still counted in the report's wall time, up to its last finished trial.
    found = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", direction="maximize")
    started = datetime.now(timezone.utc) - timedelta(minutes=10)
    log = search_study.SearchLog(lambda: search_study.note_session(found, started, 0))
    ended = SimpleNamespace(last_result={}, config={"config": {"mlflow": False}})
    for value in (0.5, 0.6):
        found.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
        log.on_trial_complete(0, [], ended)
    (session,) = found.user_attrs["sessions"]
    assert session["trials_finished"] == 2 and session["search_seconds"] >= 600
    found.set_user_attr("sessions", [])  # a trial that fails ends too: its time is the session's
    log.on_trial_error(0, [], SimpleNamespace(**vars(ended), num_failures=1))
    found.ask()  # the trial the kill interrupts
    (session,) = found.user_attrs["sessions"]
    assert session["trials_finished"] == 2 and session["search_seconds"] >= 600
    assert session["started"] == started.isoformat(timespec="seconds")


def test_stopped_trial_ends_its_mlflow_run(tmp_path, monkeypatch):
    from orestudy.config import TrainConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = {}
    for name in ("t-000", "t-001"):
        config = TrainConfig(output=str(tmp_path), name=name, experiment="stop", regime="scratch")
        runs[name] = tracking.Tracker.start(config, tmp_path / name).run_id
    tracking.end_stopped_runs("stop", "run_dir", str((tmp_path / "t-000").resolve()))
    client = mlflow.MlflowClient()
    assert [client.get_run(runs[n]).info.status for n in ("t-000", "t-001")] == ["KILLED", "RUNNING"]
