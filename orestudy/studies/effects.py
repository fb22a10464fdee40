"""The effects table: every pair of configurations that differ in one factor, compared on the same splits.

    rows = effects(trials)                  # study.Trial: records (trials.jsonl) or a study's outcomes
    rows = effects(records, pairs=[(a, b)]) # named contrasts, e.g. a search's best against its baseline

One row per contrast B - A over the seeds both ran (stats.paired_effect), Holm-adjusted across the
table, with a verdict. The replicate and search reports and `orestudy compare` all use it.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from ..config import complete, computation, is_ensemble, typed_computation

ORDER = {"attention": ["none", "se", "eca", "cbam"], "regime": ["scratch", "tl", "tl_da"]}


def cell_key(config: dict) -> str:
    """A configuration over seeds: what it computes, less the seed (missing fields take defaults); an
    ensemble's, its members' and how their weights were chosen."""
    if is_ensemble(config):
        return json.dumps({"members": sorted(map(cell_key, config["members"])), "selection": config["selection"]},
                          sort_keys=True)
    try:
        computes = typed_computation(config)
    except (TypeError, ValueError):  # a config this version cannot read: its fields as saved
        computes = computation(complete(config))
    return json.dumps({k: v for k, v in computes.items() if k != "seed"}, sort_keys=True, default=str)


def cell_label(config: dict) -> str:
    if is_ensemble(config):
        return f"ensemble of {' + '.join(complete(m)['backbone'] for m in config['members'])} (weights on validation)"
    c = complete(config)
    att = "" if c["attention"] == "none" else f" +{c['attention'].upper()} r{c['reduction']}"
    frozen = ("frozen" if c["freeze_epochs"] >= c["epochs"] else "trained" if c["freeze_epochs"] == 0
              else f"frozen {c['freeze_epochs']}/{c['epochs']}")
    depth = (f", first {c['freeze_depth']} units frozen" if c["freeze_depth"] > 0
             else f", top {-c['freeze_depth']} units trained" if c["freeze_depth"] < 0 else "")
    folds = f", cross-fitted over {c['folds']} folds" if c["folds"] > 1 else ""
    return f"{c['backbone']} {c['regime']}{att}, {frozen}{depth}{folds}"


def per_seed(trials: list) -> dict:
    """Per seed: test accuracy, macro-F1 and, where kept, per-image correctness by content hash."""
    out = {"accuracy": {}, "macro_f1": {}, "images": {}}
    for t in trials:
        seed, m = t.config["seed"], t.metrics
        out["accuracy"][seed], out["macro_f1"][seed] = m["accuracy"], m.get("macro_f1", float("nan"))
        test = [row for row in m.get("predictions", []) if row[0] == "test"]
        if test:
            out["images"][seed] = {sha: int(np.argmax(probs)) == label for _, sha, label, probs in test}
    return out


def group(records: list) -> dict[str, list]:
    """Finished trials by configuration (and data set: other data is another experiment)."""
    cells = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.config is not None:
            cells[r.dataset + cell_key(r.config)].append(r)
    return dict(cells)


def one_factor_pairs(cells: dict[str, list]) -> list[tuple[str, str, str]]:
    """(key A, key B, factor) for every two configurations that differ in exactly one field."""
    configs = {k: json.loads(k[k.index("{"):]) for k in cells}
    pairs = []
    keys = sorted(configs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a[:a.index("{")] != b[:b.index("{")]:
                continue
            diff = [f for f in configs[a] if configs[a][f] != configs[b].get(f)]
            if len(diff) == 1:
                f = diff[0]
                first, second = sorted((a, b), key=lambda k: rank(f, configs[k][f]))
                pairs.append((first, second, f))
    return pairs


CURATED = "-curated-"  # data.dataset_name of a curated data set: <published data set>-curated-<hash>


def curation_pairs(cells: dict[str, list]) -> list[tuple[list, list, str]]:
    """(published-data trials, curated trials, "curation") for every configuration run on a data set and
    on a curation of it. Both models are scored on the same photos, the published test split with the
    published labels (a curated record's test_full_accuracy); per-seed accuracies only, since curated
    records keep per-image rows of their curated test split alone."""
    pairs = []
    for key, trials in cells.items():
        dataset, config = key[:key.index("{")], key[key.index("{"):]
        if CURATED in dataset and dataset[:dataset.index(CURATED)] + config in cells:
            on_full = [replace(t, metrics={**t.metrics, "accuracy": t.metrics["test_full_accuracy"],
                                           "macro_f1": t.metrics["test_full_macro_f1"], "predictions": []})
                       for t in trials if "test_full_accuracy" in t.metrics]
            pairs.append((cells[dataset[:dataset.index(CURATED)] + config], on_full, "curation"))
    return pairs


def trial_label(trial) -> str:
    return cell_label(trial.config) + (", curated data" if CURATED in trial.dataset else "")


def rank(factor: str, value):
    order = ORDER.get(factor)
    return (order.index(value) if order and value in order else len(order or ()), str(value)) \
        if not isinstance(value, (int, float)) else (0, value)


def effects(records: list, pairs: list[tuple[list, list, str]] | None = None,
            alpha: float = 0.05, named: list[tuple[list, list, str]] = (),
            factors: list[str] | None = None, margin: float = stats.EQUIVALENCE_MARGIN) -> list[dict]:
    """The effects table: the one-factor contrasts among records (or the given (A trials, B trials,
    name) pairs), then the named ones, each B - A with stats.paired_effect, its paired-t p and its
    equivalence p at ±margin each Holm-adjusted across the whole table, and a verdict. factors: only the
    contrasts of these factors (the table, and the family Holm adjusts over)."""
    if pairs is None:
        cells = group(records)
        pairs = [(cells[a], cells[b], f) for a, b, f in one_factor_pairs(cells)] + curation_pairs(cells)
    seen = {(cell_key(a[0].config), cell_key(b[0].config)) for a, b, _ in pairs}  # a named one-factor pair once
    named = [(a, b, f) for a, b, f in named if (cell_key(a[0].config), cell_key(b[0].config)) not in seen]
    pairs = [pair for pair in list(pairs) + named if not factors or pair[2] in factors]
    rows = []
    for a_trials, b_trials, factor in pairs:
        a, b = per_seed(a_trials), per_seed(b_trials)
        effect = stats.paired_effect(stats.Paired(a["accuracy"], b["accuracy"], a["macro_f1"], b["macro_f1"],
                                                  a["images"], b["images"]), margin=margin)
        if effect["n"] == 0:
            continue
        rows.append({"factor": factor, "a": trial_label(a_trials[0]), "b": trial_label(b_trials[0]),
                     "a_mean": float(np.mean([a["accuracy"][s] for s in effect["seeds"]])),
                     "b_mean": float(np.mean([b["accuracy"][s] for s in effect["seeds"]])), **effect})
    for row, p, p_tost in zip(rows, stats.holm([r["p_t"] for r in rows]), stats.holm([r["p_tost"] for r in rows])):
        row["p_holm"], row["p_tost_holm"] = p, p_tost
        row["verdict"] = stats.verdict(row, p, alpha, p_tost)
    return rows


def points(x: float, digits: int = 1, sign: bool = True) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:{'+' if sign else ''}.{digits}f}"


def p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def table(rows: list[dict]) -> pd.DataFrame:
    """The effects table as people read it: differences in accuracy points (B - A)."""
    return pd.DataFrame([{
        "factor": r["factor"], "A": r["a"], "B": r["b"], "n": r["n"], "seeds": " ".join(map(str, r["seeds"])),
        "A acc %": points(r["a_mean"], sign=False), "B acc %": points(r["b_mean"], sign=False),
        "B − A (points)": points(r["mean"]), "95 % CI": f"{points(r['ci_low'])} to {points(r['ci_high'])}",
        "p (t)": p_text(r["p_t"]), "p (sign-flip)": p_text(r["p_sign_flip"]),
        "McNemar p (A-only/B-only, seeds)": (f"{p_text(r['p_mcnemar'])} ({r['a_only']}/{r['b_only']}, {r['mcnemar_seeds']})"
                                             if r["mcnemar_seeds"] else "no per-image records"),
        "p (Holm)": p_text(r["p_holm"]), f"p equivalent ±{100 * r['margin']:g} (Holm)": p_text(r["p_tost_holm"]),
        "verdict": r["verdict"],
        "macro-F1 B − A": points(r["macro_f1_mean"]),
        "seeds for ±1.5": "–" if r["seeds_for_1_5_points"] is None else str(r["seeds_for_1_5_points"]),
    } for r in rows])


NOTES = ("B − A: mean paired difference in test accuracy over the seeds both configurations ran (one split "
         "and one training seed per seed), in points; 95 % CI: paired t. p (t): paired t-test, Holm-adjusted "
         "across the table in p (Holm), which decides 'better' / 'worse' for B. p equivalent: two one-sided "
         "paired t-tests that |B − A| is below the margin (TOST), Holm-adjusted across the table, which decides "
         "'equivalent within ±m' where no difference is decided; else 'no difference shown', which decides "
         "nothing. p (sign-flip): exact paired permutation test over the seeds (with n seeds it "
         "cannot go below 2/2^n). McNemar: exact test on the per-image discordant pairs pooled over the seeds "
         "whose records keep per-image outcomes (older records do not: then only per-seed accuracies compare). "
         "Seeds for ±1.5: how many seeds a 95 % interval of ±1.5 points needs at the observed paired spread.")
CURATION_NOTE = (" curation: the same configuration trained on the published data (A) and on its curation (B), "
                 "both tested on the published test split with the published labels.")


def markdown(rows: list[dict]) -> str:
    from ..run.reports import markdown_table

    if not rows:
        return "No two configurations that differ in one factor share a seed yet."
    curation = any(r["factor"] == "curation" for r in rows)
    return markdown_table(table(rows)) + "\n\n" + NOTES + (CURATION_NOTE if curation else "")


def figure(path: Path, rows: list[dict]) -> None:
    """Paired differences per seed as dots, the mean with its 95 % interval, one row per contrast."""
    from ..run.reports import plt

    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.42 * len(rows)))
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        colour = {"better": "tab:green", "worse": "tab:red"}.get(r["verdict"],
                                                                "tab:blue" if r["verdict"].startswith("equivalent") else "black")
        ax.scatter(100 * np.array(r["differences"]), [y] * r["n"], s=14, color="grey", alpha=0.7, zorder=2)
        if r["n"] >= 2:
            ax.plot([100 * r["ci_low"], 100 * r["ci_high"]], [y, y], color=colour, lw=2, zorder=1)
        ax.plot(100 * r["mean"], y, "|", color=colour, ms=14, mew=2, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['b']}  vs  {r['a']}  (n={r['n']})" for r in reversed(rows)], fontsize=7)
    ax.set_xlabel("B − A, test accuracy points\n(dots: seeds; bar: mean and 95 % paired t interval; green / red: better / worse; blue: equivalent)")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write(folder: Path, rows: list[dict], stem: str = "effects") -> list[Path]:
    """effects.md, effects.csv (every column, unrounded) and effects.png in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.md", folder / f"{stem}.csv"]
    paths[0].write_text(markdown(rows) + "\n")
    pd.DataFrame(rows).to_csv(paths[1], index=False)
    if rows:
        paths.append(folder / f"{stem}.png")
        figure(paths[-1], rows)
    return paths
