"""Training: one configuration of the study, end to end (`run_experiment`), from plain functions.

`run_experiment(config, report)` is the trainable every study calls: Ray Tune trials, Optuna searches
and `python -m orestudy.train` all go through it. While the backbone is frozen, its feature maps are
taken from the feature cache and only attention + head train; the test split is evaluated once, at the
end, with the best-validation checkpoint, by `evaluate`, the one evaluation function. After every epoch
`report` gets the training state, from which `run_experiment(config, resume=state)` continues the run
exactly as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data, features, models

REGIMES = {  # the paper's three regimes: ImageNet weights or not, static 5x augmentation or not
    "scratch": {"weights": "none", "static_da": False},
    "tl": {"weights": "imagenet", "static_da": False},
    "tl_da": {"weights": "imagenet", "static_da": True},
}
AUX_WEIGHT = 0.4  # Inception v3's auxiliary loss weight (Szegedy et al. 2016)


@dataclass
class TrainConfig:
    backbone: str = "mobilenet_v2"
    regime: str = "tl_da"
    attention: str = "se"           # none | se | cbam | eca
    reduction: int = 8              # SE / CBAM reduction ratio r
    freeze_epochs: int = 10         # backbone frozen for the first F epochs (>= epochs: always)
    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 32
    dropout: float = 0.5
    aug_strength: float = 0.0       # online augmentation policy, 0 = off
    aug_bank: int = 4               # online draws kept per view while (part of) the backbone is frozen
    freeze_depth: int = 0           # leading backbone modules frozen for the whole run (partial fine-tuning)
    cache_features: bool = True     # reuse frozen backbone outputs instead of recomputing them
    seed: int = 231                 # split seed and training seed
    image_size: int = 0             # 0: the backbone's own input size (224, 299 for Inception v3)
    normalization: str = "train"    # train: split statistics (paper eq. 3) | backbone: the weights' own
    unknown_target_error: float = 0.05  # error rate the "unknown" threshold allows on validation
    precision: str = "auto"         # auto | bf16 | fp32
    threads: int = 0                # 0: all cores this process may use
    device: str = "auto"
    data: str = field(default_factory=lambda: str(data.default_data_root()))
    output: str = "runs"
    name: str = ""                  # run folder name; derived from the config when empty
    cache: str = str(features.DEFAULT_CACHE)  # feature cache folder; "" keeps it in memory only
    mlflow: bool = True
    experiment: str = "orestudy"
    parent_run: str = ""            # MLflow run id of the study this run belongs to
    progress: bool = True
    evaluate_test: bool = True      # False in search trials: the test split stays unseen until the chosen config is retrained

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; expected one of {sorted(REGIMES)}")
        if self.backbone not in models.BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {models.BACKBONES}")
        if self.attention not in models.ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {models.ATTENTIONS}")
        if self.normalization not in ("train", "backbone"):
            raise ValueError(f"normalization must be 'train' or 'backbone', got {self.normalization!r}")
        if self.epochs < 1 or self.freeze_epochs < 0 or self.freeze_depth < 0 or self.batch_size < 1 or self.reduction < 1:
            raise ValueError("epochs and batch_size must be >= 1, freeze_epochs and freeze_depth >= 0, reduction >= 1")
        if not 0.0 <= self.aug_strength <= 1.0:
            raise ValueError(f"aug_strength must be in [0, 1], got {self.aug_strength}")

    @property
    def weights(self) -> str:
        return REGIMES[self.regime]["weights"]

    def run_name(self) -> str:
        att = "" if self.attention == "none" else f"_{self.attention}{self.reduction}"
        return self.name or f"{self.backbone}_{self.regime}{att}_f{self.freeze_epochs}_e{self.epochs}_s{self.seed}"

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Device, precision, threads

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, bf16 on the CPU is emulated and several times slower than fp32.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int) -> int:
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------------------------------
# The loop: plain functions over iterables of (inputs, labels) batches.

@dataclass
class Evaluation:
    loss: float
    accuracy: float
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray


def batches(samples, labels, batch_size, make_inputs, generator: torch.Generator | None = None):
    """(inputs, labels) batches over samples; shuffled by generator when given."""
    order = torch.randperm(len(samples), generator=generator).tolist() if generator else range(len(samples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield make_inputs([samples[i] for i in idx]), torch.tensor([labels[i] for i in idx])


def loss_of(output, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (plus Inception's weighted auxiliary loss when present) and the main logits."""
    if isinstance(output, tuple):
        logits, aux = output
        return F.cross_entropy(logits, target) + AUX_WEIGHT * F.cross_entropy(aux, target), logits
    return F.cross_entropy(output, target), output


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)  # keeps the memory format its maker chose


def train_one_epoch(forward: Callable, optimizer, loader, device, dtype, total: int, desc: str,
                    progress: bool) -> tuple[float, float]:
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, target in tqdm(loader, total=total, desc=desc, leave=False, disable=not progress):
        inputs, target = to_device(inputs, device), target.to(device)
        with autocast(device, dtype):
            loss, logits = loss_of(forward(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(target)
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(target)
    return loss_sum / seen, correct / seen


@torch.no_grad()
def infer(forward: Callable, loader, device, dtype):
    """(fp32 logits, rest) for each (inputs, rest) batch: the one forward path of evaluation (rest is
    the labels) and prediction (rest is what identifies the images)."""
    for inputs, rest in loader:
        with autocast(device, dtype):
            logits = forward(to_device(inputs, device))
        yield logits.float(), rest  # yielded outside autocast, so the caller's code never runs under it


@torch.no_grad()
def evaluate(forward: Callable, loader, device, dtype) -> Evaluation:
    """The one evaluation path: validation every epoch and the final test."""
    losses, labels, probs = [], [], []
    for logits, target in infer(forward, loader, device, dtype):
        target = target.to(device)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        labels.append(target.cpu())
        probs.append(logits.softmax(1).cpu())
    labels_np = torch.cat(labels).numpy()
    probs_np = torch.cat(probs).numpy()
    preds = probs_np.argmax(1)
    return Evaluation(sum(losses) / len(labels_np), float((preds == labels_np).mean()), labels_np, preds, probs_np)


def per_image(split: str, records, evaluation: Evaluation) -> list[list]:
    """[split, image content hash, true class index, softmax probabilities] per image: what lets two
    runs on the same split be compared image by image (McNemar), and thresholds, prediction sets and
    ensembles be calibrated on validation and checked on test later, from the records alone."""
    return [[split, rec.sha256, int(label), [round(float(p), 5) for p in probs]]
            for rec, label, probs in zip(records, evaluation.labels, evaluation.probabilities)]


def unknown_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The lowest top-1 probability above which validation predictions err at most target_error of the
    time (so the most photos get an answer); below it a prediction is reported as 'unknown'."""
    order = np.argsort(-confidence)
    errors = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(errors <= target_error)[0]
    return float(confidence[order][ok.max()]) if len(ok) else 1.0


# ---------------------------------------------------------------------------------------------------
# One experiment

@functools.lru_cache(maxsize=4)
def scan_cached(root: str, progress: bool = False, cache: str = ""):
    """Scanning decodes every file: a process (a Ray worker running many trials) does it once, and
    with a cache folder later processes decode only what changed."""
    cache_file = Path(cache) / "scans" / f"{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"
    return data.scan_folder(root, progress, cache_file if cache else None)


def train_channel_stats(records, input_size: int, cache: str) -> tuple[list[float], list[float]]:
    """data.channel_stats of the training images, kept in the cache folder by their content: it
    decodes every training image, a second or two that every later run of the split skips."""
    if not cache:
        return data.channel_stats(records, input_size)
    path = Path(cache) / "stats" / f"{dataset_fingerprint(records)}-{input_size}.json"
    if path.exists():
        return tuple(json.loads(path.read_text()))
    stats = data.channel_stats(records, input_size)
    data.write_json_atomic(path, stats)
    return stats


def dataset_fingerprint(records) -> str:
    return hashlib.sha256("".join(sorted(r.sha256 for r in records)).encode()).hexdigest()[:10]


def dataset_name(root: str | Path, records) -> str:
    """A scanned data set by folder name and content, e.g. minerals-1a2b3c4d5e: what split manifests
    and trial records are keyed by, so the same photos elsewhere are recognised and changed ones are not."""
    return f"{Path(root).name}-{dataset_fingerprint(records)}"


@dataclass
class Prepared:
    class_names: list[str]
    records: dict[str, list]      # split -> records
    labels: dict[str, list[int]]
    bad_files: list
    manifest: Path


def prepare_data(config: TrainConfig, run_dir: Path, progress: bool = False) -> Prepared:
    root = Path(config.data)
    records, bad = scan_cached(str(root), progress, config.cache)
    for b in bad:
        print(f"skipping unreadable image {b.path}: {b.reason}", file=sys.stderr)
    # One manifest per (data set, seed) is shared by every run; each run keeps a copy beside it.
    shared = Path(config.output) / "splits" / f"{dataset_name(root, records)}-seed{config.seed}.csv"
    split = data.load_or_make_split(records, config.seed, shared, root)
    (run_dir / "split.csv").write_bytes(shared.read_bytes())
    class_names = sorted({r.label for r in records})
    by_split = {s: [r for r, p in zip(records, split) if p == s] for s in data.SPLITS}
    labels = {s: [class_names.index(r.label) for r in recs] for s, recs in by_split.items()}
    return Prepared(class_names, by_split, labels, bad, shared)


def train_views(config: TrainConfig) -> tuple[str, ...]:
    return data.PAPER_VIEWS if REGIMES[config.regime]["static_da"] else ("identity",)


def run_experiment(config: TrainConfig, report: Callable[[dict, dict], None] | None = None,
                   resume: dict | None = None) -> dict:
    """Train one configuration and test its best-validation checkpoint once. report(epoch_metrics,
    state) is called after every epoch (Ray Tune's hook); state (valid during the call: it holds the
    live weights) is what resume takes to continue the run after that epoch."""
    from . import reports, tracking  # matplotlib and mlflow load only when a run starts

    if resume is not None and resume["run_name"] != config.run_name():
        raise ValueError(f"the training state to resume is of run {resume['run_name']}, not {config.run_name()}")
    started = time.time()
    threads = set_threads(config.threads)
    device = pick_device(config.device)
    dtype = pick_precision(config.precision, device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    run_dir = Path(config.output) / config.run_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    progress = config.progress and sys.stderr.isatty()

    prep = prepare_data(config, run_dir, progress)
    spec = models.backbone_spec(config.backbone)
    size = config.image_size or spec.input_size
    if config.normalization == "train":
        mean, std = train_channel_stats(prep.records["train"], size, config.cache)
    else:
        mean, std = spec.mean, spec.std
    model = models.create_model(config.backbone, len(prep.class_names), config.weights, config.attention,
                                config.reduction, config.dropout).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(config.seed)

    views = train_views(config)
    train_samples = [(r, v) for r in prep.records["train"] for v in views]
    train_labels = [lab for lab in prep.labels["train"] for _ in views]
    val_samples = [(r, "identity") for r in prep.records["val"]]
    s = config.aug_strength
    online = data.online_augment(s, size) if s > 0 else None

    def images(samples, augment=None):
        return features.normalized_batch(samples, size, config.seed, s, mean, std, augment)

    # Whatever part of the backbone is frozen is computed once per fixed view and cached: the whole
    # backbone during the first freeze_epochs, its first freeze_depth modules afterwards. Random
    # (scratch) weights depend on the seed, so the seed is part of the cache key.
    cache_key = {"backbone": spec.name, "weights": config.weights, "input_size": size, "mean": mean,
                 "std": std, "precision": str(dtype), "seed": config.seed if config.weights == "none" else None,
                 "view_seed": config.seed, "strength": s}
    caches: dict[int, features.FeatureCache] = {}

    @functools.cache  # made at the first cache miss (a warm cache never needs it); frozen weights never change
    def inference_part(depth: int) -> torch.nn.Module:
        return models.for_inference(model.frozen_part(depth), size, device, dtype)

    def frozen_route(depth: int) -> tuple[features.FeatureCache, Callable, Callable]:
        """(cache of the frozen part's outputs, how to compute missing ones, the model's forward from
        them) for a backbone frozen below depth; a wholly frozen one is kept globally pooled where the
        model allows (models.OreClassifier.pools_first)."""
        pooled = depth >= model.depth and model.pools_first
        if depth not in caches:
            caches[depth] = features.FeatureCache(config.cache or None, {**cache_key, "depth": depth, "pooled": pooled})

        @torch.no_grad()
        def compute(samples):
            with autocast(device, dtype):
                out = inference_part(depth)(to_device(images(samples), device)).float()
            return (out.mean((2, 3)) if pooled else out).cpu()
        forward = model.forward_pooled if pooled else functools.partial(model.forward_from, depth)
        return caches[depth], compute, forward

    def eval_route(depth: int, samples, labels) -> tuple[Callable, Iterable]:
        """(forward, batches) that evaluate samples with the backbone frozen below depth: from the
        cache where there is one, else through the whole model. Both compute the same outputs."""
        if depth and config.cache_features:
            cache, compute, forward = frozen_route(depth)
            cache.fill(samples, compute, progress)
            return forward, batches(samples, labels, config.batch_size, cache.batch)
        return model, batches(samples, labels, config.batch_size, images)

    history, best, best_state, done, elapsed = [], {"val_accuracy": -1.0}, None, 0, 0.0
    if resume is not None:  # every random stream included, so the epochs to come are the unbroken run's
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in resume:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        history, best, best_state = resume["history"], resume["best"], resume["best_state"]
        done, elapsed = resume["epoch"], resume["elapsed"]
        print(f"[{config.run_name()}] resuming after epoch {done}/{config.epochs}", file=sys.stderr, flush=True)
    tracker = tracking.Tracker.start(config, run_dir, history, resume["mlflow_run"] if resume else None)
    n_batches = -(-len(train_samples) // config.batch_size)
    for epoch in range(done + 1, config.epochs + 1):
        t0 = time.time()
        frozen = epoch <= config.freeze_epochs
        depth = model.depth if frozen else config.freeze_depth
        model.set_frozen_depth(depth)
        model.train()
        model.frozen_part(depth).eval()  # frozen means frozen BN statistics too, exactly what is cached
        caches = {d: c for d, c in caches.items() if d == depth}  # other depths' outputs are done with
        if depth and config.cache_features:
            cache, compute, forward = frozen_route(depth)
            if online is not None:  # random views cannot be cached: draw from a fixed bank per view
                draws = torch.randint(config.aug_bank, (len(train_samples),), generator=gen).tolist()
                epoch_samples = [(r, f"{v}+online{k}") for (r, v), k in zip(train_samples, draws)]
                needed = [(r, f"{v}+online{k}") for r, v in train_samples for k in range(config.aug_bank)]
            else:
                epoch_samples = needed = train_samples
            cache.fill(needed, compute, progress)
            train_loader = batches(epoch_samples, train_labels, config.batch_size, cache.batch, gen)
        else:
            forward = model
            train_loader = batches(train_samples, train_labels, config.batch_size,
                                   lambda smp: images(smp, online), gen)
        train_loss, train_acc = train_one_epoch(forward, optimizer, train_loader, device, dtype, n_batches,
                                                f"epoch {epoch}/{config.epochs}", progress)
        model.eval()
        val = evaluate(*eval_route(depth, val_samples, prep.labels["val"]), device, dtype)
        row = {"epoch": epoch, "frozen": int(frozen), "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val.loss, "val_accuracy": val.accuracy, "epoch_seconds": time.time() - t0}
        history.append(row)
        improved = val.accuracy > best["val_accuracy"]
        if improved:
            best = {"epoch": epoch, "val_accuracy": val.accuracy, "val_loss": val.loss}
            best_state = copy.deepcopy(model.state_dict())
            models.save_checkpoint(run_dir / "best.pt", model, prep.class_names, size, mean, std,
                                  asdict(config), best)
        print(f"[{config.run_name()}] epoch {epoch}/{config.epochs} {'frozen' if frozen else 'full  '} "
              f"train loss {train_loss:.3f} acc {train_acc:.3f} | val loss {val.loss:.3f} acc {val.accuracy:.3f}"
              f"{' *' if improved else ''} ({row['epoch_seconds']:.1f}s)", file=sys.stderr, flush=True)
        tracker.log_epoch(row)
        if report is not None:
            state = {"run_name": config.run_name(), "epoch": epoch, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "history": history, "best": best, "best_state": best_state,
                     "elapsed": elapsed + time.time() - started, "mlflow_run": tracker.run_id}
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            report(row, state)

    # The best-validation checkpoint: its "unknown" threshold is chosen on validation, then the test
    # split is evaluated once. The part of the backbone that was frozen at the best epoch still holds
    # its starting weights, so its cached outputs stand in for it exactly, as during training.
    model.load_state_dict(best_state)
    model.eval()
    best_depth = model.depth if best["epoch"] <= config.freeze_epochs else config.freeze_depth
    val = evaluate(*eval_route(best_depth, val_samples, prep.labels["val"]), device, dtype)
    outcomes = per_image("val", prep.records["val"], val)
    best["unknown_threshold"] = unknown_threshold(val.probabilities.max(1), val.predictions == val.labels,
                                                  config.unknown_target_error)
    best["unknown_target_error"] = config.unknown_target_error
    models.save_checkpoint(run_dir / "best.pt", model, prep.class_names, size, mean, std, asdict(config), best)
    result = {}
    if config.evaluate_test:
        test_samples = [(r, "identity") for r in prep.records["test"]]
        test = evaluate(*eval_route(best_depth, test_samples, prep.labels["test"]), device, dtype)
        result = reports.classification_metrics(test.labels, test.predictions, prep.class_names)
        result["test_loss"] = test.loss
        outcomes += per_image("test", prep.records["test"], test)
        # What the stored threshold does to unseen photos: how many get an answer, and how often it is right.
        answered = test.probabilities.max(1) >= best["unknown_threshold"]
        result["unknown_threshold"] = best["unknown_threshold"]
        result["test_answered_share"] = float(answered.mean())
        result["test_answered_accuracy"] = float((test.predictions == test.labels)[answered].mean()) \
            if answered.any() else None  # JSON has no NaN
    result.update({
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
        "wall_seconds": elapsed + time.time() - started, "threads": threads, "device": str(device),
        "precision": str(dtype or "fp32"), "n_train": len(prep.records["train"]), "n_val": len(prep.records["val"]),
        "n_test": len(prep.records["test"]), "n_train_samples": len(train_samples),
        "unreadable_files": [asdict(b) for b in prep.bad_files], "run_dir": str(run_dir),
        "predictions": outcomes})
    reports.write_run_report(run_dir, history, result, prep.class_names)
    tracker.finish(result, run_dir, model)
    tested = f"test accuracy {result['accuracy']:.4f} macro-F1 {result['macro_f1']:.4f}" if config.evaluate_test \
        else f"best val accuracy {best['val_accuracy']:.4f}, test not evaluated"
    print(f"[{config.run_name()}] {tested} (best epoch {best['epoch']}, {result['wall_seconds']:.0f}s) -> {run_dir}",
          file=sys.stderr)
    return result
