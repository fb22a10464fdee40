"""What flip test-time augmentation does to finished runs: each run's validation and test accuracy with
the photos as they are and with their flips, what `--tta auto` chooses on validation, and the paired
effect of flips (always, and as auto chooses) against none, over the runs (a run is a pair; McNemar on
the pooled photos).

    python benchmarks/tta_effect.py runs/beyond_cpu_*/*_s* --output docs/results/tta_effect

A run's saved split (split.csv) names its validation and test photos, scored through `orestudy
predict`'s path (prediction.predict: tests/test_predict.py checks it gives a run's own test
probabilities, plain and with flips); auto's choice is training.with_tta's, on validation alone. It
measures an evaluation option on models already trained and chooses nothing for any run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from orestudy import device as devices
from orestudy.run import evaluation, prediction, training
from orestudy.studies import effects, stats
from orestudy.run.reports import markdown_table


def scored(model, meta: dict, paths: list[str], labels: np.ndarray, flips: bool, device, dtype):
    """The photos' Evaluation (probabilities in the model's class order), plain or with flips."""
    names = meta["class_names"]
    rows = []
    for pred in prediction.predict(model, meta, paths, None, len(names), flips, 32, device, dtype):
        if pred.error:
            raise ValueError(f"{pred.path}: {pred.error}")
        top = dict(pred.top)
        rows.append([top[name] for name in names])
    return evaluation.mixture(np.array(rows)[None], np.ones(1), labels)


def measure(run: Path, device, dtype) -> dict:
    config = json.loads((run / "config.json").read_text())
    split = pd.read_csv(run / "split.csv")
    model, meta = prediction.load_model(str(run), device, dtype)
    recorded = json.loads((run / "metrics.json").read_text())  # the run's own test: plain must reproduce it
    out = {"run": run.name, "backbone": config["backbone"], "seed": config["seed"],
           "test_recorded": recorded["accuracy"], "recorded_with_flips": bool(recorded.get("tta", False))}
    evals = {}
    for part in ("val", "test"):
        rows = split[split["split"] == part]
        paths = [str(Path(config["data"]) / p) for p in rows["path"]]
        labels = rows["label"].map(meta["class_names"].index).to_numpy()
        for flips in (False, True):
            key = f"{part}_{'flips' if flips else 'plain'}"
            evals[key] = scored(model, meta, paths, labels, flips, device, dtype)
            out[key] = evals[key].accuracy
            out[f"{key}_images"] = dict(zip(rows["sha256"], (evals[key].predictions == labels).tolist()))
    out["auto_flips"] = training.with_tta("auto", evals["val_plain"], lambda: evals["val_flips"])[1]["tta"]
    chosen = "test_flips" if out["auto_flips"] else "test_plain"
    out["test_auto"], out["test_auto_images"] = out[chosen], out[f"{chosen}_images"]
    return out


def effect(rows: list[dict], part: str, b: str) -> dict:
    pair = stats.Paired({i: r[f"{part}_plain"] for i, r in enumerate(rows)}, {i: r[f"{part}_{b}"] for i, r in enumerate(rows)},
                        a_images={i: r[f"{part}_plain_images"] for i, r in enumerate(rows)},
                        b_images={i: r[f"{part}_{b}_images"] for i, r in enumerate(rows)})
    return {"split": part, "flips": b, **stats.paired_effect(pair)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    p.add_argument("--output", type=Path, help="folder for tta.csv and tta.md")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = p.parse_args()
    device = devices.pick_device("auto")
    dtype = devices.pick_precision(args.precision, device)
    rows = []
    for run in args.runs:
        rows.append(measure(run, device, dtype))
        r = rows[-1]
        print(f"{r['run']}: val {r['val_plain']:.4f} -> flips {r['val_flips']:.4f} (auto: "
              f"{'flips' if r['auto_flips'] else 'plain'}); test {r['test_plain']:.4f} -> flips {r['test_flips']:.4f}",
              flush=True)
    per_run = pd.DataFrame([{k: v for k, v in r.items() if not k.endswith("_images")} for r in rows])
    found = [effect(rows, "val", "flips"), effect(rows, "test", "flips"), effect(rows, "test", "auto")]
    shown = pd.DataFrame([{"split": e["split"], "B": {"flips": "flips always", "auto": "flips where auto chose them"}[e["flips"]],
                           "n runs": e["n"], "B − A (points)": effects.points(e["mean"]),
                           "95 % CI": f"{effects.points(e['ci_low'])} to {effects.points(e['ci_high'])}",
                           "p (t)": effects.p_text(e["p_t"]), "p (sign-flip)": effects.p_text(e["p_sign_flip"]),
                           "McNemar p (A-only/B-only)": f"{effects.p_text(e['p_mcnemar'])} ({e['a_only']}/{e['b_only']})"}
                          for e in found])
    text = (f"{len(rows)} runs; auto chose flips for {int(per_run['auto_flips'].sum())}. A: the photos as they are.\n\n"
            + markdown_table(shown) + "\n\n" + markdown_table(per_run.round(4)) + "\n")
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        per_run.to_csv(args.output / "tta.csv", index=False)
        (args.output / "tta.md").write_text(text)


if __name__ == "__main__":
    main()
