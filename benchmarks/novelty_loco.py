"""'Not one of these minerals', measured by leaving one class out: for each class in turn, a model is
trained on the other six (a frozen backbone, a few epochs: affordable on a CPU), and the novelty score
it keeps (orestudy/run/novelty.py: the k-th nearest training photo in feature space, threshold passing
95 % of validation photos) is asked about every photo of the class it never saw, against the six
classes' test photos.

    python benchmarks/novelty_loco.py --output docs/results/novelty_loco

Per left-out class: AUROC of the score (the unseen class's photos against the six's test photos), the
share of the unseen class caught at the stored threshold, and the share of the six's test photos that
pass it (95 % by construction, up to sampling); beside it the maximum-softmax baseline (Hendrycks &
Gimpel 2017: 1 - top-1 probability, its threshold set the same way on the validation softmax the
checkpoint keeps), and the kNN score's AUROC at other k. The training photos never leave their folder:
each run reads a temporary folder of links to the six class folders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from orestudy import config, data, models
from orestudy.run import answering, novelty, ready, training

KS = (1, 5, 10, 20)


def left_out(root: Path, held: str, work: Path) -> Path:
    """A folder of links to every class folder of root but held."""
    folder = work / f"without_{held}"
    folder.mkdir(parents=True, exist_ok=True)
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name != held and not (folder / d.name).exists():
            os.symlink(d.resolve(), folder / d.name)
    return folder


def one_class(root: Path, held: str, args, work: Path) -> dict:
    started = time.time()
    folder = left_out(root, held, work)
    run_config = config.TrainConfig(data=str(folder), output=str(work / "runs"), name=f"loco_{held}", exist_ok=True,
                                    regime=args.regime, attention="none", epochs=args.epochs, freeze_epochs=args.epochs,
                                    seed=args.seed, precision="fp32", threads=args.threads, mlflow=False, progress=False,
                                    image_size=args.image_size)
    result = training.run_experiment(run_config)
    run_dir = Path(result["run_dir"])
    model, meta = models.load_checkpoint(run_dir / "best.pt")
    scorer = novelty.Novelty.of(meta)
    test = ready.split_records(run_dir, folder)["test"]
    val = ready.split_records(run_dir, folder)["val"]
    unseen = [r for r in data.scan_cached(str(root), False, run_config.cache)[0] if r.label == held]
    size, mean, std = meta["input_size"], meta["mean"], meta["std"]
    feats = {name: novelty.record_features(model, recs, size, mean, std)
             for name, recs in (("test", test), ("unseen", unseen), ("val", val))}
    truth = np.r_[np.zeros(len(test)), np.ones(len(unseen))]

    def knn(k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The test and unseen photos' scores at k, and the threshold set on validation at k."""
        s = novelty.fit(scorer.bank, scorer.labels, scorer.photos, scorer.hashes, feats["val"], k, scorer.pass_share)
        return s.scores(feats["test"]), s.scores(feats["unseen"]), s.threshold

    id_scores, ood_scores, threshold = knn(scorer.k)
    with np.errstate(all="ignore"):
        import torch

        with torch.no_grad():
            logits = {name: model.head[-1](torch.from_numpy(f)).softmax(1).numpy() for name, f in feats.items()
                      if name != "val"}
    msp = {name: 1 - p.max(1) for name, p in logits.items()}
    val_msp = 1 - answering.Calibration.of(meta).probabilities.max(1)
    msp_threshold = novelty.threshold_for(val_msp, scorer.pass_share)
    by_k = {}
    for k in KS:
        test_k, unseen_k, _ = knn(k)
        by_k[f"auroc_k{k}"] = float(roc_auc_score(truth, np.r_[test_k, unseen_k]))
    return {
        "held_out": held, "classes": meta["class_names"], "n_unseen": len(unseen), "n_test": len(test),
        "n_train": result["n_train"], "n_val": result["n_val"], "six_class_test_accuracy": result["accuracy"],
        "k": scorer.k, "pass_share": scorer.pass_share, "threshold": threshold,
        "auroc": float(roc_auc_score(truth, np.r_[id_scores, ood_scores])),
        "caught": float((ood_scores > threshold).mean()), "test_passed": float((id_scores <= threshold).mean()),
        "msp_auroc": float(roc_auc_score(truth, np.r_[msp["test"], msp["unseen"]])),
        "msp_caught": float((msp["unseen"] > msp_threshold).mean()),
        "msp_test_passed": float((msp["test"] <= msp_threshold).mean()),
        **by_k, "seconds": time.time() - started,
        "config": config.computation_of(run_config),
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def table(rows: list[dict]) -> str:
    lines = ["| unseen class | photos | six-class test acc. | kNN AUROC | caught at 95 % pass | test photos passed | "
             "max-softmax AUROC | max-softmax caught | " + " | ".join(f"AUROC k = {k}" for k in KS) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(KS)]
    for r in rows:
        lines.append(f"| {r['held_out']} | {r['n_unseen']} | {r['six_class_test_accuracy']:.3f} | **{r['auroc']:.3f}** | "
                     f"{pct(r['caught'])} | {pct(r['test_passed'])} ({r['n_test']}) | {r['msp_auroc']:.3f} | {pct(r['msp_caught'])} | "
                     + " | ".join(f"{r[f'auroc_k{k}']:.3f}" for k in KS) + " |")
    mean = {key: float(np.mean([r[key] for r in rows])) for key in
            ("auroc", "caught", "test_passed", "msp_auroc", "msp_caught", "six_class_test_accuracy", *[f"auroc_k{k}" for k in KS])}
    lines.append(f"| **mean of {len(rows)}** | {sum(r['n_unseen'] for r in rows)} | {mean['six_class_test_accuracy']:.3f} | "
                 f"**{mean['auroc']:.3f}** | {pct(mean['caught'])} | {pct(mean['test_passed'])} | {mean['msp_auroc']:.3f} | "
                 f"{pct(mean['msp_caught'])} | " + " | ".join(f"{mean[f'auroc_k{k}']:.3f}" for k in KS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=config.default_data_root())
    parser.add_argument("--output", type=Path, default=Path("docs/results/novelty_loco"))
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs, the backbone frozen throughout")
    parser.add_argument("--regime", default="tl_da", choices=("tl", "tl_da"))
    parser.add_argument("--seed", type=int, default=231)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=0, help="0: the backbone's own (a test uses a small one)")
    parser.add_argument("--classes", nargs="*", help="only these left-out classes (default: all)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="novelty_loco_"))
    classes = args.classes or sorted(d.name for d in args.data.iterdir() if d.is_dir() and not d.name.startswith("."))
    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for held in classes:
        rows.append(one_class(args.data, held, args, work))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), file=sys.stderr, flush=True)
        (args.output / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.output / "table.md").write_text(table(rows) + "\n")
    worst = min(rows, key=lambda r: r["auroc"])
    summary = {"n_classes": len(rows), "auroc_mean": float(np.mean([r["auroc"] for r in rows])),
               "auroc_min": worst["auroc"], "worst_class": worst["held_out"],
               "caught_mean": float(np.mean([r["caught"] for r in rows])),
               "test_passed_mean": float(np.mean([r["test_passed"] for r in rows])),
               "msp_auroc_mean": float(np.mean([r["msp_auroc"] for r in rows])),
               "msp_caught_mean": float(np.mean([r["msp_caught"] for r in rows])),
               "epochs": args.epochs, "regime": args.regime, "seed": args.seed,
               "command": "python benchmarks/novelty_loco.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
