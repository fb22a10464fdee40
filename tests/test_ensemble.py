"""Ensembles of runs: one split only, weights from validation only, a folder predict takes as a model."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from orestudy import models
from orestudy.commands import ensemble as ensemble_face, predict
from orestudy.run import ensembling, prediction
from orestudy.studies import study

CLASSES = ["azurite", "malachite", "pyrite"]


def fake_run(folder, skill: dict, seed: int, n: int = 30, split_seed: int = 0, checkpoint=None):
    """A finished run folder from its per-image probabilities alone: skill[split] is how often its top-1
    is right. best.pt is a placeholder unless a checkpoint is given."""
    rng = np.random.default_rng(split_seed)
    shas = [f"{split_seed:02d}{i:062d}" for i in range(n)]
    splits = ["val" if i % 2 else "test" for i in range(n)]
    labels = rng.integers(0, 3, n)
    folder.mkdir(parents=True)
    split = pd.DataFrame({"path": [f"{CLASSES[y]}/{i}.png" for i, y in enumerate(labels)], "sha256": shas,
                          "label": [CLASSES[y] for y in labels], "split": splits, "group": range(n)})
    split.to_csv(folder / "split.csv", index=False)
    own = np.random.default_rng(seed)
    rows = []
    for sha, split, y in zip(shas, splits, labels):
        top = y if own.random() < skill[split] else (y + 1) % 3
        probs = np.full(3, 0.1)
        probs[top] = 0.8
        rows.append([split, sha, CLASSES[y], CLASSES[top], 0.8, *probs])
    pd.DataFrame(rows, columns=["split", "sha256", "label", "predicted", "confidence", *(f"p_{c}" for c in CLASSES)]
                 ).to_csv(folder / "predictions.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"unknown_target_error": 0.05}))
    if checkpoint is None:
        (folder / "best.pt").write_bytes(b"")
    else:
        checkpoint(folder / "best.pt")
    return folder


def test_members_on_another_split_are_refused_by_name(tmp_path):
    a = fake_run(tmp_path / "a", {"val": 0.8, "test": 0.8}, seed=1)
    b = fake_run(tmp_path / "b", {"val": 0.8, "test": 0.8}, seed=2)
    c = fake_run(tmp_path / "c", {"val": 0.8, "test": 0.8}, seed=3, split_seed=7)
    with pytest.raises(ValueError, match=r"not on the split of .*a: .*c \("):
        ensembling.build_ensemble([a, b, c], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


def test_weights_come_from_validation_alone(tmp_path):
    """The member best on validation dominates; poisoning every test label and probability changes the
    test score but not the weights or anything else chosen on validation."""
    runs = [fake_run(tmp_path / "good", {"val": 0.95, "test": 0.5}, seed=1),
            fake_run(tmp_path / "fair", {"val": 0.7, "test": 0.9}, seed=2),
            fake_run(tmp_path / "poor", {"val": 0.4, "test": 0.9}, seed=3)]
    clean = ensembling.build_ensemble(runs, tmp_path / "clean")
    assert np.argmax(clean["weights"]) == 0 and sum(clean["weights"]) == pytest.approx(1)
    for run in runs:
        frame = pd.read_csv(run / "predictions.csv")
        test = frame["split"] == "test"
        frame.loc[test, "label"] = np.random.default_rng(0).permutation(frame.loc[test, "label"].to_numpy())
        frame.loc[test, [f"p_{c}" for c in CLASSES]] = frame.loc[test, [f"p_{c}" for c in CLASSES]].to_numpy()[::-1]
        frame.to_csv(run / "predictions.csv", index=False)
    poisoned = ensembling.build_ensemble(runs, tmp_path / "poisoned")
    for key in ("weights", "val_accuracy", "unknown_threshold"):
        assert poisoned[key] == clean[key]
    assert poisoned["test_accuracy"] != clean["test_accuracy"]
    metrics = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert metrics["accuracy"] == clean["test_accuracy"] and metrics["n_val"] == metrics["n_test"] == 15


def test_predict_takes_an_ensemble_folder(tmp_path, image_folder):
    """predict --model ENSEMBLE_DIR: members of different input sizes, their weighted mean."""
    def checkpoint(size):
        def save(path):
            torch.manual_seed(size)
            model = models.create_model("timm/mobilenetv3_small_050", 3, weights="none").eval()
            config = {"attention": "none", "reduction": 8, "dropout": 0.5}
            models.save_checkpoint(path, model, CLASSES, size, [0.5] * 3, [0.25] * 3, config, {})
        return save
    runs = [fake_run(tmp_path / f"m{size}", {"val": 0.9, "test": 0.9}, seed=size, checkpoint=checkpoint(size))
            for size in (48, 64)]
    folder = tmp_path / "ens"
    ensembling.build_ensemble(runs, folder)
    spec = json.loads((folder / "ensemble.json").read_text())
    spec["weights"] = [0.25, 0.75]  # both members take part, whatever the fake validation chose
    (folder / "ensemble.json").write_text(json.dumps(spec))
    preds = predict.main(["--model", str(folder), "--threads", "1", "--precision", "fp32",
                          str(image_folder / "pyrite")])
    assert len(preds) == 10 and all(p.answer in CLASSES + ["unknown"] for p in preds)
    model, meta = prediction.load_model(str(folder))
    x = torch.randn(2, 3, 64, 64)
    members = [models.load_checkpoint(run / "best.pt")[0] for run in runs]
    small = torch.nn.functional.interpolate(x * 0.25 + 0.5, size=(48, 48), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = 0.25 * members[0]((small - 0.5) / 0.25).softmax(1) + 0.75 * members[1](x).softmax(1)
        torch.testing.assert_close(model(x).softmax(1), expected, rtol=1e-4, atol=1e-5)
    assert meta["input_size"] == 64


def test_the_ensemble_is_an_mlflow_run_naming_its_members_runs(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = [fake_run(tmp_path / "runs" / name, {"val": 0.9, "test": 0.8}, seed=i) for i, name in enumerate("ab")]
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("orestudy", artifact_location=(tmp_path / "artifacts").as_uri())
    member_run = client.create_run(experiment, tags={"run_dir": str(runs[0].resolve())})
    spec = ensemble_face.main([*map(str, runs), "--output", str(tmp_path / "runs" / "ens"), "--runs", str(tmp_path / "runs")])
    (logged,) = [r for r in client.search_runs([client.get_experiment_by_name("orestudy").experiment_id])
                 if r.info.run_name == "ensemble-ens"]
    assert logged.data.metrics["test/accuracy"] == spec["test_accuracy"]
    assert logged.data.params["member_0_run"] == member_run.info.run_id and logged.data.params["member_1_run"] == "none"
    assert logged.data.tags["orestudy.members"] == member_run.info.run_id
    assert float(logged.data.params["member_0_weight"]) == spec["weights"][0]
    names = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"ensemble.json", "metrics.json", "predictions.csv"} <= names


def as_record(run, seed: int = 0, backbone: str = "mobilenet_v2"):
    """A run folder as a trial record keeps it: per-image [split, sha, label index, probabilities]."""

    frame = pd.read_csv(run / "predictions.csv")
    rows = [[r.split, r.sha256, CLASSES.index(r.label), [getattr(r, f"p_{c}") for c in CLASSES]]
            for r in frame.itertuples()]
    return study.Trial({"backbone": backbone, "seed": seed}, "ok", {"predictions": rows, "class_names": CLASSES},
                       dataset="fake")


def test_an_ensemble_of_records_is_the_ensemble_of_their_run_folders(tmp_path):
    """The study's ensemble rows (from records) and `orestudy ensemble` (from run folders) compute the
    same weights, threshold and test result; the record round-trips and keys apart from its members."""
    from orestudy.studies import effects

    runs = [fake_run(tmp_path / name, {"val": v, "test": t}, seed=i)
            for i, (name, v, t) in enumerate([("a", 0.9, 0.7), ("b", 0.75, 0.85), ("c", 0.6, 0.9)])]
    folders = ensembling.build_ensemble(runs, tmp_path / "ens")
    made = study.ensemble_trial([as_record(r, backbone=b) for r, b in zip(runs, ("mobilenet_v1", "mobilenet_v2",
                                                                                    "efficientnet_lite0"))], "fake")
    assert made.metrics["weights"] == folders["weights"]
    assert made.metrics["accuracy"] == folders["test_accuracy"] and made.metrics["macro_f1"] == folders["test_macro_f1"]
    assert made.metrics["unknown_threshold"] == folders["unknown_threshold"]
    assert made.metrics["n_test"] == 15 and len(made.metrics["predictions"]) == 30
    path = tmp_path / "trials.jsonl"
    study.write_records(path, [made.record("fake"), as_record(runs[0]).record("fake")])
    back = study.unique_records(study.read_records(path))
    assert len(back) == 2 and back[0].metrics["accuracy"] == made.metrics["accuracy"]
    assert effects.cell_label(back[0].config) == ("ensemble of mobilenet_v1 + mobilenet_v2 + efficientnet_lite0 "
                                                  "(weights on validation)")
    other_split = as_record(fake_run(tmp_path / "d", {"val": 0.8, "test": 0.8}, seed=4, split_seed=7))
    with pytest.raises(ValueError, match="differ"):
        study.ensemble_trial([as_record(runs[0]), other_split], "fake")
    with pytest.raises(ValueError, match="one data set and seed"):
        study.ensemble_trial([as_record(runs[0]), as_record(runs[1], seed=1)], "fake")
