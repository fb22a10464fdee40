"""Data: find every readable image, group near-duplicates, split, decode once, make views.

The data set is a folder with one sub-folder per class. File names are not trusted (the ore set has
files with no or odd extensions and a GIF), so every file is opened with PIL; what cannot be decoded
is reported and left out.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
import torch
from PIL import Image, ImageFile
from sklearn.model_selection import StratifiedGroupKFold
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: str
    sha256: str
    phash: str
    width: int
    height: int
    format: str
    mode: str


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image PIL can read (whatever the file name) as RGB; alpha is composited on white."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


def scan_folder(root: str | Path, progress: bool = False,
                cache_file: Path | None = None) -> tuple[list[ImageRecord], list[BadFile]]:
    """Every readable image under root/<class>/, plus the files that could not be read and why.
    With cache_file, files whose size and modification time are unchanged are not decoded again."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (set --data or ORESTUDY_DATA)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<images>")
    records, bad = [], []
    files = [(d, p) for d in class_dirs for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    known = json.loads(cache_file.read_text()) if cache_file and cache_file.exists() else {}
    stamps = {}
    for class_dir, path in tqdm(files, desc=f"reading {root.name}", unit="image", disable=not progress):
        stat = path.stat()
        stamps[str(path)] = stamp = [stat.st_size, stat.st_mtime_ns]
        cached = known.get(str(path))
        if cached and cached["stamp"] == stamp and cached["label"] == class_dir.name:
            records.append(ImageRecord(**{k: v for k, v in cached.items() if k != "stamp"}))
            continue
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as probe:
                fmt, mode = probe.format or "?", probe.mode
            img = load_rgb(io.BytesIO(data))
        except Exception as err:  # PIL raises many types for bad files; each is reported, not fatal
            bad.append(BadFile(str(path), f"{type(err).__name__}: {err}"))
            continue
        records.append(ImageRecord(
            path=str(path), label=class_dir.name, sha256=hashlib.sha256(data).hexdigest(),
            phash=str(imagehash.phash(img)), width=img.width, height=img.height, format=fmt, mode=mode))
    if not records:
        raise ValueError(f"no readable images under {root}")
    if cache_file:
        write_json_atomic(cache_file, {r.path: {**asdict(r), "stamp": stamps[r.path]} for r in records})
    return records, bad


@contextlib.contextmanager
def replaced(path: Path):
    """A temporary name beside path, of this process and thread alone, moved over path when the block
    ends: a reader sees the old file or the whole new one, and concurrent writers (two identical runs,
    trials sharing a cache) never write into each other's file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, value, indent: int | None = None) -> None:
    """JSON written whole or not at all: processes sharing a cache folder never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        tmp.write_text(json.dumps(value, indent=indent))


def near_duplicate_groups(records: list[ImageRecord], max_distance: int = 6) -> np.ndarray:
    """Group id per record: images whose perceptual hashes differ in <= max_distance bits (or whose
    bytes are identical) share a group, transitively, so a group can be kept inside one split."""
    bits = np.array([imagehash.hex_to_hash(r.phash).hash.flatten() for r in records], dtype=np.uint8)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    same = distance <= max_distance
    sha = np.array([r.sha256 for r in records])
    same |= sha[:, None] == sha[None, :]
    parent = np.arange(len(records))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(same, 1))):
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(records))])


def make_split(records: list[ImageRecord], seed: int, fractions=(0.6, 0.2, 0.2)) -> list[str]:
    """Stratified, grouped train/val/test assignment (60/20/20 by default), reproducible from seed."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    labels = np.array([r.label for r in records])
    groups = near_duplicate_groups(records)
    split = np.array(["train"] * len(records), dtype=object)
    # Test, then val from the rest; StratifiedGroupKFold keeps every group on one side of each cut.
    remaining = np.arange(len(records))
    for name, frac, share_left in (("test", fractions[2], 1.0), ("val", fractions[1], 1.0 - fractions[2])):
        n_splits = max(2, round(share_left / frac))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(folds.split(remaining, labels[remaining], groups[remaining]))
        split[remaining[held]] = name
        remaining = np.delete(remaining, held)
    return split.tolist()


def write_manifest(path: Path, records: list[ImageRecord], split: list[str], root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = near_duplicate_groups(records)
    with replaced(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "sha256", "label", "split", "group"])
        for rec, part, group in zip(records, split, groups):
            writer.writerow([os.path.relpath(rec.path, root), rec.sha256, rec.label, part, int(group)])


def read_manifest(path: Path, records: list[ImageRecord], root: Path) -> list[str]:
    """Split per record from a saved manifest; refuses a manifest that no longer matches the data."""
    with path.open() as f:
        rows = {(row["path"], row["sha256"]): row["split"] for row in csv.DictReader(f)}
    keys = [(os.path.relpath(r.path, root), r.sha256) for r in records]
    missing = [k[0] for k in keys if k not in rows]
    if missing or len(rows) != len(keys):
        raise ValueError(
            f"split manifest {path} does not match the data in {root} ({len(missing)} images not in it, "
            f"{len(rows)} rows for {len(keys)} images); delete it to make a new split")
    return [rows[k] for k in keys]


def load_or_make_split(records: list[ImageRecord], seed: int, manifest: Path, root: Path) -> list[str]:
    if manifest.exists():
        return read_manifest(manifest, records, root)
    split = make_split(records, seed)
    write_manifest(manifest, records, split, root)
    return split


# ---------------------------------------------------------------------------------------------------
# Decoding and views. Images are decoded and resized once per process to a base size a little larger
# than the model input, kept as uint8 tensors; every view is made from that base image.

_BASE_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def base_size(input_size: int) -> int:
    return round(input_size * 256 / 224)


def decode_base(path: str | Path, input_size: int) -> torch.Tensor:
    """uint8 CHW tensor of an image file, shorter side resized to base_size(input_size): what every
    view, in training and in prediction, is cut from."""
    return TF.resize(TF.pil_to_tensor(load_rgb(path)), base_size(input_size), antialias=True)


def load_base(rec: ImageRecord, input_size: int) -> torch.Tensor:
    """decode_base, cached per process."""
    key = (rec.sha256, input_size)
    if key not in _BASE_CACHE:
        _BASE_CACHE[key] = decode_base(rec.path, input_size)
    return _BASE_CACHE[key]


def eval_view(img: torch.Tensor, input_size: int) -> torch.Tensor:
    """The one deterministic view for validation, test and prediction."""
    return TF.center_crop(img, [input_size, input_size])


# The paper's static augmentation: each training image expanded 5x into these views.
PAPER_VIEWS = ("identity", "centre_crop", "edge_crop", "zoom", "jitter")


def paper_view(img: torch.Tensor, view: str, input_size: int, generator: torch.Generator) -> torch.Tensor:
    """One of the paper's static DA views; random choices come from generator so views are fixed."""
    h, w = img.shape[-2:]
    side = min(h, w)
    if view == "identity":
        return eval_view(img, input_size)
    if view == "centre_crop":
        crop = round(side * 0.7)
        return TF.resize(TF.center_crop(img, [crop, crop]), [input_size, input_size], antialias=True)
    if view == "edge_crop":
        crop = round(side * 0.7)
        corner = int(torch.randint(4, (1,), generator=generator))
        top = 0 if corner < 2 else h - crop
        left = 0 if corner % 2 == 0 else w - crop
        return TF.resized_crop(img, top, left, crop, crop, [input_size, input_size], antialias=True)
    if view == "zoom":
        # RandomResizedCrop with scale 0.8-1.2 as the paper; a scale >1 that cannot fit falls back to
        # torchvision's centre crop, exactly as in the replication.
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            return v2.RandomResizedCrop(input_size, scale=(0.8, 1.2), antialias=True)(img)
    if view == "jitter":
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            return v2.ColorJitter(brightness=0.2, contrast=0.2)(eval_view(img, input_size))
    raise ValueError(f"unknown view {view!r}; expected one of {PAPER_VIEWS}")


def online_augment(strength: float, input_size: int) -> v2.Transform:
    """The online policy: one knob in [0, 1]. Ore photos have no 'up', so all 8 flips and right-angle
    rotations are fair (and lossless, unlike arbitrary angles); hue is never shifted, since colour is
    what tells malachite from chrysocolla. Strength 0 is the plain evaluation view."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    if strength == 0:
        return v2.Lambda(lambda img: eval_view(img, input_size))
    s = strength
    return v2.Compose([
        v2.RandomResizedCrop(input_size, scale=(1.0 - 0.6 * s, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
        v2.Lambda(lambda img: img.rot90(int(torch.randint(2, ())), (-2, -1))),  # with the flips: all 8
        v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.3 * s),
    ])


def view_seed(sha256: str, view: str, seed: int) -> int:
    """A stable seed per (image content, view, run seed), so a view is the same wherever it is made."""
    return int(hashlib.sha256(f"{sha256}:{view}:{seed}".encode()).hexdigest()[:8], 16)


def make_view(rec: ImageRecord, view: str, input_size: int, seed: int, strength: float = 0.0) -> torch.Tensor:
    """A fixed view of one image: a paper view ('identity' is the evaluation view), optionally followed
    by '+online<k>', entry k of a per-image bank of draws from the online policy."""
    static, _, online = view.partition("+")
    gen = torch.Generator().manual_seed(view_seed(rec.sha256, static, seed))
    img = paper_view(load_base(rec, input_size), static, input_size, gen)
    if online:
        with torch.random.fork_rng():
            torch.manual_seed(view_seed(rec.sha256, view, seed))
            img = online_augment(strength, input_size)(img)
    return img


def channel_stats(records: list[ImageRecord], input_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over the given images' evaluation views (the paper's eq. 3)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for rec in records:
        x = eval_view(load_base(rec, input_size), input_size).to(torch.float64) / 255
        total += x.sum((1, 2))
        total_sq += (x ** 2).sum((1, 2))
        count += x.shape[1] * x.shape[2]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def normalize(batch_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    x = batch_uint8.float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------
# A scanned data set, once per process, and what is keyed by its content

@functools.lru_cache(maxsize=4)
def scan_cached(root: str, progress: bool = False, cache: str = ""):
    """Scanning decodes every file: a process (a Ray worker running many trials) does it once, and
    with a cache folder later processes decode only what changed."""
    cache_file = Path(cache) / "scans" / f"{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"
    return scan_folder(root, progress, cache_file if cache else None)


def train_channel_stats(records, input_size: int, cache: str) -> tuple[list[float], list[float]]:
    """channel_stats of the training images, kept in the cache folder by their content: it decodes
    every training image, a second or two that every later run of the split skips."""
    if not cache:
        return channel_stats(records, input_size)
    path = Path(cache) / "stats" / f"{dataset_fingerprint(records)}-{input_size}.json"
    if path.exists():
        return tuple(json.loads(path.read_text()))
    stats = channel_stats(records, input_size)
    write_json_atomic(path, stats)
    return stats


def dataset_fingerprint(records) -> str:
    return hashlib.sha256("".join(sorted(r.sha256 for r in records)).encode()).hexdigest()[:10]


def dataset_name(root: str | Path, records) -> str:
    """A scanned data set by folder name and content, e.g. minerals-1a2b3c4d5e: what split manifests
    and trial records are keyed by, so the same photos elsewhere are recognised and changed ones are not."""
    return f"{Path(root).name}-{dataset_fingerprint(records)}"
