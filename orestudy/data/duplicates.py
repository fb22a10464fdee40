"""Near-duplicate photos: perceptual hashes within a few bits of each other share a group, which a
split keeps together.
"""
from __future__ import annotations


import numpy as np

from .images import ImageRecord


def hamming_neighbours(hashes: np.ndarray, rows: np.ndarray, max_distance: int, blocks) -> np.ndarray:
    """Sorted unique i * n + j for every pair i in rows, j > i, within max_distance bits of each other.
    Pigeonhole: max_distance + 1 disjoint bit blocks, so such a pair is equal on at least one block;
    with the records sorted by (block value, index), a row's candidates are the rest of its run."""
    n, found = len(hashes), []
    for order, position, end in blocks:
        starts = position[rows] + 1
        lengths = end[rows] - starts
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)
        i, j = np.repeat(rows, lengths), order[offsets]  # j > i: a run is sorted by index
        keep = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
        found.append(i[keep] * n + j[keep])
    return np.unique(np.concatenate(found))


def near_duplicate_groups(records: list[ImageRecord], max_distance: int = 6, chunk: int = 1 << 20) -> np.ndarray:
    """Group id per record: images whose 64-bit perceptual hashes differ in <= max_distance bits share a
    group, transitively, so a group can be kept inside one split (identical bytes have identical
    hashes). Multi-index hashing keeps memory linear in the number of images (comparing all pairs
    took 69 bytes x n^2). The ids are the union-find roots of the pairs taken in (i, j) order, as the
    all-pairs version made them: split manifests and splits stay the same."""
    n = len(records)
    hashes = np.array([int(r.phash, 16) for r in records], dtype=np.uint64)
    width = -(-64 // (max_distance + 1))
    blocks = []  # per block: the records sorted by (block value, index), each one's place, its run's end
    for shift in range(0, 64, width):
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << min(width, 64 - shift)) - 1)
        order = np.lexsort((np.arange(n), key))
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        run_end = np.searchsorted(key[order], key[order], side="right")
        blocks.append((order, position, run_end[position]))
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Rows in slices of about `chunk` candidate pairs, so pairs are found and joined in (i, j) order.
    candidates = np.cumsum(sum(end - position - 1 for _, position, end in blocks))
    start = 0
    while start < n:
        stop = max(start + 1, int(np.searchsorted(candidates, (candidates[start - 1] if start else 0) + chunk)))
        for pair in hamming_neighbours(hashes, np.arange(start, min(stop, n)), max_distance, blocks).tolist():
            i, j = divmod(pair, n)
            parent[find(i)] = find(j)
        start = stop
    return np.array([find(i) for i in range(n)])
