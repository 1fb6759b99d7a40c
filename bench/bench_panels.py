"""What the backward's W^T panels cost: each item of a product by ``W^T`` turns its 32
columns of the stored codes into a panel (``gemm._backward_panel``, 16 x 16 blocks through
``vtranspose8``) before its row blocks run; the forward reads bf16 in place.

Prints (2 threads unless ``NUMBA_NUM_THREADS`` says otherwise, bf16, median of 5 after a warm-up):

- the panel builds alone, every item of the Qwen3-30B-A3B gate_up weight (W [1536, 2048]),
  with the codes read from DRAM (128 experts), from L3 (4), from L2 (K = 64) and from L1
  (N = K = 64): time per item per thread and per 16 x 16 block;
- ``grouped_gemm`` by ``W`` and by ``W^T`` with the row counts of a uniform T=1024 batch
  (8192 rows over 128 experts), no LoRA: what the builds add to the product.

Run: ``python bench/bench_panels.py`` (``bench/RESULTS.md`` has the numbers).
"""

import ml_dtypes
import numba
import numpy as np
from numba import prange

from nbmoe.bench import QWEN3_30B_A3B, median_time, routing
from nbmoe.config import JIT_PARALLEL
from nbmoe.kernels import gemm
from nbmoe.kernels.isa import choose_route


@numba.njit(**JIT_PARALLEL)
def _builds(route, codes, flat, tasks, bounds, panels, tmps, reps):
    """Every item's backward panel, ``reps`` times, one run of items per thread."""
    for c in prange(bounds.shape[0] - 1):
        for _ in range(reps):
            for i in range(bounds[c], bounds[c + 1]):
                gemm._backward_panel(route, codes, flat, gemm._NO_SCALES, gemm._NO_ZEROS, codes.shape[2], tasks[i, 0],
                                     tasks[i, 1] * gemm.TILE_N // 2, panels[c], tmps[c])


def bf16_bits(shape, seed):
    """Random bf16 values ~ N(0, 1) as their uint16 bits."""
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return values.astype(ml_dtypes.bfloat16).view(np.uint16)


def weights(E, N, K):
    return gemm.PackedWeight([bf16_bits((E, N, K), 0)], "bf16")


def builds(route, E, N, K, reps):
    w = weights(E, N, K)
    threads = numba.get_num_threads()
    tasks, bounds = gemm.make_tasks(np.arange(E + 1) * 64, np.arange(E), K // gemm.TILE_N, threads)
    panels = np.zeros((threads, N * gemm.LANES), np.uint32)
    tmps = np.zeros((threads, gemm.TMP), np.uint32)
    t = median_time(lambda: _builds(route, w.codes, w.codes.reshape(-1), tasks, bounds, panels, tmps, reps), 5) / reps
    per_item = t * threads / tasks.shape[0]
    return per_item, per_item / (2 * N // gemm.LANES)


def products(route, T=1024):
    E, k, H, I = (QWEN3_30B_A3B[n] for n in ("experts", "topk", "hidden", "intermediate"))
    ids, _ = routing(T, E, k)
    offsets = np.zeros(E + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(ids.ravel(), minlength=E))
    P, N, K = int(offsets[-1]), 2 * I, H
    w = weights(E, N, K)
    no_lora = np.zeros((P, 0), np.float32), np.zeros((E, 0, N + K), np.float32)
    for transposed, width, cols in ((False, K, N), (True, N, K)):
        a = bf16_bits((P + gemm.ROW_SLACK, gemm.longer(width, np.uint16)), 1)   # rows as the layer's buffers
        out = np.zeros((P, cols), np.float32)
        t = median_time(lambda: gemm.grouped_gemm(route, a.view(np.uint32), w, offsets, np.arange(E), *no_lora, cols,
                                                  np.float32(0), out, np.zeros((0, 0), np.uint16),
                                                  transposed=transposed), 5)
        print(f"grouped_gemm by {'W^T' if transposed else 'W  '} of [{N}, {K}], {P} rows over {E} experts: "
              f"{1e3 * t:7.2f} ms, {2 * P * N * K / t / 1e9:5.0f} GFLOP/s", flush=True)


def main():
    route = choose_route()
    print(f"route {route.name}, {numba.get_num_threads()} threads")
    for where, E, N, K, reps in (("DRAM", 128, 1536, 2048, 1), ("L3", 4, 1536, 2048, 10), ("L2", 1, 1536, 64, 2000),
                                 ("L1", 1, 64, 64, 100000)):
        item, block = builds(route, E, N, K, reps)
        print(f"panel builds, codes in {where:4s} (W [{N}, {K}] x {E}): {1e9 * item:7.0f} ns an item a thread, "
              f"{1e9 * block:5.2f} ns a 16 x 16 block", flush=True)
    products(route)


if __name__ == "__main__":
    main()
