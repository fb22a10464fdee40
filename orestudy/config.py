"""The one description of a run: `TrainConfig`, whose fields carry their help, choices and role.

From it come the command line (`cli.add_options`), the type-checked loading of grid and search-space
YAML (`TrainConfig.from_dict`), the fields a portable trial record keeps (`computation`), and the run
name. It imports nothing heavy, so `--help` answers at once.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "minerals"
DEFAULT_CACHE = Path(os.environ.get("ORESTUDY_CACHE", Path.home() / ".cache" / "orestudy"))

TIMM_PREFIX = "timm/"


class Backbones(tuple):
    """The registered backbones (models.REGISTRY), and any timm/<model name>: timm's name is checked
    when the model is made, so this module stays free of torch and timm."""

    def __contains__(self, name) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and name.startswith(TIMM_PREFIX)
                                              and len(name) > len(TIMM_PREFIX))


# The last entry stands for any timm model, so that --help and error messages show it.
BACKBONES = Backbones(("alexnet", "vgg16", "resnet50", "inception_v3", "mobilenet_v2", "mobilenet_v1",
                       "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", f"{TIMM_PREFIX}<name>"))
ATTENTIONS = ("none", "se", "cbam", "eca")
REGIMES = {  # the paper's three regimes: ImageNet weights or not, static 5x augmentation or not
    "scratch": {"weights": "none", "static_da": False},
    "tl": {"weights": "imagenet", "static_da": False},
    "tl_da": {"weights": "imagenet", "static_da": True},
}

SPLIT_METHODS = ("hash", "shuffle")
# What a config saved before a field existed computed, where that is not the field's default: a record
# or config.json without split_method was split by shuffle (see complete()).
SAVED_BEFORE = {"split_method": "shuffle"}

# A field's role: what it computes (part of a trial's identity), or where the run lives and how it
# is watched (never part of it). "study" fields compute, but a study sets them, never a config file.
COMPUTES, WHERE, STUDY = "computes", "where", "study"


def default_data_root() -> Path:
    return Path(os.environ.get("ORESTUDY_DATA", DEFAULT_DATA))


def option(default, help: str, *, choices=None, role: str = COMPUTES, factory=None):
    """A config field with its help text, choices and role as metadata."""
    meta = {"help": help, "choices": choices, "role": role}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    backbone: str = option("mobilenet_v2", "ImageNet backbone the classifier is built on; timm/<name>: any timm "
                                            "model", choices=BACKBONES)
    regime: str = option("tl_da", "scratch: random weights; tl: ImageNet weights; tl_da: ImageNet weights and "
                                  "the paper's static 5x augmentation", choices=tuple(REGIMES))
    attention: str = option("se", "attention block after the backbone's features", choices=ATTENTIONS)
    reduction: int = option(8, "SE / CBAM reduction ratio r")
    freeze_epochs: int = option(10, "backbone frozen (weights and BatchNorm statistics) for the first F "
                                    "epochs; >= epochs: frozen throughout")
    epochs: int = option(20, "training epochs; an epoch is one pass over the (5x augmented) training set")
    patience: int = option(0, "stop early once validation accuracy has not improved for N epochs; 0: never "
                              "(the paper trains every epoch)")
    lr: float = option(1e-4, "learning rate (of the pretrained backbone; the new layers' is lr x head_lr_mult), "
                             "in (0, 1]")
    optimizer: str = option("adam", "timm's optimizer: adam (the paper's), adamw (decoupled weight decay), sgd "
                                    "(momentum 0.9, Nesterov)", choices=("adam", "adamw", "sgd"))
    weight_decay: float = option(0.0, "weight decay, in [0, 1); never on biases and normalization weights")
    lr_schedule: str = option("constant", "constant (the paper's) or cosine decay over all epochs (timm's "
                                          "CosineLRScheduler, stepped per epoch)", choices=("constant", "cosine"))
    warmup_epochs: int = option(0, "the learning rate rises linearly from lr/100 over the first N epochs, "
                                   "then follows lr_schedule; in [0, epochs)")
    head_lr_mult: float = option(1.0, "the new layers' (attention block and head) learning rate is lr x this, "
                                      "in (0, 1000]: the pretrained backbone moves slower than what starts random")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy targets, in [0, 0.5)")
    mixup: float = option(0.0, "mixup alpha (timm's Mixup): each batch is blended with its reverse at a Beta("
                               "alpha, alpha) ratio, at the trainable part's input (images, or the frozen "
                               "part's cached outputs while it is frozen); 0: off")
    cutmix: float = option(0.0, "cutmix alpha (timm's Mixup; a batch gets mixup or cutmix at even odds when both "
                                "are on): a box of the reversed batch is pasted in; spatial inputs only (a "
                                "pooled cached batch takes mixup); 0: off")
    ema_decay: float = option(0.0, "exponential moving average of the weights (timm's ModelEmaV3), updated every "
                                   "step: what validation selects and the checkpoint keeps; 0: off, else in "
                                   "[0.5, 1)")
    batch_size: int = option(32, "training and evaluation batch size")
    dropout: float = option(0.5, "dropout before the last linear layer, in [0, 1)")
    aug_strength: float = option(0.0, "online augmentation on top, in [0, 1] (crops, flips, right-angle "
                                      "rotations, brightness/contrast/saturation; never hue); 0: off")
    aug_bank: int = option(4, "online draws kept per view while (part of) the backbone is frozen")
    freeze_depth: int = option(0, "leading backbone modules frozen for the whole run (partial fine-tuning); "
                                  "negative: all but the last -N (the same top whatever the backbone's length)")
    cache_features: bool = option(True, "reuse a frozen backbone's outputs instead of recomputing them")
    seed: int = option(231, "split seed and training seed")
    split_method: str = option("hash", "hash: each photo's split follows from its content and the seed, so "
                                       "adding or removing photos moves no other photo (class shares near "
                                       "60/20/20); shuffle: exact shares, but any change of the data redraws "
                                       "the whole split (the committed studies' split)", choices=SPLIT_METHODS)
    folds: int = option(1, "K > 1: the seed's non-test images are cut into K grouped, stratified folds, one "
                           "of which validates (cross-validation); the test split stays the seed's")
    fold: int = option(-1, "with folds > 1: the fold that validates (0 .. folds-1); -1: every fold, one "
                           "model each, trained in lockstep, judged by their mean validation accuracy")
    image_size: int = option(0, "input size in pixels; 0: the backbone's own (224; 299 for Inception v3)")
    normalization: str = option("train", "train: the training split's channel statistics (paper eq. 3); "
                                          "backbone: the ImageNet weights' own", choices=("train", "backbone"))
    unknown_target_error: float = option(0.05, "most error allowed among answered photos; below the 'unknown' "
                                               "threshold chosen on validation for it, a photo is 'unknown'")
    unknown_delta: float = option(0.1, "the answered error is at most unknown_target_error with confidence "
                                       "1 - unknown_delta (a Clopper-Pearson bound on validation)")
    tta: str = option("off", "test-time augmentation of the final evaluation: flips scores validation and "
                             "test on the mean softmax over each photo and its horizontal and vertical flips "
                             "(predict --tta); auto: flips only where they raise validation accuracy (test is "
                             "never looked at); predict follows the run's choice", choices=("off", "flips", "auto"))
    set_coverage: float = option(0.95, "coverage of the conformal prediction sets reported on test (predict "
                                       "takes any with --coverage)")
    precision: str = option("auto", "autocast dtype; auto: bf16 on CUDA and on CPUs with native bf16, "
                                    "else fp32", choices=("auto", "bf16", "fp32"))
    threads: int = option(0, "CPU threads; 0: all cores this process may use", role=WHERE)
    device: str = option("auto", "cpu, cuda, cuda:N; auto: CUDA when present", role=WHERE)
    data: str = option(None, "image folder with one sub-folder per class (default: ORESTUDY_DATA or "
                             "../shared/data/minerals)", role=WHERE, factory=lambda: str(default_data_root()))
    # Where the file lives; what it changes is part of the data set's name (data.dataset_name), which
    # split manifests and trial records are keyed by.
    curation: str = option("", "curation CSV (image, action, label, note): images to exclude or relabel, "
                               "applied after scanning; the split stays the published data's", role=WHERE)
    output: str = option("runs", "folder of run folders and the MLflow store", role=WHERE)
    name: str = option("", "run folder name; derived from the config when empty (then -2, -3, ... is added "
                           "while that folder exists)", role=WHERE)
    exist_ok: bool = option(False, "let --name reuse an existing run folder (otherwise an error)", role=WHERE)
    cache: str = option(str(DEFAULT_CACHE), "feature cache folder; '' keeps it in memory only", role=WHERE)
    mlflow: bool = option(True, "log the run to MLflow", role=WHERE)
    experiment: str = option("orestudy", "MLflow experiment", role=WHERE)
    register: str = option("", "register the run's MLflow model under this name in the model registry",
                           role=WHERE)
    parent_run: str = option("", "MLflow run id of the study this run belongs to", role=WHERE)
    progress: bool = option(True, "progress bars on a terminal", role=WHERE)
    evaluate_test: bool = option(True, "evaluate the test split at the end (search trials do not: it stays "
                                       "unseen until the chosen configuration is retrained)", role=STUDY)

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"unknown {f.name} {getattr(self, f.name)!r}; expected one of {sorted(choices)}")
        if self.epochs < 1 or self.freeze_epochs < 0 or self.batch_size < 1 or self.reduction < 1 or self.patience < 0:
            raise ValueError("epochs and batch_size must be >= 1, freeze_epochs and patience >= 0, reduction >= 1")
        for name, ok, want in (
                ("aug_strength", 0.0 <= self.aug_strength <= 1.0, "in [0, 1]"),
                ("lr", 0.0 < self.lr <= 1.0, "a positive number, at most 1 (larger ones only diverge)"),
                ("weight_decay", 0.0 <= self.weight_decay < 1.0, "in [0, 1)"),
                ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "in [0, epochs)"),
                ("head_lr_mult", 0.0 < self.head_lr_mult <= 1000.0, "in (0, 1000]"),
                ("label_smoothing", 0.0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
                ("mixup", 0.0 <= self.mixup <= 10.0, "in [0, 10]"),
                ("cutmix", 0.0 <= self.cutmix <= 10.0, "in [0, 10]"),
                ("ema_decay", self.ema_decay == 0.0 or 0.5 <= self.ema_decay < 1.0, "0 (off) or in [0.5, 1)"),
                ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
                ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),  # numpy's and scikit-learn's seed range
                ("image_size", self.image_size == 0 or self.image_size >= 32, "0 (the backbone's own) or >= 32"),
                ("threads", self.threads >= 0, ">= 0 (0: all cores)"),
                ("aug_bank", self.aug_bank >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if self.folds < 1 or not -1 <= self.fold < self.folds:
            raise ValueError(f"folds must be >= 1 and fold in -1 .. folds-1, got folds {self.folds}, fold {self.fold}")
        for name in ("unknown_target_error", "unknown_delta", "set_coverage"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")

    @property
    def weights(self) -> str:
        return REGIMES[self.regime]["weights"]

    @property
    def static_da(self) -> bool:
        return REGIMES[self.regime]["static_da"]

    def run_name(self) -> str:
        att = "" if self.attention == "none" else f"_{self.attention}{self.reduction}"
        cv = "" if self.folds == 1 else f"_cv{self.folds}"
        backbone = self.backbone.replace("/", "-")  # timm/<name>: one folder, not two
        name = self.name or f"{backbone}_{self.regime}{att}_f{self.freeze_epochs}_e{self.epochs}_s{self.seed}{cv}"
        return name if self.folds == 1 or self.fold < 0 else f"{name}-fold{self.fold}"

    def fold_configs(self) -> list["TrainConfig"]:
        """The runs this config stands for: itself, or (folds > 1, fold -1) one per fold."""
        if self.folds == 1 or self.fold >= 0:
            return [self]
        return [replace(self, fold=k) for k in range(self.folds)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "") -> "TrainConfig":
        """A config from plain values (YAML, JSON, a Tune param space), each checked against its field's
        type; an int is taken for a float. source (a file) starts every error message."""
        where = f"{source}: " if source else ""
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{where}unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        typed = {}
        for key, value in values.items():
            want = type(defaults()[key])
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if want is float and isinstance(value, str) else ""
                raise ValueError(f"{where}{key} must be {want.__name__}, got {value!r}{hint}")
            typed[key] = value
        try:
            return cls(**typed)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None


def read_recipe(path: str | Path) -> dict:
    """A recipe file: YAML of TrainConfig fields (experiments/recipes/*.yaml), each checked as from_dict
    checks it; a study-set field is refused, as the command line refuses it."""
    import yaml  # light, but only a recipe needs it

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the recipe ({type(err).__name__}: {err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of TrainConfig fields, not {type(values).__name__}")
    studies_set = sorted(set(values) & set(fields_with_role(STUDY)))
    if studies_set:
        raise ValueError(f"{path}: {', '.join(studies_set)} are set by studies, not by a recipe")
    TrainConfig.from_dict(values, source=str(path))  # every key known, every value typed and in range
    return values


def defaults() -> dict:
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)}


def complete(saved: dict) -> dict:
    """A saved config (a trial record's, a run's config.json) with every field: a field added since it
    was saved takes the value that computed it then (SAVED_BEFORE), else its default."""
    return {**defaults(), **SAVED_BEFORE, **saved}


# The recipe fields (optimizer ... ema_decay) came after every committed study: a record leaves them out
# at their defaults, so an old record and a new one of the same computation are the same bytes.
OMITTED_AT_DEFAULT = ("optimizer", "weight_decay", "lr_schedule", "warmup_epochs", "head_lr_mult",
                      "label_smoothing", "mixup", "cutmix", "ema_decay")


def compact(config: dict) -> dict:
    """config less the OMITTED_AT_DEFAULT fields at their defaults (complete() restores them)."""
    values = defaults()
    return {k: v for k, v in config.items() if not (k in OMITTED_AT_DEFAULT and v == values[k])}


def fields_with_role(*roles: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["role"] in roles)


def computation(config: dict) -> dict:
    """What a config computes: its fields less where it lives and how it is watched."""
    where = fields_with_role(WHERE)
    return {k: v for k, v in config.items() if k not in where}


def is_ensemble(config: dict) -> bool:
    """An ensemble's record (studies.study.ensemble_trial) has for config its members' computations, the
    seed they share and how their weights were chosen, instead of TrainConfig fields."""
    return "members" in config


def computation_of(config: TrainConfig) -> dict:
    return computation(asdict(config))


@dataclass
class StudySettings:
    """Where a study (replicate's grid, a search) lives and how its trials are run: one CLI section
    shared by both faces (cli.add_options)."""
    name: str = option("", "the study's name: its folder under --output and --storage-path, and its MLflow "
                           "run (default: derived from the command)", role=WHERE)
    output: str = option("runs", "run folders live in OUTPUT/NAME; the MLflow store in OUTPUT", role=WHERE)
    storage_path: str = option("", "Ray Tune's results and checkpoints: a folder every node reaches, or "
                                   "s3:// gs:// (default: OUTPUT/ray_results)", role=WHERE)
    experiment: str = option("orestudy", "MLflow experiment", role=WHERE)
    mlflow: bool = option(True, "log the study and its trials to MLflow", role=WHERE)
    max_failures: int = option(2, "retries of a trial that raised, from its last finished epoch, before "
                                  "it counts as failed", role=WHERE)
    cpus_per_trial: int = option(0, "0: a whole (smallest) node, or its share per GPU trial", role=WHERE)
    gpus_per_trial: float = option(0.0, "0: one GPU where nodes have GPUs; a fraction shares one", role=WHERE)
    data: str = option(None, "image folder with one sub-folder per class (default: ORESTUDY_DATA or "
                             "../shared/data/minerals)", role=WHERE, factory=lambda: str(default_data_root()))
    cache: str = option(str(DEFAULT_CACHE), "feature cache folder; '' keeps features in memory only", role=WHERE)
    curation: str = option("", "curation CSV every trial's data is curated by (see train --curation); its "
                               "trials' records name the curated data set", role=WHERE)
    device: str = option("auto", "the trials' device: cpu, cuda; auto: CUDA where a node has it", role=WHERE)
    address: str = option("", "a Ray cluster to join ('auto': the one running here, or host:port); "
                              "default: start Ray in this process", role=WHERE)

    def __post_init__(self):
        # Trials run in their own working folders: every path they are given is absolute.
        self.output = str(Path(self.output).resolve())
        self.data = str(Path(self.data).resolve())
        self.cache = str(Path(self.cache).resolve()) if self.cache else ""
        self.curation = str(Path(self.curation).resolve()) if self.curation else ""
        if not self.storage_path:
            self.storage_path = str(Path(self.output) / "ray_results")
        elif "://" not in self.storage_path:
            self.storage_path = str(Path(self.storage_path).resolve())

    @property
    def path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"
