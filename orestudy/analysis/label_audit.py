"""Label audit: the photos whose given label a model trained on the other photos contradicts.

Every image gets out-of-fold predicted probabilities: a logistic regression on a frozen backbone's
globally pooled features (the mean over the image and its mirror image), fitted on the other folds of
a stratified K-fold grouped by near-duplicates, so no copy of a photo helps predict it. Confident
learning (cleanlab) flags the images whose label those probabilities contradict, ranked by label
quality (self-confidence: the out-of-fold probability of the given label). A flag is a question for a
person to answer by looking at the photo, not a verdict: decisions go into a curation file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .. import data, device as devices, models
from ..run import features
from ..run.reports import plt

C = 0.1  # the regression's inverse L2 strength: ~1000 features from ~700 photos need a firm prior
COLUMNS = ("rank", "path", "sha256", "given", "suggested", "label_quality", "flagged")


def backbone_features(records, backbone: str, model: str, image_size: int, cache: str, progress: bool) -> np.ndarray:
    """(N, C) pooled, flip-averaged features of the images' evaluation views: from the ImageNet weights
    of backbone, or from the backbone of a trained run's checkpoint (model: its run folder)."""
    if model:
        checkpoint = Path(model) / "best.pt"
        net, meta = models.load_checkpoint(checkpoint)
        size, mean, std = meta["input_size"], meta["mean"], meta["std"]
        weights = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    else:
        net, spec = models.create_model(backbone, 2), models.backbone_spec(backbone)
        size, mean, std, weights = image_size or spec.input_size, spec.mean, spec.std, "imagenet"
    device = devices.pick_device("auto")
    key = {"audit": "pooled, flip-averaged", "backbone": net.spec.name, "weights": weights, "input_size": size,
           "mean": mean, "std": std}
    store = features.FeatureCache(Path(cache) if cache else None, key)

    part = []  # the inference copy, made at the first cache miss: a rerun reads every feature from the cache

    @torch.no_grad()
    def compute(samples):
        if not part:
            part.append(models.for_inference(net.backbone, size, device, None))
        views = torch.stack([data.eval_view(data.load_base(rec, size), size) for rec, _ in samples])
        x = devices.to_device(data.normalize(views, mean, std), device)
        return ((part[0](x).mean((2, 3)) + part[0](x.flip(-1)).mean((2, 3))) / 2).float().cpu()

    samples = [(rec, "audit") for rec in records]
    store.fill(samples, compute, progress)
    return store.batch(samples).numpy()


def out_of_fold_probabilities(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int,
                              folds: int, seed: int) -> np.ndarray:
    """(N, n_classes): each image's probabilities from a regression fitted without its fold."""
    probs = np.zeros((len(labels), n_classes))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(x, labels, groups):
        fitted = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(x[train], labels[train])
        probs[np.ix_(held, fitted.classes_)] = fitted.predict_proba(x[held])  # a class absent from train: 0
    return probs


def label_issues(records, class_names: list[str], probs: np.ndarray, root: Path) -> list[dict]:
    """One row per image, most suspect first: cleanlab's label quality, its suggestion (the most probable
    class) and whether confident learning flags it."""
    labels = np.array([class_names.index(r.label) for r in records])
    flagged = set(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence").tolist())
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    order = np.argsort(quality, kind="stable")
    return [{"rank": rank, "path": os.path.relpath(records[i].path, root), "sha256": records[i].sha256,
             "given": records[i].label, "suggested": class_names[int(probs[i].argmax())],
             "label_quality": round(float(quality[i]), 4), "flagged": i in flagged}
            for rank, i in enumerate(order, 1)]


def cross_class_duplicates(records, groups: np.ndarray, root: Path) -> list[tuple]:
    """(group, path, label, sha256) of near-duplicate groups whose photos carry more than one label."""
    labels = {}
    for rec, group in zip(records, groups):
        labels.setdefault(int(group), set()).add(rec.label)
    return sorted((int(g), os.path.relpath(r.path, root), r.label, r.sha256)
                  for r, g in zip(records, groups) if len(labels[int(g)]) > 1)


def montage(path: Path, rows: list[dict], root: Path, cols: int = 6) -> None:
    """The photos of rows as thumbnails captioned 'given -> suggested'. Saved with a 256-colour palette:
    photos make large PNGs, and a figure to look at loses nothing a person would see."""
    n_rows = -(-len(rows) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.1 * cols, 2.35 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        img = data.load_rgb(root / row["path"])
        img.thumbnail((200, 200))
        ax.imshow(img)
        ax.set_title(f"#{row['rank']} {row['given']} \u2192 {row['suggested']}\nquality {row['label_quality']:.3f} "
                     f"{Path(row['path']).name[:16]}", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def summary_markdown(stats: dict, rows: list[dict], top: int) -> str:
    flagged = [r for r in rows if r["flagged"]]
    pairs = Counter((r["given"], r["suggested"]) for r in flagged).most_common()
    c = stats.get("curation")
    curated = f" after curation by {c['file']} ({c['excluded']} excluded, {c['relabelled']} relabelled)" if c else ""
    lines = [
        f"# Label audit: {stats['data']}", "",
        f"{stats['n_images']} images{curated}; "
        f"out-of-fold probabilities from {stats['features']} features ({stats['folds']} folds grouped by "
        f"near-duplicates, logistic regression; out-of-fold accuracy {stats['oof_accuracy']:.3f}), then "
        f"confident learning (cleanlab `find_label_issues`).", "",
        f"**{len(flagged)} images flagged** ({100 * len(flagged) / stats['n_images']:.1f} %): their out-of-fold "
        f"probabilities contradict their label. A flag is a question: look at each photo, and put what you "
        f"decide (exclude, relabel, or nothing for a hard but correct case) in a curation file with a note.", "",
        f"{stats['cross_class_groups']} near-duplicate groups span classes (cross_class_duplicates.csv).", "",
        "| given | suggested | flagged |", "|---|---|---:|", *[f"| {g} | {s} | {n} |" for (g, s), n in pairs], "",
        f"![the {top} most suspect photos](label_issues.png)", "",
        "| rank | image | given | suggested | label quality |", "|---:|---|---|---|---:|",
        *[f"| {r['rank']} | `{r['path']}` | {r['given']} | {r['suggested']} | {r['label_quality']:.3f} |"
          for r in flagged[:top]], ""]
    return "\n".join(lines)


def run_audit(root: Path, output: Path, folds: int = 5, seed: int = 0, backbone: str = "mobilenet_v2",
              model: str = "", top: int = 36, curation: str = "", cache: str = "", image_size: int = 0,
              progress: bool = False) -> dict:
    """Audit the data at root (after the curation file, when given); writes label_issues.csv, the montage
    label_issues.png, cross_class_duplicates.csv and summary.md to output. Returns the numbers."""
    output.mkdir(parents=True, exist_ok=True)
    records, _ = data.scan_cached(str(root), progress, cache)
    cured = data.read_curation(curation, records, root) if curation else None
    records = data.apply_curation(records, cured)
    class_names = sorted({r.label for r in records})
    labels = np.array([class_names.index(r.label) for r in records])
    groups = data.near_duplicate_groups(records)
    x = backbone_features(records, backbone, model, image_size, cache, progress)
    probs = out_of_fold_probabilities(x, labels, groups, len(class_names), folds, seed)
    rows = label_issues(records, class_names, probs, root)
    flagged = [r for r in rows if r["flagged"]]
    if flagged:
        montage(output / "label_issues.png", flagged[:top], root)
    with (output / "label_issues.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    duplicates = cross_class_duplicates(records, groups, root)
    with (output / "cross_class_duplicates.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "path", "label", "sha256"])
        writer.writerows(duplicates)
    stats = {"data": str(root), "n_images": len(records), "n_flagged": len(flagged),
             "flagged_share": len(flagged) / len(records), "oof_accuracy": float((probs.argmax(1) == labels).mean()),
             "features": f"{model} checkpoint" if model else f"frozen ImageNet {backbone}", "folds": folds,
             "seed": seed, "cross_class_groups": len({g for g, *_ in duplicates}),
             "curation": cured.summary() if cured else None}
    (output / "summary.md").write_text(summary_markdown(stats, rows, top))
    return stats
