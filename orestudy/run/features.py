"""Training samples, the frozen-backbone feature cache, and the route that feeds a frozen model from it.

A sample is (image record, view name). Views are fixed per (image content, view, seed), so a frozen
backbone's feature map for a sample never changes: it is computed once, kept in memory, and written
to an on-disk cache of a few shard files per key that trials share (atomic writes, so concurrent
trials never read a half-written file). `FrozenRoute` decides, per depth, whether a batch goes through the cache
or through the whole model; both compute the same outputs (tests check it).
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from .. import files, models
from ..data import ImageRecord, make_view, normalize
from ..device import autocast, to_device
from .evaluation import batches

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
    """Backbone feature maps per (backbone identity, image content, view), in memory and on disk. On disk
    a key's features are a few shards, each written whole by the fill that computed it (a new name, then
    a rename), so concurrent trials never clash or read half a file, and a shared file system holds a
    handful of files per key rather than one per sample and view. Every stored entry carries the image
    content hash and view it was made from, and is found by them alone."""

    def __init__(self, root: Path | None, backbone_key: dict):
        self.key = hashlib.sha256(json.dumps(backbone_key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / "features" / self.key if root else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(json.dumps(backbone_key, indent=1, sort_keys=True))
        self.memory: dict[tuple[str, str], torch.Tensor] = {}
        self.seen: set[str] = set()  # shards already read
        self.pending: list[tuple[str, str]] = []  # added, not yet written

    def _read_shards(self) -> None:
        """Entries of the shards written since the last look, by this process or a concurrent one; a
        damaged shard is reported and removed (what it held is recomputed into a new one)."""
        for path in sorted(self.dir.glob("shard-*.pt")):
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            try:
                shard = torch.load(path, weights_only=True)
                entries = list(zip(shard["sha256"], shard["view"], shard["features"], strict=True))
            except Exception:  # torch.load raises many types for a damaged file; each means "recompute"
                print(f"warning: ignoring the damaged feature cache shard {path}; its entries are recomputed",
                      file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            for sha, view, feats in entries:
                self.memory.setdefault((sha, view), feats)

    def fill(self, samples, compute, progress: bool = False) -> int:
        """Make sure every sample's features are at hand; compute(list of samples) -> (B, C, H, W) for
        the missing ones. Returns how many were computed (not found in memory or on disk)."""
        if self.dir and any((rec.sha256, view) not in self.memory for rec, view in samples):
            self._read_shards()
        missing = {(r.sha256, v): (r, v) for r, v in samples if (r.sha256, v) not in self.memory}
        unique = list(missing.values())
        for start in tqdm(range(0, len(unique), 64), desc="frozen features", unit="batch", leave=False,
                          disable=not progress or not unique):
            chunk = unique[start:start + 64]
            for (rec, view), feats in zip(chunk, compute(chunk)):
                self.memory[(rec.sha256, view)] = feats.to(torch.float16).contiguous()
        if self.dir and unique:
            self._write_shard(list(missing))
        return len(unique)

    def add(self, samples, feats: torch.Tensor) -> None:
        """Entries computed on the way to another cache's (FrozenRoute.stage); written by flush()."""
        if self.dir:
            self._read_shards()
        for (rec, view), f in zip(samples, feats):
            if (rec.sha256, view) not in self.memory:
                self.memory[(rec.sha256, view)] = f.to(torch.float16).contiguous()
                self.pending.append((rec.sha256, view))

    def flush(self) -> None:
        if self.dir and self.pending:
            self._write_shard(self.pending)
        self.pending = []

    def _write_shard(self, keys: list[tuple[str, str]]) -> None:
        name = f"shard-{uuid.uuid4().hex}.pt"  # of this fill alone: concurrent trials never share a name
        with files.replaced(self.dir / name) as tmp:  # a concurrent reader sees no shard or the whole shard
            torch.save({"sha256": [sha for sha, _ in keys], "view": [view for _, view in keys],
                        "features": [self.memory[k].clone() for k in keys]}, tmp)
        self.seen.add(name)

    def batch(self, samples) -> torch.Tensor:
        return torch.stack([self.memory[(rec.sha256, view)] for rec, view in samples]).float()


def normalized_batch(samples, input_size, seed, strength, mean, std, online=None) -> torch.Tensor:
    """Float input batch: fixed views, then (unfrozen training only) the live online augmentation."""
    images = image_batch(samples, input_size, seed, strength)
    if online is not None:
        images = torch.stack([online(img) for img in images])
    # channels_last: about 20 % faster convolutions on CPU; feature maps stay plain (no conv follows)
    return normalize(images, mean, std).contiguous(memory_format=torch.channels_last)


class FrozenRoute:
    """How a model whose backbone is frozen below a depth is fed. Whatever part is frozen is computed
    once per fixed view, through an inference copy of that part, and cached: the whole backbone while
    it is frozen, its first freeze_depth modules afterwards. A wholly frozen backbone is kept globally
    pooled where the model allows (models.OreClassifier.pools_first). Without caching (or at depth 0)
    batches go through the whole model."""

    def __init__(self, model: models.OreClassifier, images, input_size: int, cache_root: str, cache_key: dict,
                 device: torch.device, dtype, enabled: bool = True, progress: bool = False, stage: int = 0):
        self.model, self.images, self.input_size = model, images, input_size
        # The depth the schedule unfreezes to once the whole backbone has been frozen. While the whole
        # backbone's outputs are computed, the outputs at this depth pass by on the way: they are cached
        # in the same pass, which saves the second pass through the backbone (about a third of a cache
        # fill; decoding and augmenting the views is the rest).
        self.stage = stage if 0 < stage < model.depth else 0
        self.cache_root, self.cache_key, self.enabled = cache_root or None, cache_key, enabled
        self.device, self.dtype, self.progress = device, dtype, progress
        self.caches: dict[int, FeatureCache] = {}
        # (start, depth) -> inference copy, made at the first cache miss; frozen weights never change
        self.inference: dict[tuple[int, int], torch.nn.Module] = {}

    def uses_cache(self, depth: int) -> bool:
        return bool(depth) and self.enabled

    def keep_only(self, depth: int) -> None:
        """Other depths' outputs are done with (a schedule only ever unfreezes), but for the stage's
        while the whole backbone is still frozen."""
        self.caches = {d: c for d, c in self.caches.items() if d == depth or self.stage == d < depth}

    def _part(self, depth: int, start: int = 0, example: torch.Tensor | None = None) -> torch.nn.Module:
        """An inference copy of the backbone's modules start..depth (example: an input of theirs)."""
        if (start, depth) not in self.inference:
            part = self.model.frozen_part(depth)
            self.inference[start, depth] = models.for_inference(part[start:] if start else part, self.input_size,
                                                                self.device, self.dtype, example)
        return self.inference[start, depth]

    def _route(self, depth: int):
        """(cache of the frozen part's outputs, how to compute missing ones, the model's forward from them)."""
        pooled = depth >= self.model.depth and self.model.pools_first
        if depth not in self.caches:
            self.caches[depth] = FeatureCache(self.cache_root, {**self.cache_key, "depth": depth, "pooled": pooled})
        stage = self.stage if self.stage < depth and self.enabled else 0
        if stage:
            self._route(stage)

        @torch.no_grad()
        def compute(samples):
            with autocast(self.device, self.dtype):
                out = to_device(self.images(samples), self.device)
                if stage:  # through the stage's depth, kept, and on from there
                    out = self._part(stage)(out)
                    self.caches[stage].add(samples, out.float().cpu())
                out = self._part(depth, stage, out)(out).float()
            return (out.mean((2, 3)) if pooled else out).cpu()
        forward = self.model.forward_pooled if pooled else functools.partial(self.model.forward_from, depth)
        return self.caches[depth], compute, forward

    def _fill(self, depth: int, samples):
        """(the cache holding every sample's frozen outputs at depth, the model's forward from them)."""
        cache, compute, forward = self._route(depth)
        cache.fill(samples, compute, self.progress)
        if self.stage in self.caches:
            self.caches[self.stage].flush()
        return cache, forward

    def eval_batches(self, depth: int, samples, labels, batch_size: int):
        """(forward, batches) that evaluate samples with the backbone frozen below depth."""
        if not self.uses_cache(depth):
            return self.model, batches(samples, labels, batch_size, self.images)
        cache, forward = self._fill(depth, samples)
        return forward, batches(samples, labels, batch_size, cache.batch)

    def train_batches(self, depth: int, samples, labels, batch_size: int, generator: torch.Generator,
                      online=None, bank: int = 1):
        """(forward, shuffled batches) for one training epoch. Random online views cannot be cached:
        while cached, each sample draws one of a fixed bank of online views per epoch."""
        if not self.uses_cache(depth):
            return self.model, batches(samples, labels, batch_size, lambda smp: self.images(smp, online), generator)
        if online is not None:
            draws = torch.randint(bank, (len(samples),), generator=generator).tolist()
            epoch_samples = [(r, f"{v}+online{k}") for (r, v), k in zip(samples, draws)]
            needed = [(r, f"{v}+online{k}") for r, v in samples for k in range(bank)]
        else:
            epoch_samples = needed = samples
        cache, forward = self._fill(depth, needed)
        return forward, batches(epoch_samples, labels, batch_size, cache.batch, generator)
