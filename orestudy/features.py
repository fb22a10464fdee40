"""Training samples and the frozen-backbone feature cache.

A sample is (image record, view name). Views are fixed per (image content, view, seed), so a frozen
backbone's feature map for a sample never changes: it is computed once, kept in memory, and written
to an on-disk cache that trials on the same machine share (atomic writes, so concurrent trials never
read a half-written file).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .data import ImageRecord, make_view, normalize

DEFAULT_CACHE = Path(os.environ.get("ORESTUDY_CACHE", Path.home() / ".cache" / "orestudy"))

_VIEW_CACHE: dict[tuple, torch.Tensor] = {}


def view_image(rec: ImageRecord, view: str, input_size: int, seed: int, strength: float) -> torch.Tensor:
    """uint8 CHW tensor of one fixed view, made once per process."""
    key = (rec.sha256, view, input_size, seed, strength)
    if key not in _VIEW_CACHE:
        _VIEW_CACHE[key] = make_view(rec, view, input_size, seed, strength)
    return _VIEW_CACHE[key]


def image_batch(samples, input_size: int, seed: int, strength: float) -> torch.Tensor:
    return torch.stack([view_image(rec, view, input_size, seed, strength) for rec, view in samples])


class FeatureCache:
    """Backbone feature maps per (backbone identity, image content, view), in memory and on disk."""

    def __init__(self, root: Path | None, backbone_key: dict):
        self.key = hashlib.sha256(json.dumps(backbone_key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / "features" / self.key if root else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(json.dumps(backbone_key, indent=1, sort_keys=True))
        self.memory: dict[tuple[str, str], torch.Tensor] = {}

    def _file(self, sha: str, view: str) -> Path:
        return self.dir / sha[:2] / f"{sha}_{view}.pt"

    def fill(self, samples, compute, progress: bool = False) -> int:
        """Make sure every sample's features are at hand; compute(list of samples) -> (B, C, H, W) for
        the missing ones. Returns how many were computed (not found in memory or on disk)."""
        missing = []
        for rec, view in samples:
            key = (rec.sha256, view)
            if key in self.memory:
                continue
            path = self._file(rec.sha256, view) if self.dir else None
            if path is not None and path.exists():
                try:
                    self.memory[key] = torch.load(path, weights_only=True)
                    continue
                except Exception:  # a damaged cache file is recomputed, never trusted
                    path.unlink(missing_ok=True)
            missing.append((rec, view))
        unique = list({(r.sha256, v): (r, v) for r, v in missing}.values())
        for start in tqdm(range(0, len(unique), 64), desc="frozen features", unit="batch", leave=False,
                          disable=not progress or not unique):
            chunk = unique[start:start + 64]
            for (rec, view), feats in zip(chunk, compute(chunk)):
                feats = feats.to(torch.float16).contiguous()
                self.memory[(rec.sha256, view)] = feats
                if self.dir:
                    self._save(self._file(rec.sha256, view), feats)
        return len(unique)

    def _save(self, path: Path, tensor: torch.Tensor) -> None:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(tensor.clone(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file

    def batch(self, samples) -> torch.Tensor:
        return torch.stack([self.memory[(rec.sha256, view)] for rec, view in samples]).float()


def normalized_batch(samples, input_size, seed, strength, mean, std, online=None) -> torch.Tensor:
    """Float input batch: fixed views, then (unfrozen training only) the live online augmentation."""
    images = image_batch(samples, input_size, seed, strength)
    if online is not None:
        images = torch.stack([online(img) for img in images])
    # channels_last: about 20 % faster convolutions on CPU; feature maps stay plain (no conv follows)
    return normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
