"""Tracking: every run logged to MLflow (params, per-epoch metrics, figures, checkpoint, model).

The store is an embedded SQLite file beside the runs unless MLFLOW_TRACKING_URI says otherwise, with
the artifacts beside it in mlartifacts/, whatever folder a command is started from. Browse it with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --default-artifact-root runs/mlartifacts`.
A run ends FINISHED, or FAILED (it raised) or KILLED (Ctrl-C; a trial Tune stopped): never left RUNNING.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import filelock
import mlflow

ARTIFACTS = ("config.json", "split.csv", "history.csv", "metrics.json", "predictions.csv", "confusion_matrix.png",
             "learning_curves.png", "best.pt")


SET_HERE: set[str] = set()  # URIs use_store set: mlflow.set_tracking_uri exports them as MLFLOW_TRACKING_URI


def use_store(output: str | Path) -> str:
    """Point MLflow at the store MLFLOW_TRACKING_URI names, or else at the SQLite store in output/; an
    earlier call's own URI (in the environment since) is not taken for the user's."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri or uri in SET_HERE:
        uri = f"sqlite:///{Path(output).resolve() / 'mlflow.db'}"
        SET_HERE.add(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def configure(output: str | Path, experiment: str) -> str:
    """Point MLflow at its store (use_store); returns the experiment id. A new experiment in a SQLite
    store keeps its artifacts beside the store in mlartifacts/ (MLflow's default would be ./mlruns of
    the working folder); a tracking server or a file store places them itself."""
    Path(output).mkdir(parents=True, exist_ok=True)
    db = sqlite_file(use_store(output))
    # The first process to open a new SQLite store creates its tables: two at once crash without the lock.
    with filelock.FileLock(f"{db}.lock") if db else contextlib.nullcontext():
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return mlflow.create_experiment(experiment, artifact_location=db and (db.parent / "mlartifacts").as_uri())
            except mlflow.exceptions.MlflowException:  # another process created it first (a tracking server)
                exp = mlflow.get_experiment_by_name(experiment)
    return exp.experiment_id


def flat_metrics(result: dict) -> dict[str, float]:
    metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, scores in result.get("per_class", {}).items():
        metrics.update({f"test_{key}_{name}": float(value) for key, value in scores.items() if key != "support"})
    for key, value in (result.get("curation") or {}).items():  # a curated run's counts
        if key in ("excluded", "relabelled"):
            metrics[f"curation_{key}"] = float(value)
    for key in ("accuracy", "macro_f1"):  # absent when the run did not evaluate the test split
        if key in metrics:
            metrics[f"test_{key}"] = metrics.pop(key)
    return metrics


TRIAL_TAG = "orestudy.trial"


def trial_identity(config) -> str:
    """A study trial's identity, which outlives its checkpoints: its study's run and its name."""
    return f"{config.parent_run}/{config.run_name()}" if config.parent_run else ""


def trial_run(client, experiment_id: str, identity: str) -> str | None:
    """The MLflow run an earlier attempt of the trial made, also when no checkpoint recorded it."""
    if not identity:
        return None
    found = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{identity}'", max_results=1)
    return found[0].info.run_id if found else None


class Tracker:
    """One MLflow run per experiment run; a no-op when tracking is switched off. As a context manager,
    the run is ended FAILED or KILLED when the block raises."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.client = mlflow.MlflowClient() if run_id else None

    @classmethod
    def start(cls, config, run_dir: Path, history: list[dict] = (), run_id: str | None = None) -> "Tracker":
        """A new run; for a resumed one (history: its epochs so far), its run_id continued where the
        store still has it, else a new run given those epochs. A study trial continues the run of its
        earlier attempt (found by its identity) also when that left no checkpoint."""
        if not config.mlflow:
            return cls(None)
        experiment_id = configure(config.output, config.experiment)
        client = mlflow.MlflowClient()
        for earlier in (run_id, trial_run(client, experiment_id, trial_identity(config))):
            if earlier:
                try:
                    client.update_run(earlier, status="RUNNING")
                    return cls(earlier)
                except mlflow.exceptions.MlflowException:  # resumed against another store
                    pass
        tags = {"mlflow.runName": config.run_name(), "run_dir": str(run_dir.resolve())}
        if config.parent_run:
            tags.update({"mlflow.parentRunId": config.parent_run, TRIAL_TAG: trial_identity(config)})
        run = client.create_run(experiment_id, tags=tags)
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v))
                                                   for k, v in asdict(config).items()])
        tracker = cls(run.info.run_id)
        for row in history:
            tracker.log_epoch(row)
        return tracker

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and self.run_id:
            end_abnormally(self.run_id, kind)

    def log_epoch(self, row: dict) -> None:
        if self.run_id:
            step = int(row["epoch"])
            self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, step)
                                                        for k, v in row.items() if k != "epoch"])

    def finish(self, result: dict, run_dir: Path, model) -> None:
        if not self.run_id:
            return
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0)
                                                    for k, v in flat_metrics(result).items()])
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model.cpu(), name="model", serialization_format="pickle",
                                     pip_requirements=["torch", "torchvision"])
        self.client.set_terminated(self.run_id)


def current_uri() -> str:
    return mlflow.get_tracking_uri()


# ---------------------------------------------------------------------------------------------------
# A study's run: the parent of its trials' runs

def start_parent_run(output: str, experiment: str, study_path: str, name: str, params: dict, resume: bool) -> str:
    """The study's MLflow run, whose nested children are the trials; on resume, the one already made
    (found by the study's path, its identity)."""
    experiment_id = configure(output, experiment)
    client = mlflow.MlflowClient()
    if resume:
        found = client.search_runs([experiment_id], f"tags.`orestudy.study` = '{study_path}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, tags={"mlflow.runName": name, "orestudy.study": study_path})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def finish_parent_run(run_id: str, files: list[Path], metrics: dict[str, float], finished: bool) -> None:
    """The study's run ended, FINISHED or (trials unfinished: Ctrl-C) KILLED with its trials' runs the
    interrupt left RUNNING."""
    client = mlflow.MlflowClient()
    for path in files:
        client.log_artifact(run_id, str(path))
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    end_children(run_id)
    client.set_terminated(run_id, "FINISHED" if finished else "KILLED")


def end_stopped_runs(experiment: str, tag: str, value: str, status: str = "KILLED") -> None:
    """A trial Tune stops (ASHA, the time budget) or a killed search cannot end its MLflow run: runs
    with this tag still RUNNING are ended with status. Only for runs no trial is still writing to."""
    found = mlflow.get_experiment_by_name(experiment)
    client = mlflow.MlflowClient()
    for run in client.search_runs([found.experiment_id], f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status)


def end_children(run_id: str) -> None:
    """The runs still RUNNING under run_id (a study's trials), ended KILLED."""
    client = mlflow.MlflowClient()
    end_stopped_runs(client.get_experiment(client.get_run(run_id).info.experiment_id).name, "mlflow.parentRunId",
                     run_id)


def end_abnormally(run_id: str, kind: type[BaseException]) -> None:
    """A run (and its children still RUNNING) ended by an exception: KILLED when stopped (Ctrl-C, or the
    SystemExit with which Tune stops a trial), else FAILED. Never masks the exception being raised."""
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        end_children(run_id)
        mlflow.MlflowClient().set_terminated(run_id, "KILLED" if issubclass(kind, (KeyboardInterrupt, SystemExit))
                                             else "FAILED")


@contextlib.contextmanager
def ended_on_error(run_id: str):
    """The block's run (a study's), and its trials' runs still RUNNING, ended if the block raises."""
    try:
        yield
    except BaseException as err:
        if run_id:
            end_abnormally(run_id, type(err))
        raise


# ---------------------------------------------------------------------------------------------------
# Runs of the other commands

def log_folder(output: str | Path, experiment: str, name: str, params: dict, metrics: dict, folder: Path) -> str:
    """One MLflow run of a report folder (the EDA): params, metrics and every file; returns its id."""
    experiment_id = configure(output, experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder))
    return run.info.run_id


def download_checkpoint(source: str) -> Path:
    """best.pt of an MLflow run (runs:/<id>) or registered model (models:/<name>/<version>)."""
    run_id = (source.removeprefix("runs:/").strip("/").split("/")[0] if source.startswith("runs:/")
              else mlflow.models.get_model_info(source).run_id)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best.pt"))
