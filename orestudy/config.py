"""The one description of a run: `TrainConfig`, whose fields carry their help, choices and role.

From it come the command line (`cli.add_options`), the type-checked loading of grid and search-space
YAML (`TrainConfig.from_dict`), the fields a portable trial record keeps (`computation`), and the run
name. It imports nothing heavy, so `--help` answers at once.
"""
from __future__ import annotations

import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "minerals"
DEFAULT_CACHE = Path(os.environ.get("ORESTUDY_CACHE", Path.home() / ".cache" / "orestudy"))

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class BackboneInfo:
    """What models.py builds a registered backbone from: its builder (a models.py function) with leading
    arguments, and what its ImageNet weights were trained on."""
    builder: str
    args: tuple = ()
    input_size: int = 224
    normalization: str = "imagenet"  # imagenet: torchvision's mean/std; tf: Google's TensorFlow x / 127.5 - 1
    interpolation: str = "bilinear"


# The registered backbones, the one list of their names: models.REGISTRY is made from it (torch-free
# here, so that --help and config checks need no torch). Sizes and interpolation of the Lite models:
# timm's pretrained configs of tf_efficientnet_lite{0,1,2}.
BACKBONE_TABLE = {
    "alexnet": BackboneInfo("fc_head_backbone", ("alexnet", 256, 6)),
    "vgg16": BackboneInfo("fc_head_backbone", ("vgg16", 512, 7)),
    "resnet50": BackboneInfo("resnet50"),
    "inception_v3": BackboneInfo("inception_v3", input_size=299, normalization="tf"),
    "mobilenet_v2": BackboneInfo("mobilenet_v2"),
    "mobilenet_v1": BackboneInfo("mobilenet_v1", normalization="tf"),
    **{f"efficientnet_lite{k}": BackboneInfo("efficientnet_lite", (k,), size, "tf", "bicubic")
       for k, size in ((0, 224), (1, 240), (2, 260))},
}


class Backbones(tuple):
    """The registered backbones (BACKBONE_TABLE), and any timm/<model name>: timm's name is checked
    when the model is made, so this module stays free of torch and timm."""

    def __contains__(self, name) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and name.startswith(TIMM_PREFIX)
                                              and len(name) > len(TIMM_PREFIX))


# The last entry stands for any timm model, so that --help and error messages show it.
BACKBONES = Backbones((*BACKBONE_TABLE, f"{TIMM_PREFIX}<name>"))


class Devices(tuple):
    """cpu, cuda, cuda:N (any GPU index) and auto (CUDA when present)."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


DEVICES = Devices(("auto", "cpu", "cuda", "cuda:N"))


def device_name(text: str) -> str:
    """text, if it names a device (DEVICES); else a ValueError that says what would."""
    if text not in DEVICES:
        raise ValueError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or auto")
    return text


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


def option(default, help: str, *, choices=None, role: str = COMPUTES, factory=None, parse=None, metavar=None,
           nargs=None, repeat=False, recorded_if_set=False):
    """A config field with its help text, choices and role as metadata; the rest shapes its command-line
    option (commands.cli.add_options): parse, a function from the option's text to the value (raising
    ValueError with a message); metavar; nargs ("+" or "*") of a list field (a tuple or list default),
    whose option takes `1,2,3` or `1 2 3`; repeat: a list field's option is given once per value;
    recorded_if_set: a trial record leaves the field out at its default (see compact)."""
    meta = {"help": help, "choices": choices, "role": role, "parse": parse, "metavar": metavar,
            "nargs": nargs, "repeat": repeat, "recorded_if_set": recorded_if_set}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Fields that a run (TrainConfig) and a study (StudySettings) share: declared once, here.

def data_option():
    return option(None, "image folder with one sub-folder per class (default: ORESTUDY_DATA or "
                        "../shared/data/minerals)", role=WHERE, factory=lambda: str(default_data_root()))


def curation_option():
    # Where the file lives; what it changes is part of the data set's name (data.dataset_name), which
    # split manifests and trial records are keyed by.
    return option("", "curation CSV (image, action, label, note): images to exclude or relabel, applied after "
                      "scanning; the split stays the published data's, and records name the curated data set",
                  role=WHERE)


def runs_option():  # the field is `output` (configs and records keep it); its option is --runs
    return option("runs", "the runs folder: run folders (a study's in RUNS/NAME) and the MLflow store "
                          "RUNS/mlflow.db, unless MLFLOW_TRACKING_URI is set", role=WHERE, metavar="DIR")


def cache_option():
    return option(str(DEFAULT_CACHE), "feature cache folder; '' keeps features in memory only", role=WHERE)


def device_option():
    return option("auto", "cpu, cuda, cuda:N; auto: CUDA when present (a study's trials: on their node)",
                  choices=DEVICES, parse=device_name, role=WHERE)


def mlflow_option():
    return option(True, "log to MLflow (a study: its own run and its trials' runs)", role=WHERE)


def experiment_option():
    return option("orestudy", "MLflow experiment", role=WHERE)


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
                                    "(momentum 0.9, Nesterov)", choices=("adam", "adamw", "sgd"), recorded_if_set=True)
    weight_decay: float = option(0.0, "weight decay, in [0, 1); never on biases and normalization weights", recorded_if_set=True)
    lr_schedule: str = option("constant", "constant (the paper's) or cosine decay over all epochs (timm's "
                                          "CosineLRScheduler, stepped per epoch)", choices=("constant", "cosine"), recorded_if_set=True)
    warmup_epochs: int = option(0, "the learning rate rises linearly from lr/100 over the first N epochs, "
                                   "then follows lr_schedule; in [0, epochs)", recorded_if_set=True)
    head_lr_mult: float = option(1.0, "the new layers' (attention block and head) learning rate is lr x this, "
                                      "in (0, 1000]: the pretrained backbone moves slower than what starts random", recorded_if_set=True)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy targets, in [0, 0.5)", recorded_if_set=True)
    mixup: float = option(0.0, "mixup alpha (timm's Mixup): each batch is blended with its reverse at a Beta("
                               "alpha, alpha) ratio, at the trainable part's input (images, or the frozen "
                               "part's cached outputs while it is frozen); 0: off", recorded_if_set=True)
    cutmix: float = option(0.0, "cutmix alpha (timm's Mixup; a batch gets mixup or cutmix at even odds when both "
                                "are on): a box of the reversed batch is pasted in; spatial inputs only (a "
                                "pooled cached batch takes mixup); 0: off", recorded_if_set=True)
    ema_decay: float = option(0.0, "exponential moving average of the weights (timm's ModelEmaV3), updated every "
                                   "step: what validation selects and the checkpoint keeps; 0: off, else in "
                                   "[0.5, 1)", recorded_if_set=True)
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
    device: str = device_option()
    data: str = data_option()
    curation: str = curation_option()
    output: str = runs_option()
    name: str = option("", "run folder name; derived from the config when empty (then -2, -3, ... is added "
                           "while that folder exists)", role=WHERE)
    exist_ok: bool = option(False, "let --name reuse an existing run folder (otherwise an error)", role=WHERE)
    cache: str = cache_option()
    mlflow: bool = mlflow_option()
    experiment: str = experiment_option()
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


def compact(config: dict) -> dict:
    """config less its recorded_if_set fields at their defaults (complete() restores them): the recipe
    fields came after every committed study, so an old record and a new one of the same computation are
    the same bytes."""
    values = defaults()
    later = {f.name for f in fields(TrainConfig) if f.metadata["recorded_if_set"]}
    return {k: v for k, v in config.items() if not (k in later and v == values[k])}


def fields_with_role(*roles: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["role"] in roles)


def computation(config: dict) -> dict:
    """What a config computes: its fields less where it lives and how it is watched."""
    where = fields_with_role(WHERE)
    return {k: v for k, v in config.items() if k not in where}


def typed_computation(config: dict) -> dict:
    """What a saved config computes, complete (config.complete) and with every value of TrainConfig's
    type, so that a record rewritten by a JSON tool (jq writes 0.0 as 0) is the same computation; raises
    TypeError or ValueError for a config this version cannot read."""
    return computation(asdict(TrainConfig.from_dict(computation(complete(config)))))


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
    name: str = option("", "the study's name: its folder under --runs and --storage-path, and its MLflow "
                           "run (default: derived from the command)", role=WHERE)
    output: str = runs_option()
    storage_path: str = option("", "Ray Tune's results and checkpoints: a folder every node reaches, or "
                                   "s3:// gs:// (default: RUNS/ray_results)", role=WHERE)
    experiment: str = experiment_option()
    mlflow: bool = mlflow_option()
    max_failures: int = option(2, "retries of a trial that raised or lost its node, from its last finished "
                                  "epoch, before it counts as failed (a node Ray drained, e.g. a preempted spot "
                                  "machine, is not counted)", role=WHERE)
    cpus_per_trial: int = option(0, "0: a whole (smallest) node, or its share per GPU trial", role=WHERE)
    gpus_per_trial: float = option(0.0, "0: one GPU where nodes have GPUs; a fraction shares one", role=WHERE)
    data: str = data_option()
    cache: str = cache_option()
    curation: str = curation_option()
    device: str = device_option()
    address: str = option("", "a Ray cluster to join ('auto': the one running here, or host:port); "
                              "default: start Ray in this process", role=WHERE)

    def __post_init__(self):
        device_name(self.device)
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


def duration(text: str) -> float:
    """Seconds from '5400', '90m', '6h' or '1h30m'."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 5400, 90m, 6h, 1h30m)")
    h, m, s = (float(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


def grid_row(name: str) -> tuple[str, str | None]:
    """A grid row's name as (regime, attention): tl_da_se is regime tl_da with attention se (the rows
    replicate --regimes takes); a regime alone is (regime, None)."""
    for attention in ATTENTIONS:
        regime = name.removesuffix(f"_{attention}")
        if attention != "none" and regime != name and regime in REGIMES:
            return regime, attention
    return name, None


# The sections of a command's options beyond where it lives (StudySettings): option groups (cli.add_options)
SEARCH, RETRAINING, SELECTION, HOW = "search", "retraining", "selection", "how"
DEFAULT_SEEDS = (231, 1, 2, 3, 4)  # the committed studies' seeds: train's default seed, then 1-4


@dataclass
class SearchSettings:
    """What a search does beyond where it lives (StudySettings)."""
    trials: int = option(0, "finished trials the search should have in all (default: the space's budget.trials); "
                            "a resumed search runs only the missing ones", role=SEARCH)
    folds: int = option(0, "a trial's objective is the mean best validation accuracy over K grouped, stratified "
                           "folds of the non-test images (default: the space's budget.folds, 1)", role=SEARCH)
    time_budget: float = option(0.0, "stop searching after this long (5400, 90m, 6h, 1h30m): running trials "
                                     "are cut, and re-run first by --resume; the retraining of the best so far follows "
                                     "(a search over several sessions: --seeds alone until its last) (default: no "
                                     "limit)", role=SEARCH, parse=duration, metavar="DURATION")
    resume: bool = option(False, "continue the search with this name", role=SEARCH)
    sampler_seed: int = option(0, "TPE's seed", role=SEARCH)
    seeds: tuple[int, ...] = option(DEFAULT_SEEDS, "retrain the best configuration once per seed (split and "
                                    "training seed) and test it; none: no retraining (default: 231,1,2,3,4, the "
                                    "committed studies' seeds, train's --seed first)", role=RETRAINING, nargs="*")
    baseline: bool = option(True, "retrain the space's baseline (the paper recipe) beside the best", role=RETRAINING)
    baseline_seeds: tuple[int, ...] = option((), "the baseline's seeds, when fewer than --seeds are affordable "
                                                 "(default: the same)", role=RETRAINING, nargs="+")
    reuse: tuple[str, ...] = option((), "finished trials of earlier studies (a replicate report's or a search's "
                                        "trials.jsonl, from any machine): a retraining run of the same "
                                        "configuration, seed and data is not run again but read from its "
                                        "record; repeatable", role=RETRAINING, metavar="TRIALS_JSONL", repeat=True)


GRID_FILE = REPO_ROOT / "experiments" / "paper_grid.yaml"
PUBLISHED_FILE = REPO_ROOT / "experiments" / "published_results.yaml"


@dataclass
class ReplicationSettings:
    """What a replication study does beyond where it lives (StudySettings): which trials (the grid file,
    its filters, seeds and budget, and fields every trial shares), and how it runs."""
    grid: str = option(str(GRID_FILE), "grid file", role=SELECTION)
    published: str = option(str(PUBLISHED_FILE), "published numbers", role=SELECTION)
    only: list[str] = option(None, "e.g. table4", role=SELECTION, metavar="TABLE", nargs="+", factory=list)
    backbones: list[str] = option(None, "e.g. mobilenet_v2,mobilenet_v1", role=SELECTION, nargs="+", factory=list)
    regimes: list[str] = option(None, "rows: scratch, tl, tl_da, tl_da_se", role=SELECTION, nargs="+", factory=list)
    schedules: list[str] = option(None, "frozen, unfrozen, frozen10", role=SELECTION, nargs="+", factory=list)
    seeds: list[int] = option(None, "split and training seeds, each cell runs once per seed (default: the grid's, "
                                    "231)", role=SELECTION, nargs="+", factory=list)
    epochs: int = option(0, "budget: epochs per trial instead of the grid's (frozen epochs scale along; default: "
                            "the grid's, the paper's 20)", role=SELECTION)
    # --set FIELD=VALUE, written by the face: a value is checked against its TrainConfig field
    fields: dict = option(None, "any other TrainConfig field for every trial, e.g. image_size=128", role=SELECTION,
                          metavar="FIELD=VALUE", factory=dict)
    resume: bool = option(False, "continue the interrupted study of the same command", role=HOW)
    reuse: list[str] = option(None, "finished trials of an earlier study (its report/trials.jsonl, from any "
                                    "machine): a trial of the same configuration on the same data is not run "
                                    "again but reported; repeatable", role=HOW, metavar="TRIALS_JSONL", repeat=True,
                              factory=list)
    report_only: bool = option(False, "write the report of the study as it stands (with --reuse records), running "
                                      "nothing", role=HOW)
