"""Training: one configuration of the study, end to end, from plain functions.

    run = build_run(config)          # device, data, model, optimizer, the frozen-backbone route
    progress = fit(run, report)      # one train_one_epoch + evaluate per epoch, best checkpoint kept
    result = finish(run, progress)   # "unknown" threshold on validation, the test split once, reports

`run_experiment(config, report, resume)` is those three steps, and the trainable every study calls:
Ray Tune trials, Optuna searches and `orestudy train` all go through it. While (part of) the
backbone is frozen, its outputs come from the feature cache (features.FrozenRoute) and only the rest
trains. After every epoch the training state is saved as last.pt in the run folder and given to
`report`; `run_experiment(config, resume=state)` (or `resumable(run_dir)`'s, from last.pt) continues
the run exactly as if it had never stopped. Every run has a folder of its own, never overwritten.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import data, device as devices, environment, files, models
from . import answering, features
from ..config import TrainConfig, complete
from .evaluation import Evaluation, calibration, classification_metrics, evaluate, mixture, per_image, test_metrics
from .recipe import Recipe, make_ema, make_optimizer, make_recipe, make_scheduler, weights_of

AUX_WEIGHT = 0.4  # Inception v3's auxiliary loss weight (Szegedy et al. 2016)


def loss_of(output, target: torch.Tensor, criterion=F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (plus Inception's weighted auxiliary loss when present) and the main logits."""
    if isinstance(output, tuple):
        logits, aux = output
        return criterion(logits, target) + AUX_WEIGHT * criterion(aux, target), logits
    return criterion(output, target), output


def train_one_epoch(forward: Callable, optimizer, loader, device, dtype, total: int, desc: str,
                    progress: bool, recipe: Recipe | None = None, after_step: Callable | None = None
                    ) -> tuple[float, float]:
    """One pass over loader. recipe: its loss and batch mixing (default: plain cross-entropy);
    after_step: called after every optimizer step (the weights' moving average)."""
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, total=total, desc=desc, leave=False, disable=not progress)
    for inputs, target in bar:
        inputs, target = devices.to_device(inputs, device), target.to(device)
        mixed, soft = recipe.mix(inputs, target) if recipe else (inputs, target)
        with devices.autocast(device, dtype):
            loss, logits = loss_of(forward(mixed), soft, recipe.criterion if recipe else F.cross_entropy)
        value = loss.item()
        if not math.isfinite(value):  # NaN weights would still "test" at some accuracy: stop here instead
            raise FloatingPointError(f"training loss is {value} in {desc}: the run stops (a learning rate too "
                                     f"high, or channel statistics with a zero standard deviation?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += value * len(target)
        correct += (logits.argmax(1) == target).sum().item()  # of the (first) label: a mixed batch scores lower
        seen += len(target)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
    return loss_sum / seen, correct / seen


# ---------------------------------------------------------------------------------------------------
# Building a run

@dataclass
class Prepared:
    class_names: list[str]
    records: dict[str, list]      # split -> records
    labels: dict[str, list[int]]
    bad_files: list
    manifest: Path
    curation: dict | None = None  # data.Curation.summary() of a curated run
    published_test: list = field(default_factory=list)  # a curated run's test split before curation
    fold_rows: tuple | None = None  # a cross-validation fold's manifest (records, split, root, curation)

    def write_split(self, run_dir: Path) -> None:
        """The run's split.csv: a copy of the shared manifest, or its fold's own."""
        if self.fold_rows is not None:
            data.write_manifest(run_dir / "split.csv", *self.fold_rows)
        else:
            (run_dir / "split.csv").write_bytes(self.manifest.read_bytes())


def prepare_data(config: TrainConfig, progress: bool = False) -> Prepared:
    """The data as the run uses it; writes nothing in a run folder (Prepared.write_split does), so a data
    set that cannot be trained on (data.DataError) is refused before a run folder is made."""
    root = Path(config.data)
    records, bad = data.scan_cached(str(root), progress, config.cache)
    for b in bad:
        print(f"skipping unreadable image {b.path}: {b.reason}", file=sys.stderr)
    found = sorted({r.label for r in records})
    if len(found) < 2:  # it would "test" at accuracy 1.0
        raise data.DataError(f"{root} has one class ({found[0]}): a classifier needs photos of two or more "
                             f"classes, one sub-folder each")
    curation = data.read_curation(config.curation, records, root) if config.curation else None
    # One manifest per (data set, seed) is shared by every run; each run keeps a copy beside it.
    split, shared = data.dataset_split(records, config.seed, Path(config.output) / "splits", root, curation,
                                       config.split_method)
    fold_rows = None
    if config.folds > 1:  # cross-validation: this run's fold of the non-test images validates
        split = data.fold_split(records, split, config.folds, config.fold, config.seed)
        fold_rows = (records, split, root, curation)
    class_names = sorted({r.label for r in records})
    published = {s: [r for r, p in zip(records, split) if p == s] for s in data.SPLITS}
    by_split = {s: data.apply_curation(recs, curation) for s, recs in published.items()}
    labels = {s: [class_names.index(r.label) for r in recs] for s, recs in by_split.items()}
    if curation is None:
        return Prepared(class_names, by_split, labels, bad, shared, fold_rows=fold_rows)
    return Prepared(class_names, by_split, labels, bad, shared, curation.summary(), published["test"], fold_rows)


@dataclass
class Run:
    """Everything one run trains with, made once by build_run."""
    config: TrainConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype | None
    threads: int
    prep: Prepared
    input_size: int
    mean: list[float]
    std: list[float]
    model: models.OreClassifier
    optimizer: torch.optim.Optimizer
    scheduler: object | None      # timm's, or None for a constant rate
    recipe: Recipe
    ema: object | None            # timm's ModelEmaV3 of the model, or None
    generator: torch.Generator
    route: features.FrozenRoute
    online: Callable | None       # the online augmentation policy, or None
    train_samples: list           # (record, view) pairs: each training image once per static view
    train_labels: list[int]
    val_samples: list
    progress: bool
    started: float = field(default_factory=time.time)
    device_fallback: str = ""     # why device auto got the CPU though handed GPUs (no CUDA behind them), or ""

    def depth(self, epoch: int) -> int:
        """How much of the backbone is frozen in this epoch: all of it for the first freeze_epochs."""
        return self.model.depth if epoch <= self.config.freeze_epochs else unfrozen_depth(self.config, self.model.depth)

    def judged(self):
        """The model holding the weights validation judges and checkpoints keep (recipe.weights_of)."""
        return weights_of(self.model, self.ema)

    def log(self, text: str) -> None:
        print(f"[{self.config.run_name()}] {text}", file=sys.stderr, flush=True)


class RunFolderExists(FileExistsError):
    pass


class ConfigError(ValueError):
    """A configuration the model cannot run (found once the model is built), refused before a run folder is made."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped, and so how to continue it (train --resume run_dir; None for a
    cross-validation, whose folds' runs continue only inside a study)."""

    def __init__(self, run_dir: Path | None, epoch: int):
        super().__init__(run_dir, epoch)  # its args, so that it pickles (a Ray trial's error travels so)
        self.run_dir, self.epoch = run_dir, epoch

    def __str__(self) -> str:
        return f"interrupted after epoch {self.epoch}"


def unfinished_hint(folder: Path) -> str:
    """How a run folder another run would take continues, if it is an unfinished run's."""
    if (folder / "metrics.json").exists() or not (folder / "config.json").exists():
        return ""
    if (folder / LAST).exists():
        return f"; it is an unfinished run: `orestudy train --resume {folder}` continues it"
    return f"; its run finished no epoch: `orestudy train --resume {folder}` restarts it"


def unfrozen_depth(config: TrainConfig, backbone_depth: int) -> int:
    """How much of the backbone stays frozen after the first freeze_epochs (negative: all but the last)."""
    return config.freeze_depth if config.freeze_depth >= 0 else backbone_depth + config.freeze_depth


def claim_run_dir(config: TrainConfig) -> Path:
    """A run folder no other run writes to, made atomically, so two identical runs started at once get
    one each: output/run_name(), or while that exists the first free of run_name()-2, -3, ... (as
    Ultralytics does). A --name is taken as given, an existing one only with exist_ok (which a study
    trial has: its folder is its own, and a retry takes it over)."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    folder = output / config.run_name()
    if config.exist_ok:
        folder.mkdir(exist_ok=True)
        return folder
    for n in itertools.count(2):
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            if config.name:
                raise RunFolderExists(f"run folder {folder} already exists (--exist-ok reuses it)"
                                      + unfinished_hint(folder)) from None
            folder = output / f"{config.run_name()}-{n}"


def build_run(config: TrainConfig, run_dir: Path | None = None) -> Run:
    """The run, in run_dir (a resumed run's folder) or in a new folder of its own, made only once the data
    and the model are known to be trainable (a refused run leaves no folder behind)."""
    threads = devices.set_threads(config.threads)
    device = devices.pick_device(config.device)
    dtype = devices.pick_precision(config.precision, device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    progress = config.progress and sys.stderr.isatty()

    prep = prepare_data(config, progress)
    spec = models.backbone_spec(config.backbone)
    size = config.image_size or spec.input_size
    if config.normalization == "train":
        mean, std = data.train_channel_stats(prep.records["train"], size, config.cache)
    else:
        mean, std = spec.mean, spec.std
    model = models.create_model(config.backbone, len(prep.class_names), config.weights, config.attention,
                                config.reduction, config.dropout).to(device)
    model = model.to(memory_format=torch.channels_last)
    if not -model.depth < config.freeze_depth <= model.depth:
        raise ConfigError(f"freeze_depth {config.freeze_depth}: {config.backbone} has {model.depth} modules to freeze")
    if run_dir is None:
        run_dir = claim_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The config, and the versions and commit it ran with (metrics.json and MLflow repeat them).
    files.write_json_atomic(run_dir / "config.json", {**asdict(config), "environment": environment.versions()},
                           indent=2)
    prep.write_split(run_dir)
    optimizer = make_optimizer(model, config, device)
    s = config.aug_strength

    def images(samples, augment=None):
        return features.normalized_batch(samples, size, config.seed, s, mean, std, augment)

    # Random (scratch) weights depend on the seed, so the seed is part of the cache key.
    cache_key = {"backbone": spec.name, "weights": config.weights, "input_size": size, "mean": mean,
                 "std": std, "precision": str(dtype), "seed": config.seed if config.weights == "none" else None,
                 "view_seed": config.seed, "strength": s}
    route = features.FrozenRoute(model, images, size, config.cache, cache_key, device, dtype, config.cache_features,
                                 progress, stage=unfrozen_depth(config, model.depth) * (config.epochs > config.freeze_epochs))
    views = data.PAPER_VIEWS if config.static_da else ("identity",)
    return Run(config, run_dir, device, dtype, threads, prep, size, mean, std, model, optimizer,
               make_scheduler(optimizer, config), make_recipe(config, len(prep.class_names)), make_ema(model, config),
               torch.Generator().manual_seed(config.seed), route,
               data.online_augment(s, size) if s > 0 else None,
               [(r, v) for r in prep.records["train"] for v in views],
               [lab for lab in prep.labels["train"] for _ in views],
               [(r, "identity") for r in prep.records["val"]], progress,
               device_fallback=devices.gpus_unusable(config.device))


# ---------------------------------------------------------------------------------------------------
# Fitting

@dataclass
class Progress:
    """How far a run has come: what a resumed run starts from, and what finish() needs."""
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0})
    best_state: dict | None = None
    epoch: int = 0
    elapsed: float = 0.0          # seconds spent before this process took the run over
    mlflow_run: str | None = None


def training_state(run: Run, progress: Progress) -> dict:
    """What resume takes to continue after progress.epoch: every random stream included, so the epochs
    to come are the unbroken run's. Valid during the report call only (it holds the live weights)."""
    state = {"run_name": run.config.run_name(), "run_dir": str(run.run_dir), "epoch": progress.epoch,
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "generator": run.generator.get_state(), "numpy_rng": numpy_rng_state(),
             "torch_rng": torch.get_rng_state(), "history": progress.history, "best": progress.best,
             "best_state": progress.best_state, "elapsed": progress.elapsed + time.time() - run.started,
             "mlflow_run": progress.mlflow_run}
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    if run.scheduler is not None:
        state["scheduler"] = run.scheduler.state_dict()
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    return state


def numpy_rng_state() -> dict:
    """numpy's global random state (timm's mixup draws from it) in types torch.load(weights_only=True) reads."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "has_gauss": has_gauss,
            "gauss": gauss}


def set_numpy_rng_state(saved: dict) -> None:
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["gauss"]))


def restore(run: Run, state: dict) -> Progress:
    """The inverse of training_state."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" in state:  # states saved before it was kept drew nothing from it
        set_numpy_rng_state(state["numpy_rng"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if run.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.log(f"resuming after epoch {state['epoch']}/{run.config.epochs}")
    return Progress(state["history"], state["best"], state["best_state"], state["epoch"], state["elapsed"],
                    state.get("mlflow_run"))


def fit_epoch(run: Run, epoch: int) -> dict:
    """One epoch: train with the part of the backbone this epoch freezes, then validate."""
    t0, config, depth = time.time(), run.config, run.depth(epoch)
    if run.scheduler is not None:
        run.scheduler.step(epoch - 1)
    run.model.freeze(depth)
    run.model.train()
    run.route.keep_only(depth)
    forward, loader = run.route.train_batches(depth, run.train_samples, run.train_labels, config.batch_size,
                                              run.generator, run.online, config.aug_bank)
    train_loss, train_acc = train_one_epoch(forward, run.optimizer, loader, run.device, run.dtype,
                                            -(-len(run.train_samples) // config.batch_size),
                                            f"epoch {epoch}/{config.epochs}", run.progress, run.recipe,
                                            (lambda: run.ema.update(run.model)) if run.ema is not None else None)
    run.model.eval()
    with run.judged():
        val = evaluate(*run.route.eval_batches(depth, run.val_samples, run.prep.labels["val"], config.batch_size),
                       run.device, run.dtype)
    return {"epoch": epoch, "frozen": int(epoch <= config.freeze_epochs), "train_loss": train_loss,
            "train_accuracy": train_acc, "val_loss": val.loss, "val_accuracy": val.accuracy,
            "epoch_seconds": time.time() - t0}


def save_best(run: Run, best: dict) -> None:
    models.save_checkpoint(run.run_dir / "best.pt", run.model, run.prep.class_names, run.input_size, run.mean,
                           run.std, asdict(run.config), best)


LAST = "last.pt"  # the training state after the last finished epoch, until the run has finished


def stopped_early(config: TrainConfig, progress: Progress) -> bool:
    """--patience: no better validation accuracy in the last `patience` epochs."""
    return 0 < config.patience <= progress.epoch - progress.best.get("epoch", 0)


def fit_step(run: Run, progress: Progress, tracker, epoch: int) -> dict:
    """One epoch of fit: train and validate, keep the best-validation weights (saved as best.pt), log."""
    row = fit_epoch(run, epoch)
    progress.history.append(row)
    progress.epoch = epoch
    improved = row["val_accuracy"] > progress.best["val_accuracy"]
    if improved:
        progress.best = {"epoch": epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
        with run.judged():
            progress.best_state = copy.deepcopy(run.model.state_dict())
            save_best(run, progress.best)
    run.log(f"epoch {epoch}/{run.config.epochs} {'frozen' if row['frozen'] else 'full  '} "
            f"train loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.3f} "
            f"acc {row['val_accuracy']:.3f}{' *' if improved else ''} ({row['epoch_seconds']:.1f}s)")
    tracker.log_epoch(row)
    return row


def fit(run: Run, progress: Progress, tracker, report: Callable[[dict, dict], None] | None = None) -> Progress:
    """The epochs after progress.epoch, or fewer when --patience stops the run early; the training state
    after every epoch is kept as last.pt (and handed to report)."""
    while progress.epoch < run.config.epochs and not stopped_early(run.config, progress):
        row = fit_step(run, progress, tracker, progress.epoch + 1)
        state = training_state(run, progress)
        with files.replaced(run.run_dir / LAST) as tmp:
            torch.save(state, tmp)
        if report is not None:
            report(row, state)
    if progress.epoch < run.config.epochs:
        run.log(f"stopped early after epoch {progress.epoch}: validation accuracy has not improved for "
                f"{run.config.patience} epochs")
    return progress


# ---------------------------------------------------------------------------------------------------
# Finishing: the best checkpoint's threshold on validation, then the test split once

def finish(run: Run, progress: Progress, tracker) -> dict:
    """The part of the backbone that was frozen at the best epoch still holds its starting weights, so
    its cached outputs stand in for it exactly, as during training."""
    from . import reports  # matplotlib loads only when a run ends

    config, prep, best = run.config, run.prep, progress.best
    run.model.load_state_dict(progress.best_state)
    run.model.eval()
    depth = run.depth(best["epoch"])

    def scored(records: list, labels: list[int], flips: bool) -> Evaluation:
        """The photos as they are, or (flips) the mean softmax over them and their flips."""
        views = data.FLIP_VIEWS if flips else data.FLIP_VIEWS[:1]
        runs = [evaluate(*run.route.eval_batches(depth, [(r, view) for r in records], labels, config.batch_size),
                         run.device, run.dtype) for view in views]
        return runs[0] if len(runs) == 1 else mixture(np.stack([e.probabilities for e in runs]),
                                                      [1 / len(runs)] * len(runs), runs[0].labels)

    val_set = (prep.records["val"], prep.labels["val"])
    val, result = with_tta(config.tta, scored(*val_set, False), lambda: scored(*val_set, True))
    outcomes = per_image("val", prep.records["val"], val)
    best.update(calibration(val.probabilities, val.labels, config.unknown_target_error, config.unknown_delta))
    # what predict needs to answer at any target, set coverage and novelty pass share (run/answering.py)
    best.update(answering.keep(run.model, prep.records, prep.labels, val.probabilities, run.input_size, run.mean,
                               run.std, config.data, f"validation split of {config.run_name()}", run.device,
                               run.dtype, config.batch_size))
    best["tta"] = result["tta"]
    save_best(run, best)
    if config.evaluate_test:
        test = scored(prep.records["test"], prep.labels["test"], result["tta"])
        result.update(test_metrics(test, prep.class_names, best, config.set_coverage))
        outcomes += per_image("test", prep.records["test"], test)
    result.update(curation_metrics(run, lambda records, labels: scored(records, labels, result["tta"])))
    result.update({
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"], "epochs_run": progress.epoch,
        "wall_seconds": progress.elapsed + time.time() - run.started, "threads": run.threads,
        "device": str(run.device), "device_requested": config.device,
        **({"device_fallback": run.device_fallback} if run.device_fallback else {}),
        "precision": str(run.dtype or "fp32"), "n_train": len(prep.records["train"]),
        "n_val": len(prep.records["val"]), "n_test": len(prep.records["test"]),
        "n_train_samples": len(run.train_samples), "unreadable_files": [asdict(b) for b in prep.bad_files],
        "run_dir": str(run.run_dir), "environment": environment.versions(), "predictions": outcomes})
    reports.write_run_report(run.run_dir, progress.history, result, prep.class_names)
    tracker.finish(result, run.run_dir, run.model)
    tested = f"test accuracy {result['accuracy']:.4f} macro-F1 {result['macro_f1']:.4f}" if config.evaluate_test \
        else f"best val accuracy {best['val_accuracy']:.4f}, test not evaluated"
    run.log(f"{tested} (best epoch {best['epoch']}, {result['wall_seconds']:.0f}s) -> {run.run_dir}")
    return result


def with_tta(mode: str, plain: Evaluation, flipped: Callable[[], Evaluation]) -> tuple[Evaluation, dict]:
    """Validation as the run is judged (config.tta): the photos as they are, with their flips, or (auto)
    whichever scores the higher validation accuracy (then the lower loss; a tie keeps them plain); and
    the choice for metrics.json. The test split follows the choice, never informs it."""
    if mode == "off":
        return plain, {"tta": False}
    other = flipped()
    if mode == "flips":
        return other, {"tta": True}
    chosen = (other.accuracy, -other.loss) > (plain.accuracy, -plain.loss)
    return other if chosen else plain, {"tta": chosen, "val_accuracy_plain": plain.accuracy,
                                        "val_accuracy_flips": other.accuracy}


def curation_metrics(run: Run, scored: Callable[[list, list[int]], Evaluation]) -> dict:
    """A curated run's curation, and (when it tests) its model on the published test split with the
    published labels: the same photos an uncurated run of the seed is tested on."""
    prep = run.prep
    if prep.curation is None:
        return {}
    if not run.config.evaluate_test:
        return {"curation": prep.curation}
    labels = [prep.class_names.index(r.label) for r in prep.published_test]
    full = scored(prep.published_test, labels)
    scores = classification_metrics(full.labels, full.predictions, prep.class_names)
    return {"curation": prep.curation, "n_test_full": len(labels), "test_full_accuracy": scores["accuracy"],
            "test_full_macro_f1": scores["macro_f1"]}


def resumed_dir(config: TrainConfig, state: dict | None) -> Path | None:
    """The folder of the run a training state continues; None for a new run, or for a state saved before
    states recorded it (that run continues in a folder claimed as usual)."""
    if state is None:
        return None
    if state["run_name"] != config.run_name():  # checked before anything is written to its folder
        raise ValueError(f"the training state to resume is of run {state['run_name']}, not {config.run_name()}")
    return Path(state["run_dir"]) if "run_dir" in state else None


def describe(run: Run) -> list[str]:
    """What a run trains on and with: the opening lines it prints, and its MLflow description."""
    config, prep = run.config, run.prep
    n = {s: len(prep.records[s]) for s in data.SPLITS}
    samples = f" ({len(run.train_samples)} samples an epoch)" if len(run.train_samples) != n["train"] else ""
    folds = f", fold {config.fold + 1} of {config.folds}" if config.folds > 1 else ""
    return [f"data {config.data}: {len(prep.class_names)} classes, {sum(n.values())} images"
            f"{f' ({len(prep.bad_files)} unreadable, left out)' if prep.bad_files else ''}"
            f"{', curated by ' + config.curation if config.curation else ''}; split by {config.split_method}, "
            f"seed {config.seed}{folds}: {n['train']} train{samples} / {n['val']} val / {n['test']} test",
            f"{config.backbone}, {config.regime}, attention {config.attention}, backbone frozen for "
            f"{min(config.freeze_epochs, config.epochs)} of {config.epochs} epochs; on {run.device}, "
            f"{'fp32' if run.dtype is None else str(run.dtype).removeprefix('torch.') + ' autocast'}, "
            f"{run.threads} threads"]


def opening(run: Run, tracker) -> None:
    """The run's first lines: its data, what it trains, and where its folder and MLflow run are."""
    for line in describe(run):
        run.log(line)
    if run.device_fallback:  # a GPU trial on a node without CUDA: never a silent CPU run
        run.log(f"device auto: {run.device_fallback}, so the run trains on the CPU")
    where = f"run folder {run.run_dir}"
    if tracker.run_id:
        where += f"; MLflow run {tracker.run_id} in {tracker.uri}, experiment {run.config.experiment}"
    run.log(where)


def run_experiment(config: TrainConfig, report: Callable[[dict, dict], None] | None = None,
                   resume: dict | None = None) -> dict:
    """Train one configuration and test its best-validation checkpoint once. report(epoch_metrics,
    state) is called after every epoch (Ray Tune's hook); resume takes such a state and continues, in
    the run's folder and MLflow run (a state without weights, from resumable, restarts the run in its
    folder). A run that raises ends its MLflow run FAILED, or KILLED (Ctrl-C, raised as Interrupted,
    which says where the run stopped). A cross-validated config (folds > 1, fold -1) is cross_validate's."""
    from .. import tracking  # mlflow loads only when a run starts

    if len(config.fold_configs()) > 1:
        return cross_validate(config, report, resume)
    run = build_run(config, resumed_dir(config, resume))
    progress = restore(run, resume) if resume is not None and "model" in resume else Progress()
    if resume is not None and "model" not in resume:
        run.log("restarting the run in its folder: it finished no epoch")
    try:
        with tracking.Tracker.start(config, run.run_dir, progress.history, progress.mlflow_run,
                                    "\n\n".join(describe(run) + [f"Run folder: `{run.run_dir}`"])) as tracker:
            progress.mlflow_run = tracker.run_id
            opening(run, tracker)
            result = finish(run, fit(run, progress, tracker, report), tracker)
    except KeyboardInterrupt as stop:
        raise Interrupted(run.run_dir, progress.epoch) from stop
    (run.run_dir / LAST).unlink(missing_ok=True)  # finished: nothing left to resume
    return {**result, "mlflow_run": tracker.run_id or "", "mlflow_uri": tracker.uri,
            "mlflow_url": tracking.view_url(tracker.experiment_id, tracker.run_id) if tracker.run_id else ""}


def resumable(run_dir: str | Path, **where) -> tuple[TrainConfig, dict]:
    """The config (its config.json; where: fields of where and how it runs now, e.g. threads) and the
    training state (its last.pt) that continue the interrupted run in run_dir after its last finished
    epoch: run_experiment(*resumable(run_dir)) finishes it in its folder and MLflow run. A run that
    finished no epoch (killed before its first ended) has no last.pt: its state restarts it in its folder
    (its stale MLflow run is ended KILLED and a new one begins)."""
    run_dir = Path(run_dir).resolve()
    if (run_dir / "metrics.json").exists():
        raise ValueError(f"{run_dir} has finished (it has metrics.json): nothing to resume")
    saved = run_dir / "config.json"
    if not saved.exists():
        raise FileNotFoundError(f"{saved} not found: {run_dir} is no run folder")
    # Its MLflow store and split manifests are beside it, wherever this is started from.
    saved_config = {k: v for k, v in json.loads(saved.read_text()).items() if k != "environment"}
    config = TrainConfig.from_dict({**complete(saved_config), **where, "output": str(run_dir.parent)},
                                   source=str(saved))
    if not (run_dir / LAST).exists():
        return config, {"run_name": config.run_name(), "run_dir": str(run_dir), "epoch": 0}
    return config, {**torch.load(run_dir / LAST, map_location="cpu"), "run_dir": str(run_dir)}


def cross_validate(config: TrainConfig, report: Callable[[dict, dict], None] | None = None,
                   resume: dict | None = None) -> dict:
    """One model per fold, trained in lockstep, epoch by epoch, so that every report (and ASHA's rung)
    compares configurations at the same epoch on the mean over all folds: the mean of the folds' best
    validation accuracies so far, with the spread beside it. The state holds every fold's state."""
    from .. import tracking

    # The folds never test: with evaluate_test, their models are tested once together (crossfit)
    folds = [replace(c, evaluate_test=False) for c in config.fold_configs()]
    states = resume["folds"] if resume is not None else [None] * len(folds)
    runs = [build_run(c, resumed_dir(c, state)) for c, state in zip(folds, states)]
    progresses = [Progress() if state is None else restore(run, state) for run, state in zip(runs, states)]
    with contextlib.ExitStack() as stack:  # each fold's MLflow run ends FAILED or KILLED if this raises
        try:
            trackers = [stack.enter_context(tracking.Tracker.start(run.config, run.run_dir, p.history, p.mlflow_run))
                        for run, p in zip(runs, progresses)]
            for p, tracker in zip(progresses, trackers):
                p.mlflow_run = tracker.run_id
            results = lockstep(config, runs, progresses, trackers, report)
        except KeyboardInterrupt as stop:
            raise Interrupted(None, progresses[0].epoch) from stop
    fold_best = [r["best_val_accuracy"] for r in results]
    summary = {"folds": results, "fold_best_val_accuracy": fold_best, "best_val_accuracy": float(np.mean(fold_best)),
               "best_epoch": int(np.median([r["best_epoch"] for r in results])),
               "wall_seconds": max(r["wall_seconds"] for r in results), "run_dir": str(runs[0].run_dir.parent)}
    return {**summary, **crossfit(config, runs, results)} if config.evaluate_test else summary


def crossfit(config: TrainConfig, runs: list[Run], fold_results: list[dict]) -> dict:
    """The fold models as one cross-fitted model (ensembling.build_crossfit) in output/run_name(), tested
    once, and logged to MLflow as one run beside the folds'; its result has a run's fields, so that a
    study keeps it as a trial record."""
    from . import ensembling

    output = Path(config.output) / config.run_name()
    started = time.time()
    spec = ensembling.build_crossfit([run.run_dir for run in runs], output, Path(config.data), runs[0].device,
                                     runs[0].dtype, config.batch_size)
    first = fold_results[0]
    result = {**spec["metrics"], "class_names": spec["class_names"], "tta": any(r["tta"] for r in fold_results),
              "wall_seconds": max(r["wall_seconds"] for r in fold_results) + time.time() - started,  # lockstep folds overlap
              **{k: first[k] for k in ("device", "precision", "threads")}}
    if config.mlflow:
        result["mlflow_run"] = ensembling.log_run(config.output, config.experiment, output, spec)
    runs[0].log(f"cross-fitted model of {len(runs)} folds: test accuracy {result['accuracy']:.4f} macro-F1 "
                f"{result['macro_f1']:.4f}; calibrated on {result['n_val']} out-of-fold photos -> {output}")
    return result


def lockstep(config: TrainConfig, runs: list[Run], progresses: list[Progress], trackers: list, report) -> list[dict]:
    """The folds' epochs, one epoch of every fold at a time, each reported as the folds' mean; then
    every fold finished."""
    for epoch in range(progresses[0].epoch + 1, config.epochs + 1):
        rows = [fit_step(run, p, t, epoch) for run, p, t in zip(runs, progresses, trackers)]
        if report is not None:
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("epoch", "frozen")}
            bests = [p.best for p in progresses]
            report({**rows[0], **mean, "epoch_seconds": sum(r["epoch_seconds"] for r in rows),
                    "fold_best_val_accuracy": [b["val_accuracy"] for b in bests]},
                   {"folds": [training_state(run, p) for run, p in zip(runs, progresses)],
                    "best": {"epoch": epoch, "val_accuracy": float(np.mean([b["val_accuracy"] for b in bests])),
                             "val_loss": float(np.mean([b["val_loss"] for b in bests]))}})
    return [finish(run, p, t) for run, p, t in zip(runs, progresses, trackers)]
