"""Curation: what a person decided about single photos after looking at them (an audit's flags are
questions, not decisions). Applied right after scanning; the split stays the published data's.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path


from .images import ImageRecord


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
