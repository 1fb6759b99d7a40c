"""The machine's ceilings, measured: each route's peak and streaming read bandwidth.

The roofline of docs/design.md §10 is ``max(FLOPs / peak, bytes / bandwidth)``, with
the peak of the instruction the route runs on:

- ``fma_spin``: ``ACC`` independent ``f32x16`` FMA chains per work item (generic, avx512);
- ``dpbf16_spin``: ``ACC`` ``vdpbf16ps`` chains (avx512_bf16);
- ``amx_spin``: 2 x 2 ``tdpbf16ps`` accumulator tiles fed by 4 tile loads from L1 per
  step, the shape of the GEMM's AMX block (amx; the process must hold AMX state);
- ``read_stream``: sums a large array, one private partial sum per work item, reduced
  after the parallel loop.

Each returns the FLOP (or bytes) it did per work item; the caller divides by the time.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT, JIT_PARALLEL
from .isa import tile_dpbf16, tile_load, tile_store, tile_zero, vdpbf16
from .simd import LANES, vfma, vhsum, vload, vsplat, vsplat_pair, vzero

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


@njit(**JIT)
def _dpbf16_chains(iters, seed):
    x = vsplat_pair(np.uint32(0x3F803F80))
    y = vsplat_pair(np.uint32(seed))
    a0, a1, a2, a3, a4, a5 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    a6, a7, a8, a9, a10, a11 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    for _ in range(iters):
        a0, a1, a2, a3 = vdpbf16(a0, x, y), vdpbf16(a1, x, y), vdpbf16(a2, x, y), vdpbf16(a3, x, y)
        a4, a5, a6, a7 = vdpbf16(a4, x, y), vdpbf16(a5, x, y), vdpbf16(a6, x, y), vdpbf16(a7, x, y)
        a8, a9, a10, a11 = vdpbf16(a8, x, y), vdpbf16(a9, x, y), vdpbf16(a10, x, y), vdpbf16(a11, x, y)
    return vhsum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11)


@njit(**JIT_PARALLEL)
def dpbf16_spin(iters, out):
    """Each work item runs ``iters`` x ``ACC`` ``vdpbf16ps`` (64 FLOP each)."""
    for i in prange(out.shape[0]):
        out[i] = _dpbf16_chains(iters, np.uint32(0x3F80 + i))


@njit(**JIT)
def _amx_steps(iters, buf):
    c0, c1, c2, c3 = tile_zero(), tile_zero(), tile_zero(), tile_zero()
    for i in range(iters):
        at = (i & 3) * LANES                    # moving addresses: the loads stay in the loop
        a0 = tile_load(buf, at, 64)
        a1 = tile_load(buf, 256 + at, 64)
        b0 = tile_load(buf, 512 + at, 64)
        b1 = tile_load(buf, 768 + at, 64)
        c0, c1 = tile_dpbf16(c0, a0, b0), tile_dpbf16(c1, a0, b1)
        c2, c3 = tile_dpbf16(c2, a1, b0), tile_dpbf16(c3, a1, b1)
    out = np.empty(4 * 256, np.float32)
    for j, c in enumerate((c0, c1, c2, c3)):
        tile_store(out, j * 256, 64, c)
    return out.sum()


@njit(**JIT_PARALLEL)
def amx_spin(iters, out):
    """Each work item runs ``iters`` x 4 ``tdpbf16ps`` (16 x 16 x 32 x 2 FLOP each)."""
    for i in prange(out.shape[0]):
        buf = np.full(1024 + 4 * LANES, np.uint32(0x3F803F80))
        out[i] = _amx_steps(iters, buf)


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
