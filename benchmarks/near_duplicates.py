"""Wall time and peak memory of near-duplicate grouping (data.near_duplicate_groups) at scale.

    python benchmarks/near_duplicates.py --sizes 10000 50000 100000

Each size runs in a fresh process: random 64-bit perceptual hashes, a tenth of them with 1-4 planted
near-duplicates (1-8 bits flipped, so some are just inside the 6-bit distance and some just outside).
Peak memory is the grouping call's own (tracemalloc sees NumPy's allocations) and the process's
maximum resident size (the interpreter, torch and the records included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path


def records(n: int, seed: int = 0):
    import numpy as np

    from orestudy.data import ImageRecord

    rng = np.random.default_rng(seed)
    hashes = []
    while len(hashes) < n:
        h = int(rng.integers(0, 2**64, dtype=np.uint64))
        hashes.append(h)
        if rng.random() < 0.1:
            for _ in range(int(rng.integers(1, 5))):
                for bit in rng.choice(64, int(rng.integers(1, 9)), replace=False):
                    h ^= 1 << int(bit)
                hashes.append(h)
    return [ImageRecord(str(i), "a", f"{i:064x}", f"{h:016x}", 1, 1, "PNG", "RGB") for i, h in enumerate(hashes[:n])]


def measure(n: int) -> dict:
    from orestudy.data import near_duplicate_groups

    recs = records(n)
    tracemalloc.start()
    start = time.perf_counter()
    groups = near_duplicate_groups(recs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"n": n, "seconds": round(seconds, 2), "peak_mib": round(peak / 2**20, 1),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "groups": len(set(groups.tolist()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    root = Path(__file__).resolve().parents[1]
    print("| images | seconds | peak memory of the call (MiB) | process max RSS (MiB) | groups |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], cwd=root, check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {row['n']:,} | {row['seconds']} | {row['peak_mib']} | {row['max_rss_mib']} | {row['groups']:,} |",
              flush=True)


if __name__ == "__main__":
    main()
