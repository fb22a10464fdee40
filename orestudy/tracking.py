"""Tracking: every run logged to MLflow: MLflow's source, user and git-commit tags and a description;
the config with the device, dtype and threads it resolved to and the library versions as params;
per-epoch metrics and the headline test metrics, named in sections MLflow groups (test/, test_per_class/,
train/, val/: METRIC_NAMES; single values such as sizes, the best epoch and the epochs run are
params); the split as the run's dataset; files, the checkpoint, and the model as a pyfunc that answers
photos (orestudy/pyfunc_model.py), optionally registered. Experiments are marked as model development
(MLflow's experiment kind), so the UI opens them on their runs.

The store is an embedded SQLite file beside the runs unless MLFLOW_TRACKING_URI says otherwise, with
the artifacts beside it in mlartifacts/, whatever folder a command is started from. Browse it with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --default-artifact-root runs/mlartifacts`.
A run ends FINISHED, or FAILED (it raised) or KILLED (Ctrl-C; a trial Tune stopped): never left RUNNING
by a process that could end it; a run whose process was killed (kill -9) is ended KILLED by the next run
in its folder (train --resume, or a new run of the same name).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import filelock
import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME
from PIL import Image

from . import data, device as devices, environment

# MLflow's INFO lines (creating a store's tables, validating the input example) and its progress bars
# for the artifacts it downloads to check a logged model say nothing a run's own lines do not.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the kind MLflow shows it as: not GenAI

# A saved view of the runs list (MLflow's "saved views", an experiment tag each): the runs with their
# scores and what they varied, best test accuracy first. MLflow's default view shows no metric column;
# this one opens at view_url(experiment id), or from the runs page's view menu.
SAVED_VIEW = "orestudy"
VIEW_COLUMNS = ([f"metrics.`{m}`" for m in ("test/accuracy", "test/macro_f1", "val/best_accuracy", "best/test_accuracy")]
                + [f"params.`{p}`" for p in ("backbone", "regime", "attention", "freeze_epochs", "seed")])


def saved_view() -> dict[str, str]:
    """The experiment tag of the saved view SAVED_VIEW, in the envelope the MLflow UI reads (its name,
    times in ms and the view's state as a JSON string)."""
    state = {"selectedColumns": VIEW_COLUMNS, "orderByKey": "metrics.`test/accuracy`", "orderByAsc": False}
    now = int(time.time() * 1000)
    return {f"mlflow.sharedViewState.{SAVED_VIEW}": json.dumps(
        {"name": "orestudy: runs and their scores", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})}


def view_url(experiment_id: str, run_id: str = "") -> str:
    """Where the UI of `mlflow ui` (port 5000) shows a run, or the experiment's runs in the saved view (in
    its model-training mode: MLflow 3.17's UI opens in its GenAI mode unless told, whatever the
    experiment's kind)."""
    base, mode = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs", "workflowType=machine_learning"
    return f"{base}/{run_id}?{mode}" if run_id else f"{base}?viewStateShareKey={SAVED_VIEW}&{mode}"


def configure(output: str | Path, experiment: str) -> str:
    """Point MLflow at its store (use_store); returns the experiment id. A new experiment in a SQLite
    store keeps its artifacts beside the store in mlartifacts/ (MLflow's default would be ./mlruns of
    the working folder); a tracking server or a file store places them itself. Every experiment is
    marked as model development (EXPERIMENT_KIND), one made before this was set included."""
    Path(output).mkdir(parents=True, exist_ok=True)
    db = sqlite_file(use_store(output))
    # The first process to open a new SQLite store creates its tables: two at once crash without the lock.
    with filelock.FileLock(f"{db}.lock") if db else contextlib.nullcontext():
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return mlflow.create_experiment(experiment, artifact_location=db and (db.parent / "mlartifacts").as_uri(),
                                                tags={**EXPERIMENT_KIND, **saved_view()})
            except mlflow.exceptions.MlflowException:  # another process created it first (a tracking server)
                exp = mlflow.get_experiment_by_name(experiment)
        for key, value in {**EXPERIMENT_KIND, **saved_view()}.items():
            if key not in exp.tags:  # an experiment made before; a view edited in the UI is kept
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


# A run's numbers (the keys of its history.csv and metrics.json) as MLflow metrics, named so that MLflow
# draws them in sections (in the order of their names, test/accuracy first): test/, test_per_class/,
# train/, val/ (the "unknown" threshold is chosen on validation, what it does is measured on test) and
# curation/ (metric_name). Runs logged before used the flat names of FLAT_NAMES (else the key itself),
# which read_metric still reads.
METRIC_NAMES = {
    "train_loss": "train/loss", "train_accuracy": "train/accuracy", "epoch_seconds": "train/epoch_seconds",
    "val_loss": "val/loss", "val_accuracy": "val/accuracy", "best_val_accuracy": "val/best_accuracy",
    "val_accuracy_plain": "val/accuracy_plain", "val_accuracy_flips": "val/accuracy_flips",
    "unknown_threshold": "val/unknown_threshold", "unknown_error_bound": "val/unknown_error_bound",
    "accuracy": "test/accuracy", "macro_f1": "test/macro_f1", "test_loss": "test/loss",
    "test_full_accuracy": "test/full_accuracy", "test_full_macro_f1": "test/full_macro_f1",
    "test_answered_share": "test/answered_share", "test_answered_accuracy": "test/answered_accuracy",
    "test_answered_error": "test/answered_error", "test_set_coverage": "test/set_coverage",
    "test_mean_set_size": "test/mean_set_size"}
FLAT_NAMES = {"accuracy": "test_accuracy", "macro_f1": "test_macro_f1"}
PER_CLASS = ("precision", "recall", "f1")

# Numbers a run has one of and constants of its config: params, so the metric page shows only what varies
# or is scored.
SINGLE_VALUES = ("best_epoch", "epochs_run", "wall_seconds", "n_train", "n_val", "n_test", "n_train_samples",
                 "n_test_full")


def valid_name(name: str) -> str:
    """A metric name MLflow takes: the commas, plus signs and brackets of a label dropped, any other
    character it refuses (a class folder's may have any) as '_'."""
    return re.sub(r"[^/\w.\- :]", "_", re.sub(r"[,+()]", "", name))


def metric_name(key: str) -> str | None:
    """The MLflow metric of a run-file key (history.csv, metrics.json, a per-class test_f1_<class>, a
    curation_<count>); None for a key that is not a metric."""
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    if any(key.startswith(f"test_{score}_") for score in PER_CLASS):
        return valid_name(f"test_per_class/{key.removeprefix('test_')}")
    if key.startswith("curation_"):
        return f"curation/{key.removeprefix('curation_')}"
    return None


def read_metric(metrics: dict[str, float], key: str) -> float | None:
    """A run's metric by its run-file key, from an MLflow run's metrics (run.data.metrics), whichever
    names it was logged under: the sections' (metric_name) or the flat ones of earlier runs."""
    for name in (metric_name(key), FLAT_NAMES.get(key, key)):
        if name in metrics:
            return metrics[name]
    return None


def metric_history(client: mlflow.MlflowClient, run_id: str, key: str) -> list:
    """A run's per-epoch values of a history.csv key, under its section name or an earlier run's flat one."""
    return client.get_metric_history(run_id, metric_name(key)) or client.get_metric_history(run_id, key)


def epoch_metrics(row: dict) -> dict[str, float]:
    return {metric_name(k): float(v) for k, v in row.items() if metric_name(k)}


def flat_metrics(result: dict) -> dict[str, float]:
    """A finished run's metrics by their MLflow names."""
    values = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, scores in result.get("per_class", {}).items():
        values.update({f"test_{key}_{name}": value for key, value in scores.items() if key != "support"})
    for key, value in (result.get("curation") or {}).items():  # a curated run's counts
        if key in ("excluded", "relabelled"):
            values[f"curation_{key}"] = value
    return {metric_name(k): float(v) for k, v in values.items() if metric_name(k)}


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


NOTE = "mlflow.note.content"  # the run's description, as the UI shows and edits it


class Tracker:
    """One MLflow run per experiment run; a no-op when tracking is switched off. As a context manager,
    the run is ended FAILED or KILLED when the block raises."""

    def __init__(self, run_id: str | None, register: str = "", description: str = ""):
        self.run_id = run_id
        self.register = register  # the registered model the run's model becomes a version of; '': none
        self.description = description
        self.client = mlflow.MlflowClient() if run_id else None
        self.uri = mlflow.get_tracking_uri() if run_id else ""
        self.experiment_id = self.client.get_run(run_id).info.experiment_id if run_id else ""

    @classmethod
    def start(cls, config, run_dir: Path, history: list[dict] = (), run_id: str | None = None,
              description: str = "") -> "Tracker":
        """A new run; for a resumed one (history: its epochs so far), its run_id continued where the
        store still has it, else a new run given those epochs. A study trial continues the run of its
        earlier attempt (found by its identity) also when that left no checkpoint. A new run first ends
        the runs a killed process left RUNNING in the same folder (KILLED). description: the run's
        description (finish adds the result). If anything after the run is made raises, it ends FAILED."""
        if not config.mlflow:
            return cls(None)
        experiment_id = configure(config.output, config.experiment)
        client = mlflow.MlflowClient()
        for earlier in (run_id, trial_run(client, experiment_id, trial_identity(config))):
            if earlier:
                try:
                    client.update_run(earlier, status="RUNNING")
                    return cls(earlier, config.register, description)
                except mlflow.exceptions.MlflowException:  # resumed against another store
                    pass
        end_stale_runs(client, experiment_id, run_dir)
        versions = environment.versions()
        tags = {"mlflow.runName": config.run_name(), "run_dir": str(run_dir.resolve()), **source_tags(versions)}
        if description:
            tags[NOTE] = description
        if config.parent_run:
            tags.update({"mlflow.parentRunId": config.parent_run, TRIAL_TAG: trial_identity(config)})
        run = client.create_run(experiment_id, tags=tags)
        tracker = cls(run.info.run_id, config.register, description)
        with tracker:  # ended FAILED if the run cannot be set up (a manifest MLflow cannot read, a store gone)
            params = {**asdict(config), **resolved(config), **{f"version_{k}": v for k, v in versions.items()}}
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
            if (run_dir / "split.csv").exists():
                log_split(client, run.info.run_id, run_dir / "split.csv", config)
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
            self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, v, 0, step)
                                                        for k, v in epoch_metrics(row).items()])

    def finish(self, result: dict, run_dir: Path, model) -> None:
        if not self.run_id:
            return
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0)
                                                    for k, v in flat_metrics(result).items()],
                              params=[mlflow.entities.Param(k, str(result[k])) for k in SINGLE_VALUES if k in result],
                              tags=[mlflow.entities.RunTag(NOTE, result_note(result) + self.description)])
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        with mlflow.start_run(run_id=self.run_id):
            log_classifier(model, run_dir, self.register)
        self.client.set_terminated(self.run_id)


def result_note(result: dict) -> str:
    """The headline of a finished run, above its description."""
    if "accuracy" in result:
        line = (f"**Test accuracy {result['accuracy']:.4f}**, macro-F1 {result['macro_f1']:.4f} "
                f"(n = {result['n_test']})")
    else:
        line = "Test split not evaluated"
    return (f"{line}; best validation accuracy {result['best_val_accuracy']:.4f} at epoch {result['best_epoch']} "
            f"of {result['epochs_run']}; {result['wall_seconds']:.0f} s on {result['device']} "
            f"({str(result['precision']).removeprefix('torch.')}).\n\n")


def end_stale_runs(client: mlflow.MlflowClient, experiment_id: str, run_dir: Path) -> list[str]:
    """Runs still RUNNING in run_dir: left by a process killed without a chance to end them (kill -9, a
    lost machine), as a run starts in that folder again: ended KILLED."""
    where = str(run_dir.resolve())
    if "'" in where:
        return []
    stale = client.search_runs([experiment_id], f"tags.run_dir = '{where}' and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in stale]


def source_tags(versions: dict) -> dict[str, str]:
    """MLflow's own source, user and git commit tags: its guess, with the commit of orestudy's repository
    (MLflow would look for one around the entry point, which in a Ray worker is Ray's)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()
    if sys.argv and sys.argv[0]:
        tags[MLFLOW_SOURCE_NAME] = environment.from_repo(sys.argv[0])
    tags[MLFLOW_GIT_COMMIT] = versions["git_commit"]
    return tags


def resolved(config) -> dict[str, str]:
    """The device, autocast dtype and thread count 'auto' and 0 stand for, as this process resolves them
    (training.build_run has just done the same)."""
    device = devices.pick_device(config.device)
    dtype = devices.pick_precision(config.precision, device)
    return {"device_resolved": str(device), "dtype": str(dtype or torch.float32).removeprefix("torch."),
            "threads_resolved": torch.get_num_threads()}


def log_split(client: mlflow.MlflowClient, run_id: str, manifest: Path, config) -> None:
    """The split manifest (path, content hash, label, split, near-duplicate group) as the run's dataset.
    Its paths are the file names as bytes (data.MANIFEST_ENCODING): one that is not UTF-8 is shown with
    its undecodable bytes replaced; the group is a label, so a string (MLflow warns of integer columns)."""
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    frame = read_manifest(manifest).astype({"group": str})
    with warnings.catch_warnings():  # MLflow registers two sources for local files ('' and file://) and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways",
                                UserWarning)
        dataset = from_pandas(frame, source=manifest.resolve().as_uri(), targets="label",
                              name=f"{Path(config.data).name}-seed{config.seed}")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def read_manifest(manifest: Path) -> pd.DataFrame:
    """A split manifest as a frame, file names that are not UTF-8 with their odd bytes replaced."""
    return pd.read_csv(manifest, encoding="utf-8", encoding_errors="replace")


# ---------------------------------------------------------------------------------------------------
# The run's model: orestudy/pyfunc_model.py over the best checkpoint as TorchScript

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "mlflow")


def model_signature(class_names: list[str]) -> ModelSignature:
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                      *[ColSpec("double", f"p_{name}") for name in class_names]])
    return ModelSignature(inputs, outputs)


def example_image(run_dir: Path, data_root: str) -> bytes:
    """A training photo of the run, shrunk, as JPEG bytes: the model's input example."""
    with open(run_dir / "split.csv", newline="", **data.MANIFEST_ENCODING) as f:
        path = next(row["path"] for row in csv.DictReader(f) if row["split"] == "train")
    with Image.open(Path(data_root) / path) as img:
        img = img.convert("RGB")
        img.thumbnail((256, 256))
        out = tempfile.SpooledTemporaryFile()
        img.save(out, format="JPEG", quality=85)
    out.seek(0)
    return out.read()


def log_classifier(model: torch.nn.Module, run_dir: Path, register: str = ""):
    """The best checkpoint (model holds its weights; run_dir its best.pt) as an MLflow pyfunc model that
    takes photos and answers class names: the network traced to TorchScript (loadable without orestudy's
    classes) and the preprocessing from the checkpoint. Returns the logged model's info."""
    meta = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    meta.pop("model")
    size = meta["input_size"]
    with tempfile.TemporaryDirectory() as tmp:
        classifier, preprocessing = Path(tmp) / "classifier.pt", Path(tmp) / "preprocessing.json"
        # TorchScript, deprecated for torch.export, is what loads in any torch of these years; the check
        # (a second trace) is skipped, as eval mode has no data-dependent branches.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model.cpu().float().eval(), torch.zeros(2, 3, size, size), check_trace=False)
        traced.save(str(classifier))
        preprocessing.write_text(json.dumps({
            "input_size": size, "base_size": data.base_size(size), "mean": meta["mean"], "std": meta["std"],
            "class_names": meta["class_names"], "unknown_threshold": meta["best"].get("unknown_threshold")}, indent=1))
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_FILE),
            artifacts={"classifier": str(classifier), "preprocessing": str(preprocessing)},
            signature=model_signature(meta["class_names"]),
            input_example=pd.DataFrame({"image": [example_image(run_dir, meta["config"]["data"])]}),
            pip_requirements=[f"{p}=={environment.installed(p)}" for p in REQUIREMENTS],
            registered_model_name=register or None)


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


NOTE_LENGTH = 8000  # MLflow's longest tag value


def note_of(text: str, more: str = "report.md") -> str:
    """A description MLflow keeps: text, or as much of it as fits, pointing at the rest."""
    if len(text) <= NOTE_LENGTH:
        return text
    tail = f"\n\n… (the rest: {more} in the artifacts)"
    return text[:NOTE_LENGTH - len(tail)].rsplit("\n", 1)[0] + tail


def effect_metrics(rows: list[dict]) -> dict[str, float]:
    """An effects table's rows (factor, a, b, mean: B - A in accuracy) as metrics effects/<factor>: B - A."""
    def label(text) -> str:  # a slash would start another section
        return valid_name(str(text).replace("/", " of "))

    return {f"effects/{label(r['factor'])}: {label(r['b'])} - {label(r['a'])}"[:MAX_KEY]: float(r["mean"]) for r in rows}


MAX_KEY = 250  # MLflow's longest metric name


def finish_parent_run(run_id: str, files: list[Path], metrics: dict[str, float], finished: bool,
                      note: str = "", tags: dict[str, str] | None = None) -> None:
    """The study's run ended, FINISHED or (trials unfinished: Ctrl-C) KILLED with its trials' runs the
    interrupt left RUNNING; note: its description (the study's report), tags: e.g. its best trial."""
    client = mlflow.MlflowClient()
    for path in files:
        client.log_artifact(run_id, str(path))
    tags = {**(tags or {}), **({NOTE: note_of(note)} if note else {})}
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])
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

def log_folder(output: str | Path, experiment: str, name: str, params: dict, metrics: dict, folder: Path,
               tags: dict | None = None) -> str:
    """One MLflow run of a report folder (the EDA, a validation, an ensemble): params, metrics, tags and
    every file; returns its id."""
    experiment_id = configure(output, experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder))
    return run.info.run_id


def runs_of_folders(output: str | Path, folders: list[Path]) -> list[str]:
    """The MLflow run of each run folder in the store of output (use_store), found by the run_dir tag
    every run carries; '' where the store has none (a run made with --no-mlflow or elsewhere)."""
    use_store(output)
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = []
    for folder in folders:
        where = str(Path(folder).resolve())
        runs = client.search_runs(experiments, f"tags.run_dir = '{where}'", max_results=1) \
            if experiments and "'" not in where else []
        found.append(runs[0].info.run_id if runs else "")
    return found


def download_checkpoint(source: str) -> Path:
    """best.pt of an MLflow run (runs:/<id>) or registered model (models:/<name>/<version>)."""
    run_id = (source.removeprefix("runs:/").strip("/").split("/")[0] if source.startswith("runs:/")
              else mlflow.models.get_model_info(source).run_id)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best.pt"))
