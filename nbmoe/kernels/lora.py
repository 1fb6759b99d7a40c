"""LoRA: per-slot factors, low-rank projections of the rows, and the weight gradients.

Every LoRA product of the MoE layer is one of three shapes. Rows are the
expert-ordered pairs; ``s`` is the row's active-expert slot; a "group" splits the
columns into adapters stored side by side (gate | up), each with its own R columns
of the small operand.

- ``project``: ``out[m, g*R + q] = sum_{k in group g} M[m, k] * F[s, q, k]``
  (``x A^T``, ``h A_down^T``, ``G B_down``, ``dg B_gate | du B_up``); G's rows are
  gathered from grad_y and scaled by w (``src``, ``w_row``: G is never stored in fp32)
- the GEMM epilogue (``gemm.grouped_gemm``) adds ``scale * out[m, g*R + :] @ F[s]``
- ``outer``: ``acc[s, q, n] = sum_{m of s} v[m, g(n)*R + q] * M[m, n]``, the weight
  gradients (``dA = (G B)^T h``, ``dB^T = (x A^T)^T dg``, ...)

One set of four factor buffers ``F [S, R, W]`` (fp32, padded to the GEMM's ``Np``/``Kp``)
serves both directions: ``A`` in its own layout, ``B`` transposed. ``[A_g; A_u]``
projects x in forward and is the grad_x epilogue factor in backward; ``A_d`` projects
h and is the grad_h epilogue factor; ``[B_g^T | B_u^T]`` and ``B_d^T`` are the forward
epilogue factors and project dgu and G in backward. ``load`` fills them from the
caller's arrays (float32, or bf16 as uint16 bits, any strides: TP slices are views; B
through a transposed view), read on every call, never kept: an in-place optimizer step
is seen by the next call; its pad columns are written as zeros (the buffers are shared
scratch, stale from the last call). ``store`` is its mirror for the gradients.
The forward reads no buffer where the caller's arrays allow (float32, C order,
unpadded: ``kernels.moe``): ``project`` takes A as a tuple of arrays whose ranks stack
(gate_a, up_a), indexed by expert instead of slot, and the GEMM epilogue turns B per
item (``gemm._item_lora``). The backward loads B^T: its projections need it whole; its
GEMM epilogues read A where the caller keeps it, as the forward's projections do. Its
``outer`` writes the A gradients into the caller's arrays alike (scaled, added to), and
only the B gradients go through the buffers and ``store``.

Both products are register-blocked like the GEMM: ``project`` keeps 4 rows x 4 ranks of
16-lane partial sums over k (summed across lanes at the end), ``outer`` keeps 8 ranks x
32 columns over the expert's rows. Work items are (expert, 4 rows), all of one cost, and
(slot, 32 columns, 8 ranks), whose cost is the expert's rows: ``outer`` runs them in
``schedule.balanced`` runs, one per thread; with an fp32 ``M`` each ``outer`` item also
hints a share of the next slot's rows into L2 (``_prefetch_share``), and each ``project``
item the next item's rows (either dtype). Each output element belongs to one item and
is summed in a fixed order, so results do not depend on the thread count.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT, JIT_PARALLEL
from .schedule import balanced
from .simd import (LANES, as_f32, prefetch, prefetch_l2, vfma, vfma2, vhsum, vload, vload_f32, vsplat, vsplat_at,
                   vload_strip, vstore, vstrip_order, vtranspose16, vzero)

MR = 4              # rows per ``project`` tile (a ``row_blocks`` item)
PROJECT_RANKS = 4   # ranks per ``project`` tile: each row of M is loaded (and widened
                    # from bf16) once per 4 ranks. Zen 4, 2 threads, T=1024 step of the
                    # Qwen3-30B-A3B layer: the four projections 20.6 -> 17.0 ms (2 ranks)
OUTER_COLS = 32     # columns per ``outer`` tile
OUTER_RANKS = 8     # ranks per ``outer`` tile: a row's 32 columns of M are loaded (and
                    # widened) once per 8 ranks, 16 accumulators. With the next strip's
                    # prefetch (``_outer_item``), Zen 4, 2 threads, the four outer products
                    # of a T=1024 step of the Qwen3-30B-A3B layer: 22.3-22.9 -> 19.6-20.9 ms


@njit(**JIT_PARALLEL)
def _load_rows(src, active, n_active, dst, row0, col0, width):
    """``load`` row by row through 1-D views: a C-contiguous source row is a unit-stride
    copy the compiler vectorises (Zen 4, 2 threads, A of [128, 16, 2048] float32: 1.5 ->
    0.4-0.55 ms)."""
    _, R, K = src.shape
    for s in prange(n_active):
        e = active[s]
        for q in range(R):
            row, factor = dst[s, row0 + q, col0:col0 + width], src[e, q]
            for k in range(K):
                row[k] = as_f32(factor[k])
            row[K:] = 0


@njit(**JIT_PARALLEL)
def _load_turned(b, active, n_active, dst, row0, col0, width):
    """``load`` of B^T from b [E, K, R] float32 with unit stride along R and R a multiple
    of 16: 16 x 16 blocks turned in registers (``vtranspose16``), the last K % 16 columns
    one at a time. Zen 4, 2 threads, 81 of 128 experts, B [2048, 16]: 0.85 -> 0.2 ms
    (element by element through the strided view, ~2 cycles an element)."""
    _, K, R = b.shape
    ld_e, ld_k = b.strides[0] // 4, b.strides[1] // 4
    out = dst.reshape(-1)
    rows, ld = dst.shape[1], dst.shape[2]
    whole = K - K % LANES
    for s in prange(n_active):
        e = active[s]
        for q0 in range(0, R, LANES):
            for k0 in range(0, whole, LANES):
                vtranspose16(b, e * ld_e + k0 * ld_k + q0, ld_k, out, (s * rows + row0 + q0) * ld + col0 + k0, ld)
        for q in range(R):
            row = dst[s, row0 + q, col0:col0 + width]
            for k in range(whole, K):
                row[k] = b[e, k, q]
            row[K:] = 0


def load(src, active, n_active, dst, row0, col0, width):
    """dst[s, row0 + q, col0 + k] = src[active[s], q, k] as float32 for k < K, 0 for
    K <= k < width: the factor's whole padded span, whatever the buffer held before.

    src [E, R, K] float32 or uint16 (bf16 bits), any strides: a transposed view of
    B [E, N, R] loads B^T (turned 16 x 16 in registers where B is float32 with contiguous
    ranks, R a multiple of 16); dst [>=S, >=row0+R, >=col0+width] float32, C (written
    contiguously along k).
    """
    R = src.shape[1]
    if src.dtype == np.float32 and src.strides[1] == 4 and R % LANES == 0 and src.strides[2] % 4 == 0:
        _load_turned(src.transpose(0, 2, 1), active, n_active, dst, row0, col0, width)
    else:
        _load_rows(src, active, n_active, dst, row0, col0, width)


@njit(**JIT_PARALLEL)
def _store_rows(acc, active, n_active, row0, col0, scale, accumulate, out):
    """``store`` element by element, any strides."""
    _, R, K = out.shape
    for s in prange(n_active):
        e = active[s]
        for q in range(R):
            row, grad = acc[s, row0 + q, col0:col0 + K], out[e, q]
            for k in range(K):
                grad[k] = grad[k] + scale * row[k] if accumulate else scale * row[k]


@njit(**JIT_PARALLEL)
def _store_turned(acc, active, n_active, row0, col0, scale, accumulate, b):
    """``store`` into b [E, K, R] float32, C order, R a multiple of 16 (a B gradient): 16 x
    16 blocks of the buffer turned in registers (``vtranspose16``) into a block of this
    slot's own, then scaled into b's rows of 16 ranks; the last K % 16 rows one at a
    time. Zen 4, 2 threads, T=1024 step of the Qwen3-30B-A3B layer: the three B gradients
    6.6-6.7 -> 2.0-2.2 ms with the A gradients written by ``outer`` (element by element, a
    strided store each)."""
    _, K, R = b.shape
    src, dst = acc.reshape(-1), b.reshape(-1)
    rows, ld = acc.shape[1], acc.shape[2]
    whole = K - K % LANES
    for s in prange(n_active):
        block = np.empty(LANES * LANES, np.float32)        # this slot's own
        e = active[s]
        for q0 in range(0, R, LANES):
            for k0 in range(0, whole, LANES):
                vtranspose16(src, (s * rows + row0 + q0) * ld + col0 + k0, ld, block, 0, LANES)
                for k in range(LANES):
                    _store_scaled(dst, (e * K + k0 + k) * R + q0, vload(block, k * LANES), scale, accumulate)
            for k in range(whole, K):
                for q in range(q0, q0 + LANES):
                    grad = acc[s, row0 + q, col0 + k]
                    b[e, k, q] = b[e, k, q] + scale * grad if accumulate else scale * grad


def store(acc, active, n_active, row0, col0, scale, accumulate, out):
    """out[active[s], q, k] = scale * acc[s, row0 + q, col0 + k] (or ``+=``): the mirror
    of ``load``; out [E, R, K] float32, any strides (a transposed view of B [E, K, R]
    stores B^T's gradient into B's, turned 16 x 16 in registers where B is C order, R a
    multiple of 16)."""
    b = out.transpose(0, 2, 1)
    if b.flags.c_contiguous and out.shape[1] % LANES == 0:
        _store_turned(acc, active, n_active, row0, col0, scale, accumulate, b)
    else:
        _store_rows(acc, active, n_active, row0, col0, scale, accumulate, out)


@njit(**JIT)
def row_blocks(offsets, active, n_active):
    """Work items (expert, first row) covering each active expert's rows MR at a time."""
    n = 0
    for s in range(n_active):
        e = active[s]
        n += (offsets[e + 1] - offsets[e] + MR - 1) // MR
    items = np.empty((n, 2), np.int64)
    i = 0
    for s in range(n_active):
        e = active[s]
        for m in range(offsets[e], offsets[e + 1], MR):
            items[i, 0] = e
            items[i, 1] = m
            i += 1
    return items


@njit(**JIT_PARALLEL)
def project(m, offsets, items, index, fs, group, out, src, w_row):
    """out[r, g*R + q] = sum_{k < group} M[r, g*group + k] * F[index[e], q, g*group + k],
    e the expert of row r; F the ranks of ``fs`` stacked in order (R in all); with
    ``src``, row r of M is w_row[r] * m[src[r]] (the sum scaled once, at the end).

    m [>=P, >=W] float32 or uint16 (bf16 bits), W and group multiples of 16; items from
    ``row_blocks``; index [E] int64: an expert's position along the factors' first axis
    (its active slot in ``load``'s buffers, the expert itself for the caller's arrays read
    in place); fs: a tuple of float32 C arrays [*, R_j, >=W] (one buffer, or gate_a and
    up_a side by side); out [>=P, (W/group)*R] float32; src [>=P] int64 and w_row [>=P]
    float32, or both empty (M = m).
    """
    R = 0
    for j in range(len(fs)):
        R += fs[j].shape[1]
    ld = m.shape[1]                                 # the groups come from out
    for i in prange(items.shape[0]):
        r0, r1, r2, r3 = _item_rows(offsets, items, i)
        m0, m1, m2, m3 = _m_rows(src, r0, r1, r2, r3)
        w0, w1, w2, w3 = _row_scales(w_row, r0, r1, r2, r3)
        s = index[items[i, 0]]
        # the first rank pass of each group hints the next item's rows into L2. Zen 4, 2
        # threads, T=1024 step of the Qwen3-30B-A3B layer: G B_d 4.6-4.8 -> 4.1 ms, dgu
        # [B_g|B_u] 3.7-3.8 -> 3.1 ms (fp32 M); Zen 5, the same step, bf16 M: x [A_g; A_u]
        # 4.05-4.14 -> 3.52-3.68 ms, h A_d 0.86-1.03 -> 0.69-0.76 ms.
        ahead = i + 1 < items.shape[0]
        n0, n1, n2, n3 = _item_rows(offsets, items, np.int64(i) + 1 if ahead else np.int64(i))   # prange: i is unsigned
        n0, n1, n2, n3 = _m_rows(src, n0, n1, n2, n3)
        for g in range(out.shape[1] // R):
            k0 = g * group
            for q0 in range(0, R, PROJECT_RANKS):
                hint = ahead and q0 == 0
                q1, q2, q3 = min(q0 + 1, R - 1), min(q0 + 2, R - 1), min(q0 + 3, R - 1)
                a0, f0 = rank_row(fs, s, q0)
                a1, f1 = rank_row(fs, s, q1)
                a2, f2 = rank_row(fs, s, q2)
                a3, f3 = rank_row(fs, s, q3)
                c00, c01, c02, c03 = vzero(), vzero(), vzero(), vzero()
                c10, c11, c12, c13 = vzero(), vzero(), vzero(), vzero()
                c20, c21, c22, c23 = vzero(), vzero(), vzero(), vzero()
                c30, c31, c32, c33 = vzero(), vzero(), vzero(), vzero()
                for k in range(k0, k0 + group, LANES):
                    if hint:
                        prefetch_l2(m, n0 * ld + k)
                        prefetch_l2(m, n1 * ld + k)
                        prefetch_l2(m, n2 * ld + k)
                        prefetch_l2(m, n3 * ld + k)
                    b0, b1, b2, b3 = vload(a0, f0 + k), vload(a1, f1 + k), vload(a2, f2 + k), vload(a3, f3 + k)
                    x = vload_f32(m, m0 * ld + k)
                    c00, c01, c02, c03 = vfma2(x, b0, b1, c00, c01) + vfma2(x, b2, b3, c02, c03)
                    x = vload_f32(m, m1 * ld + k)
                    c10, c11, c12, c13 = vfma2(x, b0, b1, c10, c11) + vfma2(x, b2, b3, c12, c13)
                    x = vload_f32(m, m2 * ld + k)
                    c20, c21, c22, c23 = vfma2(x, b0, b1, c20, c21) + vfma2(x, b2, b3, c22, c23)
                    x = vload_f32(m, m3 * ld + k)
                    c30, c31, c32, c33 = vfma2(x, b0, b1, c30, c31) + vfma2(x, b2, b3, c32, c33)
                col = g * R + q0
                n = q3 - q0 + 1
                _store_sums(out, r0, col, n, w0, c00, c01, c02, c03)
                if r1 > r0:
                    _store_sums(out, r1, col, n, w1, c10, c11, c12, c13)
                if r2 > r1:
                    _store_sums(out, r2, col, n, w2, c20, c21, c22, c23)
                if r3 > r2:
                    _store_sums(out, r3, col, n, w3, c30, c31, c32, c33)


@njit(inline="always", **JIT)
def rank_row(fs, s, q):
    """(array, flat offset) of rank ``q`` of position ``s`` among the ranks of ``fs``: a tuple
    of float32 C arrays [*, R_j, W] whose ranks stack (gate_a, up_a; a buffer alone)."""
    for j in range(len(fs) - 1):
        if q < fs[j].shape[1]:
            return fs[j], (s * fs[j].shape[1] + q) * fs[j].shape[2]
        q -= fs[j].shape[1]
    f = fs[len(fs) - 1]
    return f, (s * f.shape[1] + q) * f.shape[2]


@njit(inline="always", **JIT)
def _item_rows(offsets, items, i):
    """The four rows of ``project`` item ``i``, the expert's last repeated past its end."""
    r0 = items[i, 1]
    last = offsets[items[i, 0] + 1] - 1
    return r0, min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)


@njit(inline="always", **JIT)
def _m_rows(src, r0, r1, r2, r3):
    """The rows of m that rows ``r0 .. r3`` read: ``src``'s, or their own where it is empty."""
    if src.shape[0] == 0:
        return r0, r1, r2, r3
    return src[r0], src[r1], src[r2], src[r3]


@njit(inline="always", **JIT)
def _row_scales(w_row, r0, r1, r2, r3):
    """The scales of rows ``r0 .. r3``: ``w_row``'s, or 1 (exact) where it is empty."""
    if w_row.shape[0] == 0:
        one = np.float32(1.0)
        return one, one, one, one
    return w_row[r0], w_row[r1], w_row[r2], w_row[r3]


@njit(inline="always", **JIT)
def _store_sums(out, row, col, n, w, c0, c1, c2, c3):
    """out[row, col + j] = w * the lane sum of c_j for the first ``n`` of the four."""
    out[row, col] = w * vhsum(c0)
    if n > 1:
        out[row, col + 1] = w * vhsum(c1)
    if n > 2:
        out[row, col + 2] = w * vhsum(c2)
    if n > 3:
        out[row, col + 3] = w * vhsum(c3)


@njit(**JIT_PARALLEL)
def outer(v, m, offsets, active, n_active, group, outs, index, scale, accumulate, runs, src):
    """out[index[e], q, n] = scale * sum over rows r of expert e of v[r, (n // group)*R + q]
    * M[r, n] for each active expert e = active[s] (with ``accumulate``: added to), where
    ``out`` is the ranks of ``outs`` stacked in order; M[r] = m[src[r]], or m[r] where
    ``src`` is empty (a row's scale, as ``project``'s ``w_row``, goes into v).

    v [>=P, G*R] float32, C order (G = W / group); m [>=P, >=W] float32 or uint16 (bf16
    bits); outs: two float32 C arrays [*, R_j, W] whose first ranks stack to R (a
    ``load``-style buffer twice, indexed by slot; or the caller's gradients, gate_a and
    up_a, or down_a twice, indexed by expert); index [E] int64; W a multiple of
    OUTER_COLS and of group, group of OUTER_COLS; runs: how many balanced runs to cut the
    work into (the thread count); src [>=P] int64 or empty.
    """
    W = outs[0].shape[2]
    R = v.shape[1] * group // W
    blocks = W // OUTER_COLS
    rank_blocks = (R + OUTER_RANKS - 1) // OUTER_RANKS
    per_slot = blocks * rank_blocks
    cost = np.empty(n_active * per_slot, np.int64)
    for i in range(cost.shape[0]):
        e = active[i // per_slot]
        cost[i] = offsets[e + 1] - offsets[e]
    bounds = balanced(cost, runs)
    for run in prange(bounds.shape[0] - 1):
        sums = np.empty(OUTER_RANKS * OUTER_COLS, np.float32)      # this run's item sums
        for i in range(bounds[run], bounds[run + 1]):
            s = i // per_slot
            # fp32 M streams from DRAM down 128-byte strips of long rows: while this slot
            # computes, its items pull the next slot's rows (if this run has it) into L2
            # in row order. Zen 4, 2 threads, T=1024 step of the Qwen3-30B-A3B layer: dB_d
            # 8.4 -> 5.4 ms, dB_gate|up 6.4 -> 4.0 ms; bf16 M (half the bytes, widened per
            # rank block) lost 0.4 ms with it, so it has none.
            if m.itemsize == 4 and src.shape[0] == 0 and (s + 1) * per_slot < bounds[run + 1]:
                _prefetch_share(m, offsets, active[s + 1], W, i - s * per_slot, per_slot)
            _outer_item(v, m, offsets, active, group, outs, index, scale, accumulate, i, R, blocks, rank_blocks, sums,
                        src)


@njit(inline="always", **JIT)
def _prefetch_share(m, offsets, e, W, k, parts):
    """Hint into L2 share ``k`` of ``parts`` of the lines of expert ``e``'s rows of
    ``m`` (columns ``0 .. W - 1``), in row order."""
    line = 64 // m.itemsize
    per_row = (W + line - 1) // line
    r0 = offsets[e]
    total = (offsets[e + 1] - r0) * per_row
    lo, hi = total * k // parts, total * (k + 1) // parts
    r = lo // per_row
    at = (r0 + r) * m.shape[1]
    c = lo - r * per_row
    for _ in range(lo, hi):
        prefetch_l2(m, at + c * line)
        c += 1
        if c == per_row:
            c = 0
            at += m.shape[1]


@njit(inline="always", **JIT)
def _outer_item(v, m, offsets, active, group, outs, index, scale, accumulate, i, R, blocks, rank_blocks, sums, src):
    """Item ``i`` of ``outer``: slot ``s``, columns ``n0 .. n0 + 31``, ranks ``q0 .. q0 + 7``
    (past the last rank: the last again, not stored)."""
    W = outs[0].shape[2]
    ld = m.shape[1]
    s = i // (blocks * rank_blocks)
    n0 = (i // rank_blocks) % blocks * OUTER_COLS
    q0 = i % rank_blocks * OUTER_RANKS
    q_last = min(q0 + OUTER_RANKS, R) - 1
    last = q_last - q0                              # ranks past it repeat it, unstored
    d1, d2, d3, d4, d5, d6 = min(1, last), min(2, last), min(3, last), min(4, last), min(5, last), min(6, last)
    e = active[s]
    pos = index[e]
    # the lines the sums are added to, read at the end: in flight from now. Zen 4, 2
    # threads, T=1024 step accumulating: the four outer products 20.7-21.0 -> 19.5-20.5 ms
    if accumulate:
        for q in range(q0, q_last + 1):
            out, at = rank_row(outs, pos, q)
            prefetch(out, at + n0)
            prefetch(out, at + n0 + LANES)
    ldv = v.shape[1]
    vr = offsets[e] * ldv + (n0 // group) * R + q0  # v[r, that rank block]: flat, walked by row
    c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
    c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
    c40, c41, c50, c51 = vzero(), vzero(), vzero(), vzero()
    c60, c61, c70, c71 = vzero(), vzero(), vzero(), vzero()
    # the first rank block of a strip pulls the next strip's lines into L1 as it walks the
    # rows (a line per row, rows KiBs apart: no hardware prefetcher follows them)
    nxt = n0 + OUTER_COLS if q0 == 0 and n0 + OUTER_COLS < W else n0
    gathered = src.shape[0] > 0
    for r in range(offsets[e], offsets[e + 1]):
        at = (src[r] if gathered else r) * ld
        prefetch(m, at + nxt)
        if m.itemsize == 4:
            prefetch(m, at + nxt + LANES)
        # bf16 as 16 pairs, even | odd columns, ordered back before the stores: one load,
        # a shift and a mask, not two widening shuffles. Zen 4, 2 threads, 128 experts of
        # 64 rows, R=32, H=2048 (``dA_gate|up``), four alternated runs, old / new: 9.57 /
        # 9.21, 9.60 / 9.13, 12.67 / 12.53, 9.53 / 9.68 ms
        a0, a1 = vload_strip(m, at + n0)
        c00, c01 = vfma2(vsplat_at(v, vr), a0, a1, c00, c01)
        c10, c11 = vfma2(vsplat_at(v, vr + d1), a0, a1, c10, c11)
        c20, c21 = vfma2(vsplat_at(v, vr + d2), a0, a1, c20, c21)
        c30, c31 = vfma2(vsplat_at(v, vr + d3), a0, a1, c30, c31)
        c40, c41 = vfma2(vsplat_at(v, vr + d4), a0, a1, c40, c41)
        c50, c51 = vfma2(vsplat_at(v, vr + d5), a0, a1, c50, c51)
        c60, c61 = vfma2(vsplat_at(v, vr + d6), a0, a1, c60, c61)
        c70, c71 = vfma2(vsplat_at(v, vr + last), a0, a1, c70, c71)
        vr += ldv
    for q, (c0, c1) in enumerate(((c00, c01), (c10, c11), (c20, c21), (c30, c31),
                                  (c40, c41), (c50, c51), (c60, c61), (c70, c71))):
        c0, c1 = vstrip_order(m, c0, c1)
        vstore(sums, q * OUTER_COLS, c0)
        vstore(sums, q * OUTER_COLS + LANES, c1)
    for q in range(q0, q_last + 1):                 # scaled, added: apart from the loop's registers
        out, at = rank_row(outs, pos, q)
        for half in range(0, OUTER_COLS, LANES):
            _store_scaled(out, at + n0 + half, vload(sums, (q - q0) * OUTER_COLS + half), scale, accumulate)


@njit(inline="always", **JIT)
def _store_scaled(out, at, c, scale, accumulate):
    """out.flat[at:at + 16] = scale * c, or += (one FMA, as ``store`` rounds it)."""
    if accumulate:
        vstore(out, at, vfma(vsplat(scale), c, vload(out, at)))
    else:
        vstore(out, at, vsplat(scale) * c)
