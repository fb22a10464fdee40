"""Ensembles of trained runs of one split: their softmax probabilities' weighted mean, the weights chosen
on validation alone by Caruana et al.'s (2004) greedy selection with replacement, the test split scored
once from the members' predictions.csv; loaded back as one model (models.Ensemble) for predict. The
command is `orestudy ensemble` (commands/ensemble.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace


ROUNDS_PER_MEMBER = 5  # Caruana's selection runs a fixed number of rounds; ties keep the smaller ensemble


def read_member(run_dir: Path) -> dict:
    import pandas as pd

    missing = [n for n in ("split.csv", "predictions.csv", "config.json", "best.pt") if not (run_dir / n).is_file()]
    if missing:
        raise ValueError(f"{run_dir}: not a finished run folder (no {', '.join(missing)})")
    split = pd.read_csv(run_dir / "split.csv")
    predictions = pd.read_csv(run_dir / "predictions.csv").set_index("sha256")
    classes = [c[len("p_"):] for c in predictions.columns if c.startswith("p_")]
    return {"dir": run_dir, "split": frozenset(zip(split.sha256, split.split, split.label)),
            "predictions": predictions, "classes": classes,
            "config": json.loads((run_dir / "config.json").read_text())}


def check_members(members: list[dict]) -> None:
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two runs")
    first = members[0]
    other_split = [str(m["dir"]) for m in members[1:] if m["split"] != first["split"]]
    if other_split:
        raise ValueError(f"not on the split of {first['dir']}: {', '.join(other_split)} (an ensemble's members "
                         f"must share one split: the same data and seed)")
    other_classes = [str(m["dir"]) for m in members[1:] if m["classes"] != first["classes"]]
    if other_classes:
        raise ValueError(f"other classes than {first['dir']}'s {first['classes']}: {', '.join(other_classes)}")
    untested = [str(m["dir"]) for m in members if not (m["predictions"]["split"] == "test").any()]
    if untested:
        raise ValueError(f"no test predictions (a search trial?): {', '.join(untested)}")


def split_probabilities(members: list[dict], split: str):
    """(probabilities (members, images, classes), labels, image hashes) of one split, in the first member's order."""
    import numpy as np

    rows = members[0]["predictions"]
    shas = list(rows.index[rows["split"] == split])
    columns = [f"p_{c}" for c in members[0]["classes"]]
    probs = np.stack([m["predictions"].loc[shas, columns].to_numpy(float) for m in members])
    labels = rows.loc[shas, "label"].map(members[0]["classes"].index).to_numpy()
    return probs, labels, shas


def caruana_weights(val_probs, val_labels, rounds: int):
    """Greedy forward selection with replacement on validation: each round adds the member that gives
    the running mean the best (accuracy, -log loss), the earlier member on a tie; the weights are the
    counts of the best round (the earliest, i.e. smallest ensemble, on a tie)."""
    import numpy as np

    from .evaluation import mixture

    counts, history = np.zeros(len(val_probs)), []
    for _ in range(rounds):
        def score(m):
            trial = counts.copy()
            trial[m] += 1
            ev = mixture(val_probs, trial / trial.sum(), val_labels)
            return ev.accuracy, -ev.loss
        scores = [score(m) for m in range(len(val_probs))]
        best = max(range(len(scores)), key=lambda m: (scores[m], -m))
        counts[best] += 1
        history.append((scores[best], counts.copy()))
    chosen = max(range(rounds), key=lambda r: (history[r][0], -r))
    return history[chosen][1] / history[chosen][1].sum()


SELECTION = "caruana2004 greedy with replacement, on validation"


def combine(val_probs, val_labels, test_probs, test_labels, classes: list[str], config: dict):
    """The one ensemble computation, of run folders and of records alike: weights chosen on validation,
    the unknown threshold and sets calibrated on it as for a run (config: the members' settings), then
    the test split scored once. (weights, validation Evaluation, calibration, test Evaluation, test metrics)."""
    from .evaluation import calibration, mixture, test_metrics

    weights = caruana_weights(val_probs, val_labels, ROUNDS_PER_MEMBER * len(val_probs))
    val = mixture(val_probs, weights, val_labels)
    calibrated = calibration(val.probabilities, val.labels, config["unknown_target_error"], config["unknown_delta"])
    test = mixture(test_probs, weights, test_labels)  # the weights are fixed by now
    result = test_metrics(test, classes, calibrated, config["set_coverage"])
    result.update({"best_val_accuracy": val.accuracy, "val_loss": val.loss, "n_val": len(val_labels),
                   "n_test": len(test_labels)})
    return weights, val, calibrated, test, result


def outcomes(val_shas: list[str], val, test_shas: list[str], test) -> list[list]:
    """The ensemble's per-image rows (evaluation.per_image) of both splits, by image content hash."""
    from .evaluation import per_image

    images = lambda shas: [SimpleNamespace(sha256=sha) for sha in shas]  # per_image takes records
    return per_image("val", images(val_shas), val) + per_image("test", images(test_shas), test)


def build_ensemble(run_dirs: list[str | Path], output: str | Path) -> dict:
    """Choose the weights on validation, score the test split once, and write the ensemble folder."""
    from . import reports
    from ..config import complete

    members = [read_member(Path(d)) for d in run_dirs]
    check_members(members)
    classes = members[0]["classes"]
    val_probs, val_labels, val_shas = split_probabilities(members, "val")
    test_probs, test_labels, test_shas = split_probabilities(members, "test")
    # the guarantee and sets the members were run with
    weights, val, calibrated, test, result = combine(val_probs, val_labels, test_probs, test_labels, classes,
                                                     complete(members[0]["config"]))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    result["run_dir"] = str(output)
    spec = {"members": [os.path.relpath(m["dir"].resolve(), output.resolve()) for m in members],
            "weights": weights.round(6).tolist(), "selection": SELECTION, **calibrated, "class_names": classes,
            "val_accuracy": val.accuracy, "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"]}
    (output / "ensemble.json").write_text(json.dumps(spec, indent=2))
    (output / "metrics.json").write_text(json.dumps(result, indent=2))
    shutil.copyfile(members[0]["dir"] / "split.csv", output / "split.csv")
    reports.write_predictions(output / "predictions.csv", outcomes(val_shas, val, test_shas, test), classes)
    return {**spec, "metrics": result}


def log_run(runs: str | Path, experiment: str, output: Path, spec: dict) -> str:
    """The ensemble as one MLflow run beside its members' (in runs/mlflow.db unless MLFLOW_TRACKING_URI
    is set): each member's folder, weight and MLflow run, the test metrics and the ensemble folder."""
    from .. import tracking  # mlflow is slow to import

    folders = [(output / member).resolve() for member in spec["members"]]
    member_runs = tracking.runs_of_folders(runs, folders)
    params = {"selection": spec["selection"], "n_members": len(folders)}
    for i, (folder, weight, run_id) in enumerate(zip(folders, spec["weights"], member_runs)):
        params.update({f"member_{i}": str(folder), f"member_{i}_weight": weight, f"member_{i}_run": run_id or "none"})
    tags = {"run_dir": str(output.resolve()), "orestudy.members": ",".join(r for r in member_runs if r)}
    return tracking.log_folder(runs, experiment, f"ensemble-{output.name}", params,
                               tracking.flat_metrics(spec["metrics"]), output, tags)


def is_ensemble(source: str | Path) -> bool:
    return (Path(source) / "ensemble.json").is_file()


def load_ensemble(folder: str | Path, device, dtype):
    """(models.Ensemble ready for inference, metadata in a checkpoint's shape) for predict."""
    from .. import models

    folder = Path(folder)
    spec = json.loads((folder / "ensemble.json").read_text())
    members = []
    for path, weight in zip(spec["members"], spec["weights"]):
        if weight > 0:
            model, meta = models.load_checkpoint(folder / path / "best.pt", device)
            ready = models.for_inference(model, meta["input_size"], device, dtype)
            # a member evaluated with flips (its tta) gave the ensemble its probabilities that way
            members.append((models.Flipped(ready) if meta["best"].get("tta") else ready, weight, meta))
    largest = max((meta for _, _, meta in members), key=lambda meta: meta["input_size"])
    meta = {"backbone": "ensemble", "class_names": spec["class_names"], "input_size": largest["input_size"],
            "mean": largest["mean"], "std": largest["std"], "members": spec["members"], "weights": spec["weights"],
            "best": {k: spec[k] for k in ("unknown_threshold", "unknown_target_error", "unknown_delta",
                                          "unknown_error_bound", "conformal_scores")}}
    return models.Ensemble(members, meta["input_size"], meta["mean"], meta["std"]).to(device).eval(), meta
