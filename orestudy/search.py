"""Searches: Optuna's TPE proposes configurations, Ray Tune trains them as trials (ASHA stops the weak
ones early), both on validation accuracy alone; then the best configuration is retrained over several
seeds and tested once per seed, beside the paper's recipe on the same seeds.

    python -m orestudy.search se_ablation_cpu --trials 30 --time-budget 6h
    python -m orestudy.search se_ablation_cpu --resume                 # continue an interrupted search
    python -m orestudy.search se_ablation_cpu --resume --trials 40     # or extend a finished one

A search space is a YAML file in search_spaces/ (or any path): `params` searched, `fixed` TrainConfig
values every trial shares, `budget` (epochs per trial, ASHA's grace epochs and reduction factor, the
number of trials) and `baseline`, the recipe the winner is compared with. A search keeps everything in
<output>/<name>/: the Optuna study (optuna.db: what --resume continues from), one run folder per trial
and per retraining run, and report.md with its figures. In MLflow it is one parent run with a child
run per trial. Search trials never evaluate the test split; only the retraining runs do.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import numpy as np
import optuna
import pandas as pd
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import models, reports, stats, study, tracking
from .config import REGIMES, REPO_ROOT, STUDY, WHERE, TrainConfig, default_data_root, defaults, fields_with_role

SPACES_DIR = REPO_ROOT / "search_spaces"
METRIC = study.METRIC  # the objective, and ASHA's signal: the best validation accuracy so far
PARAM_KEYS = {"int": {"low", "high"}, "float": {"low", "high"}, "loguniform": {"low", "high"},
              "categorical": {"choices"}}
SECTIONS = {"description", "params", "fixed", "budget", "baseline"}
BUDGET_KEYS = {"epochs", "grace_epochs", "reduction_factor", "trials"}
# Where the data and results are and how trials run: set by the command line, never by a space.
RUNTIME_FIELDS = set(fields_with_role(WHERE, STUDY))
DEFAULTS = defaults()
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
YAML_FLOAT_HINT = " (YAML reads 1e-4 as text: write 1.0e-4)"


# ---------------------------------------------------------------------------------------------------
# Search spaces: YAML files, checked before anything runs

class SearchSpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass
class SearchSpace:
    name: str
    path: Path
    raw: dict                     # the file's content, kept in the study so a resume can check it
    params: dict[str, optuna.distributions.BaseDistribution]
    fixed: dict
    baseline: dict
    epochs: int
    grace_epochs: int = 1
    reduction_factor: int = 3
    trials: int = 30
    description: str = ""

    def config(self, values: dict) -> dict:
        """TrainConfig fields of a trial with these searched values."""
        return {**self.fixed, "epochs": self.epochs, **values}

    def baseline_config(self) -> dict:
        return {**self.fixed, **self.baseline}


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_path(name: str) -> Path:
    """A name in search_spaces/, or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise SearchSpaceError(f"{path}: no such search-space file")
        return path
    path = SPACES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SearchSpaceError(f"no search space {name!r} ({path} is missing); available: {', '.join(available_spaces())}")
    return path


def value_error(values: dict) -> str | None:
    """Why these TrainConfig values are unusable (unknown field, wrong type, rejected), or None."""
    for key, value in values.items():
        if key not in DEFAULTS:
            return f"{key!r} is not a TrainConfig field"
        want = type(DEFAULTS[key])
        number = want is float and isinstance(value, int) and not isinstance(value, bool)
        if not (isinstance(value, want) or number) or (want is int and isinstance(value, bool)):
            return f"{key} must be {want.__name__}, got {value!r}{YAML_FLOAT_HINT if want is float else ''}"
    try:
        TrainConfig.from_dict(values)
    except ValueError as err:
        return str(err)
    return None


def load_space(name: str) -> SearchSpace:
    """Read and check a search space; every error names the file and the key."""
    path = space_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"{path}: not valid YAML: {err}") from err

    def fail(key: str, message: str):
        raise SearchSpaceError(f"{path}: {key}: {message}")

    def mapping(key: str, value, required: bool = False) -> dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict) or (required and not value):
            fail(key, "missing or empty: expected a mapping" if required else "expected a mapping")
        return value

    raw = mapping("(top level)", raw, required=True)
    if set(raw) - SECTIONS:
        fail(", ".join(sorted(set(raw) - SECTIONS)), f"unknown section; expected {sorted(SECTIONS)}")
    fixed = mapping("fixed", raw.get("fixed"))
    baseline = mapping("baseline", raw.get("baseline"))
    budget = mapping("budget", raw.get("budget"), required=True)
    spec = mapping("params", raw.get("params"), required=True)

    if set(budget) - BUDGET_KEYS:
        fail(f"budget.{sorted(set(budget) - BUDGET_KEYS)[0]}", f"unknown key; expected {sorted(BUDGET_KEYS)}")
    for key in BUDGET_KEYS:
        if key in budget and (not isinstance(budget[key], int) or isinstance(budget[key], bool) or budget[key] < 1):
            fail(f"budget.{key}", f"must be a positive integer, got {budget[key]!r}")
    if "epochs" not in budget:
        fail("budget.epochs", "required: the epochs a trial that is not stopped early trains")
    epochs = budget["epochs"]
    grace, factor = budget.get("grace_epochs", 1), budget.get("reduction_factor", 3)
    if grace > epochs:
        fail("budget.grace_epochs", f"{grace} is more than budget.epochs ({epochs})")
    if factor < 2:
        fail("budget.reduction_factor", "must be at least 2")

    for section, values in (("fixed", fixed), ("baseline", baseline)):
        for key in values:
            if key in RUNTIME_FIELDS:
                fail(f"{section}.{key}", "is set from the command line, not by a search space")
            if section == "fixed" and key in ("epochs", *spec):
                fail(f"fixed.{key}", "is searched or set by budget, so it cannot be fixed")
        problem = value_error({**fixed, "epochs": epochs, **values})
        if problem:
            fail(section, problem)

    params = {}
    for key, p in spec.items():
        where = f"params.{key}"
        if key in RUNTIME_FIELDS or key in ("epochs", "seed"):
            fail(where, "cannot be searched (epochs is budget.epochs; seed is the split, and searching it "
                        "would pick a lucky split; the rest are set from the command line)")
        p = mapping(where, p, required=True)
        kind = p.get("type")
        if kind not in PARAM_KEYS:
            fail(f"{where}.type", f"must be one of {sorted(PARAM_KEYS)}, got {kind!r}")
        keys = set(p) - {"type"}
        if keys != PARAM_KEYS[kind]:
            fail(where, f"a {kind} parameter takes exactly {sorted(PARAM_KEYS[kind])}, got {sorted(keys)}")
        if kind == "categorical":
            choices = p["choices"]
            if not isinstance(choices, list) or not choices or any(isinstance(c, (dict, list)) for c in choices):
                fail(f"{where}.choices", "expected a non-empty list of plain values")
            examples = choices
            params[key] = optuna.distributions.CategoricalDistribution(choices)
        else:
            low, high = p["low"], p["high"]
            number = int if kind == "int" else (int, float)
            if any(not isinstance(v, number) or isinstance(v, bool) for v in (low, high)):
                fail(where, f"low and high must be {'integers' if kind == 'int' else 'numbers'}, got {low!r}, {high!r}"
                            f"{YAML_FLOAT_HINT if kind != 'int' else ''}")
            if low >= high:
                fail(where, f"low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                fail(f"{where}.low", "must be positive on a log scale")
            examples = [low, high]
            params[key] = optuna.distributions.IntDistribution(low, high) if kind == "int" else \
                optuna.distributions.FloatDistribution(float(low), float(high), log=kind == "loguniform")
        for value in examples:
            problem = value_error({**fixed, "epochs": epochs, key: value})
            if problem:
                fail(where, problem)
    if raw.get("description") is not None and not isinstance(raw["description"], str):
        fail("description", "expected text")
    return SearchSpace(path.stem, path, raw, params, fixed, baseline, epochs, grace, factor,
                       budget.get("trials", 30), raw.get("description") or "")


def check_weights(space: SearchSpace) -> None:
    """A backbone whose ImageNet weights are not here would fail every trial that draws it: refused
    before the search starts (study.train_trial skips such runs; a search would only waste trials)."""
    def values(key: str, config: dict, searched: bool) -> set:
        d = space.params.get(key) if searched else None
        return set(d.choices) if d is not None else {config.get(key, DEFAULTS[key])}

    for where, config, searched in (("params", space.config({}), True), ("baseline", space.baseline_config(), False)):
        if not any(REGIMES[r]["weights"] == "imagenet" for r in values("regime", config, searched)):
            continue
        for backbone in sorted(values("backbone", config, searched)):
            try:
                models.create_model(backbone, 2, "imagenet")
            except models.WeightsUnavailable as err:
                raise SearchSpaceError(f"{space.path}: {where}: backbone {backbone}: {err}") from err


# ---------------------------------------------------------------------------------------------------
# The Optuna study: the search's memory

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
    elif found.user_attrs.get("space") != space.raw:
        raise SearchSpaceError(f"{space.path} has changed since search {name!r} began; its trials are not "
                               f"comparable with new ones: start another search (--name)")
    return found, storage


def requeue_interrupted(found: optuna.Study) -> list[int]:
    """Trials left running by a search that was killed or ran out of time are marked failed, and their
    configurations are asked first, so an interruption costs their progress, not their place."""
    stale = [t for t in found.trials if t.state == TrialState.RUNNING]
    for t in stale:
        found.tell(t.number, state=TrialState.FAIL)
        found.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


def finished(found: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in found.trials if t.state in FINISHED]


def best_trial(found: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial that ran all its epochs with the best validation accuracy; ties (one validation image
    is 0.6 points) go to the lower validation loss at that epoch."""
    complete = [t for t in found.trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.user_attrs.get("best_val_loss", math.inf)), default=None)


def trial_name(search: str, number: int) -> str:
    return f"{search}-{number:03d}"


class TPESearch(OptunaSearch):
    """Ray's OptunaSearch with three changes, so the study reads right afterwards: its parameters are
    TrainConfig fields, given to a trial as params["config"] (study.train_trial's layout); a trial is
    named after its Optuna number (run folder, MLflow run and study line up); and a trial ASHA stopped
    before its last epoch is told to Optuna as PRUNED, not as a finished trial scoring its early value."""

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
        for key in ("best_epoch", "best_val_loss"):
            ot_trial.set_user_attr(key, result[key])
        ot_trial.set_user_attr("epochs_run", result["epoch"])
        if error or result["epoch"] >= self.epochs:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial.report(result[self.metric], int(result["epoch"]))  # the result that made ASHA stop it
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


# ---------------------------------------------------------------------------------------------------
# Trials

end_stopped_runs = tracking.end_stopped_runs


class SearchLog(tune.Callback):
    """One line per trial as it ends, for people (and tests) following a long search."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if METRIC in r:
            print(f"[search] {study.run_name(trial)}: best val accuracy {r[METRIC]:.4f} (epoch {r['best_epoch']}) "
                  f"after {r['epoch']} epochs", flush=True)
        config = TrainConfig.from_dict(trial.config["config"])
        if config.mlflow:  # a trial that ran all its epochs has ended its run; one ASHA stopped has not
            end_stopped_runs(config.experiment, "run_dir", str((Path(config.output) / config.run_name()).resolve()))

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[search] {study.run_name(trial)} failed after {trial.num_failures} attempts", flush=True)


def concurrent_trials(resources: dict[str, float]) -> int:
    """How many trials of these resources the cluster runs at once: TPE proposes no further ahead of
    the results it learns from."""
    total = ray.cluster_resources()
    n = total.get("CPU", 0) // resources["cpu"]
    if resources.get("gpu"):
        n = min(n, total.get("GPU", 0) // resources["gpu"])
    return max(1, int(n))


@dataclass
class SearchSettings:
    trials: int = 0                 # finished trials wanted in all; 0: the space's budget.trials
    time_budget_s: float = 0.0      # stop searching after this long (0: no limit); retraining follows
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)  # the best is retrained and tested once per seed; () skips it
    baseline: bool = True           # retrain the space's baseline beside the best
    baseline_seeds: tuple[int, ...] = ()  # its seeds; (): the best's (a full fine-tuning recipe costs more)
    resume: bool = False
    sampler_seed: int = 0
    data: str = field(default_factory=lambda: str(default_data_root()))
    cache: str = DEFAULTS["cache"]
    device: str = "auto"


def run_trials(found: optuna.Study, storage, space: SearchSpace, settings: study.StudySettings,
               base: dict, n: int, time_budget_s: float, sampler_seed: int) -> None:
    """n more trials through Ray Tune: TPE (seeded afresh per session, so a resumed search does not
    replay its random start) proposes, ASHA stops trials that trail at its rungs."""
    with warnings.catch_warnings():  # multivariate TPE and the constant liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(found.trials), multivariate=True,
                                             constant_liar=True)
    searcher = TPESearch(space.params, metric=METRIC, mode="max",
                         sampler=sampler, study_name=found.study_name, storage=storage,
                         search=settings.name, epochs=space.epochs)
    # Search trials evaluate validation only: the test split stays unseen until the retraining.
    study.tuner(settings, {"config": {**base, "evaluate_test": False}}, f"session-{datetime.now():%Y%m%d-%H%M%S}",
                settings.path, [SearchLog()], metric=METRIC, mode="max", search_alg=searcher, num_samples=n,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=space.epochs, grace_period=space.grace_epochs,
                                        reduction_factor=space.reduction_factor, stop_last_trials=False),
                max_concurrent_trials=concurrent_trials(study.trial_resources(settings)),
                time_budget_s=time_budget_s or None).fit()
    requeue_interrupted(found)  # trials the time budget cut short
    if settings.mlflow:
        end_stopped_runs(settings.experiment, "mlflow.parentRunId", base["parent_run"])


def retrain(settings: study.StudySettings, label: str, config: dict, seeds) -> list[dict]:
    """config trained and tested once per seed (a grid through study.run_study); continued if a
    previous session left it unfinished."""
    runs = study.StudySettings(**{**vars(settings), "storage_path": settings.path,
                                  "name": f"retrain-{label}-s{'+'.join(map(str, seeds))}"})
    grid = [{**config, "seed": s, "name": f"{label}-s{s}"} for s in seeds]
    results = study.run_study({"config": tune.grid_search(grid)}, runs, resume=tune.Tuner.can_restore(runs.path))
    return sorted(study.outcomes(results), key=lambda o: o["config"]["seed"])


# ---------------------------------------------------------------------------------------------------
# The report

def importances(found: optuna.Study) -> dict[str, float]:
    """fANOVA importance of each searched parameter for the objective, over the trials that ran all
    their epochs (seeded, so a report is reproducible); empty with fewer than two."""
    complete = [t for t in found.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    weights = optuna.importance.get_param_importances(found, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in weights.items()}


def search_figures(found: optuna.Study, folder: Path, with_importance: bool) -> list[Path]:
    """Optuna's importance, parallel-coordinate and slice plots (matplotlib), as PNG files."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    target = "best validation accuracy"
    figures = {"parallel_coordinate.png": lambda s: plots.plot_parallel_coordinate(s, target_name=target),
               "slice.png": lambda s: plots.plot_slice(s, target_name=target)}
    if with_importance:
        figures["importance.png"] = lambda s: plots.plot_param_importances(
            s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name=target)
    written = []
    # Optuna's plots switch matplotlib to its ggplot style: kept to these figures only. Its warnings
    # (experimental API, a parameter with one value so far) say nothing to the reader of a report.
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        for file, plot in figures.items():
            fig = np.ravel(plot(found))[0].figure
            fig.savefig(folder / file, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(folder / file)
    return written


def trials_frame(found: optuna.Study, search: str) -> pd.DataFrame:
    rows = [{"trial": trial_name(search, t.number), "state": t.state.name.lower(), "val accuracy": t.value,
             "best epoch": t.user_attrs.get("best_epoch"), "epochs run": t.user_attrs.get("epochs_run"), **t.params}
            for t in found.trials if t.state in FINISHED]
    frame = pd.DataFrame(rows)
    return frame.sort_values("val accuracy", ascending=False, kind="stable") if rows else frame


def by_value(frame: pd.DataFrame, space: SearchSpace) -> dict[str, pd.DataFrame]:
    """Per parameter, the completed trials' validation accuracy by value (numbers: by quartile)."""
    complete = frame[frame["state"] == "complete"] if len(frame) else frame
    tables = {}
    for p, distribution in space.params.items():
        if len(complete) < 2:
            break
        values = complete[p]
        if not isinstance(distribution, optuna.distributions.CategoricalDistribution) and values.nunique() > 4:
            values = pd.qcut(values, 4, duplicates="drop").astype(str).rename(f"{p} (quartile)")
        tables[p] = complete.groupby(values, observed=True)["val accuracy"].agg(["count", "mean", "max"]).reset_index()
    return tables


def summarise(outcomes: list[dict]) -> dict | None:
    ok = [o for o in outcomes if o["status"] == "ok"]
    if not ok:
        return None
    summary = stats.accuracy_summary([o["metrics"]["accuracy"] for o in ok], [o["metrics"]["n_test"] for o in ok])
    summary["per_seed"] = {o["config"]["seed"]: o["metrics"]["accuracy"] for o in ok}
    summary["macro_f1_mean"] = float(np.mean([o["metrics"]["macro_f1"] for o in ok]))
    summary["not_ok"] = {o["config"]["seed"]: o["status"] for o in outcomes if o["status"] != "ok"}
    summary["wall_seconds"] = float(sum(o["metrics"]["wall_seconds"] for o in ok))
    return summary


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_report(found: optuna.Study, space: SearchSpace, name: str, folder: Path,
                 retrained: dict[str, list[dict]]) -> tuple[dict, list[Path]]:
    """report.md and report.json in folder, with the figures: search on validation, then the retraining
    runs' test results; no search trial has a test result to show."""
    trials = trials_frame(found, name)
    best = best_trial(found)
    states = [t.state for t in found.trials]
    sessions = found.user_attrs.get("sessions", [])
    weights = importances(found)
    files = search_figures(found, folder, bool(weights)) if best is not None else []
    summaries = {label: summarise(outcomes) for label, outcomes in retrained.items()}
    if retrained:
        reports.seed_comparison_figure(folder / "retrained.png", {
            label: s["per_seed"] for label, s in summaries.items() if s})
        files.append(folder / "retrained.png")
    summary = {
        "search": name, "space": str(space.path), "objective": f"{METRIC} (validation)",
        "trials": {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL)},
        "search_seconds": sum(s["search_seconds"] for s in sessions), "sessions": sessions,
        "best": None if best is None else {"trial": trial_name(name, best.number), "val_accuracy": best.value,
                                            "best_epoch": best.user_attrs.get("best_epoch"),
                                            "config": space.config(best.params)},
        "baseline": space.baseline_config(), "importances": weights,
        "retrained": {label: s for label, s in summaries.items()},
    }
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str))

    hours = summary["search_seconds"] / 3600
    lines = [f"# Search `{name}`: {space.description}", "",
             f"Space `{space.path}`; objective: best validation accuracy of a trial (validation split of seed "
             f"{space.config({}).get('seed', DEFAULTS['seed'])}). No search trial evaluated the test split.", "",
             f"- trials: {summary['trials']['complete']} ran all {space.epochs} epochs, "
             f"{summary['trials']['pruned']} were stopped early by ASHA, {summary['trials']['failed']} failed "
             f"or were interrupted (and re-run)",
             f"- search wall time: {hours:.2f} h over {len(sessions)} session(s)", ""]
    if best is None:
        lines.append("No trial has run all its epochs yet.")
    else:
        config, base = space.config(best.params), space.baseline_config()
        keys = sorted(set(space.params) | {k for k in set(config) | set(base) if config.get(k) != base.get(k)})
        lines += [f"## Best configuration: {trial_name(name, best.number)}, validation accuracy {best.value:.4f}",
                  "", reports.markdown_table(pd.DataFrame(
                      [{"field": k, "best": fmt(config.get(k, DEFAULTS[k])),
                        "baseline (paper recipe)": fmt(base.get(k, DEFAULTS[k]))} for k in keys])), ""]
    if summaries:
        seeds = sorted({s for v in summaries.values() if v for s in v["per_seed"]})
        rows = []
        for label, s in summaries.items():
            if s:
                rows.append({"": label, **{f"seed {k}": fmt(s["per_seed"].get(k)) for k in seeds},
                             "mean ± std": f"{s['mean']:.4f} ± {fmt(s['std'], 2)}",
                             "95 % CI": f"{s['ci_low']:.3f}-{s['ci_high']:.3f} ({s['ci_method']})",
                             "macro-F1": f"{s['macro_f1_mean']:.4f}"})
        hours = sum(s["wall_seconds"] for s in summaries.values() if s) / 3600
        lines += ["## Retrained and tested once per seed (seed = split + training seed)", "",
                  reports.markdown_table(pd.DataFrame(rows)), "", "![retrained](retrained.png)", ""]
        ran = [set(s["per_seed"]) for s in summaries.values() if s]
        common = sorted(set.intersection(*ran)) if len(ran) > 1 else []
        if common and any(r != set(common) for r in ran):  # compare like with like, split for split
            means = [f"{label} {np.mean([s['per_seed'][k] for k in common]):.4f}"
                     for label, s in summaries.items() if s]
            lines += [f"On the seeds both ran ({', '.join(map(str, common))}): {' vs '.join(means)}.", ""]
        lines += [f"Retraining: {hours:.2f} h of runs in all.", ""]
        for label, s in summaries.items():
            if s is None or s["not_ok"]:
                lines.append(f"- {label}: {(s or {}).get('not_ok') or 'no run finished'}")
    if weights:
        lines += ["## What mattered: fANOVA importance over the trials that ran all epochs", "",
                  reports.markdown_table(pd.DataFrame({"parameter": list(weights),
                                                       "importance": [f"{v:.3f}" for v in weights.values()]})),
                  "", "![importance](importance.png)", ""]
    for p, table in by_value(trials, space).items():
        lines += [f"### {p}: validation accuracy of completed trials by value", "",
                  reports.markdown_table(table.round(4)), ""]
    if best is not None:
        lines += ["## Trials, best first", "", reports.markdown_table(trials.map(fmt)), "",
                  "![parallel coordinates](parallel_coordinate.png)", "", "![slice](slice.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return summary, [folder / "report.md", folder / "report.json", *files]


# ---------------------------------------------------------------------------------------------------
# The whole search

def run_search(space: SearchSpace, settings: study.StudySettings, options: SearchSettings) -> dict:
    """Search (or continue searching) until the study has its trials or the time budget is spent, then
    retrain the best and the baseline over the seeds, write the report and log it to MLflow. Call
    study.connect() first."""
    check_weights(space)
    folder = Path(settings.output) / settings.name
    found, storage = open_study(space, folder, settings.name, options.resume)
    parent = tracking.start_parent_run(settings.output, settings.experiment, settings.path, settings.name, {
        "space": space.name, "space_file": str(space.path), "epochs": space.epochs,
        "grace_epochs": space.grace_epochs, "reduction_factor": space.reduction_factor,
        "sampler_seed": options.sampler_seed, **{f"fixed.{k}": v for k, v in space.fixed.items()}},
        options.resume) if settings.mlflow else ""
    interrupted = requeue_interrupted(found)
    if parent:  # a killed session's runs
        end_stopped_runs(settings.experiment, "mlflow.parentRunId", parent)
    if interrupted:
        print(f"[search] re-running interrupted trials {interrupted}", flush=True)
    target = options.trials or space.trials
    done_before = len(finished(found))
    missing = target - done_before
    started = time.time()
    base = {**space.fixed, "epochs": space.epochs, "data": options.data, "cache": options.cache,
            "device": options.device, "output": str(folder), "mlflow": settings.mlflow,
            "experiment": settings.experiment, "parent_run": parent}
    if missing > 0:
        print(f"[search] {done_before} of {target} trials finished: running {missing} more", flush=True)
        run_trials(found, storage, space, settings, base, missing, options.time_budget_s, options.sampler_seed)
        found.set_user_attr("sessions", found.user_attrs.get("sessions", []) + [{
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "trials_finished": len(finished(found)) - done_before, "search_seconds": round(time.time() - started, 1)}])

    best = best_trial(found)
    retrained = {}
    if best is not None and options.seeds:
        runtime = {k: v for k, v in base.items() if k not in space.fixed and k != "epochs"}
        retrained[f"best ({trial_name(settings.name, best.number)})"] = retrain(
            settings, f"best{best.number:03d}", {**runtime, **space.config(best.params)}, options.seeds)
        if options.baseline:
            retrained["baseline (paper recipe)"] = retrain(
                settings, "baseline", {**runtime, **space.baseline_config()}, options.baseline_seeds or options.seeds)
    summary, files = write_report(found, space, settings.name, folder, retrained)
    if settings.mlflow:
        metrics = {"trials_complete": summary["trials"]["complete"], "trials_pruned": summary["trials"]["pruned"],
                   "search_seconds": summary["search_seconds"]}
        if summary["best"]:
            metrics["best_val_accuracy"] = summary["best"]["val_accuracy"]
        for label, s in summary["retrained"].items():
            if s:
                key = label.split()[0]
                metrics.update({f"{key}_test_accuracy_mean": s["mean"], f"{key}_test_accuracy_std": s["std"]})
        tracking.finish_parent_run(parent, [*files, space.path], {k: v for k, v in metrics.items()
                                                                 if not math.isnan(v)}, finished=True)
    print(f"[search] report: {folder / 'report.md'}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------
# Command line

def duration(text: str) -> float:
    """Seconds from '5400', '90m', '6h' or '1h30m'."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 5400, 90m, 6h, 1h30m)")
    h, m, s = (float(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m orestudy.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", help=f"a search space in search_spaces/ ({', '.join(available_spaces())}) "
                                      "or a YAML file")
    parser.add_argument("--name", default="", help="the search's name (default: the space's): its folder in "
                                                   "--output and its MLflow run")
    parser.add_argument("--trials", type=int, default=0,
                        help="finished trials the search should have in all (default: the space's budget.trials); "
                             "a resumed search runs only the missing ones")
    parser.add_argument("--time-budget", type=duration, default=0.0, metavar="DURATION",
                        help="stop searching after this long (5400, 90m, 6h): running trials are cut, and re-run "
                             "first by --resume; the retraining follows")
    parser.add_argument("--resume", action="store_true", help="continue the search with this name")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5],
                        help="retrain the best configuration once per seed (split and training seed) and test "
                             "it; none: no retraining (default: 1 2 3 4 5)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="retrain the space's baseline (the paper recipe) beside the best")
    parser.add_argument("--baseline-seeds", type=int, nargs="+", default=[],
                        help="the baseline's seeds, when fewer than --seeds are affordable (default: the same)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="TPE's seed")
    parser.add_argument("--data", default=str(default_data_root()), help="the data set folder")
    parser.add_argument("--output", default="runs", help="searches live in OUTPUT/NAME; MLflow in OUTPUT/mlflow.db")
    parser.add_argument("--storage-path", default="", help="Ray Tune's results (default: OUTPUT/ray_results; on a "
                                                           "cluster a folder every node mounts, or a URI)")
    parser.add_argument("--cache", default=DEFAULTS["cache"], help="feature cache folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experiment", default="orestudy", help="MLflow experiment")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--address", default=None, help="a Ray cluster to join ('auto': the one running here)")
    parser.add_argument("--cpus-per-trial", type=int, default=0, help="0: a whole node, or its share per GPU")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="0: one GPU where nodes have them")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a trial that raised")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        parser.error(f"data folder not found: {args.data} (--data or ORESTUDY_DATA)")
    try:
        space = load_space(args.space)
    except SearchSpaceError as err:
        parser.error(str(err))
    settings = study.StudySettings(name=args.name or space.name, output=args.output, storage_path=args.storage_path,
                                   experiment=args.experiment, mlflow=args.mlflow, max_failures=args.max_failures,
                                   cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    options = SearchSettings(trials=args.trials, time_budget_s=args.time_budget, seeds=tuple(args.seeds),
                             baseline=args.baseline, baseline_seeds=tuple(args.baseline_seeds),
                             resume=args.resume, sampler_seed=args.sampler_seed,
                             data=str(Path(args.data).resolve()),
                             cache=str(Path(args.cache).resolve()) if args.cache else "",
                             device=args.device)
    # Ctrl-C stops the whole search, not just Tune's part of it (after which the retraining would
    # start); the trials it cuts short stay "running" in the study, and --resume runs them first.
    try:
        with mock.patch.dict(os.environ, {"TUNE_DISABLE_SIGINT_HANDLER": "1"}), study.connected(args.address):
            return run_search(space, settings, options)
    except (FileExistsError, FileNotFoundError, SearchSpaceError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
