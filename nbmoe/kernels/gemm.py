"""Grouped bf16 GEMM on packed weights, with the LoRA term fused into the epilogue.

For every expert ``e`` and its rows ``offsets[e]:offsets[e+1]`` of the expert-ordered
activations::

    out[m, n] = sum_k a[m, k] * W[e, n, k]                      (bf16 x bf16, fp32 accumulate)
              + scale * sum_q lora_l[m, g*R + q] * lora_r[s, q, n]   (fp32; g = n // group_n)

then stored as fp32 (``out32``) and/or rounded to bf16 (``out16``). ``s`` is the expert's
active slot. ``lora_l`` holds the LoRA down-projections of the rows (``x A^T``, ...),
``lora_r`` the per-slot up factors (``B^T``, ...); ``group_n`` lets one GEMM carry two
adapters side by side (gate | up). ``R == 0`` means no LoRA.

Layout (shared by every route)
------------------------------
``pack_vnni`` stores ``W [E, N, K]`` as ``[E, Np/16, Kp/2, 16]`` uint32: lane ``j`` of
column block ``b`` at pair ``p`` holds ``(W[e, 16b+j, 2p], W[e, 16b+j, 2p+1])`` - the
VNNI pair order of ``vdpbf16ps`` and AMX ``tdpbf16ps``. ``Np``, ``Kp`` are ``N``, ``K``
rounded up to ``PAD``; pad weights are zero and activation pad columns must be zero
too (0 * NaN would poison a sum). The backward GEMMs use packs of the transposed
weights, so every product streams its weights contiguously.

Work split
----------
A work item is (expert, 32-column tile); ``prange`` runs over the flat list, busiest
experts first. The item walks its expert's rows four at a time; the micro-kernel keeps
the 4 x 32 accumulator block in 8 registers over all of K. Each output element is
written by exactly one item, summed in a fixed order: results do not depend on the
thread count.

Routes slot in through ``_tile``: one ``@overload`` body per route name.
"""

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..config import JIT, JIT_PARALLEL
from .simd import LANES, f32_from_bits, vfma, vfma2, vload, vpair_hi, vpair_lo, vsplat, vstore, vstore_bf16, vzero

PAD = 32          # N and K padding: two vectors of output, one AMX tile of K
TILE_N = 32       # output columns per work item (two 16-lane vectors)
MR = 4            # rows per micro-kernel call


def padded(n):
    return -(-n // PAD) * PAD


@njit(**JIT_PARALLEL)
def pack_vnni(w, out, block0, pair0):
    """Pack ``w [E, N, K]`` (uint16 bf16 bits, any strides) into ``out`` at column block
    ``block0`` and K-pair ``pair0``: ``out [E, >=block0 + N/16, >=pair0 + K/2, 16]`` uint32,
    zero-initialised by the caller (pads stay zero)."""
    E, N, K = w.shape
    for e in prange(E):
        for n in range(N):
            b = block0 + n // LANES
            j = n % LANES
            for k in range(0, K - 1, 2):
                out[e, b, pair0 + k // 2, j] = np.uint32(w[e, n, k]) | (np.uint32(w[e, n, k + 1]) << np.uint32(16))
            if K % 2:
                out[e, b, pair0 + K // 2, j] = np.uint32(w[e, n, K - 1])


def _tile(route, a, r0, r1, r2, r3, w, w0, k2):
    """Accumulate rows r0..r3 of ``a`` (uint32 bf16 pairs) against the two 16-column
    blocks of packed weights starting at flat offset ``w0``; returns 8 ``f32x16``:
    (row i, block v) -> element ``2*i + v``."""


@njit(**JIT)
def _pair_fma(x, b0l, b0h, b1l, b1h, c0, c1):
    """One row's VNNI pair ``x`` into its two accumulators: c += lo(x) b_lo + hi(x) b_hi."""
    c0, c1 = vfma2(vsplat(f32_from_bits(x << np.uint32(16))), b0l, b1l, c0, c1)
    return vfma2(vsplat(f32_from_bits(x & np.uint32(0xFFFF0000))), b0h, b1h, c0, c1)


@overload(_tile, jit_options=JIT)
def _tile_generic(route, a, r0, r1, r2, r3, w, w0, k2):
    if route.route != "generic":
        return None

    def impl(route, a, r0, r1, r2, r3, w, w0, k2):
        c00 = vzero()
        c01 = vzero()
        c10 = vzero()
        c11 = vzero()
        c20 = vzero()
        c21 = vzero()
        c30 = vzero()
        c31 = vzero()
        w1 = w0 + k2 * LANES
        for p in range(k2):
            b0 = vload(w, w0 + p * LANES)
            b1 = vload(w, w1 + p * LANES)
            b0l, b0h, b1l, b1h = vpair_lo(b0), vpair_hi(b0), vpair_lo(b1), vpair_hi(b1)
            c00, c01 = _pair_fma(a[r0, p], b0l, b0h, b1l, b1h, c00, c01)
            c10, c11 = _pair_fma(a[r1, p], b0l, b0h, b1l, b1h, c10, c11)
            c20, c21 = _pair_fma(a[r2, p], b0l, b0h, b1l, b1h, c20, c21)
            c30, c31 = _pair_fma(a[r3, p], b0l, b0h, b1l, b1h, c30, c31)
        return c00, c01, c10, c11, c20, c21, c30, c31
    return impl


@njit(**JIT)
def _finish_row(m, n0, c0, c1, slot, lora_l, l0, lora_r, scale, out32, out16):
    """Epilogue of one output row: add the LoRA term, store fp32 and/or bf16."""
    R = lora_r.shape[1]
    ld_r = lora_r.shape[2]
    for q in range(R):
        coef = vsplat(scale * lora_l[m, l0 + q])
        base = (slot * R + q) * ld_r + n0
        c0 = vfma(coef, vload(lora_r, base), c0)
        c1 = vfma(coef, vload(lora_r, base + LANES), c1)
    if out32.size:
        at = m * out32.shape[1] + n0
        vstore(out32, at, c0)
        vstore(out32, at + LANES, c1)
    if out16.size:
        at = m * out16.shape[1] + n0
        vstore_bf16(out16, at, c0)
        vstore_bf16(out16, at + LANES, c1)


@njit(**JIT)
def make_tasks(offsets, slot_of_expert, n_tiles):
    """Work items (expert, tile) for the active experts, busiest experts first."""
    E = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:E]
    experts = np.argsort(-counts, kind="mergesort")
    n_active = 0
    for e in range(E):
        n_active += slot_of_expert[e] >= 0
    tasks = np.empty((n_active * n_tiles, 2), np.int64)
    i = 0
    for e in experts[:n_active]:
        for tile in range(n_tiles):
            tasks[i, 0] = e
            tasks[i, 1] = tile
            i += 1
    return tasks


@njit(**JIT_PARALLEL)
def grouped_gemm(route, a, w, offsets, slot_of_expert, tasks, lora_l, lora_r, group_n, scale, out32, out16):
    """The grouped GEMM of the module docstring.

    a [>=P, Kp/2] uint32 (bf16 pairs, expert order); w [E, Np/16, Kp/2, 16] uint32;
    offsets [E+1]; slot_of_expert [E]; tasks [n, 2] from ``make_tasks``;
    lora_l [>=P, G*R] float32; lora_r [S, R, Np] float32; out32 [>=P, Np] float32 or
    empty; out16 [>=P, Np] uint16 or empty.
    """
    k2 = w.shape[2]
    block_stride = k2 * LANES
    expert_stride = w.shape[1] * block_stride
    R = lora_r.shape[1]
    for i in prange(tasks.shape[0]):
        e = tasks[i, 0]
        n0 = tasks[i, 1] * TILE_N
        slot = slot_of_expert[e]
        l0 = (n0 // group_n) * R
        w0 = e * expert_stride + (n0 // LANES) * block_stride
        first = offsets[e]
        last = offsets[e + 1] - 1
        for m in range(first, last + 1, MR):
            c00, c01, c10, c11, c20, c21, c30, c31 = _tile(
                route, a, m, min(m + 1, last), min(m + 2, last), min(m + 3, last), w, w0, k2)
            _finish_row(m, n0, c00, c01, slot, lora_l, l0, lora_r, scale, out32, out16)
            if m + 1 <= last:
                _finish_row(m + 1, n0, c10, c11, slot, lora_l, l0, lora_r, scale, out32, out16)
            if m + 2 <= last:
                _finish_row(m + 2, n0, c20, c21, slot, lora_l, l0, lora_r, scale, out32, out16)
            if m + 3 <= last:
                _finish_row(m + 3, n0, c30, c31, slot, lora_l, l0, lora_r, scale, out32, out16)
