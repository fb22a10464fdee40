"""A search end to end: Optuna's TPE proposes configurations, Ray Tune trains them as trials of the one
trial function (study.train_trial; ASHA stops the weak ones early), both on validation accuracy alone
(optionally the mean over K folds); then the best configuration is retrained over several seeds and
tested once per seed, beside the space's baseline on the same seeds, and the report is written.

Everything lives in <output>/<name>/: the Optuna study (optuna.db: what resume continues from), one
run folder per trial and per retraining run, trials.jsonl (the retraining runs' portable records) and
report.md with its figures. In MLflow a search is one parent run with a child run per trial.
"""
from __future__ import annotations

import math
import warnings
from datetime import datetime, timezone
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import search_report, study
from .. import tracking
from ..config import SearchSettings, TrainConfig  # SearchSettings: imported from here before
from .search_report import best_trial, finished, trial_name
from .search_space import SearchSpace, SearchSpaceError, check_weights

METRIC = study.METRIC  # the objective, and ASHA's signal: the best validation accuracy so far (fold mean)


def open_study(space: SearchSpace, folder: Path, name: str, resume: bool) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """The search's study in folder/optuna.db: made new, or with resume the one already there, whose
    space must be the file's as it was when the search began."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    exists = name in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise FileExistsError(f"search {name!r} already exists in {folder}: --resume continues it, "
                              f"--name starts another")
    if resume and not exists:
        raise FileNotFoundError(f"no search {name!r} to resume in {folder}")
    found = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    if not exists:
        found.set_user_attr("space", space.raw)
        found.set_user_attr("space_file", str(space.path))
        found.set_user_attr("folds", space.folds)
    elif found.user_attrs.get("space") != space.raw or found.user_attrs.get("folds", 1) != space.folds:
        raise SearchSpaceError(f"{space.path} (or --folds) has changed since search {name!r} began; its trials are "
                               f"not comparable with new ones: start another search (--name)")
    return found, storage


def requeue_interrupted(found: optuna.Study) -> list[int]:
    """Trials left running by a search that was killed or ran out of time are marked failed, and their
    configurations are asked first, so an interruption costs their progress, not their place."""
    stale = [t for t in found.trials if t.state == TrialState.RUNNING]
    for t in stale:
        found.tell(t.number, state=TrialState.FAIL)
        found.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


class TPESearch(OptunaSearch):
    """Ray's OptunaSearch with three changes, so the study reads right afterwards: its parameters are
    TrainConfig fields, given to a trial as params["config"] (study.train_trial's layout); a trial is
    named after its Optuna number (run folder, MLflow run and study line up); and a trial ASHA stopped
    before its last epoch is told to Optuna as PRUNED, not as a finished trial scoring its early value.
    Ray offers no public hook for the last two, so this relies on OptunaSearch's _ot_trials,
    _ot_study and _completed_trials (tests/test_search.py checks them on the installed Ray)."""

    def __init__(self, *args, search: str, epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.search, self.epochs = search, epochs

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        if params is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        return {"config": {**params, "name": trial_name(self.search, ot_trial.number)}}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or not result or self.metric not in result:
            return super().on_trial_complete(trial_id, result, error)
        for key in ("best_epoch", "best_val_loss", "fold_best_val_accuracy"):
            if key in result:
                ot_trial.set_user_attr(key, result[key])
        ot_trial.set_user_attr("epochs_run", result["epoch"])
        if error or result["epoch"] >= self.epochs:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial.report(result[self.metric], int(result["epoch"]))  # the result that made ASHA stop it
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


class SearchLog(tune.Callback):
    """One line per trial as it ends (finished or failed), for people (and tests) following a long
    search; then on_end() (Tune calls both after the searcher has told Optuna the trial's state)."""

    def __init__(self, on_end):
        self.on_end = on_end

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.on_end()
        r = trial.last_result or {}
        if METRIC in r:
            print(f"[search] {study.run_name(trial)}: best val accuracy {r[METRIC]:.4f} (epoch {r['best_epoch']}) "
                  f"after {r['epoch']} epochs", flush=True)
        config = TrainConfig.from_dict(trial.config["config"])
        if config.mlflow:  # a trial that ran all its epochs has ended its runs; one ASHA stopped has not
            for run in config.fold_configs():
                tracking.end_stopped_runs(run.experiment, "run_dir", str((Path(run.output) / run.run_name()).resolve()))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_end()
        print(f"[search] {study.run_name(trial)} failed after {trial.num_failures} attempts", flush=True)


def concurrent_trials(resources: dict[str, float]) -> int:
    """How many trials of these resources the cluster runs at once: TPE proposes no further ahead of
    the results it learns from."""
    total = ray.cluster_resources()
    n = total.get("CPU", 0) // resources["cpu"]
    if resources.get("gpu"):
        n = min(n, total.get("GPU", 0) // resources["gpu"])
    return max(1, int(n))


def run_trials(found: optuna.Study, storage, space: SearchSpace, settings: study.StudySettings,
               base: dict, n: int, time_budget_s: float, sampler_seed: int, log: SearchLog) -> None:
    """n more trials through Ray Tune: TPE (seeded afresh per session, so a resumed search does not
    replay its random start) proposes, ASHA stops trials that trail at its rungs. With folds, a rung
    compares trials on the mean over their folds at the same epoch (the folds train in lockstep)."""
    with warnings.catch_warnings():  # multivariate TPE and the constant liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(found.trials), multivariate=True,
                                             constant_liar=True)
    searcher = TPESearch(space.params, metric=METRIC, mode="max", sampler=sampler, study_name=found.study_name,
                         storage=storage, search=settings.name, epochs=space.epochs)
    # Search trials evaluate validation only: the test split stays unseen until the retraining.
    study.tuner(settings, {"config": {**base, "evaluate_test": False}}, f"session-{datetime.now():%Y%m%d-%H%M%S}",
                settings.path, [log], metric=METRIC, mode="max", search_alg=searcher, num_samples=n,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=space.epochs, grace_period=space.grace_epochs,
                                        reduction_factor=space.reduction_factor, stop_last_trials=False),
                max_concurrent_trials=concurrent_trials(study.trial_resources(settings)),
                time_budget_s=time_budget_s or None).fit()
    requeue_interrupted(found)  # trials the time budget cut short
    if settings.mlflow:
        tracking.end_stopped_runs(settings.experiment, "mlflow.parentRunId", base["parent_run"])


def search_session(found: optuna.Study, storage, space: SearchSpace, settings: study.StudySettings,
                   options: SearchSettings, base: dict) -> None:
    """Run the trials the study still lacks (re-running interrupted ones first), noting the session."""
    interrupted = requeue_interrupted(found)
    if interrupted:
        print(f"[search] re-running interrupted trials {interrupted}", flush=True)
    target, done_before, started = options.trials or space.trials, len(finished(found)), datetime.now(timezone.utc)
    if target <= done_before:
        return
    print(f"[search] {done_before} of {target} trials finished: running {target - done_before} more", flush=True)
    log = SearchLog(lambda: note_session(found, started, done_before))
    run_trials(found, storage, space, settings, base, target - done_before, options.time_budget,
               options.sampler_seed, log)
    note_session(found, started, done_before)


def note_session(found: optuna.Study, started: datetime, done_before: int) -> None:
    """This session's entry in the study (its wall time, the trials it finished), rewritten as each
    trial ends: a session that is killed still counts its time up to its last finished trial."""
    entry = {"started": started.isoformat(timespec="seconds"), "trials_finished": len(finished(found)) - done_before,
             "search_seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1)}
    earlier = [s for s in found.user_attrs.get("sessions", []) if s["started"] != entry["started"]]
    found.set_user_attr("sessions", earlier + [entry])


def retrain(settings: study.StudySettings, label: str, config: dict, seeds, earlier: list[study.Trial],
            dataset: str) -> list[study.Trial]:
    """config trained and tested once per seed (a grid through study.run_study) on the seed's own
    split; continued if a previous session left it unfinished. A seed whose computation an earlier
    record (--reuse) holds on the same data is not trained again: the record stands in for it."""
    grid = [{**config, "seed": s, "name": f"{label}-s{s}"} for s in seeds]
    to_run, reused = study.reusable(grid, earlier, dataset)
    if reused:
        print(f"[search] {label}: seeds {', '.join(str(r.config['seed']) for r in reused)} from earlier records",
              flush=True)
    ran = []
    if to_run:
        runs = study.StudySettings(**{**vars(settings), "storage_path": settings.path,
                                      "name": f"retrain-{label}-s{'+'.join(str(c['seed']) for c in to_run)}"})
        results = study.run_study({"config": tune.grid_search(to_run)}, runs, resume=tune.Tuner.can_restore(runs.path))
        ran = study.outcomes(results)
    return sorted(reused + ran, key=lambda o: o.config["seed"])


def retrain_picks(found: optuna.Study, space: SearchSpace, settings: study.StudySettings, options: SearchSettings,
                  runtime: dict) -> dict[str, list[study.Trial]]:
    """The best configuration (and the baseline) retrained per seed; their portable records are kept
    in the search's trials.jsonl (and each in best.jsonl, baseline.jsonl), so `orestudy compare`
    can pair them with any other study's, e.g. two searches' picks (--contrast A/best.jsonl B/best.jsonl)."""
    best, retrained = best_trial(found), {}
    if best is None or not options.seeds:
        return retrained
    dataset = study.dataset_of(settings)
    earlier = study.read_records(*options.reuse)
    retrained[f"best ({trial_name(settings.name, best.number)})"] = retrain(
        settings, f"best{best.number:03d}", {**runtime, **space.config(best.params)}, options.seeds, earlier, dataset)
    if options.baseline:
        retrained["baseline (paper recipe)"] = retrain(settings, "baseline", {**runtime, **space.baseline_config()},
                                                       options.baseline_seeds or options.seeds, earlier, dataset)
    folder = Path(settings.output) / settings.name
    study.write_records(folder / "trials.jsonl",
                        [o.record(dataset) for runs in retrained.values() for o in runs if o.config])
    for role, runs in zip(("best", "baseline"), retrained.values()):  # one configuration a file: compare --contrast
        study.write_records(folder / f"{role}.jsonl", [o.record(dataset) for o in runs if o.config])
    return retrained


def log_search(parent: str, summary: dict, files: list[Path], space: SearchSpace, report: Path) -> None:
    """The search's MLflow run: its trials (trials/), its best trial (best/: validation, and the test
    accuracy of its retraining over the seeds; the trial as the tag orestudy.best), the baseline's
    retraining (baseline/), the best-vs-baseline effect (effects/), the report as its description."""
    metrics = {"trials/complete": summary["trials"]["complete"], "trials/pruned": summary["trials"]["pruned"],
               "trials/failed": summary["trials"]["failed"], "search/seconds": summary["search_seconds"]}
    tags = {}
    if summary["best"]:
        metrics["best/val_accuracy"] = summary["best"]["val_accuracy"]
        tags["orestudy.best"] = summary["best"]["trial"]
    for label, s in summary["retrained"].items():
        if s:
            key = label.split()[0]
            metrics.update({f"{key}/test_accuracy_mean": s["mean"], f"{key}/test_accuracy_std": s["std"]})
    metrics.update(tracking.effect_metrics(summary["best_vs_baseline"]))
    tracking.finish_parent_run(parent, [*files, space.path], {k: v for k, v in metrics.items() if not math.isnan(v)},
                               finished=True, note=report.read_text(), tags=tags)


def run_search(space: SearchSpace, settings: study.StudySettings, options: SearchSettings) -> dict:
    """Search (or continue searching) until the study has its trials or the time budget is spent, then
    retrain the best and the baseline over the seeds, write the report and log it to MLflow. Call
    study.connect() first."""
    if options.folds:
        space.folds = options.folds
    check_weights(space)
    folder = Path(settings.output) / settings.name
    found, storage = open_study(space, folder, settings.name, options.resume)
    parent = tracking.start_parent_run(settings.output, settings.experiment, settings.path, settings.name, {
        "space": space.name, "space_file": str(space.path), "epochs": space.epochs, "folds": space.folds,
        "grace_epochs": space.grace_epochs, "reduction_factor": space.reduction_factor,
        "sampler_seed": options.sampler_seed, **{f"fixed.{k}": v for k, v in space.fixed.items()}},
        options.resume) if settings.mlflow else ""
    if parent:  # a killed session's runs
        tracking.end_stopped_runs(settings.experiment, "mlflow.parentRunId", parent)
    runtime = {"data": settings.data, "cache": settings.cache, "curation": settings.curation,
               "device": settings.device, "output": str(folder),
               "mlflow": settings.mlflow, "experiment": settings.experiment, "parent_run": parent}
    trial_fields = {"folds": space.folds} if space.folds > 1 else {}  # fold -1: every fold, in lockstep
    with tracking.ended_on_error(parent):  # Ctrl-C ends the search's run and its trials' KILLED
        search_session(found, storage, space, settings, options,
                       {**space.fixed, "epochs": space.epochs, **trial_fields, **runtime})
        retrained = retrain_picks(found, space, settings, options, runtime)
        summary, files = search_report.write_report(found, space, settings.name, folder, retrained)
        if parent:
            log_search(parent, summary, files, space, folder / "report.md")
    print(f"[search] report: {folder / 'report.md'}", flush=True)
    return summary
