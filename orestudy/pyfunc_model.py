"""The MLflow model of a trained classifier: photos in, class names and probabilities out.

MLflow loads it from this file ("models from code"), with two artifacts: the classifier as TorchScript
and its preprocessing as JSON. It imports nothing of orestudy, so a logged model loads with
`mlflow.pyfunc.load_model` wherever torch, torchvision, Pillow, pandas and MLflow are installed:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(pd.DataFrame({"image": [open("photo.jpg", "rb").read()]}))  # or {"path": [...]}
    model.unwrap_python_model().predict(None, tensor)  # N x 3 x S x S, already normalised

Each output row: `class` (a class name, or "unknown" when the top probability is below the threshold
chosen on validation), `probability` (the top one) and `p_<class>` for every class.
"""
from __future__ import annotations

import io
import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

UNKNOWN = "unknown"
BATCH = 32  # images decoded at a time, so a large frame never holds every image in memory


# The preprocessing of orestudy's validation view (data.load_rgb, decode_base, eval_view, normalize),
# restated here because this file must not import orestudy; tests/test_mlflow_model.py checks the two
# give the same probabilities.
def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits (>> 8), float grey from [0, 1], as data.to_8bit."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray((np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    if img.mode == "F":
        return Image.fromarray(np.round(np.clip(np.asarray(img), 0.0, 1.0) * 255).astype(np.uint8))
    return img


def load_rgb(source) -> Image.Image:
    """Any image PIL reads, as RGB, the way a viewer shows it: turned by its EXIF orientation, 16-bit and
    float scaled to 8 bits, alpha composited on white."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
        img.load()
        img = to_8bit(ImageOps.exif_transpose(img))
        if img.mode in ("RGBA", "RGBa", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


def eval_input(source, prep: dict) -> torch.Tensor:
    """uint8 CHW: shorter side resized to base_size (antialiased), then the centre input_size square."""
    img = TF.resize(TF.pil_to_tensor(load_rgb(source)), prep["base_size"], antialias=True)
    return TF.center_crop(img, [prep["input_size"], prep["input_size"]])


def normalize(batch_uint8: torch.Tensor, prep: dict) -> torch.Tensor:
    x = batch_uint8.float() / 255
    return (x - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / torch.tensor(prep["std"]).view(1, 3, 1, 1)


class OreModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with warnings.catch_warnings():  # TorchScript's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(context.artifacts["classifier"], map_location="cpu").eval()
        with open(context.artifacts["preprocessing"]) as f:
            self.prep = json.load(f)

    def inputs(self, frame: pd.DataFrame) -> list:
        column = "image" if "image" in frame else "path"
        if column not in frame:
            raise ValueError(f"expected a column 'image' (bytes of image files) or 'path', got {list(frame.columns)}")
        return list(frame[column])

    def batches(self, sources: list):
        for start in range(0, len(sources), BATCH):
            images = []
            for i, source in enumerate(sources[start:start + BATCH], start):
                try:
                    images.append(eval_input(source, self.prep))
                except Exception as err:  # PIL raises many types for a bad file
                    raise ValueError(f"row {i}: not a readable image ({type(err).__name__}: {err})") from None
            yield normalize(torch.stack(images), self.prep)

    # The type hint tells MLflow the input is a frame (the logged signature describes its columns); called
    # directly (unwrap_python_model), predict also takes an already preprocessed tensor or array.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            batches = self.batches(self.inputs(model_input))
        else:  # an already preprocessed N x 3 x S x S tensor or array
            batches = [torch.as_tensor(np.asarray(model_input), dtype=torch.float32)]
        with torch.no_grad():
            probs = np.concatenate([self.net(x).float().softmax(1).numpy() for x in batches]) if len(model_input) \
                else np.zeros((0, len(self.prep["class_names"])), np.float32)
        return self.answers(probs)

    def answers(self, probs: np.ndarray) -> pd.DataFrame:
        names, threshold = self.prep["class_names"], self.prep["unknown_threshold"]
        top = probs.argmax(1)
        confidence = probs[np.arange(len(probs)), top].astype(np.float64)
        named = [names[i] if threshold is None or p >= threshold else UNKNOWN for i, p in zip(top, confidence)]
        return pd.DataFrame({"class": named, "probability": confidence,
                             **{f"p_{name}": probs[:, i].astype(np.float64) for i, name in enumerate(names)}})


mlflow.models.set_model(OreModel())
