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
experts first. The item walks its expert's rows a block at a time; each route's
``_block`` keeps its accumulators in registers (vector or tile) over all of K, then
runs the shared epilogue ``_finish_row``. Each output element is written by exactly one
item, summed in a fixed order: results do not depend on the thread count.

Routes slot in through ``_block`` and ``block_rows``: one ``@overload`` per route.
"""

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..config import JIT, JIT_PARALLEL
from .isa import tile_dpbf16, tile_load, tile_store, tile_zero, vdpbf16
from .simd import (LANES, f32_from_bits, vfma, vfma2, vload, vpair_hi, vpair_lo, vsplat, vsplat_pair, vstore,
                   vstore_bf16, vzero)

PAD = 32          # N and K padding: two vectors of output, one AMX tile of K
TILE_N = 32       # output columns per work item (two 16-lane vectors, two AMX tiles)
MR = 4            # rows per block: generic / avx512
MR_BF16 = 8       # rows per block: avx512_bf16
MR_AMX = 32       # rows per block: amx (two 16-row tiles)
ROW_SLACK = MR_AMX  # rows every A operand has past its last pair: a block reads whole tiles


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


def block_rows(route):
    """Rows one ``_block`` call covers on ``route``."""


@overload(block_rows, jit_options=JIT)
def _block_rows(route):
    rows = {"generic": MR, "avx512": MR, "avx512_bf16": MR_BF16, "amx": MR_AMX}[route.route]
    return lambda route: rows


def _block(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
    """Rows ``m .. m + block_rows(route) - 1`` (those ``<= last``) of ``a`` (uint32 bf16 pairs)
    times the two 16-column blocks of packed weights at flat offset ``w0``, through
    ``_finish_row``. Rows past ``last`` may be read (``ROW_SLACK``), never written."""


@njit(**JIT)
def _pair_fma(x, b0l, b0h, b1l, b1h, c0, c1):
    """One row's VNNI pair ``x`` into its two accumulators: c += lo(x) b_lo + hi(x) b_hi."""
    c0, c1 = vfma2(vsplat(f32_from_bits(x << np.uint32(16))), b0l, b1l, c0, c1)
    return vfma2(vsplat(f32_from_bits(x & np.uint32(0xFFFF0000))), b0h, b1h, c0, c1)


def _row(route, a, r, w, w0, k2):
    """Row ``r`` of ``a`` times the two 16-column blocks at ``w0``, over all of K: (c0, c1)."""


@overload(_row, jit_options=JIT)
def _row_fma(route, a, r, w, w0, k2):
    if route.route not in ("generic", "avx512"):
        return None

    def impl(route, a, r, w, w0, k2):
        w1 = w0 + k2 * LANES
        c0, c1 = vzero(), vzero()
        for p in range(k2):
            b0 = vload(w, w0 + p * LANES)
            b1 = vload(w, w1 + p * LANES)
            c0, c1 = _pair_fma(a[r, p], vpair_lo(b0), vpair_hi(b0), vpair_lo(b1), vpair_hi(b1), c0, c1)
        return c0, c1
    return impl


@overload(_row, jit_options=JIT)
def _row_bf16(route, a, r, w, w0, k2):
    if route.route != "avx512_bf16":
        return None

    def impl(route, a, r, w, w0, k2):
        w1 = w0 + k2 * LANES
        c0, c1 = vzero(), vzero()
        for p in range(k2):
            c0, c1 = _dp2(vsplat_pair(a[r, p]), vload(w, w0 + p * LANES), vload(w, w1 + p * LANES), c0, c1)
        return c0, c1
    return impl


@njit(**JIT)
def _tail_rows(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
    """Rows m..last, fewer than a block: one at a time over the (by now cached) weights,
    not a clamped block of duplicate rows (decode: one row per expert, no wasted work)."""
    for r in range(m, last + 1):
        c0, c1 = _row(route, a, r, w, w0, k2)
        _finish_row(r, n0, c0, c1, slot, lora_l, l0, lora_r, scale, out32, out16)


@overload(_block, jit_options=JIT)
def _block_fma(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
    """generic / avx512: widen each weight pair to two fp32 vectors once per step, 2 FMAs
    per row; 4 rows x 32 columns = 8 accumulators (fits 16 registers of any vector ISA).
    Fewer rows than a block go to ``_tail_rows``."""
    if route.route not in ("generic", "avx512"):
        return None

    def impl(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
        w1 = w0 + k2 * LANES
        if last - m + 1 < MR:
            _tail_rows(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16)
            return
        r1, r2, r3 = m + 1, m + 2, m + 3
        c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
        c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
        for p in range(k2):
            b0 = vload(w, w0 + p * LANES)
            b1 = vload(w, w1 + p * LANES)
            b0l, b0h, b1l, b1h = vpair_lo(b0), vpair_hi(b0), vpair_lo(b1), vpair_hi(b1)
            c00, c01 = _pair_fma(a[m, p], b0l, b0h, b1l, b1h, c00, c01)
            c10, c11 = _pair_fma(a[r1, p], b0l, b0h, b1l, b1h, c10, c11)
            c20, c21 = _pair_fma(a[r2, p], b0l, b0h, b1l, b1h, c20, c21)
            c30, c31 = _pair_fma(a[r3, p], b0l, b0h, b1l, b1h, c30, c31)
        for i, (c0, c1) in enumerate(((c00, c01), (c10, c11), (c20, c21), (c30, c31))):
            _finish_row(m + i, n0, c0, c1, slot, lora_l, l0, lora_r, scale, out32, out16)
    return impl


@njit(**JIT)
def _dp2(x, b0, b1, c0, c1):
    return vdpbf16(c0, x, b0), vdpbf16(c1, x, b1)


@overload(_block, jit_options=JIT)
def _block_bf16(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
    """avx512_bf16: one ``vdpbf16ps`` per row and 16 columns per K pair, the row's pair
    broadcast; 8 rows x 32 columns = 16 accumulators of the 32 zmm registers. Fewer rows
    than a block go to ``_tail_rows``."""
    if route.route != "avx512_bf16":
        return None

    def impl(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
        if last - m + 1 < MR_BF16:
            _tail_rows(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16)
            return
        w1 = w0 + k2 * LANES
        r1, r2, r3, r4, r5, r6, r7 = m + 1, m + 2, m + 3, m + 4, m + 5, m + 6, m + 7
        c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
        c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
        c40, c41, c50, c51 = vzero(), vzero(), vzero(), vzero()
        c60, c61, c70, c71 = vzero(), vzero(), vzero(), vzero()
        for p in range(k2):
            b0 = vload(w, w0 + p * LANES)
            b1 = vload(w, w1 + p * LANES)
            c00, c01 = _dp2(vsplat_pair(a[m, p]), b0, b1, c00, c01)
            c10, c11 = _dp2(vsplat_pair(a[r1, p]), b0, b1, c10, c11)
            c20, c21 = _dp2(vsplat_pair(a[r2, p]), b0, b1, c20, c21)
            c30, c31 = _dp2(vsplat_pair(a[r3, p]), b0, b1, c30, c31)
            c40, c41 = _dp2(vsplat_pair(a[r4, p]), b0, b1, c40, c41)
            c50, c51 = _dp2(vsplat_pair(a[r5, p]), b0, b1, c50, c51)
            c60, c61 = _dp2(vsplat_pair(a[r6, p]), b0, b1, c60, c61)
            c70, c71 = _dp2(vsplat_pair(a[r7, p]), b0, b1, c70, c71)
        for i, (c0, c1) in enumerate(((c00, c01), (c10, c11), (c20, c21), (c30, c31),
                                      (c40, c41), (c50, c51), (c60, c61), (c70, c71))):
            _finish_row(m + i, n0, c0, c1, slot, lora_l, l0, lora_r, scale, out32, out16)
    return impl


@overload(_block, jit_options=JIT)
def _block_amx(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
    """amx: 2 x 2 tiles of 16 x 16 fp32 (32 rows x 32 columns) over K in steps of 32:
    per step 2 A tiles (16 rows x 32 bf16) and 2 B tiles (16 pairs x 16 columns: 1 KiB
    contiguous in the packed layout), 4 ``tdpbf16ps``; 8 tile registers. A block of at
    most 16 rows uses one row of tiles. The fp32 result goes through a 4 KiB scratch to
    the shared epilogue."""
    if route.route != "amx":
        return None

    def impl(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16):
        ld = a.shape[1]
        w1 = w0 + k2 * LANES
        scratch = np.empty(MR_AMX * TILE_N, np.float32)         # this block's own
        c00, c01 = tile_zero(), tile_zero()
        if last - m < 16:
            for p in range(0, k2, 16):
                a0 = tile_load(a, m * ld + p, ld * 4)
                c00 = tile_dpbf16(c00, a0, tile_load(w, w0 + p * LANES, 64))
                c01 = tile_dpbf16(c01, a0, tile_load(w, w1 + p * LANES, 64))
        else:
            c10, c11 = tile_zero(), tile_zero()
            for p in range(0, k2, 16):
                a0 = tile_load(a, m * ld + p, ld * 4)
                a1 = tile_load(a, (m + 16) * ld + p, ld * 4)
                b0 = tile_load(w, w0 + p * LANES, 64)
                b1 = tile_load(w, w1 + p * LANES, 64)
                c00 = tile_dpbf16(c00, a0, b0)
                c01 = tile_dpbf16(c01, a0, b1)
                c10 = tile_dpbf16(c10, a1, b0)
                c11 = tile_dpbf16(c11, a1, b1)
            tile_store(scratch, 16 * TILE_N, TILE_N * 4, c10)
            tile_store(scratch, 16 * TILE_N + LANES, TILE_N * 4, c11)
        tile_store(scratch, 0, TILE_N * 4, c00)
        tile_store(scratch, LANES, TILE_N * 4, c01)
        for i in range(min(MR_AMX, last - m + 1)):
            _finish_row(m + i, n0, vload(scratch, i * TILE_N), vload(scratch, i * TILE_N + LANES),
                        slot, lora_l, l0, lora_r, scale, out32, out16)
    return impl


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
        last = offsets[e + 1] - 1
        for m in range(offsets[e], last + 1, block_rows(route)):
            _block(route, a, m, last, w, w0, k2, n0, slot, lora_l, l0, lora_r, scale, out32, out16)


class PackedMatrix:
    """One bf16 weight ``W [N, K]`` packed once; ``matmul`` computes ``a @ W.T`` in fp32.

    The plain GEMM of the layer's kernels (one expert, no LoRA), for users and for the
    side-by-side with ``torch.matmul``. ``a`` is copied into a padded operand buffer
    (grown as needed, reused): rows past M are read as whole tiles, never written.
    """

    def __init__(self, w):
        N, K = w.shape
        self.shape = (N, K)
        self.packed = np.zeros((1, padded(N) // LANES, padded(K) // 2, LANES), np.uint32)
        pack_vnni(w.reshape(1, N, K), self.packed, 0, 0)
        self._operand = np.zeros((0, padded(K)), np.uint16)
        self._no_lora = np.zeros((1, 0, padded(N)), np.float32)

    def matmul(self, route, a, out=None):
        """a [M, K] uint16 (bf16 bits) -> out [M, N] float32 (a view of a padded array
        unless N is a multiple of ``PAD``; pass ``out`` [M, padded(N)] to reuse one)."""
        N, K = self.shape
        M = a.shape[0]
        if self._operand.shape[0] < M + ROW_SLACK:
            self._operand = np.zeros((M + ROW_SLACK, padded(K)), np.uint16)
        self._operand[:M, :K] = a
        out = np.empty((M, padded(N)), np.float32) if out is None else out
        offsets = np.array([0, M], np.int64)
        slot = np.zeros(1, np.int64)
        lora_l = np.zeros((M, 0), np.float32)
        grouped_gemm(route, self._operand.view(np.uint32), self.packed, offsets, slot,
                     make_tasks(offsets, slot, padded(N) // TILE_N), lora_l, self._no_lora, padded(N),
                     np.float32(0), out, np.zeros((0, 0), np.uint16))
        return out[:, :N]
