"""A search's report: the search on validation (best configuration, fANOVA importances, accuracy by
value, Optuna's plots, each trial's fold spread), then the retraining runs' test results, and the
paired effect of the best configuration against the baseline on the seeds both ran."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from . import effects, stats
from .. import environment
from ..run import reports
from ..config import defaults
from .search_space import SearchSpace

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
METRIC_NAME = "best validation accuracy"


def trial_name(search: str, number: int) -> str:
    return f"{search}-{number:03d}"


def finished(found: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in found.trials if t.state in FINISHED]


def best_trial(found: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial that ran all its epochs with the best validation accuracy; ties (one validation image
    is 0.6 points) go to the lower validation loss at that epoch."""
    complete = [t for t in found.trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.user_attrs.get("best_val_loss", math.inf)), default=None)


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

    figures = {"parallel_coordinate.png": lambda s: plots.plot_parallel_coordinate(s, target_name=METRIC_NAME),
               "slice.png": lambda s: plots.plot_slice(s, target_name=METRIC_NAME)}
    if with_importance:
        figures["importance.png"] = lambda s: plots.plot_param_importances(
            s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name=METRIC_NAME)
    written = []
    # Optuna's plots switch matplotlib to its ggplot style: kept to these figures only. Its warnings
    # (experimental API, a parameter with one value so far) say nothing to the reader of a report.
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        for file, plot in figures.items():
            fig = np.ravel(plot(found))[0].figure
            reports.legible(fig)
            fig.savefig(folder / file, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(folder / file)
    return written


def fold_spread(trial: optuna.trial.FrozenTrial) -> str:
    """The folds' best validation accuracies of a cross-validated trial: how noisy its ranking is."""
    folds = trial.user_attrs.get("fold_best_val_accuracy")
    return f"{min(folds):.3f}-{max(folds):.3f}" if folds else ""


def trials_frame(found: optuna.Study, search: str) -> pd.DataFrame:
    rows = [{"trial": trial_name(search, t.number), "state": t.state.name.lower(), "val accuracy": t.value,
             "fold range": fold_spread(t), "best epoch": t.user_attrs.get("best_epoch"),
             "epochs run": t.user_attrs.get("epochs_run"), **t.params}
            for t in found.trials if t.state in FINISHED]
    frame = pd.DataFrame(rows)
    if rows and not frame["fold range"].any():
        frame = frame.drop(columns="fold range")
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


def summarise(outcomes: list) -> dict | None:
    ok = [o for o in outcomes if o.status == "ok"]
    if not ok:
        return None
    summary = stats.accuracy_summary([o.metrics["accuracy"] for o in ok], [o.metrics["n_test"] for o in ok])
    summary["per_seed"] = {o.config["seed"]: o.metrics["accuracy"] for o in ok}
    summary["macro_f1_mean"] = float(np.mean([o.metrics["macro_f1"] for o in ok]))
    summary["not_ok"] = {o.config["seed"]: o.status for o in outcomes if o.status != "ok"}
    summary["wall_seconds"] = float(sum(o.metrics["wall_seconds"] for o in ok))
    summary["reused"] = sum(o.reused for o in ok)  # seeds read from earlier records (--reuse), not run here
    return summary


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def best_lines(found: optuna.Study, space: SearchSpace, name: str) -> list[str]:
    best = best_trial(found)
    if best is None:
        return ["No trial has run all its epochs yet."]
    config, base, every = space.config(best.params), space.baseline_config(), defaults()
    keys = sorted(set(space.params) | {k for k in set(config) | set(base) if config.get(k) != base.get(k)})
    spread = f" (folds {fold_spread(best)})" if fold_spread(best) else ""
    return [f"## Best configuration: {trial_name(name, best.number)}, validation accuracy {best.value:.4f}{spread}",
            "", reports.markdown_table(pd.DataFrame(
                [{"field": k, "best": fmt(config.get(k, every[k])),
                  "baseline (paper recipe)": fmt(base.get(k, every[k]))} for k in keys])), ""]


def retrained_lines(summaries: dict[str, dict | None], contrast: list[dict]) -> list[str]:
    """The retrained configurations' test accuracy per seed, and best - baseline, paired by seed."""
    seeds = sorted({s for v in summaries.values() if v for s in v["per_seed"]})
    rows = [{"": label, **{f"seed {k}": fmt(s["per_seed"].get(k)) for k in seeds},
             "mean ± std": f"{s['mean']:.4f} ± {fmt(s['std'], 2)}",
             "95 % CI": f"{s['ci_low']:.3f}-{s['ci_high']:.3f} ({s['ci_method']})",
             "macro-F1": f"{s['macro_f1_mean']:.4f}"} for label, s in summaries.items() if s]
    lines = ["## Retrained and tested once per seed (seed = split + training seed)", "",
             reports.markdown_table(pd.DataFrame(rows)), "", "![retrained](retrained.png)", ""]
    ran = [set(s["per_seed"]) for s in summaries.values() if s]
    common = sorted(set.intersection(*ran)) if len(ran) > 1 else []
    if common and any(r != set(common) for r in ran):  # compare like with like, split for split
        means = [f"{label} {np.mean([s['per_seed'][k] for k in common]):.4f}" for label, s in summaries.items() if s]
        lines += [f"On the seeds both ran ({', '.join(map(str, common))}): {' vs '.join(means)}.", ""]
    if contrast:
        lines += ["### Best against the baseline, paired by seed", "", effects.markdown(contrast), ""]
    spent = [f"{label} {s['wall_seconds'] / 3600:.2f} h" + (f" ({s['reused']} of its seeds read from earlier records, "
                                                            "not run again)" if s["reused"] else "")
             for label, s in summaries.items() if s]
    lines += [f"Retraining, the sum of the runs' own wall times: {'; '.join(spent)}.", ""]
    return lines + [f"- {label}: {(s or {}).get('not_ok') or 'no run finished'}"
                    for label, s in summaries.items() if s is None or s["not_ok"]]


def write_report(found: optuna.Study, space: SearchSpace, name: str, folder: Path,
                 retrained: dict[str, list]) -> tuple[dict, list[Path]]:
    """report.md and report.json in folder, with the figures: search on validation, then the retraining
    runs' test results; no search trial has a test result to show."""
    trials, best, weights = trials_frame(found, name), best_trial(found), importances(found)
    states, sessions = [t.state for t in found.trials], found.user_attrs.get("sessions", [])
    files = search_figures(found, folder, bool(weights)) if best is not None else []
    summaries = {label: summarise(outcomes) for label, outcomes in retrained.items()}
    if retrained:
        reports.seed_comparison_figure(folder / "retrained.png", {l: s["per_seed"] for l, s in summaries.items() if s})
        files.append(folder / "retrained.png")
    ok = [[o for o in outcomes if o.status == "ok"] for outcomes in retrained.values()]
    contrast = effects.effects([], pairs=[(ok[1], ok[0], "search best vs baseline")]) if len(ok) == 2 and all(ok) else []
    space_file = environment.from_repo(space.path)
    summary = {
        "search": name, "space": space_file, "objective": f"best validation accuracy, mean over {space.folds} fold(s)",
        "trials": {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL)},
        "search_seconds": sum(s["search_seconds"] for s in sessions), "sessions": sessions,
        "best": None if best is None else {"trial": trial_name(name, best.number), "val_accuracy": best.value,
                                            "best_epoch": best.user_attrs.get("best_epoch"),
                                            "fold_best_val_accuracy": best.user_attrs.get("fold_best_val_accuracy"),
                                            "config": space.config(best.params)},
        "baseline": space.baseline_config(), "importances": weights, "retrained": summaries,
        "best_vs_baseline": contrast}
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    objective = ("best validation accuracy of a trial" if space.folds == 1 else
                 f"mean over {space.folds} grouped, stratified folds of the non-test images of each fold's best "
                 "validation accuracy")
    lines = [f"# Search `{name}`: {space.description}", "",
             f"Space `{space_file}`; objective: {objective} (seed {space.config({}).get('seed', defaults()['seed'])}). "
             "No search trial evaluated the test split.", "",
             f"- trials: {summary['trials']['complete']} ran all {space.epochs} epochs, "
             f"{summary['trials']['pruned']} were stopped early by ASHA, {summary['trials']['failed']} failed "
             f"or were interrupted (and re-run)",
             f"- search wall time: {summary['search_seconds'] / 3600:.2f} h over {len(sessions)} session(s)", "",
             *best_lines(found, space, name), *(retrained_lines(summaries, contrast) if summaries else []),
             *reports.curation_lines([o.metrics for outcomes in retrained.values() for o in outcomes])]
    if weights:
        lines += ["## What mattered: fANOVA importance over the trials that ran all epochs", "",
                  reports.markdown_table(pd.DataFrame({"parameter": list(weights),
                                                       "importance": [f"{v:.3f}" for v in weights.values()]})),
                  "", "![importance](importance.png)", ""]
    for p, table in by_value(trials, space).items():
        lines += [f"### {p}: validation accuracy of completed trials by value", "", reports.markdown_table(table.round(4)), ""]
    if best is not None:
        lines += ["## Trials, best first", "", reports.markdown_table(trials.map(fmt)), "",
                  "![parallel coordinates](parallel_coordinate.png)", "", "![slice](slice.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return summary, [folder / "report.md", folder / "report.json", *files]
