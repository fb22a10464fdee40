"""Export: a trained model as one file that runs without orestudy (ONNX or TorchScript), and a JSON
beside it that states everything needed to feed it.

The exported graph takes a float32 NCHW batch (any batch size) of images already preprocessed as in
validation, and returns softmax probabilities over the checkpoint's classes, in order: averaged over
flips where the run chose test-time flips, so that it computes what the "unknown" threshold and the
prediction sets were calibrated on. The JSON keeps that calibration, so `orestudy predict --model
model.onnx` answers at any --target-error as it does from the checkpoint (prediction.load_exported).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import data, models
from . import ensembling, prediction

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 18


class Probabilities(nn.Module):
    """The model's logits through a softmax: what a consumer of the file wants, with nothing to add."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


def preprocessing(meta: dict, fmt: str, file: Path) -> dict:
    """The JSON beside the file: what prediction.eval_input and data.normalize do, in words and numbers,
    and the calibration the answers come from."""
    size, best = meta["input_size"], meta.get("best", {})
    calibration = best.get("calibration")
    return {
        "file": file.name, "format": fmt, **({"opset": OPSET} if fmt == "onnx" else {}),
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB"},
        "output": {"name": "probabilities", "shape": ["batch", len(meta["class_names"])],
                   "meaning": "softmax probabilities (not logits) over class_names, in that order"},
        "preprocessing": [
            "decode as RGB turned by its EXIF orientation (16-bit and float grey scaled to 8 bits); an alpha "
            "channel is composited on white, palette and grey images become RGB",
            f"resize the shorter side to {data.base_size(size)} px, aspect ratio kept (bilinear, antialiased)",
            f"centre crop {size} x {size}",
            "scale the 0-255 values to [0, 1] (divide by 255)",
            "subtract mean and divide by std, per channel",
        ],
        "resize_shorter_side": data.base_size(size), "centre_crop": size, "value_range": [0.0, 1.0],
        "mean": meta["mean"], "std": meta["std"], "class_names": meta["class_names"],
        "flips": bool(best.get("tta", False)),
        "unknown_threshold": best.get("unknown_threshold"),
        "unknown_rule": "answer 'unknown' when the top probability is below unknown_threshold (null: never)",
        **{k: best[k] for k in ("unknown_target_error", "unknown_delta", "unknown_error_bound") if k in best},
        **({"calibration": {k: v.tolist() if hasattr(v, "tolist") else v for k, v in calibration.items()}}
           if calibration else {}),
    }


def export(source: str, fmt: str, output: Path | None = None) -> tuple[Path, Path]:
    """The model at source (run folder, checkpoint, ensemble or cross-fitted model folder, or MLflow URI)
    written as fmt to output (default: model.onnx / model_torchscript.pt beside the checkpoint, or in
    the ensemble's folder); returns (file, its JSON)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if ensembling.is_ensemble(source):  # its members' flips are inside it
        model, meta = ensembling.load_ensemble(source, torch.device("cpu"), None, eager=True)
        folder = Path(source)
    else:
        checkpoint = prediction.checkpoint_file(source)
        model, meta = models.load_checkpoint(checkpoint)
        model, folder = models.Flipped(model) if meta["best"].get("tta") else model, checkpoint.parent
    output = output or folder / ("model.onnx" if fmt == "onnx" else "model_torchscript.pt")
    output.parent.mkdir(parents=True, exist_ok=True)
    net = Probabilities(model).eval()
    example = torch.zeros(2, 3, meta["input_size"], meta["input_size"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # both paths are TorchScript's
        if fmt == "onnx":
            # The TorchScript-based exporter: deprecated since torch 2.9, but it exports MobileNetV2 + SE
            # about 5x faster here than dynamo=True, to a graph with the same outputs (both were checked).
            torch.onnx.export(net, (example,), str(output), input_names=["input"], output_names=["probabilities"],
                              dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        else:
            torch.jit.save(torch.jit.trace(net, example), str(output))
    described = output.with_name(output.name + ".json")
    described.write_text(json.dumps(preprocessing(meta, fmt, output), indent=2))
    return output, described
