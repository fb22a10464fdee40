"""Small generated image folders, so tests never depend on the real data set."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from orestudy.config import TrainConfig

COLOURS = {"azurite": (40, 60, 200), "malachite": (30, 160, 70), "pyrite": (200, 180, 60)}


def make_image(colour, seed: int, size=(48, 40)) -> Image.Image:
    """A class colour plus seeded texture: distinct per seed, learnable per class."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    pixels = base + rng.normal(0, 35, (size[1], size[0], 3))
    stripes = (np.arange(size[0]) * (1 + seed % 5) % 11 < 5)[None, :, None] * 30
    return Image.fromarray(np.clip(pixels + stripes, 0, 255).astype(np.uint8))


def png_folder(root, per_class: int = 10):
    """COLOURS as class folders of plain PNGs, for module-scoped fixtures (image_folder is per test)."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(colour, seed=100 * c + i).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 10 images, in the file formats the ore data set really has."""
    root = tmp_path / "minerals"
    for c, (name, colour) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(10):
            img = make_image(colour, seed=100 * c + i)
            kind = i % 5
            if kind == 0:
                img.save(folder / f"{name}_{i}.jpg", quality=92)
            elif kind == 1:
                img.save(folder / f"{name}_{i}", format="PNG")  # no extension
            elif kind == 2:
                img.convert("P").save(folder / f"{name}_{i}.gif")
            elif kind == 3:
                img.convert("RGBA").save(folder / f"{name}_{i}.roughjpg", format="PNG")  # odd extension
            else:
                img.save(folder / f"{name} {i}.krista-mitchell.com", format="JPEG")
    return root


@pytest.fixture(autouse=True)
def own_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: one test's store must not become the next's."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def tiny_config(folder, tmp_path, **overrides) -> TrainConfig:
    """The one tiny configuration the tests train: seconds on 2 cores (scratch MobileNetV2, 64 px, 2 epochs
    with the first frozen); overrides set the rest."""
    values = dict(data=str(folder), output=str(tmp_path / "runs"), cache=str(tmp_path / "cache"),
                  regime="scratch", epochs=2, freeze_epochs=1, image_size=64, batch_size=8, threads=1,
                  progress=False, mlflow=False)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny model, trained once per session for the tests that only read a trained run: ImageNet
    MobileNetV2 frozen (only the SE block and head train, in about a second), fp32 (the precision predict,
    the MLflow model and the exported files answer in) on the generated colour classes: (image folder,
    run folder)."""
    from orestudy.run import training

    root = tmp_path_factory.mktemp("tiny_run")
    folder = png_folder(root / "minerals")
    config = tiny_config(folder, root, cache="", regime="tl", attention="se", freeze_epochs=2, lr=1e-2,
                         precision="fp32")
    training.run_experiment(config)
    return folder, root / "runs" / config.run_name()


def with_ctrl_c() -> None:
    """preexec_fn of a child that a test interrupts with SIGINT as a terminal's Ctrl-C would: a shell's
    background job (CI started with `&`, nohup) ignores SIGINT, and its children would inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
