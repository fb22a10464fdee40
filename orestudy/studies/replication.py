"""The replication study end to end: the chosen cells of a grid, as trials of one Ray Tune study (less
those earlier records stand in for), then the report (grid_report) and the study's MLflow run."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from ray import tune

from . import effects, grid as grids, grid_report, study
from .. import tracking
from ..config import ReplicationSettings


Selection = ReplicationSettings  # its name before it moved to config


def chosen_cells(selection: Selection, grid: dict) -> list[grids.Cell]:
    every = grids.grid_cells(grid)
    for option, values, known in (("--only", selection.only, {c.table for c in every}),
                                  ("--backbones", selection.backbones, {c.backbone for c in every}),
                                  ("--regimes", selection.regimes, {c.row for c in every}),
                                  ("--schedules", selection.schedules, {c.schedule for c in every})):
        if set(values) - known:
            raise ValueError(f"{option}: unknown {sorted(set(values) - known)}; the grid has {sorted(known)}")
    cells = grids.select(every, selection.only, selection.backbones, selection.regimes, selection.schedules)
    if not cells:
        raise ValueError("the filters leave no cell of the grid")
    return cells


def default_name(selection: Selection, grid: dict, epochs: int, seeds: list[int]) -> str:
    parts = [Path(selection.grid).stem, *("-".join(v) for v in (selection.only, selection.backbones,
                                                               selection.regimes, selection.schedules) if v)]
    if epochs != grid["paper"]["epochs"]:
        parts.append(f"e{epochs}")
    return "_".join(parts + ["s" + "-".join(map(str, seeds))])


def parent_summary(trials: list[study.Trial], effects_csv: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The study's MLflow run's metrics and tags: its trials by how they ended (trials/<status>), its best
    configuration by mean test accuracy over its seeds (best/; its label as the tag orestudy.best) and its
    effects table (effects/<factor>: B - A, in accuracy)."""
    statuses = [t.status.split(":")[0] for t in trials]
    metrics = {f"trials/{s}": statuses.count(s) for s in set(statuses)}
    tags = {}
    cells = effects.group([t for t in trials if t.status == "ok" and "accuracy" in t.metrics])
    if cells:
        best = max(cells.values(), key=lambda ts: np.mean([t.metrics["accuracy"] for t in ts]))
        metrics.update({"best/test_accuracy": np.mean([t.metrics["accuracy"] for t in best]),
                        "best/test_macro_f1": np.mean([t.metrics.get("macro_f1", np.nan) for t in best]),
                        "best/seeds": len(best)})
        tags["orestudy.best"] = effects.cell_label(best[0].config)
    if effects_csv.exists() and effects_csv.stat().st_size > 1:
        rows = pd.read_csv(effects_csv).to_dict("records")
        metrics.update(tracking.effect_metrics([r for r in rows if pd.notna(r.get("mean"))]))
    return {k: float(v) for k, v in metrics.items() if not np.isnan(v)}, tags


def replicate(selection: Selection, settings: study.StudySettings) -> int:
    """Run (or continue: selection.resume, or only report: selection.report_only) the study; 0 when
    every trial has an outcome, 1 when some are unfinished (run the same command with --resume). Bad
    options raise ValueError (or FileNotFoundError / FileExistsError for a study that is missing or
    already there)."""
    resume, reuse, report_only = selection.resume, tuple(selection.reuse), selection.report_only
    grid = grids.load_grid(selection.grid)
    published = yaml.safe_load(Path(selection.published).read_text())
    cells = chosen_cells(selection, grid)
    if not Path(settings.data).is_dir():
        raise ValueError(f"data folder not found: {settings.data} (--data or ORESTUDY_DATA)")
    seeds = selection.seeds or grid["seeds"]
    epochs = selection.epochs or grid["paper"]["epochs"]
    settings.name = settings.name or default_name(selection, grid, epochs, seeds)
    shared = {**grid["paper"], **selection.fields, "epochs": epochs, "data": settings.data, "cache": settings.cache,
              "output": str(Path(settings.output) / settings.name), "experiment": settings.experiment,
              "mlflow": settings.mlflow, "device": settings.device, "curation": settings.curation}
    configs = grids.trial_configs(grid, cells, seeds, shared)
    earlier = study.read_records(*reuse)
    dataset = study.dataset_of(settings, progress=sys.stderr.isatty())
    configs, reused = study.reusable(configs, earlier, dataset)
    print(f"[study] {settings.name}: {len(cells)} cells, {len(configs) + len(reused)} trials"
          + (f" ({len(reused)} from {', '.join(reuse)})" if reused else "") + f" -> {settings.path}", flush=True)
    folder = Path(settings.output) / settings.name / "report"

    def report(trials: list[study.Trial]) -> list[Path]:
        text, files = grid_report.write_report(grid, published, cells, trials, epochs, folder, settings.name, dataset)
        print("\n" + text + "\n" + "\n".join(f"wrote {path}" for path in files))
        return files

    if report_only:  # trials no record holds are the saved study's; with records and no study, not run yet
        saved = [] if not configs or (reused and not tune.Tuner.can_restore(settings.path)) \
            else study.outcomes(study.saved_results(settings))
        report(reused + study.planned(configs, saved))
        return 0
    study.check_state(settings, resume)
    with study.connected(settings.address or None):
        parent = tracking.start_parent_run(settings.output, settings.experiment, settings.path, settings.name, {
            "grid": selection.grid, "seeds": seeds, "epochs": epochs, "cells": len(cells), "trials": len(configs),
            "reused": len(reused), "dataset": dataset, "data": settings.data, "reuse": list(reuse),
            **{k: getattr(selection, k) for k in ("only", "backbones", "regimes", "schedules", "fields")}},
            resume) if settings.mlflow else ""
        with tracking.ended_on_error(parent):  # a second Ctrl-C, or Tune failing, ends the study's run
            configs = [{**c, "parent_run": parent} for c in configs]  # a resumed study keeps its saved ones
            results = study.run_study({"config": tune.grid_search(configs)}, settings, resume) if configs else []
            trials = reused + study.planned(configs, study.outcomes(results))
    files = report(trials)
    unfinished = sum(t.status == study.UNFINISHED for t in trials)
    if parent:
        metrics, tags = parent_summary(trials, folder / "effects.csv")
        tracking.finish_parent_run(parent, files, metrics, finished=not unfinished,
                                   note=(folder / "report.md").read_text(), tags=tags)
    if unfinished:
        print(f"[study] {unfinished} trials unfinished: run the same command with --resume to continue",
              file=sys.stderr)
        return 1
    return 0
