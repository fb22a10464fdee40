"""orestudy's training pipeline against the naive one, in one process, on the same images and model.

The naive pipeline is the replication's script: fp32, NCHW, every image decoded from its file and
transformed by PIL on every visit, the 5x augmented copies as a ConcatDataset, the frozen backbone
recomputed every epoch. orestudy's is `run_experiment` (decode once, fixed views, feature cache).

    python benchmarks/pipeline.py --epochs 2 --freeze-epochs 1 --target-accuracy 0.8
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import transforms as T

from orestudy import data, models
from orestudy.run import evaluation, training
from orestudy.config import TrainConfig, default_data_root
from orestudy.device import set_threads


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
            self.peak = max(self.peak, kb * 1024)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


class NaiveImages(Dataset):
    def __init__(self, records, labels, transform):
        self.records, self.labels, self.transform = records, labels, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.transform(data.load_rgb(self.records[i].path)), self.labels[i]


def naive_transforms(mean, std, size=224):
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    resize = T.Resize((size, size))
    return [
        T.Compose([resize, *tail]),
        T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), *tail]),
        T.Compose([T.Resize(size * 8 // 7), T.FiveCrop(size), T.Lambda(lambda crops: crops[0]), *tail]),
        T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.2)), *tail]),
        T.Compose([resize, T.ColorJitter(brightness=0.2, contrast=0.2), *tail]),
    ]


def run_naive(config: TrainConfig, target: float) -> dict:
    torch.manual_seed(config.seed)
    run_dir = Path(config.output) / "naive"
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = training.prepare_data(config)
    mean, std = data.channel_stats(prep.records["train"], 224)
    tfs = naive_transforms(mean, std)
    train_set = ConcatDataset([NaiveImages(prep.records["train"], prep.labels["train"], t) for t in tfs])
    val_set = NaiveImages(prep.records["val"], prep.labels["val"], tfs[0])
    model = models.create_model(config.backbone, len(prep.class_names), config.weights, config.attention,
                                config.reduction, config.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    device = torch.device("cpu")
    epochs, reached = [], None
    started = time.time()
    for epoch in range(1, config.epochs + 1):
        t0 = time.time()
        model.freeze(model.depth if epoch <= config.freeze_epochs else 0)
        model.train()
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True)
        training.train_one_epoch(model, optimizer, loader, device, None, len(loader), "naive", False)
        model.eval()
        val = evaluation.evaluate(model, DataLoader(val_set, batch_size=config.batch_size), device, None)
        epochs.append({"seconds": time.time() - t0, "val_accuracy": val.accuracy})
        if reached is None and val.accuracy >= target:
            reached = time.time() - started
    return {"epochs": epochs, "time_to_target": reached, "samples": len(train_set)}


def run_orestudy(config: TrainConfig, target: float) -> dict:
    rows = []
    started = time.time()
    reached = []

    def report(row, _):
        rows.append(row)
        if not reached and row["val_accuracy"] >= target:
            reached.append(time.time() - started)

    result = training.run_experiment(config, report)
    return {"epochs": [{"seconds": r["epoch_seconds"], "val_accuracy": r["val_accuracy"]} for r in rows],
            "time_to_target": reached[0] if reached else None, "samples": result["n_train_samples"],
            "wall_seconds": result["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(default_data_root()))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--target-accuracy", type=float, default=0.8)
    parser.add_argument("--skip-naive", action="store_true", help="time orestudy alone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="orestudy-bench-"))
    config = TrainConfig(data=args.data, output=str(work / "runs"), cache=str(work / "cache"),
                         epochs=args.epochs, freeze_epochs=args.freeze_epochs, mlflow=False, progress=False)
    set_threads(0)
    data.scan_cached(config.data)  # both pipelines start from a scanned folder
    results = {}
    if not args.skip_naive:
        with PeakRSS() as mem:
            results["naive"] = run_naive(config, args.target_accuracy)
        results["naive"]["peak_rss"] = mem.peak
    data.views._BASE_CACHE.clear()
    with PeakRSS() as mem:
        results["orestudy"] = run_orestudy(replace(config, name="orestudy"), args.target_accuracy)
    results["orestudy"]["peak_rss"] = mem.peak

    print(f"\n{args.epochs} epochs ({args.freeze_epochs} with the backbone frozen), "
          f"{results['orestudy']['samples']} training samples per epoch, {torch.get_num_threads()} threads")
    print(f"{'pipeline':10} {'s/epoch (each)':>40} {'total s':>9} {'to val>=' + str(args.target_accuracy):>12} {'peak GB':>8}")
    for name, res in results.items():
        per_epoch = " ".join(f"{e['seconds']:.1f}" for e in res["epochs"])
        total = sum(e["seconds"] for e in res["epochs"])
        to_target = f"{res['time_to_target']:.1f}" if res["time_to_target"] is not None else "never"
        print(f"{name:10} {per_epoch:>40} {total:9.1f} {to_target:>12} {res['peak_rss'] / 1e9:8.2f}")
    for name, res in results.items():  # epoch time (validation included) per training sample
        per_sample = " ".join(f"{1000 * e['seconds'] / res['samples']:.1f}" for e in res["epochs"])
        print(f"{name:10} ms per training sample, each epoch: {per_sample}")
    if "naive" in results:
        ratio = [n["seconds"] / o["seconds"] for n, o in zip(results["naive"]["epochs"], results["orestudy"]["epochs"])]
        print("speed-up per epoch (naive / orestudy): " + " ".join(f"{r:.1f}x" for r in ratio))


if __name__ == "__main__":
    main()
