"""A run's training recipe beyond its model and data: optimizer, learning-rate schedule, loss, mixup /
cutmix and a moving average of the weights, each timm's own part configured from TrainConfig.

With the defaults (the paper's recipe: Adam at a constant rate, plain cross-entropy, nothing mixed or
averaged) this builds exactly the optimizer and loss the committed studies trained with, so their
records still stand for their configurations.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.utils import ModelEmaV3

from ..config import TrainConfig

WARMUP_START = 0.01  # a warm-up starts at lr x this


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The backbone at lr, the new layers (attention, head) at lr x head_lr_mult; with weight decay, none
    on biases and normalization weights (1-d parameters), as timm's own grouping does."""
    new = {id(p) for name, p in model.named_parameters() if not name.startswith("backbone.")}
    groups = {}
    for name, p in model.named_parameters():
        is_new, decays = id(p) in new, config.weight_decay > 0 and p.ndim > 1
        group = groups.setdefault((is_new, decays), {"params": [], "weight_decay": config.weight_decay if decays else 0.0,
                                                     "lr": config.lr * (config.head_lr_mult if is_new else 1.0)})
        group["params"].append(p)
    return list(groups.values())


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    plain = config.weight_decay == 0 and config.head_lr_mult == 1.0
    params = model.parameters() if plain else param_groups(model, config)  # plain: the paper's Adam exactly
    extra = {"fused": device.type in ("cpu", "cuda")} if config.optimizer in ("adam", "adamw") else {"momentum": 0.9}
    return create_optimizer_v2(params, opt=config.optimizer, lr=config.lr, weight_decay=config.weight_decay, **extra)


def make_scheduler(optimizer, config: TrainConfig):
    """None for a constant rate without warm-up (the paper's); else timm's scheduler, stepped with the
    0-based epoch before each epoch trains. It computes the rate from the epoch alone."""
    warmup = {"warmup_t": config.warmup_epochs, "warmup_lr_init": config.lr * WARMUP_START}
    if config.lr_schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=config.epochs, **warmup)
    if config.warmup_epochs:
        return StepLRScheduler(optimizer, decay_t=config.epochs, decay_rate=1.0, **warmup)
    return None


@dataclass
class Recipe:
    """What train_one_epoch needs beyond the model: the loss of (output, targets), and the mixing of a
    batch (None: none). Targets are class indices without mixing or smoothing, else soft targets."""
    criterion: object
    mixup: Mixup | None
    pooled_mixup: Mixup | None  # for inputs with no spatial map (a pooled cached batch): mixup alone
    num_classes: int
    smoothing: float

    def mix(self, inputs: torch.Tensor, target: torch.Tensor):
        """(inputs, targets for the criterion); an odd-sized batch (timm's mixup pairs a batch with its
        reverse) stays unmixed, with smoothed soft targets."""
        if self.mixup is None:
            return inputs, target
        mixer = self.mixup if inputs.ndim == 4 else self.pooled_mixup
        if mixer is None or len(target) % 2:
            return inputs, mixup_target(target, self.num_classes, 1.0, self.smoothing)
        return mixer(inputs, target)


def make_recipe(config: TrainConfig, num_classes: int) -> Recipe:
    if config.mixup or config.cutmix:
        mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                      num_classes=num_classes)
        pooled = Mixup(mixup_alpha=config.mixup, cutmix_alpha=0.0, label_smoothing=config.label_smoothing,
                       num_classes=num_classes) if config.mixup else None
        return Recipe(SoftTargetCrossEntropy(), mixer, pooled, num_classes, config.label_smoothing)
    criterion = LabelSmoothingCrossEntropy(config.label_smoothing) if config.label_smoothing else F.cross_entropy
    return Recipe(criterion, None, None, num_classes, config.label_smoothing)


def make_ema(model: torch.nn.Module, config: TrainConfig) -> ModelEmaV3 | None:
    return ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay else None


@contextlib.contextmanager
def weights_of(model: torch.nn.Module, ema: ModelEmaV3 | None):
    """The model holding the weights validation judges and checkpoints keep: its own, or (EMA on) the
    average's for the block, its own restored afterwards. The frozen part is the same in both, so its
    cached outputs hold for either."""
    if ema is None:
        yield model
        return
    own = copy.deepcopy(model.state_dict())
    model.load_state_dict(ema.module.state_dict())
    try:
        yield model
    finally:
        model.load_state_dict(own)
