"""The paper's experimental grid as one Ray Tune study, and its tables beside the published numbers.

    python -m orestudy.replicate                                  # Tables III and IV, paper settings, seed 231
    python -m orestudy.replicate --seeds 231,1,2,3,4 --backbones mobilenet_v2,mobilenet_v1
    python -m orestudy.replicate --only table4 --epochs 2         # a quick look on a budget, not a replication
    python -m orestudy.replicate ... --resume                     # the same command again continues it
    python -m orestudy.replicate ... --report-only                # the tables of a study as it stands
    python -m orestudy.replicate ... --reuse earlier/trials.jsonl # runs only what earlier studies did not
    python -m orestudy.replicate --address auto ...               # on a running Ray cluster

The grid is experiments/paper_grid.yaml, the published numbers experiments/published_results.yaml.
Tables (Markdown and CSV), figures and the trials' portable records (trials.jsonl) go to
<output>/<name>/report/ and onto the study's MLflow run, whose nested children are the trials.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import yaml
from ray import tune

from . import reports, study, training
from .data import REPO_ROOT
from .training import TrainConfig

GRID = REPO_ROOT / "experiments" / "paper_grid.yaml"
PUBLISHED = REPO_ROOT / "experiments" / "published_results.yaml"
MODEL_NAMES = {"alexnet": "AlexNet", "vgg16": "VGG16", "resnet50": "ResNet50", "inception_v3": "InceptionV3",
               "mobilenet_v2": "MobileNetV2", "mobilenet_v1": "MobileNet V1"}
ROW_NAMES = {"scratch": "Scratch", "tl": "TL", "tl_da": "TL+DA", "tl_da_se": "TL+DA+SE"}
CELL_KEYS = ("backbone", "regime", "attention", "schedule")
STUDY_OWNED = ("backbone", "regime", "attention", "freeze_epochs", "epochs", "seed", "parent_run")


# ---------------------------------------------------------------------------------------------------
# The grid

@dataclass(frozen=True)
class Cell:
    """One row of a table: one configuration, run once per seed."""
    table: str
    backbone: str
    regime: str
    attention: str
    schedule: str
    extra: tuple = ()  # further TrainConfig fields the grid sets for this cell, as (key, value) pairs

    @property
    def row(self) -> str:
        """The rows as the paper names them: scratch, tl, tl_da, tl_da_se."""
        return self.regime if self.attention == "none" else f"{self.regime}_{self.attention}"


def grid_cells(grid: dict) -> list[Cell]:
    """Every cell of every table, in the grid file's order; lists in an entry are crossed."""
    cells = []
    for table, spec in grid["tables"].items():
        for entry in spec["cells"]:
            lists = {k: v if isinstance(v, list) else [v] for k, v in {"attention": "none", **entry}.items()}
            for values in itertools.product(*lists.values()):
                fields = dict(zip(lists, values))
                core = {k: fields.pop(k) for k in CELL_KEYS}
                cells.append(Cell(table, **core, extra=tuple(sorted(fields.items()))))
    return cells


def select(cells: list[Cell], only=(), backbones=(), rows=(), schedules=()) -> list[Cell]:
    """The cells the filters keep; an empty filter keeps all."""
    return [c for c in cells if (not only or c.table in only) and (not backbones or c.backbone in backbones)
            and (not rows or c.row in rows) and (not schedules or c.schedule in schedules)]


def frozen_epochs(grid: dict, schedule: str, epochs: int) -> int:
    """A schedule's frozen epochs, scaled from the paper's epochs to this study's (a budget keeps the
    proportion: frozen10 of 20 is 1 of 2)."""
    return min(epochs, math.floor(grid["schedules"][schedule] * epochs / grid["paper"]["epochs"] + 0.5))


def trial_configs(grid: dict, cells: list[Cell], seeds: list[int], settings: dict) -> list[dict]:
    """Every (cell, seed) trial as a complete TrainConfig dict, seed by seed (a first look at every
    cell comes before repeats). settings: the fields every trial shares. A configuration that several
    cells share (a row of both tables, schedules that coincide on a budget) runs once."""
    unique = {}
    for seed, cell in itertools.product(seeds, cells):
        values = {**settings, **dict(cell.extra), "backbone": cell.backbone, "regime": cell.regime,
                  "attention": cell.attention, "seed": seed,
                  "freeze_epochs": frozen_epochs(grid, cell.schedule, settings["epochs"])}
        config = asdict(TrainConfig.from_dict(values))  # validated before any trial starts
        unique.setdefault(json.dumps(config, sort_keys=True), config)
    return list(unique.values())


def belongs(config: dict | None, cell: Cell, grid: dict) -> bool:
    """Whether a trial's config is one of the cell's (None: a trial that never started)."""
    return (config is not None and all(config[k] == getattr(cell, k) for k in CELL_KEYS[:3])
            and all(config[k] == v for k, v in cell.extra)
            and config["freeze_epochs"] == frozen_epochs(grid, cell.schedule, config["epochs"]))


# ---------------------------------------------------------------------------------------------------
# Tables

def published_value(published: dict, source: str, cell: Cell) -> float | None:
    """A source's number for a cell; an entry that names a schedule wins over one that does not."""
    model = published["models"][cell.backbone]
    matches = [r for r in published["results"] if r["model"] == model and r["regime"] == cell.regime
               and r.get("attention", "none") == cell.attention and r.get(source) is not None
               and r.get("schedule", cell.schedule) == cell.schedule]
    matches.sort(key=lambda r: "schedule" not in r)
    return matches[0][source] if matches else None


def schedule_label(frozen: int, epochs: int) -> str:
    return "frozen" if frozen >= epochs else "trained" if frozen == 0 else f"frozen {frozen} of {epochs} epochs"


def summarize(trials: list[dict]) -> dict:
    """A cell's trials over seeds: status, accuracy statistics (reports.accuracy_summary), macro-F1."""
    ok = [t for t in trials if t["status"] == "ok"]
    others = [t["status"] for t in trials if t["status"] != "ok"]
    if not ok:
        failed = [s for s in others if s.startswith("failed")]
        return {"status": (failed or others or ["not started"])[0], "n": 0}
    summary = reports.accuracy_summary([t["metrics"]["accuracy"] for t in ok], [t["metrics"]["n_test"] for t in ok])
    status = "ok" if not others else f"ok; {len(others)} of {len(trials)} not: {others[0]}"
    return {"status": status, **summary, "macro_f1": sum(t["metrics"]["macro_f1"] for t in ok) / len(ok),
            "seeds": " ".join(str(t["config"]["seed"]) for t in ok)}


def formatted(row: dict) -> str:
    if not row["n"]:
        return row["status"]
    spread = "" if row["n"] < 2 else f" ± {row['std']:.4f}"
    return (f"{row['mean']:.4f}{spread} (n={row['n']}; 95% CI {row['ci_low']:.3f}–{row['ci_high']:.3f}, "
            f"{row['ci_method']})" + ("" if row["status"] == "ok" else f"; {row['status']}"))


def study_tables(grid: dict, published: dict, cells: list[Cell], trials: list[dict],
                 epochs: int) -> dict[str, pd.DataFrame]:
    """Per table, one row per cell: the published numbers, then orestudy's over the seeds."""
    tables = {}
    for table in dict.fromkeys(c.table for c in cells):
        rows = []
        for cell in (c for c in cells if c.table == table):
            mine = [t for t in trials if belongs(t["config"], cell, grid)]
            rows.append({"model": MODEL_NAMES[cell.backbone], "backbone": cell.backbone,
                         "regime": ROW_NAMES.get(cell.row, cell.row), "schedule": cell.schedule,
                         "backbone_training": schedule_label(frozen_epochs(grid, cell.schedule, epochs), epochs),
                         "epochs": epochs,
                         **{source: published_value(published, source, cell) for source in published["sources"]},
                         **summarize(mine)})
        tables[table] = pd.DataFrame(rows)
    return tables


def markdown(frame: pd.DataFrame, published: dict, paper_epochs: int) -> str:
    shown = pd.DataFrame({"Model": frame["model"], "Regime": frame["regime"], "Backbone": frame["backbone_training"]})
    for source, spec in published["sources"].items():
        other = [spec.get("measured_with", {}).get(published["models"][b], b) != b for b in frame["backbone"]]
        shown[spec["column"]] = ["–" if pd.isna(v) else f"{v:.4f}" + "†" * o for v, o in zip(frame[source], other)]
    shown["orestudy: test accuracy, mean ± std"] = [formatted(r) for r in frame.to_dict("records")]
    shown["orestudy: macro-F1"] = frame.get("macro_f1", pd.Series(index=frame.index)).map(
        lambda v: "–" if pd.isna(v) else f"{v:.4f}")
    if (frame["epochs"] != paper_epochs).any():
        shown["Epochs"] = frame["epochs"]
    return reports.markdown_table(shown)


# ---------------------------------------------------------------------------------------------------
# The report

def mean_history(trials: list[dict]) -> list[dict]:
    rows = pd.DataFrame([row for t in trials for row in t["history"]])
    columns = ["frozen", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    return rows.groupby("epoch")[columns].mean().reset_index().to_dict("records")


def figures(grid: dict, cells: list[Cell], trials: list[dict], folder: Path) -> list[Path]:
    """The paper's Fig. 9 (confusion matrices of TL, TL+DA, TL+DA+SE side by side, summed over seeds)
    per MobileNet and schedule, and Fig. 7/8 (learning curves, averaged over seeds) per backbone, of
    its best cell."""
    ok = {c: [t for t in trials if t["status"] == "ok" and belongs(t["config"], c, grid)] for c in cells}
    ok = {c: ts for c, ts in ok.items() if ts}
    paths = []
    for (backbone, schedule), group in itertools.groupby(
            sorted(ok, key=lambda c: (c.backbone, c.schedule)), key=lambda c: (c.backbone, c.schedule)):
        panels = {c.row: c for c in group if c.row in ("tl", "tl_da", "tl_da_se")}
        if not backbone.startswith("mobilenet") or not panels:
            continue
        first = ok[next(iter(panels.values()))][0]["metrics"]
        matrices = {}
        for row in ("tl", "tl_da", "tl_da_se"):
            if row in panels:
                ts = ok[panels[row]]
                mean = sum(t["metrics"]["accuracy"] for t in ts) / len(ts)
                matrices[f"{ROW_NAMES[row]}: accuracy {mean:.3f} (n={len(ts)})"] = sum(
                    pd.DataFrame(t["metrics"]["confusion_matrix"]) for t in ts).values.tolist()
        paths.append(folder / f"fig9_confusion_{backbone}_{schedule}.png")
        reports.confusion_figure(paths[-1], matrices, first["class_names"])
    for backbone in dict.fromkeys(c.backbone for c in ok):
        best = max((c for c in ok if c.backbone == backbone),
                   key=lambda c: sum(t["metrics"]["accuracy"] for t in ok[c]) / len(ok[c]))
        ts = ok[best]
        paths.append(folder / f"learning_curves_{backbone}.png")
        reports.learning_curves(paths[-1], mean_history(ts), sum(t["metrics"]["accuracy"] for t in ts) / len(ts),
                                f"{MODEL_NAMES[backbone]} {ROW_NAMES.get(best.row, best.row)}, backbone "
                                f"{schedule_label(ts[0]['config']['freeze_epochs'], ts[0]['config']['epochs'])}: "
                                f"best cell, mean of {len(ts)} seed(s)")
    return paths


def trials_line(trials: list[dict]) -> str:
    """How the trials ended, how many ran in earlier studies, and the training time of those that finished."""
    counts = pd.Series([t["status"].split(":")[0] for t in trials]).value_counts().to_dict()
    text = f"{len(trials)} trials: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + "."
    reused = sum(t.get("reused", False) for t in trials)
    if reused:
        text += f" {reused} of them ran in earlier studies (--reuse)."
    ok = [t["metrics"] for t in trials if t["status"] == "ok"]
    if ok:
        machines = pd.Series([f"on {m['device']} {m['precision']}" if "device" in m else "device not recorded"
                              for m in ok]).value_counts()
        text += (f" The ok ones took {sum(m['wall_seconds'] for m in ok) / 3600:.2f} h of training in all (the "
                 "sum of their own wall times; " + ", ".join(f"{n} {where}" for where, n in machines.items()) + ").")
    return text


def report_text(grid: dict, published: dict, tables: dict[str, pd.DataFrame], trials: list[dict],
                name: str, epochs: int) -> str:
    paper_epochs = grid["paper"]["epochs"]
    lines = [f"# orestudy study `{name}`", "", trials_line(trials)]
    if epochs != paper_epochs:
        lines += ["", f"**Budget: {epochs} epochs instead of the paper's {paper_epochs}** "
                      "(frozen epochs scaled in proportion): a quick look, not a replication."]
    for table, frame in tables.items():
        lines += ["", f"## {grid['tables'][table]['title']}", "", markdown(frame, published, paper_epochs)]
    low, high = reports.wilson_interval(round(0.9319 * 193), 193)
    lines += ["", "Notes:",
              "- orestudy: test accuracy of the best-validation checkpoint, mean ± sample std over seeded "
              "stratified splits (one split and one training seed per trial). 95% CI: Student's t over "
              "the seeds when n >= 2; with one seed, the Wilson score interval of that run's one test split "
              "(binomial in the test images), which covers test sampling only, not split or training variation.",
              f"- One run on one 193-image test split carries about ±{(high - low) * 50:.1f} points "
              f"(Wilson 95% at 93.19%: {low:.3f}–{high:.3f}). The paper's 96.89% and the replication's "
              "93.19% are each one run on one split, so they cannot be told apart, nor either from ours, "
              "by one run: repeat the cells over seeds (--seeds) to compare means.",
              "- Published numbers that state no freezing schedule stand beside every schedule's row; "
              "† marks a number measured with the other MobileNet version than the row's."]
    lines += [f"- {spec['column']}: {spec['citation']} {spec.get('note', '')}".rstrip()
              for spec in published["sources"].values()]
    return "\n".join(lines) + "\n"


def write_report(grid: dict, published: dict, cells: list[Cell], trials: list[dict], epochs: int, folder: Path,
                 name: str, dataset: str) -> tuple[str, list[Path]]:
    """Tables (CSV), report.md, figures, and trials.jsonl: the records of every trial that ran to an
    end, for --reuse by a later study."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = study_tables(grid, published, cells, trials, epochs)
    paths = [folder / "trials.jsonl"]
    study.write_records(paths[0], [study.trial_record(t, dataset) for t in trials
                                   if t["config"] is not None and t["status"] != study.UNFINISHED])
    for table, frame in tables.items():
        paths.append(folder / f"{table}.csv")
        frame.to_csv(paths[-1], index=False)
    text = report_text(grid, published, tables, trials, name, epochs)
    paths.append(folder / "report.md")
    paths[-1].write_text(text)
    return text, paths + figures(grid, cells, trials, folder)


# ---------------------------------------------------------------------------------------------------
# Command line

def comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def field_value(text: str) -> tuple[str, object]:
    """KEY=VALUE for a TrainConfig field, typed like the field."""
    key, _, value = text.partition("=")
    defaults = asdict(TrainConfig())
    if key not in defaults or key in STUDY_OWNED:
        raise argparse.ArgumentTypeError(
            f"{key!r} is not a TrainConfig field the study leaves free; the grid, --epochs and --seeds set "
            f"{', '.join(STUDY_OWNED)}")
    kind = type(defaults[key])
    return key, value.lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    grid = p.add_argument_group("which trials")
    grid.add_argument("--grid", default=str(GRID), help="grid file (default: %(default)s)")
    grid.add_argument("--published", default=str(PUBLISHED), help="published numbers (default: %(default)s)")
    grid.add_argument("--only", type=comma_list, default=[], metavar="TABLES", help="e.g. table4")
    grid.add_argument("--backbones", type=comma_list, default=[], metavar="LIST", help="e.g. mobilenet_v2,mobilenet_v1")
    grid.add_argument("--regimes", type=comma_list, default=[], metavar="LIST",
                      help="rows: scratch, tl, tl_da, tl_da_se")
    grid.add_argument("--schedules", type=comma_list, default=[], metavar="LIST", help="frozen, unfrozen, frozen10")
    grid.add_argument("--seeds", type=lambda s: [int(x) for x in comma_list(s)], default=None, metavar="LIST",
                      help="split and training seeds, each cell runs once per seed (default: the grid's, 231)")
    grid.add_argument("--epochs", type=int, default=0,
                      help="budget: epochs per trial instead of the paper's 20 (frozen epochs scale along)")
    grid.add_argument("--set", type=field_value, action="append", default=[], metavar="FIELD=VALUE",
                      dest="fields", help="any other TrainConfig field for every trial, e.g. image_size=128")
    where = p.add_argument_group("where")
    where.add_argument("--data", default=defaults.data, help="image folder (default: %(default)s)")
    where.add_argument("--output", default=defaults.output, help="run folders and the MLflow store (default: %(default)s)")
    where.add_argument("--cache", default=defaults.cache, help="feature cache folder (default: %(default)s)")
    where.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment (default: %(default)s)")
    where.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True)
    where.add_argument("--name", default="", help="study name (default: from the grid file, filters, budget, seeds)")
    where.add_argument("--storage-path", default="",
                       help="Tune results and checkpoints: a folder every node reaches, or s3:// gs:// "
                            "(default: OUTPUT/ray_results)")
    how = p.add_argument_group("how")
    how.add_argument("--address", default=None, help="Ray cluster to join ('auto', or host:port); default: start Ray here")
    how.add_argument("--max-failures", type=int, default=2, help="retries of a trial that raised (default: %(default)s)")
    how.add_argument("--cpus-per-trial", type=int, default=0, help="default: a whole node, or its share per GPU")
    how.add_argument("--gpus-per-trial", type=float, default=0.0, help="default: 1 where nodes have GPUs; 0.5 shares one")
    how.add_argument("--resume", action="store_true", help="continue the interrupted study of the same command")
    how.add_argument("--reuse", action="append", default=[], metavar="TRIALS_JSONL",
                     help="finished trials of an earlier study (its report/trials.jsonl, from any machine): "
                          "a trial of the same configuration on the same data is not run again but reported; "
                          "repeatable")
    how.add_argument("--report-only", action="store_true",
                     help="write the report of the study as it stands (with --reuse records), running nothing")
    return p


def default_name(args, grid: dict, epochs: int, seeds: list[int]) -> str:
    parts = [Path(args.grid).stem, *("-".join(v) for v in (args.only, args.backbones, args.regimes, args.schedules) if v)]
    if epochs != grid["paper"]["epochs"]:
        parts.append(f"e{epochs}")
    return "_".join(parts + ["s" + "-".join(map(str, seeds))])


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    grid = yaml.safe_load(Path(args.grid).read_text())
    published = yaml.safe_load(Path(args.published).read_text())
    every = grid_cells(grid)
    for option, values, known in (("--only", args.only, {c.table for c in every}),
                                  ("--backbones", args.backbones, {c.backbone for c in every}),
                                  ("--regimes", args.regimes, {c.row for c in every}),
                                  ("--schedules", args.schedules, {c.schedule for c in every})):
        if set(values) - known:
            p.error(f"{option}: unknown {sorted(set(values) - known)}; the grid has {sorted(known)}")
    cells = select(every, args.only, args.backbones, args.regimes, args.schedules)
    if not cells:
        p.error("the filters leave no cell of the grid")
    if not Path(args.data).is_dir():
        p.error(f"data folder not found: {args.data} (--data or ORESTUDY_DATA)")
    seeds = args.seeds or grid["seeds"]
    epochs = args.epochs or grid["paper"]["epochs"]
    name = args.name or default_name(args, grid, epochs, seeds)
    settings = study.StudySettings(name, args.output, args.storage_path, args.experiment, args.mlflow,
                                   args.max_failures, args.cpus_per_trial, args.gpus_per_trial)
    shared = {**grid["paper"], **dict(args.fields), "epochs": epochs, "data": str(Path(args.data).resolve()),
              "output": str(Path(settings.output) / name), "experiment": args.experiment, "mlflow": args.mlflow,
              "cache": str(Path(args.cache).resolve()) if args.cache else ""}
    try:
        configs = trial_configs(grid, cells, seeds, shared)
        earlier = [r for path in args.reuse for r in study.read_records(path)]
    except (OSError, ValueError) as err:
        p.error(str(err))
    dataset = training.dataset_name(args.data, training.scan_cached(shared["data"], True, shared["cache"])[0])
    configs, reused = study.reusable(configs, earlier, dataset)
    print(f"[study] {name}: {len(cells)} cells, {len(configs) + len(reused)} trials"
          + (f" ({len(reused)} from {', '.join(args.reuse)})" if reused else "") + f" -> {settings.path}", flush=True)
    folder = Path(settings.output) / name / "report"

    if args.report_only:
        try:
            trials = reused + (study.planned(configs, study.outcomes(study.saved_results(settings)))
                               if configs else [])
        except FileNotFoundError as err:
            p.error(f"{err} (--report-only reports a study started with the same options)")
        text, files = write_report(grid, published, cells, trials, epochs, folder, name, dataset)
        print("\n" + text + "\n" + "\n".join(f"wrote {path}" for path in files))
        return 0

    try:
        study.check_state(settings, args.resume)
    except (FileExistsError, FileNotFoundError) as err:
        p.error(f"{err} (--resume continues a study; --name starts another)")
    with study.connected(args.address):
        parent_run = study.start_parent_run(settings, {
            "grid": args.grid, "seeds": seeds, "epochs": epochs, "cells": len(cells), "trials": len(configs),
            "reused": len(reused), "dataset": dataset,
            **{k: getattr(args, k) for k in ("only", "backbones", "regimes", "schedules", "fields", "data", "reuse")}},
            args.resume) if args.mlflow else ""
        configs = [{**c, "parent_run": parent_run} for c in configs]  # a resumed study keeps its saved ones
        results = study.run_study({"config": tune.grid_search(configs)}, settings, args.resume) if configs else []
        trials = reused + study.planned(configs, study.outcomes(results))
    text, files = write_report(grid, published, cells, trials, epochs, folder, name, dataset)
    print("\n" + text + "\n" + "\n".join(f"wrote {path}" for path in files))
    unfinished = sum(t["status"] == study.UNFINISHED for t in trials)
    if parent_run:
        statuses = [t["status"].split(":")[0] for t in trials]
        study.finish_parent_run(parent_run, files, {f"trials_{s}": statuses.count(s) for s in set(statuses)},
                                finished=not unfinished)
    if unfinished:
        print(f"[study] {unfinished} trials unfinished: run the same command with --resume to continue",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
