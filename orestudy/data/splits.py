"""Splits: stratified, grouped, seeded train/val/test assignment, saved as manifests keyed by content,
and the folds of cross-validation.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..config import SPLIT_METHODS
from ..files import replaced, warn
from .curation import Curation
from .duplicates import near_duplicate_groups
from .images import DataError, ImageRecord, dataset_name


SPLITS = ("train", "val", "test")


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
                  method: str, since: float | None = None) -> str:
    """What changed since the newest manifest of an earlier version of this data folder (same folder
    name, method and seed, other content): photos added and removed, and photos present in both whose
    split changed ('' when there is no earlier version, or, with since, none written after that time)."""
    pattern = re.compile(rf"{re.escape(Path(root).name)}-[0-9a-f]{{10}}{'' if method == 'shuffle' else '-' + method}"
                         rf"-seed{seed}\.csv")
    earlier = [p for p in manifest.parent.glob(f"{Path(root).name}-*seed{seed}.csv")
               if pattern.fullmatch(p.name) and p.name != manifest.name and (since is None or p.stat().st_mtime > since)]
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
    existed = manifest.exists()
    split = load_or_make_split(records, seed, manifest, root, method)
    # Said once per change: when this version's manifest is made, or when the data are back at a version
    # whose manifest is older than another's (which it then becomes newer than).
    changes = split_changes(records, split, manifest, root, seed, method, manifest.stat().st_mtime if existed else None)
    if changes:
        warn(changes)
        if existed:
            os.utime(manifest)
    if curation is None:
        return split, manifest
    curated = folder / manifest_name(root, records, seed, method, curation)
    if curated.exists():
        return read_manifest(curated, records, root, curation), curated
    write_manifest(curated, records, split, root, curation)
    return split, curated
