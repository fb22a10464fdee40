"""'Not one of these minerals': a novelty score for photos of something the model was never taught.

Deep nearest neighbours (Sun, Ming, Zhu & Li 2022, "Out-of-distribution detection with deep nearest
neighbors", ICML): a photo's score is the Euclidean distance from its L2-normalised penultimate
feature (the input of the model's last linear layer: the backbone's pooled output, through the
attention block) to the k-th nearest L2-normalised feature of the training photos (scikit-learn's
NearestNeighbors). No class is involved, so a confident softmax over seven classes does not hide a
photo unlike all of them.

The threshold is set on the validation photos, which the bank never holds: the ceil((n + 1) s)-th
smallest of their n scores passes a new in-distribution photo with probability >= s (a split-conformal
argument, s = 0.95 by default). best.pt keeps the bank (fp16), its photos' labels, paths and hashes
(the similar photos shown as evidence are its nearest neighbours), and the validation scores, so that
any pass share can be chosen later.

k = 5 was fixed before measuring (Sun et al. use k = 50 for CIFAR-10's 50,000 training images, 1 % of
the data at ImageNet scale; this bank has about 500 photos, 36-126 a class); benchmarks/novelty_loco.py
reports k = 1, 5, 10 and 20 side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import data
from ..device import autocast, to_device

DEFAULT_K = 5
DEFAULT_PASS_SHARE = 0.95
NOVEL = "not one of these"


# ---------------------------------------------------------------------------------------------------
# Features

def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of an OreClassifier's last linear layer: (B, D)."""
    return model.head[:-1](model.attention(model.backbone(x))).flatten(1)


class WithFeatures(nn.Module):
    """An OreClassifier whose output is [logits | penultimate features] in one tensor, so that it takes
    the one inference path (evaluation.infer, models.for_inference) unchanged. With flips, the logits
    are the log of the softmax averaged over the photo and its flips (models.Flipped) and the features
    the photo's own."""

    def __init__(self, model: nn.Module, flips: bool = False):
        super().__init__()
        # the parts as submodules of this one, so that torch.fx (BatchNorm folding) can trace it
        self.backbone, self.attention, self.pool, self.linear = model.backbone, model.attention, model.head[:-1], model.head[-1]
        self.flips, self.classes = flips, model.head[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flips:
            feats = self.pool(self.attention(self.backbone(x))).flatten(1)
            return torch.cat([self.linear(feats).float(), feats.float()], 1)
        n = x.size(0)  # not len(x): torch.fx traces this module where BatchNorm is folded
        feats = self.pool(self.attention(self.backbone(torch.cat([x, x.flip(-1), x.flip(-2)])))).flatten(1)
        logits = self.linear(feats).float().softmax(1).view(3, n, -1).mean(0).log()
        return torch.cat([logits, feats[:n].float()], 1)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output[:, :self.classes], output[:, self.classes:]


@torch.no_grad()
def record_features(model: nn.Module, records: list, input_size: int, mean, std, device=torch.device("cpu"),
                    dtype=None, batch_size: int = 32) -> np.ndarray:
    """(len(records), D) penultimate features of the photos' evaluation view, as prediction sees them."""
    model.eval()
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = torch.stack([data.eval_view(data.load_base(r, input_size), input_size) for r in chunk])
        with autocast(device, dtype):
            out.append(penultimate(model, to_device(data.normalize(images, mean, std), device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def l2_normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------
# The score and its threshold

def pass_rank(n: int, share: float) -> int:
    return int(math.ceil((n + 1) * share))


def threshold_for(val_scores: np.ndarray, share: float) -> float:
    """The score at or below which a new in-distribution photo passes with probability >= share: the
    ceil((n + 1) share)-th smallest validation score (inf: too few validation photos, all pass)."""
    scores = np.sort(np.asarray(val_scores, dtype=float))
    rank = pass_rank(len(scores), share)
    return float(scores[rank - 1]) if rank <= len(scores) else float("inf")


@dataclass
class Novelty:
    """The k-th-nearest-neighbour distance to the training photos' features, and its threshold."""
    bank: np.ndarray            # (m, D) L2-normalised training features
    labels: list[int]           # their classes
    photos: list[str]           # their paths, relative to the data root
    hashes: list[str]           # their content hashes
    val_scores: np.ndarray      # the validation photos' scores, sorted
    k: int = DEFAULT_K
    pass_share: float = DEFAULT_PASS_SHARE

    def __post_init__(self):
        from sklearn.neighbors import NearestNeighbors

        self.bank = l2_normalised(self.bank)
        self.k = min(self.k, len(self.bank))
        # exact (brute force): a few hundred training photos, and trees do no good in 1280 dimensions
        self.index = NearestNeighbors(n_neighbors=max(self.k, 3), algorithm="brute").fit(self.bank)
        self._threshold = None

    @property
    def threshold(self) -> float:
        key = (id(self.val_scores), len(self.val_scores), self.pass_share)
        if self._threshold is None or self._threshold[0] != key:
            self._threshold = (key, threshold_for(self.val_scores, self.pass_share))
        return self._threshold[1]

    def neighbours(self, features: np.ndarray, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, bank indices) of each photo's nearest training photos, nearest first."""
        count = count or max(self.k, 3)
        return self.index.kneighbors(l2_normalised(features), n_neighbors=min(count, len(self.bank)))

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.neighbours(features)[0][:, self.k - 1]

    def to_dict(self) -> dict:
        return {"version": 1, "method": "knn", "k": self.k, "pass_share": self.pass_share,
                "bank": self.bank.astype(np.float16), "labels": list(map(int, self.labels)), "photos": list(self.photos),
                "hashes": list(self.hashes), "val_scores": np.sort(np.asarray(self.val_scores, dtype=np.float32))}

    @classmethod
    def from_dict(cls, stored: dict, pass_share: float | None = None) -> "Novelty":
        return cls(np.asarray(stored["bank"], dtype=np.float32), list(stored["labels"]), list(stored["photos"]),
                   list(stored["hashes"]), np.asarray(stored["val_scores"], dtype=float), int(stored["k"]),
                   stored["pass_share"] if pass_share is None else pass_share)

    @classmethod
    def of(cls, meta: dict, pass_share: float | None = None) -> "Novelty | None":
        stored = meta.get("best", {}).get("novelty")
        return None if stored is None else cls.from_dict(stored, pass_share)


def fit(train_features: np.ndarray, train_labels, train_photos: list[str], train_hashes: list[str],
        val_features: np.ndarray, k: int = DEFAULT_K, pass_share: float = DEFAULT_PASS_SHARE) -> Novelty:
    """A Novelty from the training photos' features (the bank) and the validation photos' (the threshold)."""
    partial = Novelty(train_features, list(train_labels), train_photos, train_hashes, np.zeros(0), k, pass_share)
    partial.val_scores = np.sort(partial.scores(val_features)) if len(val_features) else np.zeros(0)
    return partial


def note(novelty: Novelty | None, classes: int) -> str:
    if novelty is None:
        return ("no novelty score stored (the checkpoint predates it, or is an ensemble or an exported file): a photo of something "
                f"else is named as one of the {classes} classes")
    if math.isinf(novelty.threshold):
        return (f"'{NOVEL}' is never said: {len(novelty.val_scores)} validation photos are too few to set a threshold "
                f"that passes {100 * novelty.pass_share:g} % of in-distribution photos")
    return (f"'{NOVEL}' when the {ordinal(novelty.k)} nearest training photo in feature space is farther than "
            f"{novelty.threshold:.3f}, a distance {100 * novelty.pass_share:g} % of in-distribution photos stay within "
            f"({len(novelty.val_scores)} validation photos, {len(novelty.bank)} training photos)")


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def generated_outliers(count: int, seed: int = 0, size: int = 256) -> list:
    """count PIL images of nothing mineral: uniform and Gaussian noise, flat colours, colour gradients,
    checkerboards, stripes and blurred blobs, in turn. What a test or a model card can show the score
    flags without a data set of other things (the real measure is benchmarks/novelty_loco.py)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = i % 7
        if kind == 0:
            pixels = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:
            pixels = rng.normal(128, 60, (size, size, 3))
        elif kind == 2:
            pixels = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == 3:
            ramp = np.linspace(0, 1, size)
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            pixels = a + (b - a) * (ramp[:, None, None] if i % 2 else ramp[None, :, None])
            pixels = np.broadcast_to(pixels, (size, size, 3))
        elif kind == 4:
            cell = int(rng.integers(8, 48))
            board = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2)[..., None]
            pixels = np.where(board, rng.integers(0, 256, 3), rng.integers(0, 256, 3))
        elif kind == 5:
            period = int(rng.integers(6, 40))
            stripes = ((np.arange(size) // period) % 2)[None, :, None]
            pixels = np.broadcast_to(np.where(stripes, rng.integers(0, 256, 3), rng.integers(0, 256, 3)), (size, size, 3))
        else:
            pixels = rng.integers(0, 256, (size // 16, size // 16, 3))
            image = Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.BICUBIC)
            out.append(image.filter(ImageFilter.GaussianBlur(4)))
            continue
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out
