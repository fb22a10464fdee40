import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from orestudy import models, tracking
from orestudy.run import features, training
from orestudy.config import TrainConfig
from orestudy.run.training import run_experiment

from conftest import tiny_config


def backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def snapshots_of_a_run(config) -> list[dict]:
    """The backbone's weights and BatchNorm statistics before training and after every epoch."""
    run = training.build_run(config)
    snapshots = [backbone_state(run.model)]
    progress = training.Progress()
    training.fit(run, progress, tracking.Tracker(None), report=lambda row, state: snapshots.append(backbone_state(run.model)))
    return snapshots


@pytest.mark.parametrize("cache_features", [True, False])
def test_frozen_backbone_unchanged_then_trained(image_folder, tmp_path, cache_features):
    config = tiny_config(image_folder, tmp_path, epochs=3, freeze_epochs=2, cache_features=cache_features)
    start, after1, after2, after3 = snapshots_of_a_run(config)
    for k in start:  # weights and BN running statistics alike
        assert torch.equal(start[k], after1[k]) and torch.equal(start[k], after2[k]), f"{k} changed while frozen"
    changed = [k for k in start if not torch.equal(after2[k], after3[k])]
    assert "0.0.weight" in changed and len(changed) > len(start) // 2


def test_partial_freeze_keeps_lower_modules_fixed(image_folder, tmp_path):
    snapshots = snapshots_of_a_run(tiny_config(image_folder, tmp_path, epochs=2, freeze_epochs=0, freeze_depth=10))
    start, end = snapshots[0], snapshots[-1]
    low = [k for k in start if int(k.split(".")[0]) < 10]
    high = [k for k in start if int(k.split(".")[0]) >= 10 and k.endswith("weight")]
    assert all(torch.equal(start[k], end[k]) for k in low)
    assert all(not torch.equal(start[k], end[k]) for k in high)


@pytest.mark.parametrize("attention", ["se", "cbam"])  # cached pooled (SE) and whole maps (CBAM)
@pytest.mark.parametrize("precision, tolerance", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_cached_features_match_the_uncached_path(image_folder, tmp_path, attention, precision, tolerance):
    """Training the head on cached feature maps computes what recomputing the backbone computes, to
    the rounding of the precision (bf16 keeps about 3 significant digits)."""
    runs = {}
    for cached in (True, False):
        rows = []
        config = tiny_config(image_folder, tmp_path / str(cached), epochs=3, freeze_epochs=3, regime="tl_da",
                             attention=attention, precision=precision, cache_features=cached)
        result = run_experiment(config, report=lambda row, ckpt: rows.append(row))
        runs[cached] = rows, result
    (rows_c, res_c), (rows_u, res_u) = runs[True], runs[False]
    one_image = 1 / res_c["n_val"]
    for a, b in zip(rows_c, rows_u):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=tolerance)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=tolerance)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=(one_image if precision == "bf16" else 0) + 1e-9)
    # The test loss is the chosen epoch's; bf16 rounding may flip one validation image (asserted above), and so
    # the epoch chosen, which fp32 must not.
    if precision == "fp32" or res_c["best_epoch"] == res_u["best_epoch"]:
        assert res_c["best_epoch"] == res_u["best_epoch"]
        assert res_c["test_loss"] == pytest.approx(res_u["test_loss"], abs=tolerance)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_unfrozen_stage_is_cached_in_the_whole_backbones_pass(image_folder, tmp_path, precision):
    """While the whole backbone is frozen, the outputs at the depth the schedule unfreezes to are cached
    in the same pass: both caches hold what a route that fills each on its own computes, and the later
    fill computes nothing."""
    config = tiny_config(image_folder, tmp_path, regime="tl", epochs=3, freeze_epochs=1, freeze_depth=-2,
                         precision=precision)
    run = training.build_run(config)
    assert run.route.stage == run.model.depth - 2
    samples = run.train_samples
    alone = features.FrozenRoute(run.model, run.route.images, run.route.input_size, str(tmp_path / "alone"), run.route.cache_key,
                                 run.device, run.dtype)
    for route in (run.route, alone):
        route.eval_batches(run.model.depth, samples, run.train_labels, 8)
    shared = run.route.caches[run.route.stage]
    assert shared.fill(samples, compute=None) == 0  # all there: nothing to compute
    assert len(list(shared.dir.glob("shard-*.pt"))) == 1
    alone.eval_batches(run.route.stage, samples, run.train_labels, 8)
    for depth in (run.model.depth, run.route.stage):
        a, b = run.route.caches[depth].batch(samples), alone.caches[depth].batch(samples)
        assert a.shape == b.shape and a.abs().max() > 0.1
        assert (a - b).abs().max() <= (1e-3 if precision == "fp32" else 3e-2) * a.abs().max()
    run.route.keep_only(run.route.stage)
    assert list(run.route.caches) == [run.route.stage]


@pytest.mark.slow
def test_tiny_run_logged_to_mlflow(image_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(image_folder, tmp_path, mlflow=True, experiment="tiny", regime="scratch",
                         attention="se", reduction=4)
    epochs_seen = []
    result = run_experiment(config, report=lambda row, ckpt: epochs_seen.append(row["epoch"]))
    assert epochs_seen == [1, 2]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert sum(sum(row) for row in result["confusion_matrix"]) == result["n_test"]
    # The stored threshold's effect on the test photos: every photo answered at threshold 0.
    assert 0.0 <= result["test_answered_share"] <= 1.0
    assert result["test_answered_share"] < 1.0 or result["test_answered_accuracy"] == result["accuracy"]
    run_dir = tmp_path / "runs" / config.run_name()
    for name in ("config.json", "split.csv", "history.csv", "metrics.json", "confusion_matrix.png",
                 "learning_curves.png", "best.pt"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == result["accuracy"]
    saved = json.loads((run_dir / "config.json").read_text())  # the config, and what it ran with
    assert saved["epochs"] == config.epochs and saved["environment"]["torch"] == torch.__version__.split("+")[0]
    # Per-image outcomes of the best checkpoint, validation and test, keyed by image content.
    per_image = pd.read_csv(run_dir / "predictions.csv")
    assert sorted(per_image["split"].value_counts().items()) == [("test", result["n_test"]), ("val", result["n_val"])]
    test_rows = per_image[per_image["split"] == "test"]
    assert (test_rows["label"] == test_rows["predicted"]).mean() == pytest.approx(result["accuracy"])
    assert len(result["predictions"]) == len(per_image) and all(len(row[1]) == 64 for row in result["predictions"])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["attention"] == "se" and run.data.params["reduction"] == "4"
    # Metrics in sections MLflow groups (train/, val/, test/, ...), constants as params, a description;
    # the experiment marked as model development, with a saved view of the runs and their scores.
    assert run.data.metrics["test/accuracy"] == pytest.approx(result["accuracy"])
    assert run.data.metrics["test/answered_share"] == pytest.approx(result["test_answered_share"])
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/best_accuracy", "val/unknown_threshold",
            "test/macro_f1", "test_per_class/f1_azurite"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if "/" not in k]  # no flat name left over
    assert not {"frozen", "epochs_run", "set_coverage"} & set(run.data.metrics)
    assert run.data.params["epochs_run"] == "2"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Test accuracy {result['accuracy']:.4f}**") and "3 classes, 30 images" in note
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "metrics.`test/accuracy`" in json.loads(json.loads(exp.tags["mlflow.sharedViewState.orestudy"])["state"])[
        "selectedColumns"]
    val_history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in val_history] == [1, 2]
    assert tracking.read_metric(run.data.metrics, "accuracy") == run.data.metrics["test/accuracy"]
    assert [m.step for m in tracking.metric_history(client, run.info.run_id, "val_accuracy")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "predictions.csv", "confusion_matrix.png", "learning_curves.png", "best.pt"} <= artifacts
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").unwrap_python_model()
    assert model.predict(None, torch.zeros(1, 3, 64, 64)).filter(like="p_").shape == (1, 3)


def test_same_seed_same_run(image_folder, tmp_path):
    histories = []
    for attempt in ("a", "b"):
        rows = []
        run_experiment(tiny_config(image_folder, tmp_path / attempt, epochs=2, freeze_epochs=1, aug_strength=0.5),
                       report=lambda row, ckpt: rows.append({k: v for k, v in row.items() if k != "epoch_seconds"}))
        histories.append(rows)
    assert histories[0] == histories[1]


class Interrupted(Exception):
    pass


EVERY_KNOB = dict(optimizer="adamw", weight_decay=0.05, lr_schedule="cosine", warmup_epochs=1, head_lr_mult=10.0,
                  label_smoothing=0.1, mixup=0.4, cutmix=1.0, ema_decay=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [{}, EVERY_KNOB], ids=["paper", "every_knob"])
def test_a_resumed_run_continues_exactly_where_it_stopped(image_folder, tmp_path, knobs):
    """The state reported after an epoch continues the run as if it had never stopped: the same later
    epochs (online augmentation's random draws included; with every recipe knob on, the schedule, the
    weights' average and mixup's draws too), the same best checkpoint and test result."""
    config = tiny_config(image_folder, tmp_path, epochs=4, freeze_epochs=1, regime="scratch", attention="se",
                         aug_strength=0.5, **knobs)

    def run(stop_after: int = 0, resume: dict | None = None) -> tuple[list[dict], dict | None, dict]:
        rows, saved = [], {}

        def report(row, state):
            rows.append({k: v for k, v in row.items() if k != "epoch_seconds"})
            if row["epoch"] == stop_after:
                buffer = io.BytesIO()
                torch.save(state, buffer)  # as a Tune checkpoint keeps it
                saved["state"] = torch.load(io.BytesIO(buffer.getvalue()))
                raise Interrupted

        try:
            result = run_experiment(config, report, resume)
        except Interrupted:
            result = None
        return rows, saved.get("state"), result

    unbroken, _, expected = run()
    before, state, _ = run(stop_after=2)  # stopped after its first fine-tuning epoch
    after, _, result = run(resume=state)
    assert [r["epoch"] for r in before] == [1, 2] and [r["epoch"] for r in after] == [3, 4]
    assert before + after == unbroken
    for key in ("accuracy", "test_loss", "best_epoch", "best_val_accuracy", "confusion_matrix"):
        assert result[key] == expected[key], key
    assert result["wall_seconds"] >= state["elapsed"]
    with pytest.raises(ValueError, match="training state to resume is of run"):
        run_experiment(tiny_config(image_folder, tmp_path, epochs=3), resume=state)

    # The same through last.pt, the file every epoch leaves in the run folder, and `train --resume`:
    # each attempt has a folder of its own, and the resumed one finishes in its folder.
    unbroken_dir, resumed_dir, interrupted_dir = (tmp_path / "runs" / (config.run_name() + suffix)
                                                    for suffix in ("", "-2", "-3"))
    assert state["run_dir"] == str(resumed_dir) and result["run_dir"] == str(resumed_dir)
    assert json.loads((resumed_dir / "config.json").read_text())["epochs"] == 4  # the refused state wrote nothing
    run(stop_after=2)
    last = torch.load(interrupted_dir / "last.pt")
    assert last["epoch"] == 2 and all(torch.equal(last["model"][k], v) for k, v in state["model"].items())
    assert not (interrupted_dir / "metrics.json").exists()
    from orestudy.commands import train

    resumed = train.main(["--resume", str(interrupted_dir)])
    for key in ("accuracy", "test_loss", "best_epoch", "best_val_accuracy", "confusion_matrix"):
        assert resumed[key] == expected[key], key
    columns = [c for c in pd.read_csv(unbroken_dir / "history.csv").columns if c != "epoch_seconds"]
    assert pd.read_csv(interrupted_dir / "history.csv")[columns].equals(pd.read_csv(unbroken_dir / "history.csv")[columns])
    weights = [torch.load(folder / "best.pt", weights_only=False)["model"] for folder in (unbroken_dir, interrupted_dir)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not (interrupted_dir / "last.pt").exists()  # a finished run has nothing left to resume


def test_bf16_autocast_agrees_with_fp32():
    """bf16 is used only where the CPU (or GPU) runs it natively; where it is, it must not change answers."""
    torch.manual_seed(0)
    model = models.create_model("mobilenet_v2", 7, weights="imagenet", attention="se").eval()
    x = torch.randn(16, 3, 96, 96)
    with torch.no_grad():
        fp32 = model(x).softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float().softmax(1)
    assert (fp32.argmax(1) == bf16.argmax(1)).float().mean() >= 0.9
    assert (fp32 - bf16).abs().max() < 0.05


def test_bad_options_are_named(capsys):
    from orestudy.commands import train

    with pytest.raises(SystemExit):
        train.main(["--regime", "fine_tune"])
    assert "regime 'fine_tune'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="aug_strength"):
        TrainConfig(aug_strength=2.0)
    with pytest.raises(ValueError, match="unknown config keys.*'lrate'"):
        TrainConfig.from_dict({"lrate": 0.1})


@pytest.mark.slow
def test_cross_validation_trains_every_fold_in_lockstep_and_never_tests(image_folder, tmp_path):
    """folds=2: one model per fold, reported per epoch as the mean over folds; the test split is never
    evaluated, and the folds' validation images are the non-test images, each evaluated once a fold."""
    config = tiny_config(image_folder, tmp_path, folds=2, evaluate_test=False, name="cv")
    rows, states = [], []
    result = run_experiment(config, lambda row, state: (rows.append(row), states.append(state)))
    assert [r["epoch"] for r in rows] == [1, 2]
    folds = result["folds"]
    assert [f["run_dir"].rsplit("/", 1)[1] for f in folds] == ["cv-fold0", "cv-fold1"]
    assert result["best_val_accuracy"] == pytest.approx(sum(f["best_val_accuracy"] for f in folds) / 2)
    assert states[-1]["best"]["val_accuracy"] == pytest.approx(result["best_val_accuracy"])
    assert len(states[-1]["folds"]) == 2
    split = pd.read_csv(tmp_path / "runs" / "splits" / next((tmp_path / "runs" / "splits").iterdir()).name)
    test_images = set(split[split["split"] == "test"]["sha256"])
    seen = []
    for f in folds:
        assert "accuracy" not in f  # no test metrics
        predictions = pd.read_csv(f["run_dir"] + "/predictions.csv")
        assert set(predictions["split"]) == {"val"}
        seen += list(predictions["sha256"])
    assert len(seen) == len(set(seen)) == len(split) - len(test_images)  # each non-test image validated once
    assert not set(seen) & test_images


def test_the_epoch_progress_bar_shows_the_running_loss(capsys):
    import time

    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])) for _ in range(3)]

    def slow(inputs):  # slower than the bar's refresh interval
        time.sleep(0.15)
        return model(inputs)

    loss, _ = training.train_one_epoch(slow, torch.optim.SGD(model.parameters(), lr=0.1), batches,
                                       torch.device("cpu"), None, 3, "epoch 1/1", progress=True)
    shown = capsys.readouterr().err
    assert "epoch 1/1" in shown and "loss=" in shown


def test_train_with_folds_makes_a_cross_fitted_model_tested_once(image_folder, tmp_path, monkeypatch, capsys):
    """folds=2 with the test split: two fold models that never test, then their mean as one model
    (an ensemble folder) calibrated on the out-of-fold predictions of every non-test photo, its test
    split read once; predict takes it like a run and answers from those photos."""
    from orestudy.commands import export, predict
    from orestudy.run import ensembling

    reads = []
    original = ensembling.test_batches
    monkeypatch.setattr(ensembling, "test_batches", lambda *a, **k: reads.append(1) or original(*a, **k))
    config = tiny_config(image_folder, tmp_path, folds=2, name="cf", regime="tl", attention="se", freeze_epochs=2,
                         lr=1e-2, precision="fp32")
    result = run_experiment(config)
    assert reads == [1]
    for fold in result["folds"]:
        assert "accuracy" not in fold and set(pd.read_csv(fold["run_dir"] + "/predictions.csv")["split"]) == {"val"}
    folder = tmp_path / "runs" / "cf"
    spec = json.loads((folder / "ensemble.json").read_text())
    split = pd.read_csv(folder / "split.csv")
    non_test = int((split["split"] != "test").sum())
    assert result["n_val"] == non_test == len(spec["calibration"]["labels"]) and result["n_test"] == len(split) - non_test
    assert spec["weights"] == [0.5, 0.5] and result["run_dir"] == str(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["accuracy"] == result["accuracy"]
    # a run's fields, so that a study's trial keeps it as a record (study.RECORD_METRICS)
    assert {"macro_f1", "confusion_matrix", "class_names", "wall_seconds", "device", "precision", "threads",
            "tta"} <= set(result)
    assert len(result["predictions"]) == len(split) and {row[0] for row in result["predictions"]} == {"val", "test"}
    preds = predict.main([str(image_folder), "--model", str(folder)])
    assert len(preds) == len(split) and f"{non_test} calibration photos" in capsys.readouterr().err
    onnx_file, _ = export.main(["--model", str(folder), "--format", "onnx"])  # export takes it too
    exported = predict.main([str(image_folder), "--model", str(onnx_file)])
    assert [p.answer for p in exported] == [p.answer for p in preds]
    np.testing.assert_allclose([p.confidence for p in exported], [p.confidence for p in preds], atol=1e-4)
