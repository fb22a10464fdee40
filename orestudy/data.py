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
import math
import os
import re
import sys
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import imagehash
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from sklearn.model_selection import StratifiedGroupKFold
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .config import SPLIT_METHODS

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


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grey images scaled to 8 bits by the range of their mode: PIL's own conversion
    clips them at 255, which turns a 16-bit PNG almost all white. 'I' is taken as 16-bit (how PIL
    opens 16-bit PNG and TIFF grey), 'F' as [0, 1]; values outside are clipped."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray((np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    if img.mode == "F":
        return Image.fromarray(np.round(np.clip(np.asarray(img), 0.0, 1.0) * 255).astype(np.uint8))
    return img


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image PIL can read (whatever the file name) as RGB, the way a viewer shows it: turned
    by its EXIF orientation, 16-bit and float scaled to 8 bits, alpha composited on white. Training,
    the EDA and prediction all decode through here."""
    with Image.open(path) as img:
        img.load()
        img = to_8bit(ImageOps.exif_transpose(img))
        if img.mode in ("RGBA", "RGBa", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


class DataError(ValueError):
    """The data set cannot be used as it is (missing, empty, a class too small to split): faces print
    its one line, without a traceback."""


class MissingDataFolder(DataError, FileNotFoundError):
    """Still a FileNotFoundError, as callers have caught it."""


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def read_cache(path: Path | None, valid=lambda value: True):
    """A JSON cache file's content, or None when absent; a damaged one (truncated, garbage, or not what
    valid accepts) is reported and treated as absent, so it is rebuilt rather than blocking every run."""
    if path is None or not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
        if valid(value):
            return value
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
        pass
    warn(f"ignoring the damaged cache file {path}; it is rebuilt")
    return None


def file_stamp(path: Path) -> list[int]:
    """What tells a scanned file unchanged without reading it. Size and modification time alone miss a
    rewrite that keeps both (a tool or a user can set mtime back with touch or os.utime); the inode
    change time cannot be set by a user and moves on every write, and the inode number on a replace."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def read_record(path: Path, label: str) -> ImageRecord:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as probe:
        fmt, mode = probe.format or "?", probe.mode
    img = load_rgb(io.BytesIO(data))
    return ImageRecord(path=str(path), label=label, sha256=hashlib.sha256(data).hexdigest(),
                       phash=str(imagehash.phash(img)), width=img.width, height=img.height, format=fmt, mode=mode)


SCAN_KEYS = {*ImageRecord.__dataclass_fields__, "stamp"}  # what a scan cache entry holds


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of root; files beside them belong to no class and are reported."""
    if not root.is_dir():
        raise MissingDataFolder(f"data folder not found: {root} (set --data or ORESTUDY_DATA)")
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    loose = sum(e.is_file() for e in entries)
    if loose:
        warn(f"{loose} files directly in {root} belong to no class and are left out "
             f"(expected {root}/<class>/<images>)")
    class_dirs = sorted(e for e in entries if e.is_dir())
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/<images>")
    return class_dirs


def scan_folder(root: str | Path, progress: bool = False,
                cache_file: Path | None = None) -> tuple[list[ImageRecord], list[BadFile]]:
    """Every readable image under root/<class>/, plus the files that could not be read and why.
    With cache_file, files whose stamp (file_stamp) is unchanged are not decoded again."""
    root = Path(root)
    class_dirs = class_folders(root)
    records, bad = [], []
    files = [(d, p) for d in class_dirs for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    known = read_cache(cache_file, lambda v: all(e.keys() == SCAN_KEYS for e in v.values())) or {}
    stamps = {}
    for class_dir, path in tqdm(files, desc=f"reading {root.name}", unit="image", disable=not progress):
        stamps[str(path)] = stamp = file_stamp(path)
        cached = known.get(str(path))
        if cached and cached["stamp"] == stamp and cached["label"] == class_dir.name:
            records.append(ImageRecord(**{k: v for k, v in cached.items() if k != "stamp"}))
            continue
        try:
            records.append(read_record(path, class_dir.name))
        except Exception as err:  # PIL raises many types for bad files; each is reported, not fatal
            bad.append(BadFile(str(path), f"{type(err).__name__}: {err}"))
    if not records:
        raise DataError(f"no readable images under {root}")
    empty = sorted({d.name for d in class_dirs} - {r.label for r in records})
    if empty:
        warn(f"class folders with no readable image are left out: {', '.join(empty)}")
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


def hamming_neighbours(hashes: np.ndarray, rows: np.ndarray, max_distance: int, blocks) -> np.ndarray:
    """Sorted unique i * n + j for every pair i in rows, j > i, within max_distance bits of each other.
    Pigeonhole: max_distance + 1 disjoint bit blocks, so such a pair is equal on at least one block;
    with the records sorted by (block value, index), a row's candidates are the rest of its run."""
    n, found = len(hashes), []
    for order, position, end in blocks:
        starts = position[rows] + 1
        lengths = end[rows] - starts
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)
        i, j = np.repeat(rows, lengths), order[offsets]  # j > i: a run is sorted by index
        keep = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
        found.append(i[keep] * n + j[keep])
    return np.unique(np.concatenate(found))


def near_duplicate_groups(records: list[ImageRecord], max_distance: int = 6, chunk: int = 1 << 20) -> np.ndarray:
    """Group id per record: images whose 64-bit perceptual hashes differ in <= max_distance bits share a
    group, transitively, so a group can be kept inside one split (identical bytes have identical
    hashes). Multi-index hashing keeps memory linear in the number of images (comparing all pairs
    took 69 bytes x n^2). The ids are the union-find roots of the pairs taken in (i, j) order, as the
    all-pairs version made them: split manifests and splits stay the same."""
    n = len(records)
    hashes = np.array([int(r.phash, 16) for r in records], dtype=np.uint64)
    width = -(-64 // (max_distance + 1))
    blocks = []  # per block: the records sorted by (block value, index), each one's place, its run's end
    for shift in range(0, 64, width):
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << min(width, 64 - shift)) - 1)
        order = np.lexsort((np.arange(n), key))
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        run_end = np.searchsorted(key[order], key[order], side="right")
        blocks.append((order, position, run_end[position]))
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Rows in slices of about `chunk` candidate pairs, so pairs are found and joined in (i, j) order.
    candidates = np.cumsum(sum(end - position - 1 for _, position, end in blocks))
    start = 0
    while start < n:
        stop = max(start + 1, int(np.searchsorted(candidates, (candidates[start - 1] if start else 0) + chunk)))
        for pair in hamming_neighbours(hashes, np.arange(start, min(stop, n)), max_distance, blocks).tolist():
            i, j = divmod(pair, n)
            parent[find(i)] = find(j)
        start = stop
    return np.array([find(i) for i in range(n)])


def make_split(records: list[ImageRecord], seed: int, fractions=(0.6, 0.2, 0.2), method: str = "hash") -> list[str]:
    """Stratified, grouped train/val/test assignment (60/20/20 by default), reproducible from seed:
    hash_split (stable as the data change) or shuffle_split (exact shares, redrawn by any change)."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}; expected one of {list(SPLIT_METHODS)}")
    labels = np.array([r.label for r in records])
    groups = near_duplicate_groups(records)
    split = (hash_split if method == "hash" else shuffle_split)(records, labels, groups, seed, fractions)
    check_stratified(labels, groups, split)
    return split.tolist()


def shuffle_split(records, labels, groups, seed, fractions) -> np.ndarray:
    """Test, then val from the rest, by StratifiedGroupKFold: every group on one side of each cut and
    each class's shares as exact as its groups allow; one photo more or less redraws the whole split."""
    split = np.array(["train"] * len(records), dtype=object)
    remaining = np.arange(len(records))
    for name, frac, share_left in (("test", fractions[2], 1.0), ("val", fractions[1], 1.0 - fractions[2])):
        n_splits = max(2, round(share_left / frac))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(folds.split(remaining, labels[remaining], groups[remaining]))
        split[remaining[held]] = name
        remaining = np.delete(remaining, held)
    return split


def hash_split(records, labels, groups, seed, fractions) -> np.ndarray:
    """Each near-duplicate group's split follows from its photos' content and the seed alone (a uniform
    draw per photo from sha256(seed, content hash); a group takes its smallest draw; draws below the
    test share go to test, the next val share to val), so adding or removing photos moves no other
    photo, on any machine, with no state to keep. Only a new photo that joins an existing group with a
    smaller draw moves that group. A class's shares are binomial around 60/20/20 rather than exact:
    written by hand because no splitter of scikit-learn is stable under changes of the data."""
    draw = np.array([int(hashlib.sha256(f"{seed}:{r.sha256}".encode()).hexdigest()[:13], 16) / 16**13
                     for r in records])
    smallest = {}
    for group, value in zip(groups.tolist(), draw):
        smallest[group] = min(smallest.get(group, 1.0), value)
    draw = np.array([smallest[g] for g in groups.tolist()])
    split = np.where(draw < fractions[2], "test", np.where(draw < fractions[2] + fractions[1], "val", "train"))
    split = split.astype(object)
    # A small class may draw no test or no validation group: its lowest-drawing group from the split
    # holding most of its groups moves there, which depends on that class's photos alone.
    for label in sorted(set(labels.tolist())):
        mine = labels == label
        for part in ("test", "val"):
            if (split[mine] == part).any():
                continue
            donor = max(SPLITS, key=lambda s: len(set(groups[mine & (split == s)].tolist())))
            if len(set(groups[mine & (split == donor)].tolist())) > 1:
                candidates = mine & (split == donor)
                move = groups[candidates][np.argmin(draw[candidates])]
                split[groups == move] = part
    return split


def check_stratified(labels: np.ndarray, groups: np.ndarray, split: np.ndarray) -> None:
    """Refuses a split in which a class is missing from train, validation or test: its test metrics
    would be empty while macro-F1 still averages over it. A class needs at least three near-duplicate
    groups; with five or more the stratified folds give it a share of each split."""
    for label in sorted(set(labels)):
        mine = labels == label
        empty = [s for s in SPLITS if not (split[mine] == s).any()]
        if empty:
            raise DataError(
                f"class {str(label)!r} has {int(mine.sum())} images in {len(set(groups[mine]))} near-duplicate groups, too "
                f"few for a stratified train/val/test split (none in {' and '.join(empty)}); add photos of it "
                f"or move its folder out of the data set")


# File names are bytes on POSIX; Python holds undecodable ones as surrogate escapes, which this
# encoding writes back as the original bytes (a valid UTF-8 name is written as before).
MANIFEST_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_manifest(path: Path, records: list[ImageRecord], split: list[str], root: Path,
                   curation: Curation | None = None) -> None:
    """One row per image: path, content hash, label, split, near-duplicate group; a curated data set's
    manifest has the same split, the new labels, and each image's curation action and the curation's hash."""
    groups = near_duplicate_groups(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp, tmp.open("w", newline="", **MANIFEST_ENCODING) as f:
        writer = csv.writer(f)
        writer.writerow(["path", "sha256", "label", "split", "group"] + (["action", "curation"] if curation else []))
        for rec, part, group in zip(records, split, groups):
            row = [os.path.relpath(rec.path, root), rec.sha256, rec.label, part, int(group)]
            if curation:
                action, label = curation.actions.get(rec.path, ("", ""))
                row[2] = label or rec.label
                row += [action, curation.sha256]
            writer.writerow(row)


def read_manifest(path: Path, records: list[ImageRecord], root: Path, curation: Curation | None = None) -> list[str]:
    """Split per record from a saved manifest; refuses a manifest that no longer matches the data, or
    that was made with another curation (or none) than this run's."""
    with path.open(newline="", **MANIFEST_ENCODING) as f:
        table = list(csv.DictReader(f))
    made_with = {row.get("curation") or "" for row in table}
    wanted = curation.sha256 if curation else ""
    if made_with - {wanted}:
        made = ", ".join(sorted(f"curation {c}" if c else "no curation" for c in made_with))
        raise DataError(f"split manifest {path} was made with {made}, but this run has "
                        f"{f'curation {wanted} ({curation.file})' if curation else 'no curation'}")
    rows = {(row["path"], row["sha256"]): row["split"] for row in table}
    keys = [(os.path.relpath(r.path, root), r.sha256) for r in records]
    missing = [k[0] for k in keys if k not in rows]
    if missing or len(rows) != len(keys):
        raise DataError(
            f"split manifest {path} does not match the data in {root} ({len(missing)} images not in it, "
            f"{len(rows)} rows for {len(keys)} images); delete it to make a new split")
    return [rows[k] for k in keys]


def load_or_make_split(records: list[ImageRecord], seed: int, manifest: Path, root: Path,
                       method: str = "hash") -> list[str]:
    if manifest.exists():
        return read_manifest(manifest, records, root)
    split = make_split(records, seed, method=method)
    write_manifest(manifest, records, split, root)
    return split


def manifest_name(root: Path, records, seed: int, method: str, curation: Curation | None = None) -> str:
    """<data set>-seed<seed>.csv for the shuffle split (the name it always had), -hash-seed<seed>.csv for
    the hash split."""
    return f"{dataset_name(root, records, curation)}{'' if method == 'shuffle' else '-' + method}-seed{seed}.csv"


def split_changes(records: list[ImageRecord], split: list[str], manifest: Path, root: Path, seed: int,
                  method: str) -> str:
    """What changed since the newest manifest of an earlier version of this data folder (same folder
    name, method and seed, other content): photos added and removed, and photos present in both whose
    split changed ('' when there is no earlier version)."""
    pattern = re.compile(rf"{re.escape(Path(root).name)}-[0-9a-f]{{10}}{'' if method == 'shuffle' else '-' + method}"
                         rf"-seed{seed}\.csv")
    earlier = [p for p in manifest.parent.glob(f"{Path(root).name}-*seed{seed}.csv")
               if pattern.fullmatch(p.name) and p.name != manifest.name]
    if not earlier:
        return ""
    previous = max(earlier, key=lambda p: p.stat().st_mtime)
    with previous.open(newline="", **MANIFEST_ENCODING) as f:
        before = {row["sha256"]: row["split"] for row in csv.DictReader(f)}
    now = {r.sha256: part for r, part in zip(records, split)}
    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    moved = [sha for sha in now.keys() & before.keys() if now[sha] != before[sha]]
    leaked = sum(before[sha] == "test" and now[sha] == "train" for sha in moved)
    text = (f"the data in {root} changed since split manifest {previous}: {len(added)} images added, "
            f"{len(removed)} removed; {len(moved)} of the {len(now.keys() & before.keys())} images in both "
            f"changed split")
    if leaked:
        text += (f", {leaked} of them from test to train: do not compare a model trained on the earlier "
                 f"data on this test split")
    if moved and method == "shuffle":
        text += " (the shuffle split is redrawn by any change of the data; --split-method hash keeps it)"
    return text


def fold_split(records: list[ImageRecord], split: list[str], folds: int, fold: int, seed: int) -> list[str]:
    """The split with its non-test images cut into `folds` stratified folds that keep near-duplicate
    groups whole: fold `fold` validates, the rest train; the test images stay where they were."""
    rest = np.array([i for i, part in enumerate(split) if part != "test"])
    labels = np.array([r.label for r in records])[rest]
    groups = near_duplicate_groups([records[i] for i in rest])
    cuts = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(rest, labels, groups)
    _, held = list(cuts)[fold]
    out = list(split)
    for i in rest:
        out[i] = "train"
    for i in rest[held]:
        out[i] = "val"
    return out


def dataset_split(records: list[ImageRecord], seed: int, folder: Path, root: Path,
                  curation: Curation | None = None, method: str = "hash") -> tuple[list[str], Path]:
    """(split per record, its manifest in folder), made once per data set, method and seed and shared by
    every run; a change of the data since an earlier manifest is reported. A curated data set keeps
    the published data's split, so curated and published runs of a seed test on the same photos (less
    the excluded) and compare image by image; its own manifest records the curation."""
    manifest = folder / manifest_name(root, records, seed, method)
    split = load_or_make_split(records, seed, manifest, root, method)
    changes = split_changes(records, split, manifest, root, seed, method)
    if changes:
        warn(changes)
    if curation is None:
        return split, manifest
    curated = folder / manifest_name(root, records, seed, method, curation)
    if curated.exists():
        return read_manifest(curated, records, root, curation), curated
    write_manifest(curated, records, split, root, curation)
    return split, curated


# ---------------------------------------------------------------------------------------------------
# Curation: what a person decided about single photos after looking at them (an audit's flags are
# questions, not decisions). Applied right after scanning; the split stays the published data's.

CURATION_ACTIONS = ("exclude", "relabel")
CURATION_COLUMNS = ("image", "action", "label", "note")


@dataclass(frozen=True)
class Curation:
    file: str
    sha256: str     # of its decisions (image, action, label), not its notes: a reworded note changes nothing
    actions: dict   # record path -> (action, new label; "" for exclude)

    def summary(self) -> dict:
        done = [action for action, _ in self.actions.values()]
        return {"file": self.file, "sha256": self.sha256, "excluded": done.count("exclude"),
                "relabelled": done.count("relabel")}


def read_curation(path: str | Path, records: list[ImageRecord], root: str | Path) -> Curation:
    """A curation CSV (image, action, label, note) checked against the scanned data. image is a content
    hash (every copy of those bytes) or a path relative to root; action exclude or relabel (label: one
    of the class folders); note says what the photo shows. A bad line is an error naming file and line."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"curation file not found: {path}")
    by_sha, by_path = defaultdict(list), {}
    for rec in records:
        by_sha[rec.sha256].append(rec)
        by_path[os.path.relpath(rec.path, root)] = rec
    classes = sorted({r.label for r in records})
    actions = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if set(CURATION_COLUMNS) - set(reader.fieldnames or ()):
            raise ValueError(f"{path}: needs the columns {', '.join(CURATION_COLUMNS)}; found {reader.fieldnames}")
        for row in reader:
            image, action, label, note = ((row[k] or "").strip() for k in CURATION_COLUMNS)
            targets = by_sha.get(image.lower()) or ([by_path[image]] if image in by_path else [])
            problem = curation_problem(image, action, label, note, targets, classes, actions)
            if problem:
                raise ValueError(f"{path}, line {reader.line_num}: {problem}")
            actions.update({t.path: (action, label) for t in targets})
    if not actions:
        raise ValueError(f"{path}: no curation decisions in it")
    decisions = sorted(f"{os.path.relpath(p, root)},{a},{lab}" for p, (a, lab) in actions.items())
    return Curation(str(path), hashlib.sha256("\n".join(decisions).encode()).hexdigest(), actions)


def curation_problem(image, action, label, note, targets, classes, done) -> str:
    """What is wrong with one line of a curation file ('' if nothing)."""
    if not targets:
        return f"{image!r} is not an image of the data (a content hash, or a path relative to the data folder)"
    if action not in CURATION_ACTIONS:
        return f"action {action!r}: expected one of {', '.join(CURATION_ACTIONS)}"
    if action == "relabel" and label not in classes:
        return f"relabel needs a label, one of {', '.join(classes)}; got {label!r}"
    if action == "relabel" and all(t.label == label for t in targets):
        return f"it is labelled {label} already"
    if action == "exclude" and label:
        return f"exclude takes no label; got {label!r}"
    if not note:
        return "the note is empty: say what the photo shows"
    if any(t.path in done for t in targets):
        return f"{targets[0].path} is curated on an earlier line too"
    return ""


def apply_curation(records: list[ImageRecord], curation: Curation | None) -> list[ImageRecord]:
    """records less the excluded ones, the relabelled with their new label."""
    if curation is None:
        return records
    kept = []
    for rec in records:
        action, label = curation.actions.get(rec.path, ("", ""))
        if action != "exclude":
            kept.append(replace(rec, label=label) if action == "relabel" else rec)
    return kept


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
# Test-time augmentation: the evaluation view and its flips, as predict --tta (models.Flipped).
FLIP_VIEWS = ("identity", "hflip", "vflip")


def paper_view(img: torch.Tensor, view: str, input_size: int, generator: torch.Generator) -> torch.Tensor:
    """One of the paper's static DA views; random choices come from generator so views are fixed."""
    h, w = img.shape[-2:]
    side = min(h, w)
    if view == "identity":
        return eval_view(img, input_size)
    if view in ("hflip", "vflip"):  # FLIP_VIEWS
        return eval_view(img, input_size).flip(-1 if view == "hflip" else -2)
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
    stats = read_cache(path, usable_stats)
    if stats is not None:
        return tuple(stats)
    stats = channel_stats(records, input_size)
    write_json_atomic(path, stats)
    return stats


def usable_stats(stats) -> bool:
    """Three finite means and three finite, positive standard deviations (a zero one divides by zero)."""
    mean, std = stats
    return (len(mean) == len(std) == 3 and all(math.isfinite(m) for m in mean)
            and all(math.isfinite(v) and v > 0 for v in std))


def dataset_fingerprint(records) -> str:
    return hashlib.sha256("".join(sorted(r.sha256 for r in records)).encode()).hexdigest()[:10]


def dataset_name(root: str | Path, records, curation: Curation | None = None) -> str:
    """A scanned data set by folder name and content, e.g. minerals-1a2b3c4d5e: what split manifests
    and trial records are keyed by, so the same photos elsewhere are recognised and changed ones are not.
    A curated one (records: as scanned) adds its curation's hash: minerals-1a2b3c4d5e-curated-0f1e2d3c4b."""
    name = f"{Path(root).name}-{dataset_fingerprint(records)}"
    return f"{name}-curated-{curation.sha256[:10]}" if curation else name
