"""Write a trained model as one file that runs without orestudy, its preprocessing in a JSON beside it.

    orestudy export --model runs/<run name> --format onnx          # runs/<run name>/model.onnx
    orestudy export --model runs/<run name> --format torchscript --output model.pt

The file takes a float32 NCHW batch (any batch size) of images preprocessed as the JSON says (RGB,
shorter side resized, centre crop, scaled to [0, 1], mean/std) and returns softmax probabilities over
the JSON's class_names. ONNX runs in onnxruntime (`pip install orestudy[export]`), TorchScript in
torch.jit.load.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import cli


def main(argv: list[str] | None = None) -> tuple:
    p = cli.ArgumentParser(prog=cli.prog("export"), description=__doc__)
    p.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="run folder, checkpoint file, or MLflow URI (runs:/<id>, models:/<name>/<version>)")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"), help="the file's format")
    p.add_argument("--output", type=Path, help="the file to write (default: model.onnx or model_torchscript.pt "
                                               "beside the checkpoint); its JSON is FILE.json")
    p.add_argument("--runs", default="runs", help="the runs folder, whose MLflow store (RUNS/mlflow.db) resolves "
                                                  "MLflow URIs, unless MLFLOW_TRACKING_URI is set")
    args = p.parse_args(argv)
    from ..run import exporting  # torch loads only when an export runs

    if args.model.startswith(("runs:/", "models:/")):
        from .. import tracking

        tracking.use_store(args.runs)
    try:
        files = exporting.export(args.model, args.format, args.output)
    except FileNotFoundError as err:
        p.error(str(err))
    print("wrote " + " and ".join(map(str, files)))
    return files


if __name__ == "__main__":
    main()
