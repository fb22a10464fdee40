"""Every readable image of a data folder: one sub-folder per class. File names are not trusted (the ore
set has files with no or odd extensions and a GIF), so every file is opened with PIL; what cannot be
decoded is reported and left out. A scan is keyed by content (dataset_name).
"""
from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from typing import TYPE_CHECKING

from ..files import read_cache, warn, write_json_atomic

if TYPE_CHECKING:
    from .curation import Curation


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


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


# A scanned data set, once per process, and what is keyed by its content

@functools.lru_cache(maxsize=4)
def scan_cached(root: str, progress: bool = False, cache: str = ""):
    """Scanning decodes every file: a process (a Ray worker running many trials) does it once, and
    with a cache folder later processes decode only what changed."""
    cache_file = Path(cache) / "scans" / f"{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"
    return scan_folder(root, progress, cache_file if cache else None)


def dataset_fingerprint(records) -> str:
    return hashlib.sha256("".join(sorted(r.sha256 for r in records)).encode()).hexdigest()[:10]


def dataset_name(root: str | Path, records, curation: Curation | None = None) -> str:
    """A scanned data set by folder name and content, e.g. minerals-1a2b3c4d5e: what split manifests
    and trial records are keyed by, so the same photos elsewhere are recognised and changed ones are not.
    A curated one (records: as scanned) adds its curation's hash: minerals-1a2b3c4d5e-curated-0f1e2d3c4b."""
    name = f"{Path(root).name}-{dataset_fingerprint(records)}"
    return f"{name}-curated-{curation.sha256[:10]}" if curation else name
