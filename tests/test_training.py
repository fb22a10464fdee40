import json

import mlflow
import pytest
import torch

from orestudy import models
from orestudy.training import TrainConfig, run_experiment


def tiny_config(folder, tmp_path, **overrides) -> TrainConfig:
    values = dict(data=str(folder), output=str(tmp_path / "runs"), cache=str(tmp_path / "cache"),
                  regime="scratch", epochs=2, freeze_epochs=1, image_size=64, batch_size=8, threads=2,
                  progress=False, mlflow=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_frozen_backbone_unchanged_then_trained(image_folder, tmp_path):
    snapshots = []
    config = tiny_config(image_folder, tmp_path, epochs=3, freeze_epochs=2)
    original = models.OreClassifier.set_backbone_frozen

    def spy(self, frozen):  # snapshot the backbone at the start of every epoch
        snapshots.append({k: v.clone() for k, v in self.backbone.state_dict().items()})
        original(self, frozen)

    models.OreClassifier.set_backbone_frozen = spy
    try:
        run_experiment(config)
    finally:
        models.OreClassifier.set_backbone_frozen = original
    first, second, third = snapshots
    assert all(torch.equal(first[k], second[k]) for k in first), "backbone changed while frozen"
    final = torch.load(tmp_path / "runs" / config.run_name() / "best.pt", weights_only=False)["model"]
    last = {k[len("backbone."):]: v for k, v in final.items() if k.startswith("backbone.")}
    assert torch.equal(second["0.0.weight"], third["0.0.weight"])  # epoch 2 was still frozen
    assert final["head.3.weight"].shape[0] == 3


def test_tiny_run_logged_to_mlflow(image_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(image_folder, tmp_path, mlflow=True, experiment="tiny", regime="scratch",
                         attention="se", reduction=4)
    epochs_seen = []
    result = run_experiment(config, report=lambda row, ckpt: epochs_seen.append(row["epoch"]))
    assert epochs_seen == [1, 2]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert sum(sum(row) for row in result["confusion_matrix"]) == result["n_test"]
    run_dir = tmp_path / "runs" / config.run_name()
    for name in ("config.json", "split.csv", "history.csv", "metrics.json", "confusion_matrix.png",
                 "learning_curves.png", "best.pt"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == result["accuracy"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["attention"] == "se" and run.data.params["reduction"] == "4"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["accuracy"])
    val_history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in val_history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "confusion_matrix.png", "learning_curves.png", "best.pt"} <= artifacts
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
