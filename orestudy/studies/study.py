"""Studies: many TrainConfigs as the trials of one Ray Tune run, on this machine or on a Ray cluster.

`run_study(param_space, settings)` runs `train_trial` for every configuration Tune draws from
param_space["config"] (a dict of TrainConfig fields, or Tune search spaces over them: a grid for
`orestudy replicate`, a sampler for a search). Each trial is `training.run_experiment`,
reporting every epoch to Tune with its training state as the checkpoint an interrupted trial continues
from, and logged to MLflow as a child of the study's run. `outcomes(results)` says how every trial ended: "ok", "skipped: ..." or "failed: ...".

Finished trials are also kept as portable records (`trials.jsonl`: what a trial computed and measured,
not where): a study split over machines or sessions, whose run folders do not travel, is put back
together by handing a later study the earlier records (`reusable`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch
from ray import tune
from ray.exceptions import RayActorError
from ray.tune.progress_reporter import ProgressReporter

from .. import data, files, models, tracking
from ..config import StudySettings, TrainConfig, compact, complete, computation, is_ensemble, typed_computation
from ..run import ensembling
from ..run.training import run_experiment

SKIPPED_OFFLINE = "skipped: weights unavailable offline"
UNFINISHED = "unfinished"
STATE_FILE = "training_state.pt"  # in every epoch's checkpoint: what an interrupted trial continues from
# In every checkpoint of a trial: the epoch rows it has reported, over all its attempts. Tune's own copy
# (result.json) is no record of them: a trial retried after losing its node gets the storage's copy of
# that file back, which may lack the last reports before the loss (their checkpoint is what it resumes).
EPOCHS_FILE = "epochs.json"

LOCAL_OBJECT_STORE_BYTES = 100 * 2**20  # trials pass files, not objects: a small store is plenty


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at address ("auto": the one running here; RAY_ADDRESS is honoured, as
    `ray job submit` sets it), or start Ray inside this process, sized to the cores it may use.
    False when Ray was already initialised (and is left to whoever did it)."""
    if ray.is_initialized():
        return False
    quiet_tune()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    return True


def quiet_tune() -> None:
    """Ray's and Tune's output as orestudy's studies want it, set where the user has not set it: Tune's
    classic progress reporter (StudyProgress; the newer one prints every trial's whole config and
    results), no warning that trials checkpoint often (every epoch, by design), none that the
    TensorBoard logger skips a trial's lists (class names, per-image outcomes: orestudy tracks in
    MLflow), and none that a local cluster uses token authentication (Ray's default)."""
    for key, value in (("RAY_AIR_NEW_OUTPUT", "0"), ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")):
        os.environ.setdefault(key, value)
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    # The notice that a local cluster uses token authentication, Ray's default (RAY_AUTH_MODE decides it)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


@contextlib.contextmanager
def connected(address: str | None = None):
    """connect() for the block; afterwards Ray is shut down if this started or joined it (a joined
    cluster keeps running)."""
    started = connect(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def trial_resources(settings: StudySettings) -> dict[str, float]:
    """CPUs (and GPUs) per trial from the cluster's nodes, so trials never oversubscribe a node: on a
    CPU-only machine one trial takes every core (on a 2-core laptop trials run one after another);
    with GPUs each trial takes one GPU (or gpus_per_trial of one) and its share of that node's CPUs."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) > 0]
    if gpu_nodes or settings.gpus_per_trial:
        gpus = settings.gpus_per_trial or 1.0
        node = min(gpu_nodes, key=lambda n: n.get("CPU", 0), default={"CPU": 1, "GPU": 1})
        trials_per_node = max(1, int(node["GPU"] / gpus))
        return {"cpu": settings.cpus_per_trial or max(1, int(node.get("CPU", 1)) // trials_per_node), "gpu": gpus}
    cpu_nodes = [int(n["CPU"]) for n in nodes if n.get("CPU", 0) >= 1]
    if not cpu_nodes:  # e.g. ray_cluster.yaml's CPU-less head before the autoscaler has started a worker
        raise ValueError("the Ray cluster has no node with a CPU or GPU to run trials on yet; on an autoscaling "
                         "cluster say what a trial needs, e.g. --gpus-per-trial 1 --cpus-per-trial 8")
    return {"cpu": settings.cpus_per_trial or min(cpu_nodes)}


# ---------------------------------------------------------------------------------------------------
# One trial

METRIC = "best_val_accuracy"  # every epoch's report carries the best validation accuracy so far


_TRAINING_THREADS: set = set()


def _exit_at_once_if_cut_midway() -> None:
    """At the trial process's exit: when Tune stops a trial between two of its reports (ASHA at a rung),
    its training thread is still mid-epoch, and Python's shutdown kills that thread inside torch,
    which aborts the process with a 50-line native trace that reads like a crash. The thread's work
    is discarded anyway (the trial ended at its last report): leave at once instead."""
    if any(thread.is_alive() for thread in _TRAINING_THREADS):
        os._exit(0)


def train_trial(params: dict, tracking_uri: str = "") -> None:
    """The one Tune trial: run_experiment(params["config"]) with as many threads as CPUs the trial holds.
    Every epoch is reported with tune.report, beside its row the best validation accuracy so far
    (METRIC: a search's objective and ASHA's signal) with its epoch and loss, where the attempt runs
    (placement) and when it started and reported, and with the training state as its checkpoint, so a
    trial that is interrupted (Ctrl-C, a lost node) or retried continues after its last reported epoch.
    A trial that evaluates the test split ends with one more report: the test result and the whole run
    folder as the final checkpoint (holding that report, so a study resumed after its driver died before
    it saw the trial end reports it again instead of running it again), or, when the backbone's ImageNet
    weights are not available offline, the skip and its reason (a skip returns normally, so it is never
    retried). A search trial (evaluate_test off) ends with its last epoch's report."""
    if not _TRAINING_THREADS:
        atexit.register(_exit_at_once_if_cut_midway)
    _TRAINING_THREADS.add(threading.current_thread())  # Tune runs this function in a thread of its own
    if tracking_uri:  # the driver's store, wherever this trial runs
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    for name in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" every epoch
        logging.getLogger(name).setLevel(logging.WARNING)
    resources = tune.get_context().get_trial_resources().required_resources
    # A trial's run folder is its own: a retry, or the trial in a resumed study, takes it over.
    config = TrainConfig.from_dict({**params["config"], "threads": int(resources.get("CPU", 0)), "progress": False,
                                    "exist_ok": True})
    attempt = {"placement": placement(resources), "attempt_started": time.time()}

    def report(row: dict, state: dict) -> None:
        best = state["best"]
        with tempfile.TemporaryDirectory() as folder:  # report() copies it to storage before returning
            torch.save(state, Path(folder) / STATE_FILE)
            if epochs is not None:
                epochs.append({k: row[k] for k in HISTORY_COLUMNS if k in row})
                files.write_json_atomic(Path(folder) / EPOCHS_FILE, epochs)
            tune.report({**row, METRIC: best["val_accuracy"], "best_val_loss": best["val_loss"],
                         "best_epoch": best["epoch"], **attempt, "reported_at": time.time()},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    state, final, epochs = saved(tune.get_checkpoint())  # epochs None: a study begun before EPOCHS_FILE
    if reported_again(config, state, final):
        return
    try:
        result = run_experiment(config, report, resume=state)
    except models.WeightsUnavailable as err:
        tune.report({"status": SKIPPED_OFFLINE, "reason": str(err)})
        return
    if config.evaluate_test:
        final = {"status": "ok", **{k: result[k] for k in FINAL_KEYS if k in result}, **attempt,
                 "reported_at": time.time()}
        if epochs is not None:  # before the final report, whose presence says the run finished
            files.write_json_atomic(Path(result["run_dir"]) / EPOCHS_FILE, epochs)
        files.write_json_atomic(Path(result["run_dir"]) / FINAL_REPORT, final)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(result["run_dir"]))


FINAL_KEYS = ("accuracy", "macro_f1", "n_test", "best_epoch", "best_val_accuracy", "wall_seconds", "confusion_matrix",
              "class_names", "device", "device_requested", "device_fallback", "precision", "threads", "run_dir",
              "predictions", "curation", "n_test_full", "test_full_accuracy", "test_full_macro_f1", "tta")
FINAL_REPORT = "trial_result.json"  # in a study trial's run folder: its final report to Tune


def placement(resources: dict) -> dict:
    """Where Ray placed this attempt of the trial: its node (id and labels), the CPUs and GPUs it holds,
    the GPU ids Ray gave it and the CUDA devices the process sees (Ray sets CUDA_VISIBLE_DEVICES to those
    ids, whether or not a physical GPU is behind them: the device the run used says which)."""
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_labels": dict(context.get_node_labels()),
            "resources": dict(resources), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def saved(checkpoint: tune.Checkpoint | None) -> tuple[dict | None, dict | None, list[dict] | None]:
    """(training state, final report, epoch rows reported) in a trial's last checkpoint: an epoch's state
    to continue from, or a finished run's report (its run folder); (None, None, []) for a first attempt."""
    if checkpoint is None:
        return None, None, []
    with checkpoint.as_directory() as folder:
        state, final, epochs = (Path(folder) / name for name in (STATE_FILE, FINAL_REPORT, EPOCHS_FILE))
        return (torch.load(state, map_location="cpu") if state.exists() else None,
                json.loads(final.read_text()) if final.exists() else None,
                json.loads(epochs.read_text()) if epochs.exists() else None)


def reported_epochs(checkpoint: tune.Checkpoint | None) -> list[dict] | None:
    """The epoch rows a trial reported up to checkpoint (EPOCHS_FILE; only that file is read, wherever
    the storage is); None where the checkpoint has none (a study begun before orestudy kept it)."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{EPOCHS_FILE}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def reported_again(config: TrainConfig, state: dict | None, final: dict | None) -> bool:
    """The result of a trial whose run finished before the study was cut (its driver died before it took in
    the trial's end), reported again rather than run again: the final report in its last checkpoint (the
    run folder), or in the run folder a training state is of (when this node reaches it; that folder
    becomes the checkpoint). False where the run has not finished."""
    folder = Path(state["run_dir"]) if final is None and state and "run_dir" in state else None
    if folder is not None and (folder / FINAL_REPORT).exists():
        final = json.loads((folder / FINAL_REPORT).read_text())
    if final is None:
        return False
    print(f"[{config.run_name()}] finished before the study was cut: its result is reported, not run again",
          file=sys.stderr, flush=True)
    tune.report({**final, "reported_again": True},
                checkpoint=tune.Checkpoint.from_directory(folder) if folder is not None else None)
    return True


def run_name(trial) -> str:
    return TrainConfig.from_dict(trial.config["config"]).run_name()


def trial_dirname(trial) -> str:
    return f"{run_name(trial)}_{trial.trial_id}"


class StudyProgress(ProgressReporter):
    """Tune's progress in orestudy's terms: a line whenever trials start or end (how many are running,
    pending, finished and failed, and which run), and a table of the trials with their epoch and
    validation and test accuracy every `every` seconds and at the end."""

    COLUMNS = (("epoch", "epoch", "{:.0f}"), ("val_accuracy", "val acc", "{:.3f}"),
               (METRIC, "best val acc", "{:.3f}"), ("accuracy", "test acc", "{:.4f}"))

    def __init__(self, every: float = 900.0):
        self.every, self.start, self.last_table, self.last_counts = every, time.time(), time.time(), None

    def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs):
        self.start = self.last_table = start_time or time.time()

    def should_report(self, trials, done: bool = False) -> bool:
        return done or self.counts(trials) != self.last_counts or time.time() - self.last_table > self.every

    @staticmethod
    def counts(trials) -> dict[str, int]:
        states = [t.status for t in trials]
        return {"running": states.count("RUNNING"), "pending": states.count("PENDING"),
                "finished": states.count("TERMINATED"), "failed": states.count("ERROR")}

    def report(self, trials, done: bool, *sys_info: str) -> None:
        counts = self.counts(trials)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.start))
        if counts != self.last_counts:
            running = [run_name(t) for t in trials if t.status == "RUNNING"]
            print(f"[study] {elapsed} {len(trials)} trials: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
                  + (f" (running {', '.join(running)})" if running else ""), flush=True)
            self.last_counts = counts
        if done or time.time() - self.last_table > self.every:
            print(self.table(trials), flush=True)
            self.last_table = time.time()

    def table(self, trials) -> str:
        """A row per trial: its name, status and the last value it reported of each column."""
        def last(trial, key, form):
            value = (trial.metric_analysis.get(key) or {}).get("last")
            return form.format(value) if isinstance(value, (int, float)) else ""

        rows = [[run_name(t), t.status.lower()] + [last(t, key, form) for key, _, form in self.COLUMNS] for t in trials]
        header = ["trial", "status"] + [title for _, title, _ in self.COLUMNS]
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in [header] + rows)


class TrialLog(tune.Callback):
    """One line per trial as it ends, for people (and tests) following a long study."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        accuracy = f" test accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        print(f"[study] trial {run_name(trial)} finished: {result.get('status', UNFINISHED)}{accuracy}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[study] trial {run_name(trial)} failed after {trial.num_failures} attempts", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial that raised, or lost its Ray worker (its node died, or the process was killed), is
        tried again: what happened, and the epoch its next attempt continues after."""
        error = last_error(trial)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        if isinstance(error, RayActorError):  # Ray's own words on why, e.g. "... because its node has died"
            why = next((line for line in lines if line.startswith("The actor died because")), lines[0])
            cause = f"lost its Ray worker ({why})"
        else:
            cause = f"raised {lines[-1]}" if error is not None else "failed"
        epoch = (trial.last_result or {}).get("epoch")
        print(f"[study] trial {run_name(trial)} {cause}: retried from "
              + (f"its checkpoint after epoch {epoch:.0f}" if epoch else "its first epoch")
              + f" (failure {trial.num_failures} of {trial.max_failures} allowed)", flush=True)


def last_error(trial) -> BaseException | None:
    """The error a trial last failed with, from the driver's copy (the storage path's is synced later)."""
    path = trial.pickled_error_file
    return pickle.loads(Path(path).read_bytes()) if path and Path(path).exists() else None


# ---------------------------------------------------------------------------------------------------
# The study

def saved_results(settings: StudySettings) -> tune.ResultGrid:
    """The study at settings.path as it stands (finished, failed and unfinished trials), running nothing."""
    if not tune.Tuner.can_restore(settings.path):
        raise FileNotFoundError(f"no study at {settings.path}")
    return tune.Tuner.restore(settings.path, train_trial).get_results()


def check_state(settings: StudySettings, resume: bool) -> None:
    """A new study must not overwrite one at its path; a resumed one must exist."""
    exists = tune.Tuner.can_restore(settings.path)
    if resume and not exists:
        raise FileNotFoundError(f"no study to resume at {settings.path}")
    if exists and not resume:
        raise FileExistsError(f"a study already exists at {settings.path}")


def trainable(settings: StudySettings):
    """train_trial with the driver's MLflow store and the trial's resources."""
    tracking_uri = tracking.current_uri() if settings.mlflow else ""
    return tune.with_resources(tune.with_parameters(train_trial, tracking_uri=tracking_uri), trial_resources(settings))


def tuner(settings: StudySettings, param_space: dict, name: str, storage_path: str, callbacks: list,
          **tune_config) -> tune.Tuner:
    """The one Tuner of every study: trials named after their run, one checkpoint kept (the last epoch's
    state, or the finished run's folder), max_failures retries, Ray's output as quiet_tune sets it and
    Tune's progress as StudyProgress prints it; tune_config adds a searcher, a scheduler, a
    metric and a trial count where a search wants them."""
    quiet_tune()
    return tune.Tuner(
        trainable(settings), param_space=param_space,
        tune_config=tune.TuneConfig(trial_name_creator=run_name, trial_dirname_creator=trial_dirname, **tune_config),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            verbose=1, progress_reporter=StudyProgress(),
            # A trial that raises, or whose worker dies with its node (ActorDiedError), is retried from its
            # last checkpoint, max_failures times in all; Ray counts no drained (preempted) node. The other
            # trials go on (fail_fast off): one broken configuration does not end a study.
            failure_config=tune.FailureConfig(max_failures=settings.max_failures, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def run_study(param_space: dict, settings: StudySettings, resume: bool = False) -> tune.ResultGrid:
    """Run (or, with resume, continue) the study; call connect() first. A trial that raises or loses its
    node is retried max_failures times from its last finished epoch, then reported as failed while the
    others go on. Resuming keeps finished trials, continues unfinished ones after their last finished
    epoch, restarts failed ones from their first, and keeps the saved param_space."""
    check_state(settings, resume)
    if resume:
        return tune.Tuner.restore(settings.path, trainable(settings), resume_unfinished=True,
                                  restart_errored=True).fit()
    # A reused worker keeps its decoded images and data scan from one trial to the next.
    return tuner(settings, param_space, settings.name, settings.storage_path, [TrialLog()], reuse_actors=True).fit()


@dataclass
class Trial:
    """A trial as a study knows it: how it ended (outcomes), or what a portable record says of it
    (read_records), where a reused one stands in for a trial not run again."""
    config: dict | None           # its TrainConfig fields; None: the trial never started
    status: str                   # "ok", "skipped: ...", "failed: <error>" or "unfinished"
    metrics: dict = field(default_factory=dict)        # its last report: the test result when ok
    history: list[dict] = field(default_factory=list)  # its per-epoch rows
    checkpoint: tune.Checkpoint | None = None          # its last checkpoint (records keep none)
    dataset: str = ""             # the data set it ran on (data.dataset_name), as records keep it
    reused: bool = False          # a record of an earlier study standing in for this trial

    def record(self, dataset: str) -> dict:
        """A trial that ran (config not None) on the data set named dataset, as plain JSON."""
        return {"dataset": dataset, "config": computation(compact(self.config)), "status": self.status,
                "metrics": {k: self.metrics[k] for k in RECORD_METRICS if k in self.metrics},
                "history": [{k: row[k] for k in HISTORY_COLUMNS if k in row} for row in self.history]}


def outcomes(results: tune.ResultGrid) -> list[Trial]:
    """Per trial of a Tune study: how it ended, its last report, per-epoch rows and last checkpoint."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        if result.error is not None:
            lines = [line for line in str(result.error).splitlines() if line.strip()]
            status = f"failed: {lines[-1].strip() if lines else type(result.error).__name__}"
        else:
            status = metrics.get("status", UNFINISHED)
        epochs = reported_epochs(result.checkpoint)
        if epochs is None:  # no checkpoint, or one of a study begun before EPOCHS_FILE
            epochs = tune_epochs(result.metrics_dataframe)
        config = (result.config or {}).get("config")  # None: the trial never started (interrupted study)
        rows.append(Trial(config, status, metrics, epochs, result.checkpoint))
    return rows


def tune_epochs(history) -> list[dict]:
    """The epoch rows of a trial as Tune's results frame has them: a restarted trial begins again at
    epoch 1 (its last attempt counts), a resumed one after its last reported epoch (where an epoch shows
    twice, the later report counts)."""
    if history is None or "epoch" not in history or not history["epoch"].notna().any():
        return []
    epochs = history[history["epoch"].notna()]
    epochs = epochs.loc[epochs.index[epochs["epoch"] == 1][-1]:]
    return epochs.drop_duplicates("epoch", keep="last").to_dict("records")


# ---------------------------------------------------------------------------------------------------
# Portable trial records

RECORD_METRICS = ("status", "reason", "accuracy", "macro_f1", "n_test", "best_epoch", "best_val_accuracy",
                  "wall_seconds", "device", "device_fallback", "precision", "threads", "confusion_matrix",
                  "class_names", "predictions", "curation", "n_test_full", "test_full_accuracy", "test_full_macro_f1",
                  "tta", "weights")
HISTORY_COLUMNS = ("epoch", "frozen", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds")


def computation_key(config: dict) -> str | None:
    """What a config computes, as a string; a field added to TrainConfig since the config was saved
    takes the value that computed it then (config.complete). None for a config this version cannot read."""
    if is_ensemble(config):
        return json.dumps({**config, "members": sorted(map(computation_key, config["members"]))}, sort_keys=True)
    try:
        return json.dumps(typed_computation(config), sort_keys=True)
    except (TypeError, ValueError):
        return None


def write_records(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_records(*paths: str | Path) -> list[Trial]:
    """The trials of one or more trials.jsonl files, in order; a line that is not a record is an error
    naming file and line."""
    records = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            try:
                record = json.loads(line)
                if not {"dataset", "config", "status", "metrics", "history"} <= set(record):
                    raise ValueError("not a trial record")
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: {err}") from None
            records.append(Trial(record["config"], record["status"], record["metrics"], record["history"],
                                 dataset=record["dataset"]))
    return records


def dataset_of(settings: StudySettings, progress: bool = False) -> str:
    """The data set name the study's trials record (the folder's content and the curation): what a
    reused record must carry."""
    records = data.scan_cached(settings.data, progress, settings.cache)[0]
    curation = data.read_curation(settings.curation, records, settings.data) if settings.curation else None
    return data.dataset_name(settings.data, records, curation)


def reusable(configs: list[dict], records: list[Trial], dataset: str) -> tuple[list[dict], list[Trial]]:
    """(configs still to run, records that stand in for the rest): a finished ("ok") record of the
    same computation on the same data set replaces a trial, with the config it would have run and
    reused set."""
    done = {computation_key(r.config): r for r in records if r.status == "ok" and r.dataset == dataset}
    to_run, reused = [], []
    for config in configs:
        record = done.get(computation_key(config))
        if record is None:
            to_run.append(config)
        else:
            reused.append(replace(record, config=config, reused=True))
    return to_run, reused


def planned(configs: list[dict], outcomes: list[Trial]) -> list[Trial]:
    """One outcome per config: its trial's in the (saved) study, or unfinished where it never started.
    A trial of the study that a reused record now stands in for is not among configs and drops out."""
    ran = {computation_key(o.config): o for o in outcomes if o.config is not None}
    return [ran.get(computation_key(c)) or Trial(c, UNFINISHED) for c in configs]


def unique_records(records: list[Trial]) -> list[Trial]:
    """One record per (data set, computation): the one that keeps per-image outcomes, else the last."""
    kept: dict = {}
    for r in records:
        key = (r.dataset, computation_key(r.config))
        if key not in kept or "predictions" in r.metrics or "predictions" not in kept[key].metrics:
            kept[key] = r
    return list(kept.values())


def record_probabilities(trials: list, split: str):
    """(probabilities (members, images, classes), labels, hashes) of one split from trial records'
    per-image rows, in the first member's order; members that saw other images are refused."""
    import numpy as np

    rows = [{sha: (label, probs) for s, sha, label, probs in t.metrics["predictions"] if s == split} for t in trials]
    shas = list(rows[0])
    for trial, mine in zip(trials[1:], rows[1:]):
        if {sha: label for sha, (label, _) in mine.items()} != {sha: rows[0][sha][0] for sha in shas}:
            raise ValueError(f"{split} images or labels differ between the records of seed {trial.config['seed']} "
                             f"(an ensemble's members must share one split)")
    return (np.array([[mine[sha][1] for sha in shas] for mine in rows], dtype=float),
            np.array([rows[0][sha][0] for sha in shas]), shas)


def ensemble_trial(trials: list, dataset: str):
    """The ensemble of finished trial records of one seed, as a record itself (study.Trial): computed
    from their per-image validation and test probabilities, exactly as ensembling.build_ensemble computes it from
    run folders, so a study's report can add an ensemble row, and compare can pair it, from records alone."""
    if len(trials) < 2 or any(not t.metrics.get("predictions") for t in trials):
        raise ValueError("an ensemble needs at least two records with per-image predictions")
    seeds = {t.config["seed"] for t in trials}
    if len(seeds) > 1 or any(t.dataset != dataset for t in trials):
        raise ValueError(f"an ensemble's records must share one data set and seed, not seeds {sorted(seeds)}")
    val_probs, val_labels, val_shas = record_probabilities(trials, "val")
    test_probs, test_labels, test_shas = record_probabilities(trials, "test")
    classes = trials[0].metrics["class_names"]
    weights, val, _, test, result = ensembling.combine(val_probs, val_labels, test_probs, test_labels, classes,
                                            complete(trials[0].config))
    result.update({"status": "ok", "class_names": classes, "weights": weights.round(6).tolist(),
                   "wall_seconds": sum(t.metrics.get("wall_seconds", 0) for t in trials),
                   "predictions": ensembling.outcomes(val_shas, val, test_shas, test)})
    config = {"members": [computation(complete(t.config)) for t in trials], "seed": seeds.pop(), "selection": ensembling.SELECTION}
    return Trial(config, "ok", result, dataset=dataset)
