import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from orestudy import config, data, models
from orestudy.commands import predict
from orestudy.run import answering, evaluation, features, prediction, training
from conftest import COLOURS, png_folder


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny model (conftest.tiny_run): (image folder, run folder)."""
    return tiny_run


@pytest.fixture
def noise(tmp_path):
    """Uniform noise: a photo of no mineral at all."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(path)
    return path


def with_threshold(run_dir, tmp_path, threshold):
    """A copy of the run's checkpoint as one trained before checkpoints kept calibration data and a
    novelty score, with the given stored "unknown" threshold (None: a checkpoint without one)."""
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    del ckpt["best"]["calibration"], ckpt["best"]["novelty"]
    ckpt["best"]["unknown_threshold"] = threshold
    if threshold is None:
        del ckpt["best"]["unknown_threshold"]
    path = tmp_path / f"threshold_{threshold}.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_rows_for_every_file_in_the_table_csv_and_json(trained, tmp_path, capsys):
    folder, run_dir = trained
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    inputs = [str(folder), str(tmp_path / "corrupt.jpg"), str(tmp_path / "missing.png")]
    # batch size 5: the two bad files make a last batch with no readable image
    preds = predict.main(["--model", str(run_dir), *inputs, "--top-k", "2", "--batch-size", "5",
                          "--output", str(tmp_path / "out.csv")])
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    # the threshold at predict's default target, from the calibration the checkpoint keeps
    threshold = answering.certify(answering.Calibration.of(meta), 0.10, 0.10).threshold
    assert len(preds) == 32
    good, bad = preds[:30], preds[30:]
    for p in good:
        assert p.answer in meta["class_names"] + [prediction.UNKNOWN, prediction.NOVEL] and not p.error
        assert len(p.top) == 2 and p.top[0][1] >= p.top[1][1] and p.top[0][1] == p.confidence
        assert (p.answer == prediction.UNKNOWN) == (not p.novel and p.confidence < threshold)
    assert [p.path for p in bad] == inputs[1:]
    assert "OSError" in bad[0].error and "FileNotFoundError" in bad[1].error
    assert all(p.answer == "" and p.top == [] for p in bad)

    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 32 and table[0].split()[:2] == ["file", "answer"]
    assert table[-2].split()[1] == "UNREADABLE"
    with (tmp_path / "out.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "answer", "confidence", "set", "novelty", "class_1", "p_1", "class_2", "p_2", "error"]
    assert [r["answer"] for r in rows] == [p.answer for p in preds]
    assert rows[-1]["error"] and rows[-1]["class_1"] == ""

    predict.main(["--model", str(run_dir), *inputs, "--output", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["unknown_threshold"] == threshold and out["classes"] == meta["class_names"]
    assert out["target_error"] == 0.10 and out["set_guarantee"] == "conditional"
    assert out["input_size"] == 64 and out["mean"] == meta["mean"]
    assert len(out["predictions"]) == 32 and len(out["predictions"][0]["top_k"]) == 3
    assert out["predictions"][-1]["confidence"] is None


def test_probabilities_are_those_of_validation(trained):
    """Prediction preprocesses as validation does (checkpoint's size, resize, crop, mean/std), and its
    inference model (BatchNorm folded) answers as the trained one."""
    folder, run_dir = trained
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    records, _ = data.scan_folder(folder)
    size, mean, std = meta["input_size"], meta["mean"], meta["std"]
    loader = evaluation.batches([(r, "identity") for r in records], [0] * len(records), 8,
                              lambda smp: features.normalized_batch(smp, size, 0, 0.0, mean, std))
    expected = evaluation.evaluate(model, loader, torch.device("cpu"), None).probabilities
    ready, _ = prediction.load_model(str(run_dir))
    preds = prediction.predict(ready, meta, [r.path for r in records], threshold=None, top_k=3, batch_size=7)
    got = np.array([[dict(p.top)[c] for c in meta["class_names"]] for p in preds])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_noise_is_unknown_when_the_stored_threshold_says_so(trained, noise, tmp_path):
    folder, run_dir = trained
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    threshold = meta["best"]["unknown_threshold"]  # chosen on validation by training
    (plain,) = predict.main(["--model", str(run_dir), str(noise)])
    assert plain.confidence < threshold and plain.answer == prediction.UNKNOWN
    # The stored threshold decides: just above the noise's confidence it is rejected, below it named.
    above = with_threshold(run_dir, tmp_path, plain.confidence + 1e-4)
    below = with_threshold(run_dir, tmp_path, plain.confidence - 1e-4)
    image = str(next((folder / "malachite").iterdir()))
    rejected, photo = predict.main(["--model", str(above), str(noise), image])
    assert rejected.answer == prediction.UNKNOWN and rejected.confidence == pytest.approx(plain.confidence, abs=1e-5)
    assert (photo.answer == prediction.UNKNOWN) == (photo.confidence < plain.confidence + 1e-4)
    (named,) = predict.main(["--model", str(below), str(noise)])
    assert named.answer == plain.top[0][0]


def test_checkpoint_without_threshold_warns_and_never_says_unknown(trained, noise, tmp_path, capsys):
    folder, run_dir = trained
    old = with_threshold(run_dir, tmp_path, None)
    preds = predict.main(["--model", str(old), str(noise), str(folder)])
    assert "no 'unknown' threshold" in capsys.readouterr().err
    assert all(p.answer in COLOURS for p in preds)


def test_tta_averages_the_image_and_its_flips(trained, tmp_path):
    folder, run_dir = trained
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    paths = [str(p) for p in sorted((folder / "pyrite").iterdir())[:3]]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ready, _ = prediction.load_model(str(run_dir))
    preds = list(prediction.predict(ready, meta, paths + [str(tmp_path / "bad.png")], threshold=None, top_k=3,
                                 tta=True, batch_size=3))
    x = data.normalize(torch.stack([prediction.eval_input(p, meta["input_size"]) for p in paths]), meta["mean"], meta["std"])
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(1) for v in (x, x.flip(-1), x.flip(-2))]).mean(0)
    got = np.array([[dict(p.top)[c] for c in meta["class_names"]] for p in preds[:3]])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert preds[3].error


@pytest.mark.slow
def test_mlflow_run_uri_is_the_same_model(trained, tmp_path, monkeypatch):
    folder, run_dir = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    runs.mkdir()
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("tiny", artifact_location=(runs / "artifacts").as_uri()))
    client.log_artifact(run.info.run_id, str(run_dir / "best.pt"))
    images = [str(folder / "azurite")]
    from_uri = predict.main(["--model", f"runs:/{run.info.run_id}/model", "--runs", str(runs), *images])
    assert from_uri == predict.main(["--model", str(run_dir / "best.pt"), *images])


def test_training_stores_the_calibration_of_its_validation_predictions(trained):
    """best.pt keeps the guaranteed threshold and the conformal scores of the validation softmax
    (recomputed here from the run's predictions.csv), and metrics.json what they do on test."""
    folder, run_dir = trained
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    with (run_dir / "predictions.csv").open() as f:
        val = [row for row in csv.DictReader(f) if row["split"] == "val"]
    probs = np.array([[float(row[f"p_{c}"]) for c in meta["class_names"]] for row in val])
    labels = np.array([meta["class_names"].index(row["label"]) for row in val])
    expected = evaluation.calibration(probs, labels, 0.05, 0.1)
    best = meta["best"]
    assert (best["unknown_target_error"], best["unknown_delta"]) == (0.05, 0.1)
    assert best["unknown_threshold"] == pytest.approx(expected["unknown_threshold"], abs=1e-4)
    np.testing.assert_allclose(best["conformal_scores"], expected["conformal_scores"], atol=1e-4)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["set_coverage"] == 0.95 and 1 <= metrics["test_mean_set_size"] <= len(COLOURS)
    assert 0 <= metrics["test_set_coverage"] <= 1 and 0 <= metrics["test_answered_share"] <= 1
    assert metrics["test_answered_error_within_target"] == (metrics["test_answered_error"] is None
                                                            or metrics["test_answered_error"] <= 0.05)


def test_coverage_gives_each_photo_its_prediction_set(trained, tmp_path, capsys):
    folder, run_dir = trained
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    inputs = [str(folder), str(tmp_path / "bad.png")]
    preds = predict.main(["--model", str(run_dir), *inputs, "--coverage", "0.6", "--sets", "marginal",
                          "--output", str(tmp_path / "out.csv")])
    probs = np.array([[dict(p.top)[c] for c in meta["class_names"]] for p in preds[:-1]])
    sets = evaluation.prediction_sets(probs, np.array(meta["best"]["conformal_scores"]), 0.6)
    for p, members in zip(preds, sets):
        assert p.set == [c for c, _ in p.top if members[meta["class_names"].index(c)]]  # most likely first
        assert p.set[0] == p.top[0][0]  # never empty: the top-1 class is always in
    assert preds[-1].error and preds[-1].set == []
    table = capsys.readouterr().out.splitlines()
    assert "set (0.6 coverage)" in table[0] and table[1].endswith("set: " + " or ".join(preds[0].set))
    with (tmp_path / "out.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["path", "answer", "confidence", "set"]
    conditional = predict.main(["--model", str(run_dir), *inputs, "--coverage", "0.6"])  # the default guarantee
    assert all(set(a.set) <= set(b.set) for a, b in zip(preds, conditional))  # more cautious: never smaller
    assert [r["set"] for r in rows] == [" or ".join(p.set) for p in preds]

    wider = predict.main(["--model", str(run_dir), *inputs, "--coverage", "0.99", "--sets", "marginal",
                          "--output", str(tmp_path / "out.json")])
    assert all(set(a.set) <= set(b.set) for a, b in zip(preds, wider))
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["coverage"] == 0.99 and [row["set"] for row in out["predictions"]] == [p.set for p in wider]
    assert out["unknown_delta"] == 0.1


def test_checkpoint_without_conformal_scores_says_so_for_coverage_only(trained, noise, tmp_path, capsys):
    folder, run_dir = trained
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    del ckpt["best"]["conformal_scores"], ckpt["best"]["calibration"], ckpt["best"]["novelty"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(SystemExit):
        predict.main(["--model", str(old), str(noise), "--coverage", "0.95"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(old) in error and "conformal" in error
    (pred,) = predict.main(["--model", str(old), str(noise)])
    assert pred.set == [] and pred.answer


def test_flip_tta_scores_the_run_as_predict_tta_does_and_predict_follows_it(tmp_path):
    """tta=flips: validation and test are the mean softmax over each photo and its flips, computed
    through the training path (flip views, cached features); predict, by default, does the same."""
    folder = png_folder(tmp_path / "minerals")
    run_config = config.TrainConfig(data=str(folder), output=str(tmp_path / "runs"), cache="", regime="tl",
                                    attention="se", reduction=4, epochs=2, freeze_epochs=2, lr=1e-2,
                                    image_size=64, batch_size=8, threads=1, progress=False, mlflow=False,
                                    tta="flips", precision="fp32")  # fp32 as predict: bf16 CPUs differ by ~1e-2
    result = training.run_experiment(run_config)
    assert result["tta"] is True and torch.load(Path(result["run_dir"]) / "best.pt", weights_only=False)["best"]["tta"]
    rows = list(csv.DictReader(open(Path(result["run_dir"]) / "predictions.csv")))
    by_sha = {r.sha256: r.path for r in data.scan_folder(folder)[0]}
    test = [r for r in rows if r["split"] == "test"]
    preds = prediction.predict_files(result["run_dir"], [by_sha[r["sha256"]] for r in test], top_k=3, threads=1,
                                     precision="fp32")
    got = np.array([[dict(p.top)[c] for c in sorted(COLOURS)] for p in preds])
    np.testing.assert_allclose(got, [[float(r[f"p_{c}"]) for c in sorted(COLOURS)] for r in test], atol=2e-4)
    plain = prediction.predict_files(result["run_dir"], [by_sha[r["sha256"]] for r in test], top_k=3, tta=False,
                                     threads=1, precision="fp32")
    assert not np.allclose(got, [[dict(p.top)[c] for c in sorted(COLOURS)] for p in plain], atol=1e-4)


def test_auto_tta_is_chosen_on_validation_alone():
    def ev(accuracy, loss):
        return evaluation.Evaluation(loss, accuracy, np.zeros(1), np.zeros(1), np.zeros((1, 2)))
    plain, better, tied = ev(0.80, 0.5), ev(0.85, 0.6), ev(0.80, 0.5)
    assert training.with_tta("auto", plain, lambda: better) == (better, {"tta": True, "val_accuracy_plain": 0.80,
                                                                           "val_accuracy_flips": 0.85})
    assert training.with_tta("auto", plain, lambda: tied)[1]["tta"] is False  # a tie stays plain
    assert training.with_tta("off", plain, lambda: 1 / 0) == (plain, {"tta": False})  # nothing flipped is scored


def test_predict_answers_in_fp32_by_default_as_the_mlflow_model_and_onnx_file_do(trained):
    """On a CPU with native bf16, auto would autocast; the default answers agree with fp32 exactly."""
    folder, run_dir = trained
    photos = [str(p) for p in sorted(folder.rglob("*.png"))[:6]]
    default = prediction.predict_files(str(run_dir), photos, threads=1)
    fp32 = prediction.predict_files(str(run_dir), photos, threads=1, precision="fp32")
    assert [p.top for p in default] == [p.top for p in fp32]
    assert predict.argument_parser().get_default("precision") == "fp32"


def test_a_target_chosen_at_predict_time_is_the_threshold_training_would_have_stored(trained, tmp_path, capsys):
    """The same run trained for another target stores the threshold predict computes for that target
    from the first run's kept calibration photos; an uncertifiable target is said, with the smallest
    certifiable one."""
    folder, run_dir = trained
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    other = config.TrainConfig(data=str(folder), output=str(tmp_path / "runs"), cache="", regime="tl",
                               epochs=2, freeze_epochs=2, lr=1e-2, image_size=64, batch_size=8, threads=1,
                               progress=False, mlflow=False, unknown_target_error=0.5,
                               precision="fp32")  # as the session's tiny run
    training.run_experiment(other)
    _, trained_for_half = models.load_checkpoint(tmp_path / "runs" / other.run_name() / "best.pt")
    asked = answering.certify(answering.Calibration.of(meta), 0.5, 0.1)
    assert asked.certified  # 6 validation photos certify 50 %, not less than about 43 %
    assert asked.threshold == pytest.approx(trained_for_half["best"]["unknown_threshold"], abs=1e-6)
    capsys.readouterr()
    preds = predict.main(["--model", str(run_dir), str(folder / "pyrite"), "--target-error", "0.05"])
    err = capsys.readouterr().err
    assert "target error 5 % cannot be certified" in err and "the smallest this model can certify is" in err
    assert "calibration size" in err and all(p.answer in (prediction.UNKNOWN, prediction.NOVEL) for p in preds)
    assert all(p.top and p.set for p in preds)  # classes and sets still given


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_an_exported_file_answers_as_its_checkpoint(trained, tmp_path, fmt, suffix, capsys):
    """predict --model model.onnx (with the JSON export wrote): the checkpoint's answers, sets and
    probabilities, at any --target-error (the JSON keeps the calibration); no novelty bank, said once."""
    from orestudy.commands import export
    from orestudy.run import serving

    folder, run_dir = trained
    file, _ = export.main(["--model", str(run_dir), "--format", fmt, "--output", str(tmp_path / f"m{suffix}")])
    photos = sorted(str(p) for p in folder.rglob("*.png"))[::5]
    for target in (0.10, 0.30):
        ours = predict.main([*photos, "--model", str(run_dir), "--target-error", str(target), "--novelty-pass", "0.999999"])
        theirs = predict.main([*photos, "--model", str(file), "--target-error", str(target),
                               "--output", str(tmp_path / "p.csv")])
        assert [p.answer for p in theirs] == [p.answer for p in ours]
        assert [p.set for p in theirs] == [p.set for p in ours]
        np.testing.assert_allclose([q for p in theirs for _, q in p.top], [q for p in ours for _, q in p.top], atol=1e-4)
    assert "an exported file" in capsys.readouterr().err  # the novelty note
    assert len(list(csv.reader((tmp_path / "p.csv").open()))) == len(theirs) + 1
    with pytest.raises(SystemExit):
        predict.main([*photos, "--model", str(file), "--tta"])
    assert "exported file" in capsys.readouterr().err.strip().splitlines()[-1]
    asked = serving.Asker(serving.Settings(str(file))).ask(Path(photos[0]).read_bytes(), "a.png")
    assert asked["heatmap"] is None and asked["answer"] == theirs[0].answer


def test_a_file_name_that_is_not_utf8_is_written_to_csv_and_json(trained, tmp_path):
    """The CSV holds the name's own bytes (so its path opens the file); the JSON escapes them."""
    import os

    folder, run_dir = trained
    odd = os.fsencode(tmp_path) + b"/bad\xff\xfename.png"
    with open(odd, "wb") as f:
        f.write((folder / "azurite" / "azurite_0.png").read_bytes())
    for suffix in (".csv", ".json"):
        out = tmp_path / f"out{suffix}"
        (pred,) = predict.main([os.fsdecode(odd), "--model", str(run_dir), "--output", str(out)])
        assert not pred.error and pred.answer
    row = (tmp_path / "out.csv").read_bytes().splitlines()[1]
    assert row.startswith(odd + b",") and os.path.isfile(row.split(b",")[0])
    assert json.loads((tmp_path / "out.json").read_text())["predictions"][0]["path"] == os.fsdecode(odd)
