"""The ready model: the study's chosen recipe, trained on the published data, shipped in models/ with its
card, and what `orestudy predict` and `orestudy serve` use when no --model is given.

    .venv/bin/python models/build.py                # train the recipe (seed 231), then write models/minerals7
    .venv/bin/python models/build.py --run DIR  # the same from a run folder already trained
    .venv/bin/python models/build.py --card-only  # the card again, after new seed records of the recipe

The recipe is `orestudy train`'s defaults (TrainConfig), in fp32 so that its calibration holds on every
CPU: when the study decides on a better recipe, the defaults change and one command rebuilds the model.
The folder holds best.pt (weights, preprocessing, calibration photos' softmax, the novelty bank),
preprocessing.json (for use without orestudy), card.json (the figures the page shows) and README.md
(the card). No photo of the data set is shipped: the nearest-photo evidence names training photos by
path and content hash, shown where the data folder is at hand.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..config import REPO_ROOT, TrainConfig, WHERE, complete, computation, default_data_root, defaults

NAME = "minerals7"
READY_DIR = REPO_ROOT / "models" / NAME
SEED = 231
# The committed records whose seeds give the recipe's accuracy interval (the first of each seed kept).
RECORDS = sorted((REPO_ROOT / "docs" / "results").glob("*/trials.jsonl"))
# Fields that do not change what a recipe learns: a record of another split method or answering setting
# still measures the recipe (a cross-fitted record, folds > 1, is another model: not one of its seeds).
NOT_RECIPE = {"seed", "split_method", "unknown_target_error", "unknown_delta", "set_coverage", "tta", "precision",
              "evaluate_test", "cache_features"}
GENERATED_OUTLIERS = 70


def default_model() -> str:
    """The ready model's folder, announced on stderr; FileNotFoundError when it is not there."""
    if not (READY_DIR / "best.pt").is_file():
        raise FileNotFoundError(f"no --model given and the ready model is missing ({READY_DIR / 'best.pt'}); give "
                                f"--model RUN_FOLDER, or build it: python models/build.py")
    card = READY_DIR / "card.json"
    recipe = json.loads(card.read_text()).get("recipe", "") if card.is_file() else ""
    print(f"using the ready model {os.path.relpath(READY_DIR)} ({recipe}; card: "
          f"{os.path.relpath(READY_DIR / 'README.md')}); --model picks another", file=sys.stderr)
    return str(READY_DIR)


def recipe(seed: int = SEED, **where) -> TrainConfig:
    """orestudy train's defaults at seed, in fp32 (the calibration then holds on any CPU)."""
    return TrainConfig(**{**{"seed": seed, "precision": "fp32", "mlflow": False, "progress": False}, **where})


def recipe_name(config: dict) -> str:
    att = "" if config["attention"] == "none" else f", {config['attention'].upper()} (r = {config['reduction']})"
    frozen = ("frozen throughout" if config["freeze_epochs"] >= config["epochs"]
              else f"frozen {config['freeze_epochs']} of {config['epochs']} epochs")
    return f"{config['backbone']} {config['regime']}{att}, backbone {frozen}, seed {config['seed']}"


# ---------------------------------------------------------------------------------------------------
# A run folder trained before best.pt kept its calibration data: what finish() would have kept

def split_records(run_dir: Path, root: Path) -> dict[str, list]:
    """The run's photos per split, from its split.csv and the data folder."""
    from .. import data

    records, _ = data.scan_folder(root)
    by_key = {(os.path.relpath(r.path, root), r.sha256): r for r in records}
    out = {s: [] for s in data.SPLITS}
    with (run_dir / "split.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rec = by_key.get((row["path"], row["sha256"]))
            if rec is None:
                raise FileNotFoundError(f"{row['path']} of {run_dir / 'split.csv'} is not in {root}")
            out[row["split"]].append(replace(rec, label=row["label"]))
    return out


def run_predictions(run_dir: Path, classes: list[str]) -> list[tuple]:
    """(split, sha256, class index, softmax) per photo of a run folder's predictions.csv."""
    with (run_dir / "predictions.csv").open(newline="") as f:
        return [(row["split"], row["sha256"], classes.index(row["label"]), [float(row[f"p_{c}"]) for c in classes])
                for row in csv.DictReader(f)]


def enrich(run_dir: Path, root: Path | None = None) -> dict:
    """best.pt of run_dir with its calibration data and novelty bank (answering.keep), computed now from
    its split and metrics.json's validation softmax where training did not keep them; the checkpoint."""
    import numpy as np
    import torch

    from .. import models
    from . import answering

    path = run_dir / "best.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "calibration" in ckpt["best"] and "novelty" in ckpt["best"]:
        return ckpt
    root = Path(root or ckpt["config"]["data"])
    records = split_records(run_dir, root)
    classes = ckpt["class_names"]
    labels = {s: [classes.index(r.label) for r in recs] for s, recs in records.items()}
    rows = {sha: probs for split, sha, _, probs in run_predictions(run_dir, classes)
            if split == "val"}  # the softmax training calibrated on, as it computed it (to 5 decimals)
    val_probs = np.array([rows[r.sha256] for r in records["val"]])
    model, meta = models.load_checkpoint(path)
    config = TrainConfig.from_dict({k: v for k, v in complete(meta["config"]).items() if k in defaults()})
    ckpt["best"].update(answering.keep(model, records, labels, val_probs, meta["input_size"], meta["mean"], meta["std"],
                                       str(root), f"validation split of {config.run_name()}"))
    torch.save(ckpt, path)
    return ckpt


# ---------------------------------------------------------------------------------------------------
# The figures of the card

def seed_records(config: dict) -> list[dict]:
    """The committed trial records of this recipe on the published data, one per seed."""
    want = {k: v for k, v in computation(complete(config)).items() if k not in NOT_RECIPE}
    found = {}
    for path in RECORDS:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            saved = record.get("config", {})
            if "members" in saved or "predictions" not in record.get("metrics", {}) or "curation" in record["metrics"]:
                continue
            mine = {k: v for k, v in computation(complete(saved)).items() if k not in NOT_RECIPE}
            if mine == want and record.get("status", "ok") == "ok":
                found.setdefault(saved["seed"], {**record, "file": str(path.relative_to(REPO_ROOT))})
    return [found[s] for s in sorted(found)]


def interval(values: list[float]) -> dict:
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": sd, "low": mean - half, "high": mean + half}


def confusions(records: list[dict], classes: list[str], top: int = 4) -> list[dict]:
    """The most frequent (true, predicted) pairs over the records' test photos, both ways summed."""
    import numpy as np

    counts, tested = np.zeros((len(classes), len(classes)), int), 0
    for record in records:
        for split, _, label, probs in record["metrics"]["predictions"]:
            if split == "test":
                counts[label, int(np.argmax(probs))] += 1
                tested += 1
    pairs = sorted(((counts[i, j] + counts[j, i], i, j) for i in range(len(classes)) for j in range(i + 1, len(classes))),
                   reverse=True)
    return [{"pair": [classes[i], classes[j]], "count": int(n), "a_as_b": int(counts[i, j]), "b_as_a": int(counts[j, i]),
             "test_photos": tested} for n, i, j in pairs[:top] if n]


def measure(ckpt: dict, run_dir: Path, root: Path) -> dict:
    """The ready model on its own test split (answers at predict's defaults, sets, novelty) and on
    generated non-mineral pictures."""
    import numpy as np
    import torch

    from .. import data, models
    from . import answering, novelty, prediction

    metrics = json.loads((run_dir / "metrics.json").read_text())
    classes = ckpt["class_names"]
    test = [(label, np.array(probs)) for split, _, label, probs in run_predictions(run_dir, classes) if split == "test"]
    labels, probs = np.array([t[0] for t in test]), np.array([t[1] for t in test])
    rules = answering.rules_for(ckpt, "ready")
    cal = answering.Calibration.of(ckpt)
    answered = probs.max(1) >= rules.threshold
    correct = probs.argmax(1) == labels
    five = answering.certify(cal, 0.05, answering.DEFAULT_DELTA)
    sets = {g: answering.sets_at(probs, answering.set_quantile(cal.scores, 0.95, 0.1, g)) for g in answering.GUARANTEES}
    # novelty on the test photos and on generated pictures
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    records = split_records(run_dir, root)
    scorer = novelty.Novelty.of(ckpt)
    test_scores = scorer.scores(novelty.record_features(model, records["test"], meta["input_size"], meta["mean"], meta["std"]))
    outliers = novelty.generated_outliers(GENERATED_OUTLIERS, seed=1)
    with torch.no_grad():
        batch = torch.stack([prediction.eval_input(png_bytes(img), meta["input_size"]) for img in outliers])
        feats = novelty.penultimate(model, data.normalize(batch, meta["mean"], meta["std"])).numpy()
    out_scores = scorer.scores(feats)
    return {
        "test": {"n": len(labels), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                 "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]},
        "answers": {"target_error": rules.target_error, "delta": rules.delta, "threshold": rules.threshold,
                    "certified": rules.certificate.certified, "bound": rules.certificate.bound,
                    "calibration_photos": cal.n, "calibration_answered_share": rules.certificate.answered_share,
                    "test_answered_share": float(answered.mean()), "test_answered": int(answered.sum()),
                    "test_answered_error": float(1 - correct[answered].mean()) if answered.any() else None,
                    "smallest_certifiable_target": rules.certificate.smallest,
                    "at_5_percent": {"certified": five.certified, "threshold": five.threshold,
                                     "test_answered_share": float((probs.max(1) >= five.threshold).mean()),
                                     "smallest": five.smallest, "limit": five.limit, "floor": five.floor}},
        "sets": {g: {"coverage": 0.95, "delta": 0.1, "test_coverage": float(s[np.arange(len(labels)), labels].mean()),
                     "test_mean_size": float(s.sum(1).mean())} for g, s in sets.items()},
        "novelty": {"k": scorer.k, "pass_share": scorer.pass_share, "threshold": scorer.threshold,
                    "validation_photos": len(scorer.val_scores), "bank_photos": len(scorer.bank),
                    "test_pass_share": float((test_scores <= scorer.threshold).mean()), "test_photos": len(test_scores),
                    "generated_outliers": len(out_scores),
                    "generated_caught_share": float((out_scores > scorer.threshold).mean())},
        "classes": classes,
    }


def png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def loco_summary() -> dict | None:
    """The leave-one-class-out novelty benchmark's summary (docs/results/novelty_loco), if committed."""
    path = REPO_ROOT / "docs" / "results" / "novelty_loco" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# The card

def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def seeds_line(seeds: list[dict]) -> str:
    spread = interval([r["metrics"]["accuracy"] for r in seeds]) if len(seeds) > 1 else None
    if not spread:
        return "no committed seed records of this recipe yet"
    return (f"{spread['mean']:.3f} ± {spread['std']:.3f} over seeds {', '.join(str(r['config']['seed']) for r in seeds)} "
            f"(95 % t interval {spread['low']:.3f}–{spread['high']:.3f}; n = {spread['n']}; records: "
            f"{', '.join(sorted({r['file'] for r in seeds}))})")


def opening_lines(config: dict, figures: dict, size_mb: float, note: str) -> list[str]:
    """The card's title, what the model is, the note on it, and its data and split."""
    test = figures["test"]
    return [
        f"# The ready model: {NAME}",
        "",
        f"**{recipe_name(config)}**: "
        + ("an interim stand-in for the recipe the study has decided on so far (see the note), trained on" if note else
           "the recipe the study has decided on so far (`orestudy train`'s defaults), trained on"),
        "the published data, in fp32. `orestudy predict photo.jpg` and `orestudy serve` use it when no `--model` is",
        f"given. Rebuild: `python models/build.py` ({size_mb:.1f} MB, in git without LFS).",
        "",
        *([f"> **{note.split(':')[0]}.** {note.split(':', 1)[1].strip()[:1].upper()}{note.split(':', 1)[1].strip()[1:]}", ""]
          if ":" in note else []),
        "## Data and split",
        "",
        "The Minerals Identification data set (Kaggle `asiedubrempong/minerals-identification-dataset`, folder",
        f"`minet/`; 852 photos of 7 minerals as in `../shared/data/README.md`): {', '.join(figures['classes'])}. Split by",
        f"{config['split_method']} at seed {config['seed']} (60/20/20 by class): {figures['n']['train']} training, "
        f"{figures['n']['val']} validation, {test['n']} test photos. No photo is shipped here.",
        "",
    ]


def accuracy_lines(test: dict, seeds: list[dict], confused: list[dict]) -> list[str]:
    """This model's test accuracy per class, the recipe's over seeds, and the pairs it confuses."""
    return [
        "## Accuracy",
        "",
        f"- This model, its test split (n = {test['n']}): accuracy **{test['accuracy']:.3f}**, macro-F1 {test['macro_f1']:.3f}.",
        f"- The recipe over seeds (test accuracy, one split and training seed each): **{seeds_line(seeds)}**.",
        "",
        "| class | recall | precision | test photos |",
        "|---|---|---|---|",
        *[f"| {c} | {m['recall']:.3f} | {m['precision']:.3f} | {m['support']} |" for c, m in test["per_class"].items()],
        "",
        "## Known confusions",
        "",
        "Over the test photos of the recipe's committed seed records" + (f" ({confused[0]['test_photos']} photos, both "
        "directions summed):" if confused else ": none recorded."),
        "",
        *[f"- {c['pair'][0]} / {c['pair'][1]}: {c['count']} ({c['a_as_b']} {c['pair'][0]} named {c['pair'][1]}, "
          f"{c['b_as_a']} the other way)" for c in confused],
        "",
    ]


def answer_lines(ans: dict, sets: dict, n_test: int) -> list[str]:
    """The answers at the default target and at 5 %, and the prediction sets' coverage."""
    five = ans["at_5_percent"]
    return [
        "## Answers, sets and their guarantees",
        "",
        f"Calibration: the {ans['calibration_photos']} validation photos' softmax, kept in best.pt "
        "([how answers are made](../../docs/usage/geologist.md)).",
        "",
        f"- At the default target (error ≤ {pct(ans['target_error'], 0)} with confidence {1 - ans['delta']:g}): threshold "
        f"{ans['threshold']:.3f}; answers {pct(ans['calibration_answered_share'], 0)} of the calibration photos; on the "
        f"test split it answered {ans['test_answered']} of {n_test} photos ({pct(ans['test_answered_share'])}) at "
        f"{pct(ans['test_answered_error'])} error.",
        "- At 5 %: " + (f"certified, answering {pct(five['test_answered_share'])} of the test photos." if five["certified"] else
                       f"not certified; the smallest certifiable target is {pct(five['smallest'])} ({five['limit']} limits it: "
                       f"an error-free model could certify {pct(five['floor'])} with {ans['calibration_photos']} photos)."),
        f"- 95 % prediction sets on the test split: training-conditional (δ = 0.1, the default) cover "
        f"{pct(sets['conditional']['test_coverage'])} with {sets['conditional']['test_mean_size']:.2f} classes on average; "
        f"marginal cover {pct(sets['marginal']['test_coverage'])} with {sets['marginal']['test_mean_size']:.2f}.",
        "",
    ]


def novelty_lines(nov: dict, loco: dict | None) -> list[str]:
    """How photos of no known mineral are caught: generated pictures, and each class left out in turn."""
    lines = [
        "## Not one of these minerals",
        "",
        f"Deep nearest neighbours (k = {nov['k']}) on the penultimate features, the bank the {nov['bank_photos']} training "
        f"photos; threshold {nov['threshold']:.3f}, passing {pct(nov['pass_share'], 0)} of in-distribution photos by "
        f"construction ({nov['validation_photos']} validation photos).",
        "",
        f"- Test photos passed: {pct(nov['test_pass_share'])} of {nov['test_photos']}.",
        f"- Generated pictures of no mineral (noise, flat colours, gradients, checkerboards, stripes, blobs) caught: "
        f"{pct(nov['generated_caught_share'])} of {nov['generated_outliers']}.",
    ]
    if loco:
        lines += [f"- Leave one class out (a frozen backbone, each class unseen in turn; [table](../../docs/results/novelty_loco/index.md)): "
                  f"AUROC {loco['auroc_mean']:.3f} on average over the 7 classes (min {loco['auroc_min']:.3f}, "
                  f"{loco['worst_class']}); at the 95 % pass threshold {pct(loco['caught_mean'])} of an unseen class is "
                  f"caught on average."]
    return lines + [""]


CLOSING_LINES = [
    "## Licences",
    "",
    "- Starting weights: torchvision's MobileNetV2 `IMAGENET1K_V1` (torchvision, BSD-3-Clause), trained on",
    "  ImageNet-1k, whose terms allow non-commercial research and education; check them before commercial use.",
    "- Data: the Minerals Identification data set as published on Kaggle (see its page for its terms); no photo",
    "  of it is in this folder.",
    "",
    "## Files",
    "",
    "- `best.pt`: the checkpoint orestudy loads (weights, preprocessing, calibration, novelty bank).",
    "- `preprocessing.json`: how to feed the network without orestudy (resize, crop, mean/std, classes).",
    "- `card.json`: these figures, as the page shows them.",
    "",
]


def card_summary(config: dict, figures: dict, seeds: list[dict], confused: list[dict], loco: dict | None,
                 size_mb: float, note: str) -> dict:
    """card.json: the figures the page and `orestudy serve` show in short, and all of them measured."""
    test, ans, sets, nov = figures["test"], figures["answers"], figures["sets"], figures["novelty"]
    accuracies = [r["metrics"]["accuracy"] for r in seeds]
    spread = interval(accuracies) if len(accuracies) > 1 else None
    short = [
        f"test accuracy {test['accuracy']:.3f} on {test['n']} photos; the recipe over seeds: "
        + (f"{spread['mean']:.3f} ± {spread['std']:.3f} (n = {spread['n']})" if spread else "no records"),
        f"answers at ≤ {pct(ans['target_error'], 0)} error (confidence {1 - ans['delta']:g}): {pct(ans['test_answered_share'], 0)} "
        f"of test photos answered, {pct(ans['test_answered_error'])} of them wrong",
        f"95 % sets (conditional): test coverage {pct(sets['conditional']['test_coverage'])}, "
        f"{sets['conditional']['test_mean_size']:.2f} classes on average",
        f"'not one of these': {pct(nov['test_pass_share'], 0)} of test photos pass, "
        f"{pct(nov['generated_caught_share'], 0)} of generated non-mineral pictures are caught"
        + (f", but an unseen mineral only {pct(loco['caught_mean'], 0)} of the time (leave one class out)" if loco else ""),
    ]
    return {"name": NAME, "recipe": recipe_name(config), "note": note, "figures": short,
            "confusions": [f"{c['pair'][0]} / {c['pair'][1]} ({c['count']} of {c['test_photos']} test photos)" for c in confused],
            "card_url": "models/minerals7/README.md", "seeds": accuracies, "measured": figures,
            "loco": loco, "size_mb": size_mb}


def card(config: dict, figures: dict, seeds: list[dict], confused: list[dict], size_mb: float,
         note: str = "") -> tuple[str, dict]:
    """(README.md, card.json) of the ready model."""
    loco = loco_summary()
    lines = (opening_lines(config, figures, size_mb, note) + accuracy_lines(figures["test"], seeds, confused)
             + answer_lines(figures["answers"], figures["sets"], figures["test"]["n"]) + novelty_lines(figures["novelty"], loco)
             + CLOSING_LINES)
    return "\n".join(lines), card_summary(config, figures, seeds, confused, loco, size_mb, note)


def sanitized(ckpt: dict) -> dict:
    """The checkpoint without this machine's paths: the where-fields at their defaults, data as the default folder."""
    where = {f.name for f in fields(TrainConfig) if f.metadata["role"] == WHERE}
    config = {k: (v if k not in where else defaults()[k]) for k, v in ckpt["config"].items()}
    config["data"], config["cache"] = "../shared/data/minerals", ""
    return {**ckpt, "config": config}


DOCS_CARD = REPO_ROOT / "docs" / "models" / f"{NAME}.md"


def build(run_dir: Path | None = None, out: Path = READY_DIR, seed: int = SEED, threads: int = 0,
          work: Path = Path("runs") / "ready", root: Path | None = None, docs: Path | None = DOCS_CARD,
          overrides: dict | None = None, note: str = "") -> Path:
    """Train the recipe (unless run_dir is given; overrides: TrainConfig fields that depart from it, said
    on the card with note), keep its calibration data, and write the ready model's folder."""
    import torch

    from . import exporting, training

    if run_dir is None:
        config = recipe(seed, threads=threads, output=str(work), name=f"{NAME}_s{seed}",
                        data=str(root or default_data_root()), exist_ok=True, **(overrides or {}))
        run_dir = Path(training.run_experiment(config)["run_dir"])
    run_dir = Path(run_dir)
    ckpt = enrich(run_dir, root)
    root = Path(root or ckpt["config"]["data"])
    figures = measure(ckpt, run_dir, root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    figures["n"] = {"train": metrics["n_train"], "val": metrics["n_val"], "test": metrics["n_test"]}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sanitized(ckpt), out / "best.pt")
    write_card(out, ckpt["config"], figures, note, docs)
    prep = exporting.preprocessing(ckpt, "orestudy checkpoint", out / "best.pt")
    prep.update({"output": {"meaning": "the checkpoint's OreClassifier gives logits over class_names; orestudy export "
                                       "--model models/minerals7 writes ONNX or TorchScript"},
                 "unknown_threshold": figures["answers"]["threshold"], "unknown_target_error": figures["answers"]["target_error"],
                 "unknown_delta": figures["answers"]["delta"],
                 "unknown_rule": f"answer 'unknown' when the top probability is below unknown_threshold: the error among "
                                 f"answered photos is then at most {pct(figures['answers']['target_error'], 0)} with confidence "
                                 f"{1 - figures['answers']['delta']:g}; orestudy predict recomputes it for any --target-error "
                                 f"from best.pt's calibration photos"})
    prep.pop("input", None)
    (out / "preprocessing.json").write_text(json.dumps(prep, indent=1))
    print(f"{out}: {(out / 'best.pt').stat().st_size / 1e6:.1f} MB; test accuracy {figures['test']['accuracy']:.3f}", file=sys.stderr)
    return out


def write_card(out: Path, config: dict, figures: dict, note: str, docs: Path | None) -> None:
    """README.md and card.json of the model in out (docs: the same card on the documentation site), its
    figures over seeds taken from the committed records as they are now."""
    seeds = seed_records(config)
    size_mb = (out / "best.pt").stat().st_size / 1e6
    readme, summary = card(config, figures, seeds, confusions(seeds, figures["classes"]), size_mb, note)
    (out / "README.md").write_text(readme)
    if docs is not None:  # its links from there
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(readme.replace("](../../docs/", "](../").replace(
            "# The ready model: ", "# The ready model's card: ", 1))
    (out / "card.json").write_text(json.dumps(summary, indent=1, default=float))


def refresh_card(out: Path = READY_DIR, docs: Path | None = DOCS_CARD) -> None:
    """Rewrite the card of a built model from its own measurements (card.json) and the records committed
    now: the recipe's figures over seeds and its known confusions follow new records without retraining."""
    import torch

    summary = json.loads((out / "card.json").read_text())
    config = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["config"]
    write_card(out, config, summary["measured"], summary["note"], docs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python models/build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run folder of the recipe already trained (default: train it now)")
    parser.add_argument("--out", type=Path, default=READY_DIR, help="the ready model's folder")
    parser.add_argument("--seed", type=int, default=SEED, help="split and training seed")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: all")
    parser.add_argument("--work", type=Path, default=Path("runs") / "ready", help="where the training run goes")
    parser.add_argument("--data", type=Path, help="the data folder (default: ORESTUDY_DATA or ../shared/data/minerals)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field that departs from the recipe (YAML value), e.g. freeze_epochs=20")
    parser.add_argument("--note", default="", help="'Title: text' said on the card, e.g. why the recipe departs")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the card of the model in --out from its measurements and the records committed "
                             "now (no training; after new seed records of the recipe)")
    args = parser.parse_args(argv)
    # the documentation site shows the ready model's card only, never that of a model built elsewhere
    docs = DOCS_CARD if args.out.resolve() == READY_DIR.resolve() else None
    if args.card_only:
        return refresh_card(args.out, docs)
    import yaml

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    TrainConfig.from_dict({**overrides})  # type-checked before hours of training
    build(args.run, args.out, args.seed, args.threads, args.work, args.data, docs, overrides, args.note)


if __name__ == "__main__":
    main()
