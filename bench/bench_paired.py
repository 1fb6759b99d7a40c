"""The forward at small T against the streaming read measured right before and after it.

A shared VM's read bandwidth moves between ~35 and ~60 GB/s from minute to minute, so a
ceiling measured once per run (``python -m nbmoe bench``) can come from another minute
than the timing. Here every forward median (of 7) sits between two reads of 512 MiB and
its roofline fraction uses the better of the two. Qwen3-30B-A3B layer, r=16, uniform
routing, the best route of this CPU; each weight format's roofline counts its stored bytes
(int4 groups as ``bench.CHECKPOINT_GROUP``). Run: ``python bench/bench_paired.py [T ...]
[--rounds N] [--format F ...]`` (``bench/RESULTS.md`` has the numbers).
"""

import argparse
import time

import numpy as np

from nbmoe import bench
from nbmoe.kernels.peak import read_stream
from nbmoe.quant import FORMATS

SHAPE = bench.QWEN3_30B_A3B


def read_gbs(data):
    """The better of two streaming reads of ``data``, in GB/s."""
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        read_stream(data, 64)
        best = max(best, data.nbytes / (time.perf_counter() - t0))
    return best / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tokens", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", nargs="+", default=["bf16"], choices=["bf16", *FORMATS])
    args = parser.parse_args()
    E, k, H, I = SHAPE["experts"], SHAPE["topk"], SHAPE["hidden"], SHAPE["intermediate"]
    gate, up, down, lora = bench.layer_weights(E, H, I, SHAPE["rank"])
    layers = {fmt: bench.format_layer(gate, up, down, lora, fmt, max(args.tokens)) for fmt in args.format}
    data = np.ones(512 << 18, np.float32)
    read_stream(data, 64)
    calls = []
    for T in args.tokens:
        ids, weights = bench.routing(T, E, k)
        x, _ = bench.activations(T, H)
        for fmt, layer in layers.items():
            calls.append((T, fmt, layer, x, ids, weights,
                          bench.weight_bytes(ids, E, H, I, layer.packed_nbytes, lora)))
            for _ in range(3):
                layer.forward(x, ids, weights)
    for _ in range(args.rounds):
        for T, fmt, layer, x, ids, weights, nbytes in calls:
            before = read_gbs(data)
            median = bench.median_time(lambda: layer.forward(x, ids, weights), 7)
            after = read_gbs(data)
            print(f"T={T:5d} {fmt:8s} fwd {median * 1e3:7.2f} ms  read {before:5.1f} / {after:5.1f} GB/s  "
                  f"roofline {nbytes / (max(before, after) * 1e9) / median:.2f}", flush=True)


if __name__ == "__main__":
    main()
