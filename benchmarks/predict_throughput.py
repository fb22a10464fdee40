"""Prediction throughput of `orestudy.predict`, in images per second, on a folder of real photos.

End to end is what `orestudy predict` does per image (decode, resize, centre crop, normalise,
forward, softmax, threshold), after one warm-up batch; decoding alone and the model alone on ready
inputs are timed too, to show which one bounds it. Use a full-size (224 px) checkpoint:

    orestudy train --epochs 1 --freeze-epochs 1 --regime tl --attention se --no-mlflow --runs /tmp/bench_runs
    python benchmarks/predict_throughput.py --model /tmp/bench_runs/mobilenet_v2_tl_se8_f1_e1_s231
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from orestudy import models
from orestudy.run import evaluation, prediction
from orestudy.config import default_data_root
from orestudy.device import set_threads


def rate(n: int, started: float) -> float:
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run folder or checkpoint")
    parser.add_argument("--data", default=str(default_data_root()), help="folder of photos (searched recursively)")
    parser.add_argument("--images", type=int, default=0, help="how many (cycling through the folder); 0: each once")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    threads = set_threads(args.threads)
    device = torch.device("cpu")
    model, meta = prediction.load_model(args.model, device)
    paths = prediction.list_images([args.data])
    paths = list(itertools.islice(itertools.cycle(paths), args.images or len(paths)))
    size, mean, std = meta["input_size"], meta["mean"], meta["std"]
    list(prediction.predict(model, meta, paths[:args.batch_size], None, tta=args.tta, batch_size=args.batch_size))

    started = time.perf_counter()
    n = sum(1 for _ in prediction.decoded_batches(paths, args.batch_size, size, mean, std))
    decode = rate(len(paths), started)

    x = torch.randn(args.batch_size, 3, size, size)
    forward = models.Flipped(model) if args.tta else model
    started = time.perf_counter()
    for _ in evaluation.infer(forward, ((x, None) for _ in range(n)), device, None):
        pass
    forward_rate = rate(n * args.batch_size, started)

    started = time.perf_counter()
    preds = list(prediction.predict(model, meta, paths, None, tta=args.tta, batch_size=args.batch_size))
    end_to_end = rate(len(preds), started)
    unreadable = sum(bool(p.error) for p in preds)

    print(f"{meta['backbone']} ({meta['attention']}), {size} px, batch {args.batch_size}, {threads} threads"
          f"{', TTA (3 views)' if args.tta else ''}; {len(paths)} images ({unreadable} unreadable) from {args.data}")
    print(f"decode + preprocess only: {decode:7.1f} images/s")
    print(f"model only:               {forward_rate:7.1f} images/s")
    print(f"end to end (predict):     {end_to_end:7.1f} images/s")


if __name__ == "__main__":
    main()
