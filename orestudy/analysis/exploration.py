"""Exploratory data analysis of an ore image folder (the paper's section III, Fig. 1-4): the library of
`orestudy eda`.

run_eda writes to the output folder: class_counts.png (images per class, imbalance ratio), samples.png
(four random photos per class), sizes.png (width vs height by class, file formats and modes),
rgb_histograms.png (each class's RGB histogram), unreadable.csv, near_duplicates.csv, stats.json and
summary.md, which ties them together; and the label audit (orestudy.audit) in audit/. With a curation,
the curated data is described.
"""
from __future__ import annotations

import collections
import csv
import json
import os
from pathlib import Path

import numpy as np

from .. import data
from . import label_audit
from ..run.reports import plt  # matplotlib with the Agg backend: files only

CHANNELS = ("red", "green", "blue")
BINS = 64
SAMPLES = 4  # photos per class in samples.png


def class_colours(class_names: list[str]) -> dict[str, tuple]:
    """One colour per class, the same in every figure."""
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(class_names)}


def rgb_histograms(records: list[data.ImageRecord], input_size: int) -> dict[str, np.ndarray]:
    """Per class, the mean over its images of each image's per-channel histogram (BINS bins, each summing
    to 1), so every photo weighs the same whatever its size. Made from the images the model sees
    (data.load_base), which channel_stats decodes too: one decode per image for both."""
    sums: dict[str, np.ndarray] = {}
    counts = collections.Counter()
    for rec in records:
        pixels = data.load_base(rec, input_size).reshape(3, -1).numpy() // (256 // BINS)
        hist = np.stack([np.bincount(channel, minlength=BINS) for channel in pixels]) / pixels.shape[1]
        sums[rec.label] = sums.get(rec.label, 0) + hist
        counts[rec.label] += 1
    return {label: sums[label] / counts[label] for label in sorted(sums)}


def duplicate_groups(records: list[data.ImageRecord]) -> list[list[data.ImageRecord]]:
    """Groups of two or more near-duplicate images (as training groups them for the split), largest first."""
    groups = collections.defaultdict(list)
    for rec, group in zip(records, data.near_duplicate_groups(records)):
        groups[int(group)].append(rec)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0].path))


# ---------------------------------------------------------------------------------------------------
# Figures

def class_counts_figure(path: Path, counts: dict[str, int], colours: dict) -> None:
    names = sorted(counts, key=lambda n: -counts[n])
    total = sum(counts.values())
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.bar(names, [counts[n] for n in names], color=[colours[n] for n in names])
    ax.bar_label(bars, [f"{counts[n]} ({100 * counts[n] / total:.0f} %)" for n in names], fontsize=8)
    ratio = max(counts.values()) / min(counts.values())
    ax.set_title(f"{total} images in {len(counts)} classes; imbalance ratio (largest / smallest) {ratio:.2f}")
    ax.set_ylabel("images")
    ax.margins(y=0.12)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_figure(path: Path, samples: dict[str, list[data.ImageRecord]]) -> None:
    """A row per class, its photos side by side: what a class looks like, and how much it varies."""
    cols = max(len(recs) for recs in samples.values())
    fig, axes = plt.subplots(len(samples), cols, figsize=(2.4 * cols + 1.2, 2.3 * len(samples)), squeeze=False)
    for row, (label, recs) in zip(axes, samples.items()):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for ax, rec in zip(row, recs):
            ax.imshow(data.load_rgb(rec.path))
            ax.set_title(f"{Path(rec.path).name[:24]} ({rec.width}x{rec.height})", fontsize=7)
        row[0].set_ylabel(label, fontsize=11)
    fig.suptitle(f"{cols} random photos per class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sizes_figure(path: Path, records: list[data.ImageRecord], colours: dict, input_size: int) -> None:
    fig, (ax, fmt_ax) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    for label, colour in colours.items():
        recs = [r for r in records if r.label == label]
        ax.scatter([r.width for r in recs], [r.height for r in recs], s=14, alpha=0.6, color=colour, label=label)
    # Below base_size on the shorter side an image is upscaled before the centre crop.
    side = data.base_size(input_size)
    ax.axvline(side, color="grey", lw=0.8, ls="--")
    ax.axhline(side, color="grey", lw=0.8, ls="--", label=f"{side} px (resize target)")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image size by class")
    ax.legend(fontsize=8, markerscale=1.5)
    formats = collections.Counter(f"{r.format} {r.mode}" for r in records).most_common()
    bars = fmt_ax.barh([f for f, _ in formats][::-1], [n for _, n in formats][::-1], color="slategrey")
    fmt_ax.bar_label(bars, fontsize=8, padding=2)
    fmt_ax.margins(x=0.15)
    fmt_ax.set_xscale("log")
    fmt_ax.set_xlabel("images (log scale)")
    fmt_ax.set_title("File format and colour mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def histograms_figure(path: Path, histograms: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    cols = min(4, len(histograms))
    rows = -(-len(histograms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(histograms):]:
        ax.axis("off")
    centres = (np.arange(BINS) + 0.5) * 256 / BINS
    # Black and white backgrounds pile up in the end bins; scaled to the rest, the photos' colours show.
    top = 1.2 * max(h[:, 1:-1].max() for h in histograms.values())
    for ax, (label, hist) in zip(axes.flat, histograms.items()):
        for channel, values in zip(CHANNELS, hist):
            ax.plot(centres, values, color=channel, lw=1.2)
            ax.fill_between(centres, values, color=channel, alpha=0.08)
        for end, align in ((0, "left"), (-1, "right")):
            if hist[:, end].max() > top:
                ax.text(centres[end], 0.97 * top, f"{hist[:, end].max():.0%}", ha=align, va="top", fontsize=7)
        ax.set_title(f"{label} ({counts[label]} images)", fontsize=9)
        ax.set_xlim(0, 255)
        ax.set_ylim(0, top)
    for ax in axes[-1]:
        ax.set_xlabel("pixel value")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of pixels")
    fig.suptitle("RGB histogram per class (mean of the per-image histograms; end bins off scale are labelled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def duplicates_figure(path: Path, groups: list[list[data.ImageRecord]], root: Path, shown: int = 12) -> None:
    """The largest near-duplicate groups, one per row, so a person can judge them: the perceptual hash
    sees grey-level structure only, so two different minerals on the same white background can match."""
    groups = groups[:shown]
    cols = max(len(g) for g in groups)
    fig, axes = plt.subplots(len(groups), cols, figsize=(2.6 * cols, 2.6 * len(groups)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, group in zip(axes, groups):
        for ax, rec in zip(row, group):
            ax.imshow(data.load_rgb(rec.path))
            ax.set_title(rel(rec.path, root)[-30:], fontsize=8,
                         color="red" if len({r.label for r in group}) > 1 else "black")
    fig.suptitle(f"Near-duplicate groups ({len(groups)} shown; red: the group spans classes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Tables and the summary

def write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def summary_markdown(stats: dict) -> str:
    counts, sizes = stats["class_counts"], stats["size"]
    small_class = min(counts, key=counts.get)
    lines = [
        f"# EDA: {stats['data']}", "",
        f"{stats['n_images']} readable images in {len(counts)} classes, {len(stats['unreadable'])} unreadable files"
        + (f", after curation by {stats['curation']['file']} ({stats['curation']['excluded']} excluded, "
           f"{stats['curation']['relabelled']} relabelled)." if stats["curation"] else "."), "",
        "## What to know before training", "",
        f"- **Class imbalance**: {max(counts.values())} to {counts[small_class]} images per class (ratio "
        f"{stats['imbalance_ratio']:.2f}; smallest: {small_class}). Accuracy favours the large classes: "
        f"read macro-F1 and per-class recall; the split is stratified by class.",
        f"- **Near-duplicates**: {len(stats['near_duplicate_groups'])} groups hold "
        f"{sum(len(g['paths']) for g in stats['near_duplicate_groups'])} images (perceptual hash). Training "
        f"keeps each group inside one split, so copies cannot inflate the test score."
        + (f" **{stats['cross_class_groups']} of them span classes**: look at them in near_duplicates.png; "
           f"either one photo carries two labels (fix the label) or the hash, which ignores colour, matched "
           f"two different specimens (harmless: they only stay in one split)." if stats["cross_class_groups"] else ""),
        *([f"- **Label audit**: {stats['label_audit']['n_flagged']} images "
           f"({100 * stats['label_audit']['flagged_share']:.1f} %) flagged as possibly mislabelled (confident "
           f"learning on out-of-fold probabilities): look at them in audit/label_issues.png, listed in "
           f"audit/label_issues.csv, and put what you decide in a curation file."] if stats["label_audit"] else []),
        f"- **Unreadable files**: {len(stats['unreadable'])}"
        + (" (listed below; training leaves them out)." if stats["unreadable"] else "."),
        f"- **Sizes**: {sizes['min_width']}-{sizes['max_width']} x {sizes['min_height']}-{sizes['max_height']} px "
        f"(median {sizes['median_width']} x {sizes['median_height']}); {sizes['upscaled']} images have a shorter "
        f"side below {sizes['resize_to']} px and are upscaled before the {stats['input_size']} px centre crop.",
        "- **Formats**: " + ", ".join(f"{k} {v}" for k, v in stats["formats"].items())
        + ". File names are not trusted (every file is opened); palette and RGBA images become RGB (alpha on "
          "white), greyscale ones are grey RGB, which carries none of the colour the classes differ by.",
        f"- **Colour** (mean R, G, B in [0, 1] per class; greenest {stats['greenest']}, bluest "
        f"{stats['bluest']}, reddest {stats['reddest']}): colour is what separates several classes, so "
        f"augmentation never shifts hue.",
        f"- **Normalisation**: mean {fmt3(stats['mean'])}, std {fmt3(stats['std'])} per channel (R, G, B) over "
        f"every image's {stats['input_size']} px evaluation view; training with `--normalization train` uses "
        f"its own training split's.", "",
        "| class | images | share | mean R, G, B |", "|---|---:|---:|---|",
        *[f"| {c} | {n} | {100 * n / stats['n_images']:.1f} % | {fmt3(stats['class_mean_rgb'][c])} |"
          for c, n in counts.items()], "",
        "![images per class](class_counts.png)", "",
        "![four random photos per class](samples.png)", "",
        "![sizes and formats](sizes.png)", "",
        "![RGB histograms](rgb_histograms.png)", "",
    ]
    if stats["near_duplicate_groups"]:
        lines += ["![near-duplicate groups](near_duplicates.png)", ""]
    if stats["unreadable"]:
        lines += ["## Unreadable files", "", *[f"- `{b['path']}`: {b['reason']}" for b in stats["unreadable"]], ""]
    if stats["near_duplicate_groups"]:
        shown = stats["near_duplicate_groups"][:20]
        lines += ["## Near-duplicate groups", "",
                  f"The {len(shown)} largest of {len(stats['near_duplicate_groups'])} (all in near_duplicates.csv):", ""]
        lines += [f"- {'**two classes**: ' if len(set(g['labels'])) > 1 else ''}"
                  + ", ".join(f"`{p}`" for p in g["paths"]) for g in shown]
        lines.append("")
    return "\n".join(lines)


def rel(path: str, root: Path) -> str:
    return os.path.relpath(path, root)


def fmt3(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


# ---------------------------------------------------------------------------------------------------

def run_eda(root: Path, output: Path, input_size: int = 224, seed: int = 0, progress: bool = False,
            audit: bool = True, curation: str = "", cache: str = "") -> dict:
    """Writes every figure, table and the summary to output (the label audit to output/audit); returns
    the numbers (also in stats.json)."""
    output.mkdir(parents=True, exist_ok=True)
    records, bad = data.scan_folder(root, progress)
    cured = data.read_curation(curation, records, root) if curation else None
    records = data.apply_curation(records, cured)
    class_names = sorted({r.label for r in records})
    colours = class_colours(class_names)

    rng = np.random.default_rng(seed)
    by_class = {c: [r for r in records if r.label == c] for c in class_names}
    samples = {c: [recs[i] for i in sorted(rng.choice(len(recs), min(SAMPLES, len(recs)), replace=False))]
               for c, recs in by_class.items()}
    counts = {c: len(recs) for c, recs in by_class.items()}
    histograms = rgb_histograms(records, input_size)
    mean, std = data.channel_stats(records, input_size)
    groups = duplicate_groups(records)

    class_counts_figure(output / "class_counts.png", counts, colours)
    samples_figure(output / "samples.png", samples)
    sizes_figure(output / "sizes.png", records, colours, input_size)
    histograms_figure(output / "rgb_histograms.png", histograms, counts)
    if groups:
        duplicates_figure(output / "near_duplicates.png", groups, root)
    write_csv(output / "unreadable.csv", ["path", "reason"], [(rel(b.path, root), b.reason) for b in bad])
    write_csv(output / "near_duplicates.csv", ["group", "path", "label", "width", "height", "sha256"],
              [(i, rel(r.path, root), r.label, r.width, r.height, r.sha256) for i, g in enumerate(groups) for r in g])

    class_mean = {c: data.channel_stats(recs, input_size)[0] for c, recs in by_class.items()}
    # How far each channel stands above the mean of the other two: which class is the greenest, ...
    excess = {c: 1.5 * np.array(m) - 0.5 * sum(m) for c, m in class_mean.items()}
    most = [max(excess, key=lambda c: excess[c][i]) for i in range(3)]
    widths, heights = np.array([r.width for r in records]), np.array([r.height for r in records])
    stats = {
        "data": str(root), "input_size": input_size, "seed": seed, "n_images": len(records),
        "class_counts": counts, "imbalance_ratio": max(counts.values()) / min(counts.values()),
        "size": {"min_width": int(widths.min()), "max_width": int(widths.max()), "median_width": int(np.median(widths)),
                 "min_height": int(heights.min()), "max_height": int(heights.max()),
                 "median_height": int(np.median(heights)), "resize_to": data.base_size(input_size),
                 "upscaled": int((np.minimum(widths, heights) < data.base_size(input_size)).sum())},
        "formats": dict(collections.Counter(f"{r.format} {r.mode}" for r in records).most_common()),
        "mean": mean, "std": std, "class_mean_rgb": class_mean,
        "reddest": most[0], "greenest": most[1], "bluest": most[2],
        "unreadable": [{"path": rel(b.path, root), "reason": b.reason} for b in bad],
        "near_duplicate_groups": [{"paths": [rel(r.path, root) for r in g], "labels": [r.label for r in g]}
                                  for g in groups],
        "cross_class_groups": sum(len({r.label for r in g}) > 1 for g in groups),
        "samples": {c: [rel(r.path, root) for r in recs] for c, recs in samples.items()},
        "curation": cured.summary() if cured else None,
        "label_audit": label_audit.run_audit(root, output / "audit", seed=seed, curation=curation, cache=cache,
                                             image_size=input_size, progress=progress) if audit else None,
    }
    (output / "stats.json").write_text(json.dumps(stats, indent=1))
    (output / "summary.md").write_text(summary_markdown(stats))
    return stats
