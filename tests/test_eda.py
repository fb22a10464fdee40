import csv
import json
import shutil

import mlflow
import numpy as np
import pytest
from PIL import Image

from orestudy.analysis import exploration
from orestudy.commands import eda

FIGURES = ("class_counts.png", "samples.png", "sizes.png", "rgb_histograms.png", "near_duplicates.png")


@pytest.fixture
def eda_folder(image_folder):
    """The generated folder, unbalanced (azurite loses 4 images), with a corrupt file and a copy."""
    for i in range(4):
        next((image_folder / "azurite").glob(f"azurite_{i}*")).unlink()
    (image_folder / "pyrite" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    shutil.copy(image_folder / "malachite" / "malachite_0.jpg", image_folder / "malachite" / "copy.jpg")
    return image_folder


def test_eda_writes_every_figure_table_and_summary(eda_folder, tmp_path):
    out = tmp_path / "eda"
    stats = eda.main(["--data", str(eda_folder), "--output", str(out), "--input-size", "32", "--no-mlflow"])
    for name in FIGURES:
        assert Image.open(out / name).size[0] > 300, name
    assert stats["class_counts"] == {"azurite": 6, "malachite": 11, "pyrite": 10}
    assert stats["imbalance_ratio"] == pytest.approx(11 / 6)
    assert [b["path"] for b in stats["unreadable"]] == ["pyrite/broken.jpg"]
    assert {"paths": ["malachite/copy.jpg", "malachite/malachite_0.jpg"], "labels": ["malachite"] * 2} \
        in stats["near_duplicate_groups"]
    assert stats["cross_class_groups"] == 0
    # Colour: the classes were generated blue, green and yellow.
    assert (stats["bluest"], stats["greenest"], stats["reddest"]) == ("azurite", "malachite", "pyrite")
    assert all(0 < m < 1 for m in stats["mean"]) and all(0 < s < 0.5 for s in stats["std"])
    assert json.loads((out / "stats.json").read_text()) == stats

    with (out / "near_duplicates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} >= {"malachite/copy.jpg", "malachite/malachite_0.jpg"}
    with (out / "unreadable.csv").open() as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["pyrite/broken.jpg"]
    summary = (out / "summary.md").read_text()
    for text in ["27 readable images in 3 classes", "ratio 1.83", "pyrite/broken.jpg", "malachite/copy.jpg",
                 *[f"]({name})" for name in FIGURES]]:
        assert text in summary, text


def test_histograms_are_per_image_distributions(eda_folder):
    from orestudy import data

    records, _ = data.scan_folder(eda_folder)
    hists = exploration.rgb_histograms(records, 32)
    assert set(hists) == {"azurite", "malachite", "pyrite"}
    for h in hists.values():
        assert h.shape == (3, exploration.BINS) and np.allclose(h.sum(1), 1)
    centres = np.arange(exploration.BINS)
    blue, green = (hists["azurite"][2] * centres).sum(), (hists["azurite"][1] * centres).sum()
    assert blue > green  # azurite was generated blue


@pytest.mark.slow
def test_eda_is_logged_to_mlflow(eda_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, runs = tmp_path / "eda", tmp_path / "runs"
    eda.main(["--data", str(eda_folder), "--output", str(out), "--input-size", "32", "--runs", str(runs)])
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("orestudy-eda").experiment_id])
    assert run.data.metrics["n_images"] == 27 and run.data.metrics["n_unreadable"] == 1
    assert run.data.metrics["imbalance_ratio"] == pytest.approx(11 / 6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.md", "stats.json", "unreadable.csv", "near_duplicates.csv", *FIGURES} <= artifacts


def test_eda_logs_beside_its_report_not_in_the_working_folder(image_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere, here = tmp_path / "elsewhere", tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    eda.main(["--data", str(image_folder), "--output", str(elsewhere / "eda"), "--input-size", "32", "--no-audit"])
    assert list(here.iterdir()) == [] and (elsewhere / "mlflow.db").exists()
