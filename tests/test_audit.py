import csv
import json

import pytest

from conftest import COLOURS, make_image
from orestudy import data
from orestudy.commands import audit
from orestudy.run import training
from orestudy.config import TrainConfig

PER_CLASS = 24
FLIPPED = {("azurite", 3): "pyrite", ("malachite", 5): "azurite", ("pyrite", 7): "malachite",
           ("malachite", 11): "pyrite"}  # 4 of 72 images (5.6 %) saved in another class's folder


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory):
    """COLOURS as class folders of PNGs, with the FLIPPED images in the wrong folder."""
    root = tmp_path_factory.mktemp("noisy") / "minerals"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(PER_CLASS):
            folder = root / FLIPPED.get((name, i), name)
            folder.mkdir(parents=True, exist_ok=True)
            make_image(colour, seed=100 * c + i).save(folder / f"{name}_{i}.png")
    return root


@pytest.mark.slow
def test_audit_finds_flipped_labels(noisy_folder, tmp_path):
    out = tmp_path / "audit"
    stats = audit.main(["--data", str(noisy_folder), "--output", str(out), "--cache", "", "--no-mlflow",
                        "--top", "6", "--image-size", "64"])
    with (out / "label_issues.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * PER_CLASS and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    flagged = [r for r in rows if r["flagged"] == "True"]
    flips = {f"{folder}/{name}_{i}.png" for (name, i), folder in FLIPPED.items()}
    found = flips & {r["path"] for r in flagged}
    assert len(found) >= 0.8 * len(flips), (found, flagged)
    assert len(flagged) - len(found) <= 2  # few clean images flagged
    for r in rows:  # a flipped image is suggested back into the class it was made as
        if r["path"] in found:
            assert r["suggested"] == r["path"].split("/")[1].rsplit("_", 1)[0]
    assert stats["n_flagged"] == len(flagged)
    assert f"**{len(flagged)} images flagged**" in (out / "summary.md").read_text()
    assert (out / "label_issues.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------
# Curation

def write_curation(path, lines):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "action", "label", "note"])
        writer.writerows(lines)
    return path


def config_for(folder, tmp_path, curation=""):
    return TrainConfig(data=str(folder), output=str(tmp_path / "runs"), cache="", curation=str(curation),
                       progress=False, mlflow=False, seed=3)


@pytest.fixture(scope="module")
def records(noisy_folder):
    return data.scan_folder(noisy_folder)[0]


@pytest.fixture
def curation_file(noisy_folder, records, tmp_path):
    """Exclude one flipped photo by content hash, relabel another back by path."""
    sha = next(r.sha256 for r in records if r.path.endswith("pyrite/azurite_3.png"))
    return write_curation(tmp_path / "curation.csv", [
        [sha, "exclude", "", "a blue azurite specimen filed as pyrite"],
        ["azurite/malachite_5.png", "relabel", "malachite", "green banded malachite, not azurite"]])


def test_curation_applied_on_the_published_split(noisy_folder, curation_file, tmp_path):
    plain = training.prepare_data(config_for(noisy_folder, tmp_path))
    curated = training.prepare_data(config_for(noisy_folder, tmp_path, curation_file))
    assert plain.curation is None and plain.published_test == []
    assert curated.curation == {"file": str(curation_file), "sha256": curated.curation["sha256"],
                                "excluded": 1, "relabelled": 1}
    for split in data.SPLITS:  # the same split, less the excluded image
        kept = [r.sha256 for r in plain.records[split] if not r.path.endswith("pyrite/azurite_3.png")]
        assert [r.sha256 for r in curated.records[split]] == kept
    relabelled = [r for recs in curated.records.values() for r in recs if r.path.endswith("azurite/malachite_5.png")]
    assert [r.label for r in relabelled] == ["malachite"]
    assert [r.sha256 for r in curated.published_test] == [r.sha256 for r in plain.records["test"]]
    plain_name = plain.manifest.name.removesuffix("-hash-seed3.csv")
    assert curated.manifest.name.startswith(f"{plain_name}-curated-") and curated.manifest.name.endswith("-hash-seed3.csv")
    with curated.manifest.open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["azurite/malachite_5.png"]["label"] == "malachite"
    assert rows["pyrite/azurite_3.png"]["action"] == "exclude"


def test_dataset_identity_includes_the_curation(noisy_folder, records, curation_file):
    cured = data.read_curation(curation_file, records, noisy_folder)
    name = data.dataset_name(noisy_folder, records)
    assert name == f"minerals-{data.dataset_fingerprint(records)}"  # uncurated: as before
    assert data.dataset_name(noisy_folder, records, cured) == f"{name}-curated-{cured.sha256[:10]}"
    # A reworded note is the same curation; another decision is another.
    lines = list(csv.reader(curation_file.open()))
    reworded = write_curation(curation_file.with_name("b.csv"), [lines[1], [*lines[2][:3], "banded, green"]])
    assert data.read_curation(reworded, records, noisy_folder).sha256 == cured.sha256
    fewer = write_curation(curation_file.with_name("c.csv"), [lines[1]])
    assert data.read_curation(fewer, records, noisy_folder).sha256 != cured.sha256


def test_manifest_refused_across_curation(noisy_folder, records, curation_file, tmp_path):
    cured = data.read_curation(curation_file, records, noisy_folder)
    split, plain = data.dataset_split(records, 3, tmp_path, noisy_folder)
    _, curated = data.dataset_split(records, 3, tmp_path, noisy_folder, cured)
    assert data.read_manifest(curated, records, noisy_folder, cured) == split
    with pytest.raises(ValueError, match="was made with curation .* but this run has no curation"):
        data.read_manifest(curated, records, noisy_folder)
    with pytest.raises(ValueError, match="was made with no curation, but this run has curation"):
        data.read_manifest(plain, records, noisy_folder, cured)


@pytest.mark.parametrize("line, error", [
    (["0" * 64, "exclude", "", "x"], "line 3: '0000.*' is not an image of the data"),
    (["pyrite/pyrite_0.png", "drop", "", "x"], "line 3: action 'drop'"),
    (["pyrite/pyrite_0.png", "relabel", "gold", "x"], "line 3: relabel needs a label, one of azurite"),
    (["pyrite/pyrite_0.png", "relabel", "pyrite", "x"], "line 3: it is labelled pyrite already"),
    (["pyrite/pyrite_0.png", "exclude", "", " "], "line 3: the note is empty"),
    (["pyrite/azurite_3.png", "exclude", "", "again"], "line 3: .*azurite_3.png is curated on an earlier line"),
])
def test_bad_curation_line_is_named(noisy_folder, records, tmp_path, line, error):
    path = write_curation(tmp_path / "bad.csv", [["pyrite/azurite_3.png", "exclude", "", "blue azurite"], line])
    with pytest.raises(ValueError, match=f"bad.csv, {error}"):
        data.read_curation(path, records, noisy_folder)


def test_curated_run_reports_curation_and_published_test(noisy_folder, curation_file, tmp_path):
    config = TrainConfig(data=str(noisy_folder), output=str(tmp_path / "runs"), cache="", curation=str(curation_file),
                         regime="scratch", epochs=1, freeze_epochs=0, image_size=32, batch_size=16, threads=1,
                         progress=False, mlflow=False, seed=3)
    result = training.run_experiment(config)
    metrics = json.loads((tmp_path / "runs" / config.run_name() / "metrics.json").read_text())
    assert metrics["curation"]["excluded"] == 1 and metrics["curation"]["relabelled"] == 1
    plain = training.prepare_data(config_for(noisy_folder, tmp_path))
    assert metrics["n_test_full"] == len(plain.records["test"])
    assert 0 <= metrics["test_full_accuracy"] <= 1 and 0 <= metrics["test_full_macro_f1"] <= 1
    assert result["test_full_accuracy"] == metrics["test_full_accuracy"]
