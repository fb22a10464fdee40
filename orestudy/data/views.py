"""Decoding and views. Images are decoded and resized once per process to a base size a little larger
than the model input, kept as uint8 tensors; every view is made from that base image. Also the
training split's channel statistics (paper eq. 3).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..files import read_cache, write_json_atomic
from .images import ImageRecord, dataset_fingerprint, load_rgb


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
