"""orestudy: train and study image classifiers of ore-mineral photos.

The Python API, lazy so that `import orestudy` loads no torch:

    import orestudy
    result = orestudy.train(orestudy.TrainConfig(epochs=2, freeze_epochs=2, mlflow=False))
    model = orestudy.load_model(result["run_dir"])
    for p in orestudy.predict(model, ["photo.jpg"]):
        print(p.path, p.answer, p.top)

The package's wings: commands/ (the `orestudy` command, argument parsing only), studies/ (Ray Tune
studies, grids, searches and their statistics), analysis/ (EDA, label audit), run/ (one run and a
trained model's uses), data/ (scanning, near-duplicates, splits, curation, views), and the base modules
(config, device, environment, files, models, tracking).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import moved
from .config import TrainConfig

moved.install()

__all__ = ["TrainConfig", "train", "load_model", "predict", "Model"]


@dataclass
class Model:
    """A trained model ready to answer: the network, its checkpoint's metadata, and where it came from."""
    network: object
    meta: dict
    source: str


def train(config: TrainConfig | None = None, **fields) -> dict:
    """Train one configuration (TrainConfig, or its fields as keywords) and test it once, as
    `orestudy train` does: the result's run_dir holds the model."""
    from dataclasses import replace

    from .run.training import run_experiment

    return run_experiment(replace(config, **fields) if config else TrainConfig(**fields))


def load_model(source: str, device: str = "auto") -> Model:
    """A run folder, a best.pt, an ensemble folder or an MLflow runs:/ / models:/ URI, ready to answer."""
    from . import device as devices
    from .run.prediction import load_model as load

    network, meta = load(str(source), devices.pick_device(device))
    return Model(network, meta, str(source))


def predict(model: Model | str, photos: list[str], top_k: int = 3, tta: bool | None = None,
            target_error: float = 0.10, delta: float = 0.10, coverage: float | None = 0.95) -> list:
    """One run.prediction.Prediction per photo (files or folders), as `orestudy predict` answers: "not
    one of these" for a photo unlike the training photos, else its class or "unknown" at target_error
    (with confidence 1 - delta), its top classes and probabilities and its prediction set at coverage
    (training-conditional); in fp32, as every answering path."""
    import itertools

    import torch

    from .run import answering, prediction

    model = model if isinstance(model, Model) else load_model(model)
    tta = bool(model.meta.get("best", {}).get("tta", False)) if tta is None else tta
    # a frozen TorchScript module (the CPU's inference model) keeps its weights as constants: no parameters
    device = next(itertools.chain(model.network.parameters(), model.network.buffers()), torch.zeros(0)).device
    rules = answering.rules_for(model.meta, model.source, target_error, delta, coverage)
    network = model.network
    if rules.novelty is not None:  # the network that also gives the features the novelty score reads
        network, _ = prediction.load_model(model.source, device, features=True, flips=tta)
    return list(prediction.predict(network, model.meta, prediction.list_images([str(p) for p in photos]),
                                   rules.threshold, top_k, tta, device=device, quantile=rules.quantile,
                                   novelty=rules.novelty))
