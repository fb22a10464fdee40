"""Ensembles of trained runs: their softmax probabilities' weighted mean, loaded back as one model
(models.Ensemble) for predict, val and export. Two kinds:
- runs of one split (`orestudy ensemble`, commands/ensemble.py): the weights chosen on validation alone by
  Caruana et al.'s (2004) greedy selection with replacement, the test split scored once from the
  members' predictions.csv;
- the K fold models of one cross-validated config (`orestudy train --folds K`, build_crossfit): equal
  weights, calibrated on the out-of-fold predictions of every non-test photo, the test split scored
  once by the loaded model.
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


CROSSFIT = "cross-fitted: the fold models' equal-weight mean, calibrated on their out-of-fold predictions"


def out_of_fold(members: list[dict], non_test: set[str]):
    """(probabilities, labels, shas) of every non-test photo, each from the one fold model that did not
    train on it (its fold's validation row); refused unless the folds' validation rows cover them once."""
    import pandas as pd

    rows = pd.concat([m["predictions"][m["predictions"]["split"] == "val"] for m in members])
    if set(rows.index) != non_test or rows.index.has_duplicates:
        raise ValueError(f"the folds' validation photos ({len(rows)}) are not the {len(non_test)} non-test photos once each")
    classes = members[0]["classes"]
    return SimpleNamespace(probabilities=rows[[f"p_{c}" for c in classes]].to_numpy(float),
                           labels=rows["label"].map(classes.index).to_numpy(), shas=list(rows.index))


def test_batches(split, root: Path, meta: dict, batch_size: int):
    """(inputs, labels) of the test split's photos, preprocessed as predict does for this model."""
    import torch

    from .. import data
    from .prediction import eval_input  # predict's own preprocessing (prediction imports this module)

    test = split[split["split"] == "test"]
    labels = test["label"].map(meta["class_names"].index).tolist()
    for start in range(0, len(test), batch_size):
        paths = test["path"].iloc[start:start + batch_size]
        images = torch.stack([eval_input(root / p, meta["input_size"]) for p in paths])
        yield data.normalize(images, meta["mean"], meta["std"]), torch.tensor(labels[start:start + batch_size])


def build_crossfit(fold_dirs: list[Path], output: Path, root: Path, device, dtype, batch_size: int = 32) -> dict:
    """The fold models as one model in output: the "unknown" threshold and the sets' scores calibrated
    on the out-of-fold predictions of all non-test photos (answering.Calibration, so predict answers
    at any target from them), then the test split evaluated once, through the loaded model (no fold
    run has read a test label). Returns the ensemble spec with its test metrics."""
    import pandas as pd

    from ..config import complete
    from .answering import Calibration
    from .evaluation import calibration, evaluate, test_metrics

    members = [read_member(Path(d)) for d in fold_dirs]
    split = pd.read_csv(members[0]["dir"] / "split.csv")
    oof = out_of_fold(members, set(split.loc[split["split"] != "test", "sha256"]))
    config, classes = complete(members[0]["config"]), members[0]["classes"]
    calibrated = calibration(oof.probabilities, oof.labels, config["unknown_target_error"], config["unknown_delta"])
    output.mkdir(parents=True, exist_ok=True)
    kept = Calibration(oof.probabilities, oof.labels, oof.shas, [f"out-of-fold predictions of {output.name}"]).to_dict()
    spec = {"members": [os.path.relpath(m["dir"].resolve(), output.resolve()) for m in members],
            "weights": [round(1 / len(members), 6)] * len(members), "selection": CROSSFIT, **calibrated,
            "calibration": {k: v.tolist() if hasattr(v, "tolist") else v for k, v in kept.items()},
            "class_names": classes, "val_accuracy": float((oof.probabilities.argmax(1) == oof.labels).mean())}
    (output / "ensemble.json").write_text(json.dumps(spec, indent=1))  # what load_ensemble reads
    model, meta = load_ensemble(output, device, dtype)
    test = evaluate(model, test_batches(split, root, meta, batch_size), device, dtype)  # the one test evaluation
    result = {**test_metrics(test, classes, calibrated, config["set_coverage"]), "best_val_accuracy": spec["val_accuracy"],
              "n_val": len(oof.labels), "n_test": len(test.labels), "run_dir": str(output)}
    spec.update({"test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"]})
    write_crossfit(output, spec, result, split, oof, test)
    return {**spec, "metrics": result}


def write_crossfit(output: Path, spec: dict, result: dict, split, oof, test) -> None:
    """The cross-fitted model's folder beside ensemble.json: metrics.json, its split (every non-test photo
    trained some fold model: 'train'), and predictions.csv (out-of-fold rows as 'val', then the test)."""
    from . import reports
    from .evaluation import per_image

    (output / "ensemble.json").write_text(json.dumps(spec, indent=1))
    (output / "metrics.json").write_text(json.dumps(result, indent=2))
    split.assign(split=split["split"].where(split["split"] == "test", "train")).to_csv(output / "split.csv", index=False)
    images = lambda shas: [SimpleNamespace(sha256=sha) for sha in shas]  # per_image takes records
    test_shas = split.loc[split["split"] == "test", "sha256"].tolist()
    result["predictions"] = per_image("val", images(oof.shas), oof) + per_image("test", images(test_shas), test)
    reports.write_predictions(output / "predictions.csv", result["predictions"], spec["class_names"])


def is_ensemble(source: str | Path) -> bool:
    return (Path(source) / "ensemble.json").is_file()


def load_ensemble(folder: str | Path, device, dtype, eager: bool = False):
    """(models.Ensemble ready for inference, metadata in a checkpoint's shape) for predict; eager: the
    members as trained (what export traces), not made fast for inference."""
    from .. import models

    folder = Path(folder)
    spec = json.loads((folder / "ensemble.json").read_text())
    members = []
    for path, weight in zip(spec["members"], spec["weights"]):
        if weight > 0:
            model, meta = models.load_checkpoint(folder / path / "best.pt", device)
            ready = model.eval() if eager else models.for_inference(model, meta["input_size"], device, dtype)
            # a member evaluated with flips (its tta) gave the ensemble its probabilities that way
            members.append((models.Flipped(ready) if meta["best"].get("tta") else ready, weight, meta))
    largest = max((meta for _, _, meta in members), key=lambda meta: meta["input_size"])
    meta = {"backbone": "ensemble", "class_names": spec["class_names"], "input_size": largest["input_size"],
            "mean": largest["mean"], "std": largest["std"], "members": spec["members"], "weights": spec["weights"],
            "best": {k: spec[k] for k in ("unknown_threshold", "unknown_target_error", "unknown_delta",
                                          "unknown_error_bound", "conformal_scores", "calibration") if k in spec}}
    return models.Ensemble(members, meta["input_size"], meta["mean"], meta["std"]).to(device).eval(), meta
