"""A local web page to ask a model about photos.

    orestudy serve                                  # the ready model (models/minerals7), http://127.0.0.1:8000/
    orestudy serve --model runs/<run name> --port 8080 --target-error 0.05

Drop one or more photos on the page; each gets its answer ("not one of these", "unknown" or a class at
the target error), its top classes with probabilities, its prediction set, the three nearest training
photos with their labels (shown where the data folder is at hand), a Grad-CAM heat map over the photo,
and the model card's key figures. Uploads are held in memory only, never written to disk; the page
takes JPEG, PNG, WebP, GIF, BMP and TIFF up to --max-upload-mb each. It listens on 127.0.0.1 only
unless --host says otherwise.
"""
from __future__ import annotations

import argparse

from . import cli


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("serve"), description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--model", metavar="RUN_OR_CHECKPOINT",
                        help="run folder, checkpoint file or exported file (model.onnx with its JSON: no heat maps "
                             "or nearest photos); default: the ready model in models/ (its card: "
                             "models/minerals7/README.md)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 shows the page to the whole network (no login!)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--data", metavar="FOLDER",
                        help="the training photos' folder, for the nearest-photo thumbnails (default: the model's "
                             "own data folder, else ORESTUDY_DATA or ../shared/data/minerals)")
    parser.add_argument("--target-error", type=float, default=0.10, metavar="E",
                        help="most error allowed among answered photos (with confidence 1 - delta)")
    parser.add_argument("--delta", type=float, default=0.10, help="confidence 1 - delta of the guarantees")
    parser.add_argument("--coverage", type=float, default=0.95, metavar="C", help="the prediction sets' coverage")
    parser.add_argument("--sets", default="conditional", choices=("conditional", "marginal"),
                        help="the sets' guarantee: conditional (over the calibration draw) or marginal")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest photo taken, in MB")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores this process may use")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    for name in ("target_error", "delta", "coverage"):
        if not 0.0 < getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    if args.max_upload_mb <= 0 or not 0 < args.port < 65536:
        parser.error("--max-upload-mb must be > 0 and --port in 1..65535")
    from ..run import ready, serving
    from ..run.prediction import CheckpointError

    source = args.model or ready.default_model()
    settings = serving.Settings(source, args.data, args.target_error, args.delta, args.coverage, args.sets,
                                args.max_upload_mb, args.threads)
    try:
        serving.serve(settings, args.host, args.port)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
