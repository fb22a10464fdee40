"""'Not one of these minerals' (run/novelty.py): the k-th nearest training feature's distance, its
threshold set on validation so that a stated share of in-distribution photos pass, over repeated
draws; and on a trained model, generated pictures of nothing mineral flagged while new photos of the
known classes pass."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binom

from orestudy import config, models
from orestudy.commands import predict
from orestudy.run import novelty, prediction, training
from conftest import COLOURS, make_image, png_folder


def cluster_draw(rng, n: int, centres: np.ndarray, spread: float = 0.35):
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + spread * rng.normal(size=(n, centres.shape[1])), labels


def test_the_stated_share_of_in_distribution_photos_passes_over_repeated_draws():
    """Conformal threshold: over repeated (bank, validation, new photo) draws, a new in-distribution
    photo passes with probability >= 0.95 on average; photos of a class not in the bank are flagged."""
    centres = np.random.default_rng(0).normal(size=(6, 32))
    unseen_centre = np.random.default_rng(1).normal(size=(1, 32))
    rng = np.random.default_rng(2)
    passed, caught, draws = [], [], 120
    for _ in range(draws):
        train, labels = cluster_draw(rng, 300, centres)
        val, _ = cluster_draw(rng, 100, centres)
        scorer = novelty.fit(train, labels, [f"p{i}" for i in range(300)], [f"{i:064x}" for i in range(300)], val)
        new, _ = cluster_draw(rng, 50, centres)
        passed.append((scorer.scores(new) <= scorer.threshold).mean())
        ood = unseen_centre + 0.35 * rng.normal(size=(50, 32))
        caught.append((scorer.scores(ood) > scorer.threshold).mean())
    se = np.std(passed) / np.sqrt(draws)
    assert np.mean(passed) >= 0.95 - 3 * se and np.mean(passed) < 0.99  # as stated, not far above it
    assert np.mean(caught) > 0.95


def test_threshold_rank_and_too_few_validation_photos():
    assert novelty.threshold_for(np.arange(1, 20 + 1), 0.95) == 20  # ceil(21 * 0.95) = 20
    assert novelty.threshold_for(np.arange(1, 10 + 1), 0.95) == np.inf  # 10 are too few: every photo passes
    scorer = novelty.fit(np.eye(4), [0, 1, 2, 3], list("abcd"), list("abcd"), np.eye(4)[:2], k=2)
    assert scorer.k == 2 and novelty.ordinal(2) == "2nd" and "never said" in novelty.note(scorer, 4)
    stored = novelty.Novelty.of({"best": {"novelty": scorer.to_dict()}}, pass_share=0.5)
    assert stored.pass_share == 0.5 and stored.bank.shape == (4, 4)
    np.testing.assert_allclose(stored.scores(np.eye(4)), scorer.scores(np.eye(4)), atol=1e-3)  # fp16 bank


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A tiny frozen-backbone model on 40 generated photos a class (about 24 validate: a finite
    threshold at 95 %)."""
    root = tmp_path_factory.mktemp("novelty")
    folder = png_folder(root / "minerals", per_class=40)
    run_config = config.TrainConfig(data=str(folder), output=str(root / "runs"), cache="", regime="tl",
                                    attention="none", epochs=2, freeze_epochs=2, lr=1e-2, image_size=64, batch_size=16,
                                    threads=2, progress=False, mlflow=False, precision="fp32")
    result = training.run_experiment(run_config)
    return folder, Path(result["run_dir"])


@pytest.mark.slow
def test_generated_pictures_are_flagged_and_new_photos_of_the_classes_pass(model_run, tmp_path):
    folder, run_dir = model_run
    _, meta = models.load_checkpoint(run_dir / "best.pt")
    scorer = novelty.Novelty.of(meta)
    assert np.isfinite(scorer.threshold) and len(scorer.bank) == sum(1 for _ in scorer.photos)
    outliers = tmp_path / "outliers"
    outliers.mkdir()
    for i, image in enumerate(novelty.generated_outliers(28, seed=3)):
        image.save(outliers / f"thing_{i}.png")
    # new photos of the known classes: the generator's unseen seeds, in three repeated draws
    passed = []
    for draw in range(3):
        fresh = tmp_path / f"fresh{draw}"
        fresh.mkdir()
        for c, colour in enumerate(COLOURS.values()):
            for i in range(20):
                make_image(colour, seed=10_000 * (draw + 1) + 100 * c + i).save(fresh / f"{c}_{i}.png")
        preds = prediction.predict_files(str(run_dir), [str(fresh)], threads=2, precision="fp32", coverage=0.95)
        passed.append(np.mean([not p.novel for p in preds]))
    assert np.mean(passed) >= 0.95 - 0.05  # 180 photos: 0.95 stated, sampling error allowed
    things = prediction.predict_files(str(run_dir), [str(outliers)], threads=2, precision="fp32", coverage=0.95)
    caught = [p.novel for p in things]
    assert np.mean(caught) >= 0.85, [(Path(p.path).name, round(p.novelty, 3)) for p in things]
    assert all(p.answer == novelty.NOVEL for p in things if p.novel)
    assert all(p.top and p.set for p in things)  # the classes and the set are still given


@pytest.mark.slow
def test_predict_says_not_one_of_these_before_any_class(model_run, tmp_path, capsys):
    folder, run_dir = model_run
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(noise)
    photo = str(next((folder / "pyrite").iterdir()))
    flagged, known = predict.main(["--model", str(run_dir), str(noise), photo, "--output", str(tmp_path / "o.json")])
    assert flagged.answer == novelty.NOVEL and flagged.novel and flagged.novelty > known.novelty
    out = capsys.readouterr()
    assert "not one of these" in out.out.splitlines()[1] and "1 not one of these" in out.err
    assert len(known.similar) == 3 and known.similar[0]["label"] == "pyrite"
    import orestudy  # the Python API answers as the command does

    api = orestudy.predict(str(run_dir), [str(noise), photo])
    assert [p.answer for p in api] == [flagged.answer, known.answer] and api[1].set == known.set
    assert known.similar[0]["photo"] == str(Path(photo).relative_to(folder)) or known.similar[0]["distance"] > 0


@pytest.mark.slow
def test_features_with_flips_match_the_model(model_run):
    """WithFeatures' logits are the model's (or its flip average, as models.Flipped), its features the
    penultimate layer's."""
    _, run_dir = model_run
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    x = torch.randn(4, 3, 64, 64)
    for flips in (False, True):
        wrapped = novelty.WithFeatures(model, flips).eval()
        with torch.no_grad():
            logits, feats = wrapped.split(wrapped(x))
            expected = (models.Flipped(model) if flips else model)(x)
            assert torch.allclose(logits.softmax(1), expected.softmax(1), atol=1e-5)
            assert torch.allclose(feats, novelty.penultimate(model, x), atol=1e-5)
