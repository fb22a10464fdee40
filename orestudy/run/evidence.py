"""Evidence for an answer: where in the photo the model looked (a class-activation heat map) and which
training photos it is nearest to (novelty.Novelty.neighbours, the same feature space as the novelty
score).

Grad-CAM (Selvaraju et al. 2017): the backbone's last feature map A, weighted per channel by the mean
gradient of the class's logit over it, summed over channels, through a ReLU, scaled to [0, 1] and
resized to the input. Written with autograd on OreClassifier's parts (backbone -> attention -> head)
rather than through the grad-cam package, which would bring OpenCV for one weighted sum.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import data


def grad_cam(model: torch.nn.Module, inputs: torch.Tensor, classes: list[int] | None = None) -> np.ndarray:
    """(B, H, W) heat maps in [0, 1] at the input's size for each image's class (default: its top-1),
    from an eager OreClassifier in eval mode; fp32 (gradients under autocast would be bf16's)."""
    model.eval()
    with torch.enable_grad():
        maps = model.backbone(inputs.float()).detach().requires_grad_(True)
        logits = model.forward_head(maps)
        picked = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device)
        (grads,) = torch.autograd.grad(logits.gather(1, picked[:, None]).sum(), maps)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cam / top).detach().cpu().numpy()


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, matplotlib's 'jet' without importing matplotlib."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The (H, W, 3) uint8 photo with the heat map over it."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * jet(heat).astype(np.float32)
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def eval_image(source, input_size: int) -> torch.Tensor:
    """uint8 CHW: the photo (a path or a file-like object) as validation and prediction see it."""
    return data.eval_view(data.decode_base(source, input_size), input_size)


def heat_map_png(model: torch.nn.Module, meta: dict, image: torch.Tensor, class_index: int | None = None) -> bytes:
    """The Grad-CAM of image (uint8 CHW, the evaluation view) for class_index (default: top-1),
    over the photo, as PNG bytes."""
    inputs = data.normalize(image[None], meta["mean"], meta["std"])
    heat = grad_cam(model, inputs, None if class_index is None else [class_index])[0]
    return png(overlay(image.permute(1, 2, 0).numpy(), heat))


def thumbnail(path, size: int = 160) -> bytes:
    """A JPEG thumbnail of a photo (decoded as training decodes it)."""
    img = data.load_rgb(path)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
