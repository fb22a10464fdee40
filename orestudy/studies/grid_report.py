"""The report of a replication study: the paper's tables beside ours, its figures, and the trials'
portable records (trials.jsonl)."""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pandas as pd

from . import effects, stats, study
from ..run import reports
from .grid import Cell, belongs, frozen_epochs

MODEL_NAMES = {"alexnet": "AlexNet", "vgg16": "VGG16", "resnet50": "ResNet50", "inception_v3": "InceptionV3",
               "mobilenet_v2": "MobileNetV2", "mobilenet_v1": "MobileNet V1", "efficientnet_lite0": "EfficientNet-Lite0",
               "efficientnet_lite1": "EfficientNet-Lite1", "efficientnet_lite2": "EfficientNet-Lite2"}
ROW_NAMES = {"scratch": "Scratch", "tl": "TL", "tl_da": "TL+DA", "tl_da_se": "TL+DA+SE"}


def published_value(published: dict, source: str, cell: Cell) -> float | None:
    """A source's number for a cell; an entry that names a schedule wins over one that does not."""
    model = published["models"].get(cell.backbone)  # None: a backbone no source used
    matches = [r for r in published["results"] if r["model"] == model and r["regime"] == cell.regime
               and r.get("attention", "none") == cell.attention and r.get(source) is not None
               and r.get("schedule", cell.schedule) == cell.schedule]
    matches.sort(key=lambda r: "schedule" not in r)
    return matches[0][source] if matches else None


def schedule_label(frozen: int, epochs: int) -> str:
    return "frozen" if frozen >= epochs else "trained" if frozen == 0 else f"frozen {frozen} of {epochs} epochs"


def summarize(trials: list[study.Trial]) -> dict:
    """A cell's trials over seeds: status, accuracy statistics (stats.accuracy_summary), macro-F1."""
    ok = [t for t in trials if t.status == "ok"]
    others = [t.status for t in trials if t.status != "ok"]
    if not ok:
        failed = [s for s in others if s.startswith("failed")]
        return {"status": (failed or others or ["not started"])[0], "n": 0}
    summary = stats.accuracy_summary([t.metrics["accuracy"] for t in ok], [t.metrics["n_test"] for t in ok])
    status = "ok" if not others else f"ok; {len(others)} of {len(trials)} not: {others[0]}"
    return {"status": status, **summary, "macro_f1": sum(t.metrics["macro_f1"] for t in ok) / len(ok),
            "seeds": " ".join(str(t.config["seed"]) for t in ok)}


def formatted(row: dict) -> str:
    if not row["n"]:
        return row["status"]
    spread = "" if row["n"] < 2 else f" ± {row['std']:.4f}"
    return (f"{row['mean']:.4f}{spread} (n={row['n']}; 95% CI {row['ci_low']:.3f}–{row['ci_high']:.3f}, "
            f"{row['ci_method']})" + ("" if row["status"] == "ok" else f"; {row['status']}"))


def study_tables(grid: dict, published: dict, cells: list[Cell], trials: list[study.Trial],
                 epochs: int, ensembles: dict[str, list[study.Trial]]) -> dict[str, pd.DataFrame]:
    """Per table, one row per cell: the published numbers, then orestudy's over the seeds; then the
    table's ensemble, where it has one."""
    tables = {}
    for table in dict.fromkeys(c.table for c in cells):
        rows = []
        for cell in (c for c in cells if c.table == table):
            mine = [t for t in trials if belongs(t.config, cell, grid)]
            rows.append({"model": MODEL_NAMES.get(cell.backbone, cell.backbone) + " (reference)" * cell.reference,
                         "backbone": cell.backbone, "regime": ROW_NAMES.get(cell.row, cell.row),
                         "schedule": cell.schedule,
                         "backbone_training": schedule_label(frozen_epochs(grid, cell.schedule, epochs), epochs)
                         + cell.extra_label, "epochs": epochs,
                         **{source: published_value(published, source, cell) for source in published["sources"]},
                         **summarize(mine)})
        if table in ensembles:
            rows.append({"model": "Ensemble of the other rows", "backbone": "ensemble", "regime": "",
                         "schedule": "", "backbone_training": "weights chosen per seed on validation",
                         "epochs": epochs, **{source: None for source in published["sources"]},
                         **summarize(ensembles[table])})
        tables[table] = pd.DataFrame(rows)
    return tables


def finished(trials: list[study.Trial], cell: Cell, grid: dict) -> list[study.Trial]:
    """The cell's trials that finished ("ok")."""
    return [t for t in trials if t.status == "ok" and belongs(t.config, cell, grid)]


def table_ensembles(grid: dict, cells: list[Cell], trials: list[study.Trial], dataset: str) -> dict[str, list]:
    """Per table that asks for one (ensemble: true), per seed on which all its rows but the reference
    finished with per-image records: the ensemble of those trials (study.ensemble_trial)."""

    out = {}
    for table, spec in grid["tables"].items():
        rows = [c for c in cells if c.table == table and not c.reference]
        if not spec.get("ensemble") or len(rows) < 2:
            continue
        ok = [{t.config["seed"]: t for t in finished(trials, c, grid) if t.metrics.get("predictions")} for c in rows]
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in ok)))
        out[table] = [study.ensemble_trial([by_seed[s] for by_seed in ok], dataset) for s in seeds]
    return {table: made for table, made in out.items() if made}


def reference_pairs(grid: dict, cells: list[Cell], trials: list[study.Trial],
                    ensembles: dict[str, list]) -> list[tuple[list, list, str]]:
    """(reference trials, row trials, "vs reference") for every other row of a table with a reference
    row, and for its ensemble: the effects table's named contrasts."""
    mine = lambda cell: finished(trials, cell, grid)
    pairs = []
    for reference in (c for c in cells if c.reference and mine(c)):
        others = [mine(c) for c in cells if c.table == reference.table and not c.reference]
        pairs += [(mine(reference), ts, "vs reference") for ts in others + [ensembles.get(reference.table, [])] if ts]
    return pairs


def markdown(frame: pd.DataFrame, published: dict, paper_epochs: int) -> str:
    shown = pd.DataFrame({"Model": frame["model"], "Regime": frame["regime"], "Backbone": frame["backbone_training"]})
    for source, spec in published["sources"].items():
        other = [spec.get("measured_with", {}).get(published["models"].get(b), b) != b for b in frame["backbone"]]
        shown[spec["column"]] = ["–" if pd.isna(v) else f"{v:.4f}" + "†" * o for v, o in zip(frame[source], other)]
    shown["orestudy: test accuracy, mean ± std"] = [formatted(r) for r in frame.to_dict("records")]
    shown["orestudy: macro-F1"] = frame.get("macro_f1", pd.Series(index=frame.index)).map(
        lambda v: "–" if pd.isna(v) else f"{v:.4f}")
    if (frame["epochs"] != paper_epochs).any():
        shown["Epochs"] = frame["epochs"]
    return reports.markdown_table(shown)


# ---------------------------------------------------------------------------------------------------
# The report

def figures(grid: dict, cells: list[Cell], trials: list[study.Trial], folder: Path) -> list[Path]:
    """The paper's Fig. 9 (confusion matrices of TL, TL+DA, TL+DA+SE side by side, summed over seeds)
    per MobileNet and schedule, and Fig. 7/8 (learning curves, averaged over seeds) per backbone, of
    its best cell."""
    ok = {c: finished(trials, c, grid) for c in cells}
    ok = {c: ts for c, ts in ok.items() if ts}
    paths = []
    for (backbone, schedule), group in itertools.groupby(
            sorted(ok, key=lambda c: (c.backbone, c.schedule)), key=lambda c: (c.backbone, c.schedule)):
        panels = {c.row: c for c in group if c.row in ("tl", "tl_da", "tl_da_se")}
        if not backbone.startswith("mobilenet") or not panels:
            continue
        first = ok[next(iter(panels.values()))][0].metrics
        matrices = {}
        for row in ("tl", "tl_da", "tl_da_se"):
            if row in panels:
                ts = ok[panels[row]]
                mean = sum(t.metrics["accuracy"] for t in ts) / len(ts)
                matrices[f"{ROW_NAMES[row]}{panels[row].extra_label}: accuracy {mean:.3f} (n={len(ts)})"] = sum(
                    pd.DataFrame(t.metrics["confusion_matrix"]) for t in ts).values.tolist()
        seeds = sorted({t.config["seed"] for row in panels.values() for t in ok[row]})
        paths.append(folder / f"fig9_confusion_{backbone}_{schedule}.png")
        pooled = f"Counts summed over the test splits of seeds {', '.join(map(str, seeds))} (pooled; n: seeds each)"
        reports.confusion_figure(paths[-1], matrices, first["class_names"], pooled if len(seeds) > 1 else "")
    for backbone in dict.fromkeys(c.backbone for c in ok):
        best = max((c for c in ok if c.backbone == backbone),
                   key=lambda c: sum(t.metrics["accuracy"] for t in ok[c]) / len(ok[c]))
        ts = ok[best]
        paths.append(folder / f"learning_curves_{backbone}.png")
        reports.learning_curves(paths[-1], [t.history for t in ts], sum(t.metrics["accuracy"] for t in ts) / len(ts),
                                f"{MODEL_NAMES[backbone]} {ROW_NAMES.get(best.row, best.row)}, backbone "
                                f"{schedule_label(ts[0].config['freeze_epochs'], ts[0].config['epochs'])}: "
                                f"best cell, {len(ts)} seed(s)",
                                [t.metrics["best_epoch"] for t in ts if "best_epoch" in t.metrics],
                                len(ts[0].metrics["class_names"]))
    return paths


def trials_line(trials: list[study.Trial]) -> str:
    """How the trials ended, how many ran in earlier studies, and the training time of those that finished."""
    counts = pd.Series([t.status.split(":")[0] for t in trials]).value_counts().to_dict()
    text = f"{len(trials)} trials: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + "."
    reused = sum(t.reused for t in trials)
    if reused:
        text += f" {reused} of them ran in earlier studies (--reuse)."
    ok = [t.metrics for t in trials if t.status == "ok"]
    if ok:
        machines = pd.Series([f"on {m['device']} {m['precision']}" if "device" in m else "device not recorded"
                              for m in ok]).value_counts()
        text += (f" The ok ones took {sum(m['wall_seconds'] for m in ok) / 3600:.2f} h of training in all (the "
                 "sum of their own wall times; " + ", ".join(f"{n} {where}" for where, n in machines.items()) + ").")
    return text


def report_text(grid: dict, published: dict, tables: dict[str, pd.DataFrame], trials: list[study.Trial],
                name: str, epochs: int, contrasts: list[dict]) -> str:
    paper_epochs = grid["paper"]["epochs"]
    lines = [f"# orestudy study `{name}`", "", trials_line(trials)]
    lines += reports.curation_lines([t.metrics for t in trials])
    if epochs != paper_epochs:
        lines += ["", f"**Budget: {epochs} epochs instead of the paper's {paper_epochs}** "
                      "(frozen epochs scaled in proportion): a quick look, not a replication."]
    for table, frame in tables.items():
        lines += ["", f"## {grid['tables'][table]['title']}", "", markdown(frame, published, paper_epochs)]
    lines += ["", "## Effects: configurations that differ in one factor, paired by seed", "",
              effects.markdown(contrasts)] + (["", "![effects](effects.png)"] if contrasts else [])
    low, high = stats.wilson_interval(round(0.9319 * 193), 193)
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


def write_report(grid: dict, published: dict, cells: list[Cell], trials: list[study.Trial], epochs: int, folder: Path,
                 name: str, dataset: str) -> tuple[str, list[Path]]:
    """Tables (CSV), report.md, figures, and trials.jsonl: the records of every trial that ran to an
    end, for --reuse by a later study, and of the tables' ensembles."""
    folder.mkdir(parents=True, exist_ok=True)
    ran = [replace(t, dataset=dataset) for t in trials if t.config is not None and t.status != study.UNFINISHED]
    ensembles = table_ensembles(grid, cells, ran, dataset)
    tables = study_tables(grid, published, cells, trials, epochs, ensembles)
    paths = [folder / "trials.jsonl"]
    made = [t for table in ensembles.values() for t in table]
    study.write_records(paths[0], [t.record(dataset) for t in ran + made])
    for table, frame in tables.items():
        paths.append(folder / f"{table}.csv")
        frame.to_csv(paths[-1], index=False)
    contrasts = effects.effects(ran + made, named=reference_pairs(grid, cells, ran, ensembles))
    paths += effects.write(folder, contrasts)
    text = report_text(grid, published, tables, trials, name, epochs, contrasts)
    paths.append(folder / "report.md")
    paths[-1].write_text(text)
    return text, paths + figures(grid, cells, trials, folder)


