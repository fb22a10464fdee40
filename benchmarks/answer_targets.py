"""Which target error should `orestudy predict` answer at by default? The committed trial records keep
every run's validation and test softmax, so each target can be tried on each run as predict would now
(the guaranteed threshold from the validation photos, answering.certify) and checked on its test photos,
without retraining anything.

    python benchmarks/answer_targets.py --output docs/results/answer_targets

Two groups of records: the paper recipe (`orestudy train`'s defaults, the ready model's recipe: MobileNetV2
TL+DA+SE, frozen 10 of 20 epochs; 5 seeds in docs/results/beyond_grid_cpu) and the 50 MobileNet V1/V2
records of docs/results/mobilenet_seeds (the grid's cells, seeds 3-9). Per target (delta 0.1): the
share of test photos answered (mean, min, max over runs), the runs that answer nothing, the runs whose
answered error on test is within the target, and the mean and worst answered error; and the smallest
certifiable target per run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from orestudy.config import REPO_ROOT
from orestudy.run import answering, ready

TARGETS = (0.05, 0.075, 0.10, 0.15, 0.20)
GROUPS = {
    "paper recipe (beyond_grid_cpu, 5 seeds)": ("docs/results/beyond_grid_cpu/trials.jsonl",
                                                lambda c: c.get("backbone") == "mobilenet_v2" and c.get("attention") == "se"),
    "MobileNet V1/V2 grid cells (mobilenet_seeds, 50 runs)": ("docs/results/mobilenet_seeds/trials.jsonl", lambda c: True),
}


def runs(path: str, keep) -> list[tuple]:
    out = []
    for line in (REPO_ROOT / path).read_text().splitlines():
        record = json.loads(line)
        rows = record["metrics"].get("predictions")
        if not rows or not keep(record["config"]):
            continue
        split = {s: ([r for r in rows if r[0] == s]) for s in ("val", "test")}
        out.append(tuple(np.array(v) for s in ("val", "test")
                         for v in ([r[2] for r in split[s]], [r[3] for r in split[s]])))
    return out


def check(group: list[tuple], target: float, delta: float = 0.1) -> dict:
    shares, errors, nothing, within = [], [], 0, 0
    for val_labels, val_probs, test_labels, test_probs in group:
        cal = answering.Calibration(val_probs, val_labels, [str(i) for i in range(len(val_labels))])
        threshold = answering.certify(cal, target, delta).threshold
        answered = test_probs.max(1) >= threshold
        error = float((test_probs.argmax(1) != test_labels)[answered].mean()) if answered.any() else 0.0
        shares.append(float(answered.mean()))
        errors.append(error)
        nothing += not answered.any()
        within += error <= target
    return {"target": target, "runs": len(group), "answered_mean": float(np.mean(shares)),
            "answered_min": float(np.min(shares)), "answered_max": float(np.max(shares)), "answer_nothing": nothing,
            "within_target": within, "error_mean": float(np.mean(errors)), "error_max": float(np.max(errors))}


def sets(group: list[tuple], coverage: float = 0.95, delta: float = 0.1) -> dict:
    """Each guarantee's sets on every run's test photos: mean coverage, runs below the nominal
    coverage (on about 171 test photos: a noisy look at the one calibration each run has), mean size."""
    out = {}
    for guarantee in answering.GUARANTEES:
        covered, sizes = [], []
        for val_labels, val_probs, test_labels, test_probs in group:
            scores = answering.Calibration(val_probs, val_labels, [""] * len(val_labels)).scores
            members = answering.sets_at(test_probs, answering.set_quantile(scores, coverage, delta, guarantee))
            covered.append(float(members[np.arange(len(test_labels)), test_labels].mean()))
            sizes.append(float(members.sum(1).mean()))
        out[guarantee] = {"coverage_mean": float(np.mean(covered)), "coverage_min": float(np.min(covered)),
                          "runs_below": int(np.sum(np.array(covered) < coverage)), "size_mean": float(np.mean(sizes))}
    return out


def smallest(group: list[tuple], delta: float = 0.1) -> list[float | None]:
    return [answering.smallest_certifiable(p.max(1), p.argmax(1) == y, delta) for y, p, _, _ in group]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/results/answer_targets"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    lines, results = [], {}
    for name, (path, keep) in GROUPS.items():
        group = runs(path, keep)
        rows = [check(group, t) for t in TARGETS]
        floors = smallest(group)
        covered = sets(group)
        results[name] = {"records": path, "rows": rows, "smallest_certifiable": floors, "sets": covered}
        lines += [f"**{name}**: smallest certifiable target per run (δ = 0.1): median "
                  f"{ready.pct(float(np.median([f for f in floors if f is not None])))}, range "
                  f"{ready.pct(min(f for f in floors if f is not None))}–{ready.pct(max(f for f in floors if f is not None))}.",
                  "",
                  "| target error | test photos answered: mean (min–max) | runs answering nothing | runs within target "
                  "on test | answered error: mean / worst |", "|---|---|---|---|---|"]
        lines += [f"| {ready.pct(r['target'])} | {ready.pct(r['answered_mean'])} ({ready.pct(r['answered_min'], 0)}–"
                  f"{ready.pct(r['answered_max'], 0)}) | {r['answer_nothing']} of {r['runs']} | {r['within_target']} of "
                  f"{r['runs']} | {ready.pct(r['error_mean'])} / {ready.pct(r['error_max'])} |" for r in rows]
        lines += ["", "| 95 % sets (δ = 0.1) | test coverage: mean (lowest run) | runs under 95 % on test | mean set size |",
                  "|---|---|---|---|"]
        lines += [f"| {g} | {ready.pct(c['coverage_mean'])} ({ready.pct(c['coverage_min'])}) | {c['runs_below']} of "
                  f"{len(group)} | {c['size_mean']:.2f} |" for g, c in covered.items()]
        lines.append("")
    (args.output / "table.md").write_text("\n".join(lines))
    (args.output / "targets.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
