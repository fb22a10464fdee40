"""Run safety: run folders of their own, MLflow runs never left RUNNING, artifacts beside the store,
early stopping."""
import json
import os
import subprocess
import sys

import mlflow
import pytest

from orestudy import tracking
from orestudy.run import training
from orestudy.studies import study
from orestudy.config import REPO_ROOT, TrainConfig
from conftest import tiny_config


def store(output):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")


def runs_of(output, experiment: str) -> list:
    client = store(output)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.fixture
def no_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store in the run's output (conftest restores)


def test_a_named_run_folder_is_reused_only_with_exist_ok(tmp_path):
    config = TrainConfig(output=str(tmp_path), name="mine")
    assert training.claim_run_dir(config) == tmp_path / "mine"
    with pytest.raises(training.RunFolderExists, match="mine already exists"):
        training.claim_run_dir(config)
    assert training.claim_run_dir(TrainConfig(output=str(tmp_path), name="mine", exist_ok=True)) == tmp_path / "mine"
    unnamed = TrainConfig(output=str(tmp_path))
    assert [training.claim_run_dir(unnamed).name for _ in range(3)] == [unnamed.run_name() + s for s in ("", "-2", "-3")]


@pytest.mark.slow
def test_two_identical_runs_at_once_each_finish_in_a_folder_of_their_own(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path, epochs=1, freeze_epochs=1, mlflow=True, experiment="twins")
    argv = [sys.executable, "-m", "orestudy.train", *(f"--{k.replace('_', '-')}={v}" for k, v in (
        ("data", config.data), ("output", config.output), ("cache", config.cache), ("regime", "scratch"),
        ("epochs", 1), ("freeze_epochs", 1), ("image_size", 64), ("batch_size", 8), ("threads", 1),
        ("experiment", "twins"))), "--no-progress"]
    # Started elsewhere (no ./mlruns may appear there), importing this checkout's orestudy.
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO_ROOT)}
    twins = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in twins]
    assert [p.returncode for p in twins] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    runs = tmp_path / "runs"
    folders = sorted(f.name for f in runs.iterdir() if f.name.startswith(config.run_name()))
    assert folders == [config.run_name(), config.run_name() + "-2"]
    for name in folders:
        files = {p.name for p in (runs / name).iterdir()}
        assert {"config.json", "split.csv", "best.pt", "metrics.json", "history.csv"} <= files
        assert not [f for f in files if f.endswith(".tmp")] and "last.pt" not in files
    mlflow_runs = runs_of(runs, "twins")
    assert sorted(r.data.tags["run_dir"] for r in mlflow_runs) == [str(runs / name) for name in folders]
    assert all(r.info.status == "FINISHED" for r in mlflow_runs)
    assert not (tmp_path / "mlruns").exists()


class Crash(Exception):
    pass


def test_an_interrupted_or_crashed_run_is_ended_and_resumes_in_its_mlflow_run(image_folder, tmp_path, no_tracking_uri):
    config = tiny_config(image_folder, tmp_path, epochs=2, freeze_epochs=2, mlflow=True, experiment="ended")

    def stop_at(epoch: int, error: type[BaseException]):
        def report(row, state):
            if row["epoch"] == epoch:
                raise error
        return report

    def status() -> list[str]:
        return [r.info.status for r in runs_of(tmp_path / "runs", "ended")]

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the first epoch
        training.run_experiment(config, stop_at(1, KeyboardInterrupt))
    assert status() == ["KILLED"]
    run_dir = tmp_path / "runs" / config.run_name()
    resumed, state = training.resumable(run_dir)
    with pytest.raises(Crash):  # resumed, then a crash after the second epoch
        training.run_experiment(resumed, stop_at(2, Crash), resume=state)
    assert status() == ["FAILED"]
    resumed, state = training.resumable(run_dir)
    assert state["epoch"] == 2
    training.run_experiment(resumed, resume=state)
    (run,) = runs_of(tmp_path / "runs", "ended")  # one MLflow run throughout
    assert run.info.status == "FINISHED"
    client = store(tmp_path / "runs")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]
    with pytest.raises(ValueError, match="has finished"):
        training.resumable(run_dir)
    with pytest.raises(FileNotFoundError, match="config.json not found: .* is no run folder"):
        training.resumable(tmp_path)
    assert not (tmp_path / "mlruns").exists() and not (REPO_ROOT / "mlruns").exists()


def test_a_trial_continues_its_own_mlflow_run_and_a_stopped_study_ends_its_runs(tmp_path, no_tracking_uri):
    output = tmp_path / "runs"
    parent = tracking.start_parent_run(str(output), "studies", "/ray/study", "study", {}, resume=False)
    config = TrainConfig(output=str(output), experiment="studies", parent_run=parent)
    first = tracking.Tracker.start(config, output / config.run_name())
    # Its worker is killed before the first checkpoint: the retry, with no state, finds the run.
    again = tracking.Tracker.start(config, output / config.run_name())
    assert again.run_id == first.run_id
    other = tracking.Tracker.start(TrainConfig(output=str(output), experiment="studies", parent_run=parent, seed=1),
                                   output / "other")
    assert other.run_id != first.run_id
    with pytest.raises(KeyboardInterrupt), tracking.ended_on_error(parent):  # Ctrl-C twice in the study
        raise KeyboardInterrupt
    statuses = {r.info.run_id: r.info.status for r in runs_of(output, "studies")}
    assert statuses == {parent: "KILLED", first.run_id: "KILLED", other.run_id: "KILLED"}
    # Resumed and then stopped by one Ctrl-C (Tune returns with trials unfinished): the same.
    parent_again = tracking.start_parent_run(str(output), "studies", "/ray/study", "study", {}, resume=True)
    assert parent_again == parent
    assert tracking.Tracker.start(config, output / config.run_name()).run_id == first.run_id
    tracking.finish_parent_run(parent, [], {"trials_unfinished": 2}, finished=False)
    assert {r.info.status for r in runs_of(output, "studies")} == {"KILLED"}


def test_artifacts_live_beside_the_store_whatever_the_working_folder(tmp_path, monkeypatch, no_tracking_uri):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "note.txt").write_text("hello")
    for output in (tmp_path / "a", tmp_path / "b"):  # b: after a's URI is in the environment
        run_id = tracking.log_folder(output, "files", "note", {}, {}, folder)
        run = store(output).get_run(run_id)
        assert run.info.artifact_uri.startswith((output / "mlartifacts").as_uri())
        assert list((output / "mlartifacts").rglob("note.txt"))
    assert list(elsewhere.iterdir()) == []
    # A store the user names keeps the artifacts beside it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}")
    (tmp_path / "c").mkdir()
    run_id = tracking.log_folder(tmp_path / "a", "files-c", "note", {}, {}, folder)
    assert store(tmp_path / "c").get_run(run_id).info.artifact_uri.startswith((tmp_path / "c" / "mlartifacts").as_uri())
    assert list(elsewhere.iterdir()) == []


def test_patience_stops_early_and_is_recorded(image_folder, tmp_path):
    # Frozen backbone, learning rate 1e-12 (0 is refused): validation accuracy never improves on epoch 1.
    config = tiny_config(image_folder, tmp_path, epochs=6, freeze_epochs=6, lr=1e-12, patience=2)
    rows = []
    result = training.run_experiment(config, report=lambda row, state: rows.append(row["epoch"]))
    assert rows == [1, 2, 3] and result["epochs_run"] == 3 and result["best_epoch"] == 1
    metrics = json.loads((tmp_path / "runs" / config.run_name() / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3


def test_committed_records_are_still_reused_with_the_new_fields():
    record = study.read_records(REPO_ROOT / "docs" / "results" / "mobilenet_seeds" / "trials.jsonl")[0]
    assert "patience" not in record.config
    config = {**record.config, "patience": 0, "exist_ok": True, "data": "/here"}
    assert study.reusable([config], [record], record.dataset)[0] == []
    assert study.reusable([{**config, "patience": 3}], [record], record.dataset)[0] != []
