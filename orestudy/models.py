"""Models: one factory for every backbone of the study, with SE / CBAM / ECA attention.

Every model is backbone (feature map) -> attention (same shape) -> head (pool, dropout 0.5, linear).
Splitting it this way lets a frozen backbone's feature maps be computed once and cached.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from . import data
from .config import ATTENTIONS, BACKBONES, REPO_ROOT

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TF_MEAN, TF_STD = [0.5] * 3, [0.5] * 3  # Google's TensorFlow weights take x / 127.5 - 1
MOBILENET_V1_FILE = "mobilenet_v1_1.0_224_imagenet.pth"


class WeightsUnavailable(RuntimeError):
    """ImageNet weights for a backbone are neither cached nor downloadable (e.g. offline)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    mean: list[float]  # the input normalisation the ImageNet weights were trained with
    std: list[float]


# ---------------------------------------------------------------------------------------------------
# Attention modules: each maps a (B, C, H, W) feature map to one of the same shape.

class SqueezeExcitation(nn.Module):
    """Hu et al. 2018 (the paper's eq. 6-8): squeeze by global pooling, excite by FC-ReLU-FC-sigmoid."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excite = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, channels), nn.Sigmoid())

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) channel weights from the (B, C) globally pooled map."""
        return self.excite(pooled)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x.mean((2, 3)))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class EfficientChannelAttention(nn.Module):
    """Wang et al. 2020 (ECA-Net): a 1-D convolution across channels replaces SE's two FC layers."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1):
        super().__init__()
        k = int(abs((math.log2(channels) + b) / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(pooled.unsqueeze(1)).squeeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x.mean((2, 3)))[:, :, None, None]


class CBAM(nn.Module):
    """Woo et al. 2018: channel attention (shared MLP over avg- and max-pooled) then spatial attention."""

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))
        x = x * channel[:, :, None, None]
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(pooled))


def create_attention(kind: str, channels: int, reduction: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "se":
        return SqueezeExcitation(channels, reduction)
    if kind == "cbam":
        return CBAM(channels, reduction)
    if kind == "eca":
        return EfficientChannelAttention(channels)
    raise ValueError(f"unknown attention {kind!r}; expected one of {ATTENTIONS}")


# ---------------------------------------------------------------------------------------------------
# Backbones

def mobilenet_v1_features() -> nn.Sequential:
    """MobileNetV1 1.0 (Howard et al. 2017) in the layout of ../shared/weights/README.md."""
    def conv_bn(cin, cout, kernel, stride, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    layers = [conv_bn(3, 32, 3, 2)]
    channels = 32
    for out, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]:
        layers += [conv_bn(channels, channels, 3, stride, groups=channels), conv_bn(channels, out, 1, 1)]
        channels = out
    return nn.Sequential(*layers)


def mobilenet_v1_weights_path() -> Path:
    candidates = [Path(os.environ["ORESTUDY_WEIGHTS_DIR"]) / MOBILENET_V1_FILE] if "ORESTUDY_WEIGHTS_DIR" in os.environ else []
    candidates += [Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V1_FILE,
                   REPO_ROOT.parent / "shared" / "weights" / MOBILENET_V1_FILE]
    for path in candidates:
        if path.exists():
            return path
    raise WeightsUnavailable(
        f"ImageNet weights for mobilenet_v1 not found: looked for {MOBILENET_V1_FILE} in "
        f"{', '.join(str(p.parent) for p in candidates)}. Set ORESTUDY_WEIGHTS_DIR to the folder that holds it.")


class InceptionFeatures(nn.Module):
    """torchvision's Inception v3 up to Mixed_7c; in training it also returns the auxiliary logits."""

    def __init__(self, net: torchvision.models.Inception3, num_classes: int):
        super().__init__()
        net.transform_input = False  # inputs are normalised by orestudy, never re-scaled inside
        self.stem = nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                                  net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b,
                                  net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                                  net.Mixed_6d, net.Mixed_6e)
        self.top = nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c)
        self.aux = net.AuxLogits
        self.aux.fc = nn.Linear(self.aux.fc.in_features, num_classes)

    def forward(self, x):
        mid = self.stem(x)
        out = self.top(mid)
        return (out, self.aux(mid)) if self.training else out


def torchvision_backbone(name: str, pretrained: bool, num_classes: int, dropout: float):
    """(features, channels, head_layers) for a torchvision model; ImageNet weights via the weights API."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if pretrained else None
    kwargs = {"aux_logits": True, "init_weights": not pretrained} if name == "inception_v3" else {}
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url) if weights else None

    def unavailable(reason: str) -> WeightsUnavailable:
        return WeightsUnavailable(
            f"ImageNet weights for {name} are not available offline: {target} is missing and {reason}. "
            f"Download {weights.url} on a machine with internet and put it at {target}, "
            f"or train from scratch (regime 'scratch').")

    # A failed download can take a minute (DNS time-outs); ORESTUDY_OFFLINE=1 says not to try.
    if target and not target.exists() and os.environ.get("ORESTUDY_OFFLINE", "0") not in ("", "0"):
        raise unavailable("ORESTUDY_OFFLINE is set, so no download was tried")
    try:
        net = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a half-downloaded file a RuntimeError
        raise unavailable(f"downloading it failed ({type(err).__name__}: {err})") from err
    if name in ("alexnet", "vgg16"):
        pool = (6, 6) if name == "alexnet" else (7, 7)
        kept = list(net.classifier.children())[:-1]  # keep the pretrained FC layers, replace the last
        if not isinstance(kept[-1], nn.Dropout):
            kept.append(nn.Dropout(dropout))
        kept[-1].p = dropout
        head = [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), *kept, nn.Linear(4096, num_classes)]
        return net.features, 256 if name == "alexnet" else 512, head
    if name == "resnet50":
        features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                 net.layer1, net.layer2, net.layer3, net.layer4)
        return features, 2048, None
    if name == "inception_v3":
        return InceptionFeatures(net, num_classes), 2048, None
    if name == "mobilenet_v2":
        return net.features, 1280, None
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


class OreClassifier(nn.Module):
    def __init__(self, spec: BackboneSpec, backbone: nn.Module, attention: nn.Module, head: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.attention = attention
        self.head = head
        self.frozen_depth = 0

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(features))

    def forward(self, x: torch.Tensor):
        features = self.backbone(x)
        if isinstance(features, tuple):  # Inception v3 in training: (features, auxiliary logits)
            features, aux = features
            return self.forward_head(features), aux
        return self.forward_head(features)

    # Partial freezing counts the backbone's leading modules (a Sequential's children; Inception v3's
    # backbone is one module, so it is frozen whole or not at all).
    @property
    def depth(self) -> int:
        return len(self.backbone) if isinstance(self.backbone, nn.Sequential) else 1

    def frozen_part(self, depth: int) -> nn.Module:
        if depth >= self.depth:
            return self.backbone
        if isinstance(self.backbone, nn.Sequential):
            return self.backbone[:depth]
        if depth:
            raise ValueError(f"{self.spec.name}'s backbone can only be frozen whole (freeze_depth 0)")
        return nn.Sequential()

    @property
    def pools_first(self) -> bool:
        """Whether the output sees the feature map only through its global average: channel attention
        (none, SE, ECA) rescales whole channels, so avgpool(x * s) = s * avgpool(x), and the head pools
        globally first. Then a frozen backbone's output can be kept pooled, (C,) instead of (C, H, W):
        49x less to store and to stream through every head-only epoch. (CBAM's spatial attention and
        AlexNet's/VGG's 6x6/7x7 pooling need the whole map.)"""
        channel_only = isinstance(self.attention, (nn.Identity, SqueezeExcitation, EfficientChannelAttention))
        pool = self.head[0]
        return channel_only and isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The model's output from the backbone's globally pooled output (B, C); see pools_first."""
        if not isinstance(self.attention, nn.Identity):
            pooled = pooled * self.attention.scale(pooled)
        return self.head[2:](pooled)  # past the pool and the flatten: dropout, linear

    def forward_from(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        """The model's output from the frozen part's output at depth."""
        return self.forward_head(x if depth >= self.depth else self.backbone[depth:](x))

    def freeze(self, depth: int) -> None:
        """Freeze the backbone's first depth modules (all of it at self.depth), weights and BatchNorm
        statistics together: no gradients, and eval mode even while the model trains, so a frozen part
        computes exactly what its cached outputs hold."""
        self.frozen_depth = depth
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        for p in self.frozen_part(depth).parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_depth:
            self.frozen_part(self.frozen_depth).eval()
        return self


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    if name == "inception_v3":
        return BackboneSpec(name, 299, TF_MEAN, TF_STD)  # Google's Inception weights take [-1, 1]
    if name == "mobilenet_v1":
        return BackboneSpec(name, 224, TF_MEAN, TF_STD)
    return BackboneSpec(name, 224, IMAGENET_MEAN, IMAGENET_STD)


def create_model(name: str, num_classes: int, weights: str = "imagenet", attention: str = "none",
                 reduction: int = 8, dropout: float = 0.5) -> OreClassifier:
    """A classifier for num_classes ore classes. weights: 'imagenet' or 'none' (train from scratch)."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    spec = backbone_spec(name)
    pretrained = weights == "imagenet"
    if name == "mobilenet_v1":
        features, channels, head_layers = mobilenet_v1_features(), 1024, None
        if pretrained:
            state = torch.load(mobilenet_v1_weights_path(), map_location="cpu", weights_only=True)
            features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    else:
        features, channels, head_layers = torchvision_backbone(name, pretrained, num_classes, dropout)
    if head_layers is None:
        head_layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)]
    return OreClassifier(spec, features, create_attention(attention, channels, reduction), nn.Sequential(*head_layers))


def for_inference(module: nn.Module, input_size: int, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """An eval-mode module whose weights no longer change, made fast for forward passes. On the CPU in
    fp32 it is frozen as a TorchScript graph: BatchNorm folded into the convolutions and oneDNN's
    prepacked kernels, the same outputs to ~1e-5. MobileNetV2 on this 2-core CPU: 70 images/s against
    45 eager, 56 eager with BatchNorm folded, 50 torch.compile'd (after a 47 s compile). TorchScript
    is deprecated in favour of torch.compile, which does not match it here yet. Elsewhere (CUDA, bf16
    autocast) BatchNorm is folded and the module stays eager."""
    module = module.eval()
    if device.type != "cpu" or dtype is not None:
        return fuse(module).to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation notices
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, example)))


def save_checkpoint(path: Path, model: OreClassifier, class_names: list[str], input_size: int,
                    mean: list[float], std: list[float], config: dict, best: dict) -> None:
    """Everything prediction needs, so it never falls back on the training code's defaults."""
    with data.replaced(path) as tmp:
        torch.save({
            "model": model.state_dict(), "backbone": model.spec.name, "input_size": input_size,
            "attention": config["attention"], "reduction": config["reduction"], "dropout": config["dropout"],
            "class_names": list(class_names), "mean": list(mean), "std": list(std), "config": config,
            "best": best,
        }, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[OreClassifier, dict]:
    """(model in eval mode, checkpoint metadata) from a file written by save_checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = create_model(ckpt["backbone"], len(ckpt["class_names"]), "none", ckpt["attention"],
                         ckpt["reduction"], ckpt["dropout"])
    model.load_state_dict(ckpt["model"])
    model.spec = BackboneSpec(model.spec.name, ckpt["input_size"], model.spec.mean, model.spec.std)
    return model.to(device).eval(), {k: v for k, v in ckpt.items() if k != "model"}
