"""`orestudy val` gives a run's own test numbers on its test images; `orestudy export` files compute
what the checkpoint computes, fed as their JSON says."""
import csv
import json
import os

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from orestudy import data, models
from orestudy.commands import export, predict, val
from orestudy.run import prediction, validation


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny fp32 model (conftest.tiny_run; ImageNet MobileNetV2 frozen, so only SE and the
    head train, tested from cached features as every run's frozen part is): (image folder, run folder)."""
    return tiny_run


def split_folder(run_dir, data_root, split, dest):
    """The run's split images as class sub-folders (links to the files), from its split.csv."""
    with (run_dir / "split.csv").open() as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                (dest / row["label"]).mkdir(parents=True, exist_ok=True)
                os.symlink(data_root / row["path"], dest / row["label"] / os.path.basename(row["path"]))
    return dest


def test_val_on_the_runs_test_split_gives_the_runs_test_numbers(trained, tmp_path, capsys):
    folder, run_dir = trained
    test_images = split_folder(run_dir, folder, "test", tmp_path / "test")
    (test_images / "azurite" / "broken.png").write_bytes(b"\x89PNG not really")
    metrics = val.main(["--model", str(run_dir), "--data", str(test_images), "--output", str(tmp_path / "out"),
                        "--precision", "fp32", "--no-mlflow"])
    own = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == own["n_test"] and len(metrics["unreadable_files"]) == 1
    assert metrics["confusion_matrix"] == own["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(own["accuracy"]) and metrics["macro_f1"] == pytest.approx(own["macro_f1"])
    for name, scores in own["per_class"].items():
        assert metrics["per_class"][name] == pytest.approx(scores)
    # image by image, the probabilities the run's own test gave them (kept rounded to 5 decimals)
    with (run_dir / "predictions.csv").open() as f:
        probabilities = {row["sha256"]: [float(row[f"p_{c}"]) for c in own["class_names"]]
                         for row in csv.DictReader(f) if row["split"] == "test"}
    assert sorted(probabilities) == sorted(sha for _, sha, _, _ in metrics["predictions"])
    for _, sha, _, probs in metrics["predictions"]:
        np.testing.assert_allclose(probs, probabilities[sha], atol=1e-4)
    assert metrics["loss"] == pytest.approx(own["test_loss"], abs=1e-4)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["confusion_matrix"] == own["confusion_matrix"]
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 0
    printed = capsys.readouterr().out
    for name, scores in own["per_class"].items():
        assert f"{name} " in printed and f"{scores['f1']:.4f}" in printed
    assert f"{own['macro_f1']:.4f}" in printed


@pytest.mark.slow
def test_val_classes_matched_by_name_and_logged_to_mlflow(trained, tmp_path):
    folder, run_dir = trained
    two = tmp_path / "two"
    two.mkdir()
    for name in ("pyrite", "azurite"):  # a model class missing, the rest in another order
        (two / name).symlink_to(folder / name)
    runs = tmp_path / "runs"
    metrics = val.main(["--model", str(run_dir / "best.pt"), "--data", str(two), "--output", str(tmp_path / "out"),
                        "--runs", str(runs)])
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    assert metrics["class_names"] == meta["class_names"] and metrics["n_images"] == 20
    assert metrics["per_class"]["malachite"]["support"] == 0
    assert {n: m["support"] for n, m in metrics["per_class"].items() if n != "malachite"} == {"azurite": 10, "pyrite": 10}
    (run,) = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_experiment_by_name("orestudy-val").experiment_id])
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.params["data"] == str(two.resolve())

    (two / "quartz").mkdir()
    Image.new("RGB", (40, 40)).save(two / "quartz" / "q.png")
    records, _ = data.scan_folder(two)
    with pytest.raises(ValueError, match=f"{two} has classes the model does not know: quartz "):
        validation.labels_of(records, meta["class_names"], two)  # val.main makes it its one error line


def inputs_as_described(described: dict, paths) -> np.ndarray:
    """A batch made from the export's JSON alone, with torchvision, as a user of the file would."""
    images = []
    for path in paths:
        img = TF.resize(TF.pil_to_tensor(Image.open(path).convert("RGB")), described["resize_shorter_side"],
                        antialias=True)
        x = TF.center_crop(img, [described["centre_crop"]] * 2).float() / 255
        images.append((x - torch.tensor(described["mean"])[:, None, None]) / torch.tensor(described["std"])[:, None, None])
    return torch.stack(images).numpy()


@pytest.mark.slow
def test_onnx_and_torchscript_files_compute_what_the_checkpoint_does(trained, tmp_path):
    folder, run_dir = trained
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    paths = sorted(str(p) for p in folder.rglob("*.png"))[::4]
    ours = data.normalize(torch.stack([prediction.eval_input(p, meta["input_size"]) for p in paths]), meta["mean"],
                          meta["std"])
    batches = [ours, torch.randn(1, 3, 64, 64)]  # the dynamic batch axis: 8 and 1

    onnx_file, onnx_json = export.main(["--model", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    described = json.loads(onnx_json.read_text())
    assert described["class_names"] == meta["class_names"] and described["input"]["shape"][1:] == [3, 64, 64]
    assert described["unknown_threshold"] == meta["best"]["unknown_threshold"]
    np.testing.assert_array_equal(inputs_as_described(described, paths), ours.numpy())  # the JSON says it all
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(export.main(["--model", str(run_dir / "best.pt"), "--format", "torchscript",
                                           "--output", str(tmp_path / "m.pt")])[0])
    with torch.no_grad():
        for x in batches:
            expected = model(x).softmax(1).numpy()
            np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
            np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-6)
    assert (run_dir / "model.onnx").exists() is False  # --output respected, the run folder untouched


def test_val_on_the_models_own_photos_says_how_many_it_trained_and_selected_on(trained, tmp_path, capsys):
    folder, run_dir = trained
    with open(run_dir / "split.csv", newline="") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    metrics = val.main(["--model", str(run_dir), "--data", str(folder), "--output", str(tmp_path / "v"),
                        "--no-mlflow", "--threads", "1"])
    assert metrics["seen_in_training"] == {"train": splits.count("train"), "val": splits.count("val")}
    err = capsys.readouterr().err
    assert f"{splits.count('train')} in its train split and {splits.count('val')} in its val split of the 30" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has it")
def test_a_cuda_device_without_cuda_is_one_line_naming_it(trained, tmp_path, capsys):
    folder, run_dir = trained
    photo = str(next(folder.rglob("*.png")))
    for face, argv in ((val.main, ["--model", str(run_dir), "--data", str(folder), "--device", "cuda", "--no-mlflow"]),
                       (predict.main, ["--model", str(run_dir), photo, "--device", "cuda"])):
        with pytest.raises(SystemExit):
            face(argv)
        err = capsys.readouterr().err
        assert "CUDA is missing on this machine" in err and "checkpoint" not in err and "Traceback" not in err


def test_val_logs_to_its_models_store_not_in_the_working_folder(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, run_dir = trained
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    val.main(["--model", str(run_dir), "--data", str(folder), "--output", str(tmp_path / "out")])
    assert list(here.iterdir()) == []
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # where the run's own store is
    (run,) = client.search_runs([client.get_experiment_by_name("orestudy-val").experiment_id])
    assert run.data.tags["mlflow.runName"] == "val-out"
