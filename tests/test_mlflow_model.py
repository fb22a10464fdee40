"""A run's MLflow record reads like MLflow's own, and its model answers photos without orestudy."""
import io
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from orestudy import config, data, environment
from orestudy.run import prediction, training
from conftest import COLOURS, make_image, png_folder


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny run logged to a fresh store and registered: (image folder, run folder, MLflow run)."""
    root = tmp_path_factory.mktemp("mlflow_model")
    folder = png_folder(root / "minerals")
    run_config = config.TrainConfig(data=str(folder), output=str(root / "runs"), cache="", regime="tl",
                                    epochs=2, freeze_epochs=2, lr=1e-2, image_size=64, batch_size=8, threads=1,
                                    progress=False, experiment="tiny", register="ore-tiny")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the run's own store in runs/
    training.run_experiment(run_config)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    yield folder, root / "runs" / run_config.run_name(), run
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exported it


def image_bytes(seed: int, colour=(40, 60, 200), fmt="PNG") -> bytes:
    out = io.BytesIO()
    make_image(colour, seed, size=(70, 52)).save(out, format=fmt)
    return out.getvalue()


def test_run_has_source_resolved_params_single_values_and_dataset(logged):
    _, run_dir, run = logged
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert tags["mlflow.source.git.commit"] == environment.versions()["git_commit"]
    assert params["precision"] == "auto" and params["dtype"] in ("float32", "bfloat16")
    assert params["device_resolved"] == "cpu" and params["threads_resolved"] == "1"
    assert params["version_torch"] == torch.__version__.split("+")[0] and params["version_mlflow"] == mlflow.__version__
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["environment"]["torch"] == params["version_torch"]
    assert {"n_train", "n_test", "best_epoch", "wall_seconds"} <= set(params)
    assert not {"n_train", "best_epoch", "threads"} & set(metrics)
    assert params["n_train"] == str(result["n_train"]) and metrics["val/best_accuracy"] == result["best_val_accuracy"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.tags[0].value == "training" and "label" in dataset.dataset.schema
    assert json.loads(dataset.dataset.profile)["num_rows"] == sum(result[f"n_{s}"] for s in data.SPLITS)


def test_pyfunc_answers_as_predict_does(logged, tmp_path):
    folder, run_dir, run = logged
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().input_names() == ["image", "path"]
    assert model.metadata.load_input_example(None) is not None  # logged with an input example
    paths = [str(p) for p in sorted(folder.rglob("*.png"))[::7]]
    rgba = tmp_path / "rgba.png"  # alpha is composited on white in both
    make_image((200, 180, 60), 7).convert("RGBA").save(rgba)
    turned, deep = tmp_path / "turned.jpg", tmp_path / "deep.png"  # EXIF orientation and 16 bits, as predict reads
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to show
    make_image((40, 60, 200), 8, size=(64, 40)).save(turned, exif=exif)
    Image.fromarray((np.asarray(make_image((30, 160, 70), 9).convert("L"), dtype=np.uint16) * 257)).save(deep)
    paths += [str(rgba), str(turned), str(deep)]
    frame = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in paths]}))
    net, meta = prediction.load_model(str(run_dir))
    expected = list(prediction.predict(net, meta, paths, prediction.unknown_threshold(meta, "")))
    names = meta["class_names"]
    np.testing.assert_allclose(frame[[f"p_{c}" for c in names]].to_numpy(),
                               [[dict(p.top)[c] for c in names] for p in prediction.predict(net, meta, paths, None, 9)],
                               atol=1e-5)
    assert list(frame["class"]) == [p.answer for p in expected]
    np.testing.assert_allclose(frame["probability"], [p.confidence for p in expected], atol=1e-5)
    assert model.predict(pd.DataFrame({"path": paths}))["class"].tolist() == frame["class"].tolist()
    tensor = data.normalize(torch.stack([prediction.eval_input(p, 64) for p in paths]), meta["mean"], meta["std"])
    np.testing.assert_allclose(model.unwrap_python_model().predict(None, tensor)["probability"], frame["probability"],
                               atol=1e-5)
    with pytest.raises(ValueError, match="row 1: not a readable image"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"image": [image_bytes(1), b"not an image"]}))
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'ore-tiny'")
    assert version.run_id == run.info.run_id


@pytest.mark.slow
def test_pyfunc_loads_without_orestudy(logged, tmp_path):
    _, _, run = logged
    target = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path))
    (tmp_path / "photo.jpg").write_bytes(image_bytes(3, COLOURS["malachite"], "JPEG"))
    code = f"""
import sys
sys.path = [p for p in sys.path if p not in ('', {str(config.REPO_ROOT)!r}) and 'orestudy' not in p]
class NoOrestudy:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'orestudy':
            raise ImportError('orestudy is hidden')
sys.meta_path.insert(0, NoOrestudy())
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({target!r})
out = model.predict(pd.DataFrame({{'image': [open({str(tmp_path / 'photo.jpg')!r}, 'rb').read()]}}))
assert not any(m.startswith('orestudy') for m in sys.modules)
print(out['class'][0], round(out.filter(like='p_').sum(axis=1)[0], 4))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, total = done.stdout.split()
    assert answer in [*COLOURS, "unknown"] and float(total) == pytest.approx(1.0)
