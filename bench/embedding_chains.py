#!/usr/bin/env python3
"""How long the CUDA embedding backward's busiest block waits on memory, by counting, for real token ids.

kernels/cuda/embedding.cu sums the rows that are not hot in blocks of 128 ids; each block walks the
positions 1,024 at a time and, per chunk, its 8 warps take (id class, 256-column pack) tasks, each
task adding its class's entries kBatch at a time: one round trip to memory per batch (the gradient
row and the dweight row loaded together). A chunk ends at a barrier, so a block's time is about the
sum over its chunks of its busiest warp's round trips. This script counts those round trips for a
batch of token windows: uniform ids, Zipf ids (the benchmark's "text-like" rows) and a real shard,
under the kernel's rule (kernels/embedding.h: hot from the least count k >= 8 at which at most 512 rows
have k or more), the fixed threshold it had until the seventeenth session (max(32, N / 512)), and
batches of 4, so that a GPU measurement of the Zipf row can be read against it. A count, not a timing: a round trip is
roughly 0.5–1 µs of DRAM latency on an H100.

    python3 bench/embedding_chains.py demo/data/sotu_train_000000.bin [B]      (B sequences of 1024)

(numpy: Debian's python3-numpy.)
"""
import os
import sys

import numpy as np

V, C, T = 50257, 768, 1024
IDS_PER_BLOCK, CHUNK, WARPS, CLASSES, PACK_COLUMNS = 128, 1024, 8, 8, 256


def shard_tokens(path):
    """The tokens of an llm.c shard (a 256-int32 header, then uint16 tokens)."""
    raw = np.fromfile(path, dtype=np.uint8)
    return np.frombuffer(raw[1024:].tobytes(), dtype=np.uint16).astype(np.int64)


def busiest_block(ids, hot_count, batch):
    """The largest per-block sum over chunks of the busiest warp's round trips, its block, the hot rows."""
    counts = np.bincount(ids, minlength=V)
    hot = counts >= hot_count
    packs = C // PACK_COLUMNS
    cold = ~hot[ids]
    block_of = ids // IDS_PER_BLOCK
    worst, worst_block = 0, -1
    for block in np.unique(block_of[cold]):
        positions = np.nonzero(cold & (block_of == block))[0]
        chunk_of = positions // CHUNK
        total = 0
        for chunk in np.unique(chunk_of):
            entries = ids[positions[chunk_of == chunk]]
            per_class = np.bincount((entries - block * IDS_PER_BLOCK) % CLASSES, minlength=CLASSES)
            trips = [0] * WARPS
            for task in range(CLASSES * packs):  # task t: class t / packs, on warp t mod 8
                trips[task % WARPS] += -(-per_class[task // packs] // batch)
            total += max(trips)
        if total > worst:
            worst, worst_block = total, int(block)
    return worst, worst_block, int(hot.sum())


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    N = B * T
    rng = np.random.default_rng(0)
    tokens = shard_tokens(sys.argv[1])
    starts = rng.integers(0, len(tokens) - T, size=B)
    zipf = 1.0 / np.arange(1, V + 1)
    cases = {
        "uniform": rng.integers(0, V, size=N),
        "zipf (rank r -> id r - 1)": rng.choice(V, size=N, p=zipf / zipf.sum()),
        os.path.basename(sys.argv[1]): np.concatenate([tokens[s:s + T] for s in starts]),
    }
    print(f"B = {B} ({N} positions), C = {C}: the busiest block's round trips to memory")
    for name, ids in cases.items():
        counts = np.bincount(ids, minlength=V)
        threshold = 8  # kernels/embedding.h: embedding_hot_threshold
        while (counts >= threshold).sum() > 512:
            threshold += 1
        old = max(32, -(-N // 512))
        rules = [(f"the kernel (hot from {threshold})", threshold, 2), (f"and batches of 4", threshold, 4),
                 (f"the old fixed threshold ({old})", old, 2)]
        for rule, hot_count, batch in rules:
            trips, block, hot_rows = busiest_block(ids, hot_count, batch)
            print(f"  {name:34s} {rule:40s} {trips:5d} (block {block}, {hot_rows} hot rows)")


if __name__ == "__main__":
    main()
