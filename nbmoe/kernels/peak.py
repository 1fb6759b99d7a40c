"""The machine's ceilings, measured: fp32 FMA throughput and streaming read bandwidth.

The roofline of DESIGN.md section 10 is ``max(FLOPs / peak, bytes / bandwidth)``.
``fma_spin`` keeps ``ACC`` independent ``f32x16`` FMA chains per thread (enough to
cover FMA latency on two ports); ``read_stream`` sums a large array with one private
partial sum per thread, reduced after the parallel loop.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT, JIT_PARALLEL
from .simd import LANES, vfma, vhsum, vload, vsplat, vzero

ACC = 12


@njit(**JIT)
def _fma_chains(iters, seed):
    a0 = vsplat(seed)
    a1 = vsplat(seed * np.float32(1.1))
    a2 = vsplat(seed * np.float32(1.2))
    a3 = vsplat(seed * np.float32(1.3))
    a4 = vsplat(seed * np.float32(1.4))
    a5 = vsplat(seed * np.float32(1.5))
    a6 = vsplat(seed * np.float32(1.6))
    a7 = vsplat(seed * np.float32(1.7))
    a8 = vsplat(seed * np.float32(1.8))
    a9 = vsplat(seed * np.float32(1.9))
    a10 = vsplat(seed * np.float32(2.0))
    a11 = vsplat(seed * np.float32(2.1))
    m = vsplat(np.float32(0.999))
    c = vsplat(np.float32(0.001))
    for _ in range(iters):
        a0 = vfma(a0, m, c)
        a1 = vfma(a1, m, c)
        a2 = vfma(a2, m, c)
        a3 = vfma(a3, m, c)
        a4 = vfma(a4, m, c)
        a5 = vfma(a5, m, c)
        a6 = vfma(a6, m, c)
        a7 = vfma(a7, m, c)
        a8 = vfma(a8, m, c)
        a9 = vfma(a9, m, c)
        a10 = vfma(a10, m, c)
        a11 = vfma(a11, m, c)
    return vhsum(a0) + vhsum(a1) + vhsum(a2) + vhsum(a3) + vhsum(a4) + vhsum(a5) + \
        vhsum(a6) + vhsum(a7) + vhsum(a8) + vhsum(a9) + vhsum(a10) + vhsum(a11)


@njit(**JIT_PARALLEL)
def fma_spin(iters, out):
    """Each of ``out.size`` work items runs ``iters`` x ``ACC`` x 16-lane FMAs
    (2 * 16 * ACC * iters FLOP); out [n] float32 keeps the results alive."""
    for i in prange(out.shape[0]):
        out[i] = _fma_chains(iters, np.float32(i + 1))


@njit(**JIT_PARALLEL)
def read_stream(data, parts):
    """Sum of ``data`` [n] float32 (n a multiple of 16 * parts): every byte read once."""
    chunk = data.shape[0] // parts
    partial = np.zeros(parts, np.float32)          # one slot per work item, reduced below
    for p in prange(parts):
        acc = vzero()
        for i in range(p * chunk, (p + 1) * chunk, LANES):
            acc = vfma(vload(data, i), vsplat(np.float32(1.0)), acc)
        partial[p] = vhsum(acc)
    return partial.sum()
