"""How many photos change split when a data set grows, by split method (data.make_split).

    python benchmarks/split_stability.py --data ../shared/data/minerals --added 1 10 50 --seeds 231 1 2

"Before" is the data set less `added` photos drawn at random (seeded); "after" is the whole set, as if
those photos had been added. For each method and seed it counts, among the photos in both, those whose
split changed and those that went from test to training (a model trained before would be tested on
its own training photos). It also prints the sizes of each method's split of the whole set (hash:
binomial around 60/20/20). Nothing is written: the splits are made in memory from the scanned records.
"""
from __future__ import annotations

import argparse
import random

from orestudy import data


def changes(records, removed: set, seed: int, method: str) -> tuple[int, int]:
    kept = [r for r in records if r.sha256 not in removed]
    before = dict(zip((r.sha256 for r in kept), data.make_split(kept, seed, method=method)))
    after = dict(zip((r.sha256 for r in records), data.make_split(records, seed, method=method)))
    moved = [sha for sha in before if before[sha] != after[sha]]
    return len(moved), sum(before[sha] == "test" and after[sha] == "train" for sha in moved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/minerals")
    p.add_argument("--added", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[231, 1, 2])
    args = p.parse_args()
    records, _ = data.scan_folder(args.data)
    print(f"{len(records)} photos in {args.data}; train / val / test photos of the whole set:")
    for seed in args.seeds:
        for method in data.SPLIT_METHODS:
            split = data.make_split(records, seed, method=method)
            print(f"  seed {seed}, {method}: " + " / ".join(str(split.count(s)) for s in data.SPLITS))
    print("| photos added | seed | method | photos in both | changed split | test -> train |")
    print("|---:|---:|---|---:|---:|---:|")
    for added in args.added:
        removed = {r.sha256 for r in random.Random(added).sample(records, added)}
        for seed in args.seeds:
            for method in data.SPLIT_METHODS:
                moved, leaked = changes(records, removed, seed, method)
                print(f"| {added} | {seed} | {method} | {len(records) - added} | {moved} | {leaked} |")


if __name__ == "__main__":
    main()
