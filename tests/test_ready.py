"""The ready model shipped in models/minerals7: small enough for git, with its card, used by predict when no
--model is given, and right on a few photos of the data set (where ../shared/data/minerals is at hand)."""
import json
import shutil
from dataclasses import asdict

import pytest

from orestudy.commands import predict
from orestudy.config import default_data_root
from orestudy.run import prediction, ready

DATA = default_data_root()


def test_the_ready_model_is_small_and_has_its_card():
    folder = ready.READY_DIR
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"best.pt", "README.md", "card.json", "preprocessing.json"} <= set(files)
    assert sum(files.values()) <= 15e6  # git without LFS
    card = json.loads((folder / "card.json").read_text())
    assert card["recipe"].startswith("mobilenet_v2 tl_da") and len(card["figures"]) >= 4
    assert (ready.DOCS_CARD).read_text().startswith("# The ready model's card")
    text = (folder / "README.md").read_text()
    for part in ("## Accuracy", "## Known confusions", "## Answers, sets and their guarantees",
                 "## Not one of these minerals", "## Licences"):
        assert part in text


@pytest.mark.skipif(not DATA.is_dir(), reason=f"the data set is not at {DATA}")
def test_predict_without_a_model_uses_the_ready_one_and_names_known_photos(capsys):
    photos = [sorted(p for p in (DATA / name).iterdir())[:2] for name in ("malachite", "pyrite", "quartz")]
    preds = predict.main([str(p) for pair in photos for p in pair])
    err = capsys.readouterr().err
    assert "using the ready model" in err and "minerals7" in err
    assert len(preds) == 6 and not any(p.error for p in preds)
    truth = [p.parent.name for pair in photos for p in pair]
    assert sum(p.top[0][0] == t for p, t in zip(preds, truth)) >= 5  # a 90 % model on 6 photos
    assert sum(t in p.set for p, t in zip(preds, truth)) >= 5
    named = [(p.answer, t) for p, t in zip(preds, truth) if p.answer not in (prediction.UNKNOWN, prediction.NOVEL)]
    assert sum(a == t for a, t in named) >= len(named) - 1
    assert sum(not p.novel for p in preds) >= 5 and all(len(p.similar) == 3 for p in preds)


def test_the_card_is_what_the_model_and_the_committed_records_give(tmp_path):
    """A new seed record of the recipe changes the card's figures over seeds: `models/build.py --card-only`
    must have been run since (it rewrites them without retraining)."""
    shutil.copytree(ready.READY_DIR, tmp_path / "model")
    ready.refresh_card(tmp_path / "model", docs=tmp_path / "docs.md")
    for name in ("README.md", "card.json"):
        assert (tmp_path / "model" / name).read_text() == (ready.READY_DIR / name).read_text(), \
            f"{name} is stale: python models/build.py --card-only"
    assert (tmp_path / "docs.md").read_text() == ready.DOCS_CARD.read_text()


def test_the_recipes_seeds_are_its_single_models_not_its_cross_fitted_ones(tmp_path, monkeypatch):
    config = asdict(ready.recipe(seed=5))
    single = {"config": config, "metrics": {"accuracy": 0.9, "predictions": []}, "status": "ok"}
    crossfit = {**single, "config": {**config, "seed": 6, "folds": 3}}
    bf16 = {**single, "config": {**config, "seed": 7, "precision": "bf16"}}  # the same model, other arithmetic
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (single, crossfit, bf16)))
    monkeypatch.setattr(ready, "RECORDS", [tmp_path / "trials.jsonl"])
    monkeypatch.setattr(ready, "REPO_ROOT", tmp_path)
    assert [r["config"]["seed"] for r in ready.seed_records(config)] == [5, 7]


def test_only_the_ready_folder_writes_the_card_on_the_documentation_site(tmp_path, monkeypatch):
    docs = []
    monkeypatch.setattr(ready, "build", lambda run, out, seed, threads, work, data, card, *rest: docs.append(card))
    monkeypatch.setattr(ready, "refresh_card", lambda out, card: docs.append(card))
    ready.main(["--out", str(tmp_path / "elsewhere"), "--run", str(tmp_path / "run")])
    ready.main(["--card-only", "--out", str(tmp_path / "elsewhere")])
    ready.main(["--run", str(tmp_path / "run")])
    ready.main(["--card-only"])
    assert docs == [None, None, ready.DOCS_CARD, ready.DOCS_CARD]
