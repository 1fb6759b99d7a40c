"""LoRA: per-slot factors, low-rank projections of the rows, and the weight gradients.

Every LoRA product of the MoE layer is one of three shapes. Rows are the
expert-ordered pairs; ``s`` is the row's active-expert slot; a "group" splits the
columns into adapters stored side by side (gate | up), each with its own R columns
of the small operand.

- ``project``: ``out[m, g*R + q] = sum_{k in group g} M[m, k] * F[s, q, k]``
  (``x A^T``, ``h A_down^T``, ``G B_down``, ``dg B_gate | du B_up``)
- the GEMM epilogue (``gemm.grouped_gemm``) adds ``scale * out[m, g*R + :] @ F[s]``
- ``outer``: ``acc[s, q, n] = sum_{m of s} v[m, g(n)*R + q] * M[m, n]``, the weight
  gradients (``dA = (G B)^T h``, ``dB^T = (x A^T)^T dg``, ...)

One set of four factor buffers ``F [S, R, W]`` (fp32, padded to the GEMM's ``Np``/``Kp``)
serves both directions: ``A`` in its own layout, ``B`` transposed. ``[A_g; A_u]``
projects x in forward and is the grad_x epilogue factor in backward; ``A_d`` projects
h and is the grad_h epilogue factor; ``[B_g^T | B_u^T]`` and ``B_d^T`` are the forward
epilogue factors and project dgu and G in backward. ``load_a`` / ``load_bt`` fill them
from the caller's arrays (float32, or bf16 as uint16 bits, any strides: TP slices are
views), read on every call, never kept: an in-place optimizer step is seen by the next
call. ``store_a`` / ``store_bt`` are their mirrors for the gradients.

Both products are register-blocked like the GEMM: ``project`` keeps 4 rows x 2 ranks of
16-lane partial sums over k (summed across lanes at the end), ``outer`` keeps 4 ranks x
32 columns over the expert's rows. Work items are (expert, 4 rows) and (slot, 32
columns, 4 ranks); each output element belongs to one item and is summed in a fixed
order, so results do not depend on the thread count.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT, JIT_PARALLEL
from .simd import LANES, as_f32, vfma, vhsum, vload, vload_f32, vsplat, vstore, vzero

MR = 4            # rows (project) or ranks (outer) per tile
OUTER_COLS = 32   # columns per ``outer`` tile


@njit(**JIT_PARALLEL)
def load_a(src, active, n_active, dst, row0):
    """dst[s, row0 + q, :K] = src[active[s], q, :]: src [E, R, K] -> dst [S, >=row0+R, >=K] float32."""
    _, R, K = src.shape
    for s in prange(n_active):
        e = active[s]
        for q in range(R):
            for k in range(K):
                dst[s, row0 + q, k] = as_f32(src[e, q, k])


@njit(**JIT_PARALLEL)
def load_bt(src, active, n_active, dst, col0):
    """dst[s, q, col0 + n] = src[active[s], n, q]: src [E, N, R] -> dst [S, R, >=col0+N] float32.

    Rank-outer: each dst row is written contiguously (rank-inner would write R rows
    Np floats apart, the same cache set for power-of-two Np)."""
    _, N, R = src.shape
    for s in prange(n_active):
        e = active[s]
        for q in range(R):
            for n in range(N):
                dst[s, q, col0 + n] = as_f32(src[e, n, q])


@njit(**JIT_PARALLEL)
def store_a(acc, active, n_active, row0, scale, accumulate, out):
    """out[active[s]] (+)= scale * acc[s, row0:row0+R, :K]: the mirror of ``load_a``."""
    _, R, K = out.shape
    for s in prange(n_active):
        e = active[s]
        for q in range(R):
            for k in range(K):
                value = scale * acc[s, row0 + q, k]
                out[e, q, k] = out[e, q, k] + value if accumulate else value


@njit(**JIT_PARALLEL)
def store_bt(acc, active, n_active, col0, scale, accumulate, out):
    """out[active[s]] (+)= scale * acc[s, :, col0:col0+N].T: the mirror of ``load_bt``."""
    _, N, R = out.shape
    for s in prange(n_active):
        e = active[s]
        for n in range(N):
            for q in range(R):
                value = scale * acc[s, q, col0 + n]
                out[e, n, q] = out[e, n, q] + value if accumulate else value


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
def project(m, offsets, row_slot, items, f, group, out):
    """out[r, g*R + q] = sum_{k < group} M[r, g*group + k] * f[row_slot[r], q, g*group + k].

    m [>=P, W] float32 or uint16 (bf16 bits), W and group multiples of 16; items from
    ``row_blocks``; f [S, R, W] float32; out [>=P, (W/group)*R] float32.
    """
    R = f.shape[1]
    W = m.shape[1]
    ld_f = f.shape[2]
    for i in prange(items.shape[0]):
        e = items[i, 0]
        r0 = items[i, 1]
        last = offsets[e + 1] - 1
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        s = row_slot[r0]
        for g in range(W // group):
            k0 = g * group
            for q0 in range(0, R, 2):
                q1 = min(q0 + 1, R - 1)
                f0 = (s * R + q0) * ld_f
                f1 = (s * R + q1) * ld_f
                c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
                c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
                for k in range(k0, k0 + group, LANES):
                    b0 = vload(f, f0 + k)
                    b1 = vload(f, f1 + k)
                    a = vload_f32(m, r0 * W + k)
                    c00 = vfma(a, b0, c00)
                    c01 = vfma(a, b1, c01)
                    a = vload_f32(m, r1 * W + k)
                    c10 = vfma(a, b0, c10)
                    c11 = vfma(a, b1, c11)
                    a = vload_f32(m, r2 * W + k)
                    c20 = vfma(a, b0, c20)
                    c21 = vfma(a, b1, c21)
                    a = vload_f32(m, r3 * W + k)
                    c30 = vfma(a, b0, c30)
                    c31 = vfma(a, b1, c31)
                col = g * R + q0
                rows_left = last - r0
                out[r0, col] = vhsum(c00)
                if rows_left >= 1:
                    out[r1, col] = vhsum(c10)
                if rows_left >= 2:
                    out[r2, col] = vhsum(c20)
                if rows_left >= 3:
                    out[r3, col] = vhsum(c30)
                if q1 > q0:
                    out[r0, col + 1] = vhsum(c01)
                    if rows_left >= 1:
                        out[r1, col + 1] = vhsum(c11)
                    if rows_left >= 2:
                        out[r2, col + 1] = vhsum(c21)
                    if rows_left >= 3:
                        out[r3, col + 1] = vhsum(c31)


@njit(**JIT_PARALLEL)
def outer(v, m, offsets, active, n_active, group, acc):
    """acc[s, q, n] = sum over rows r of expert active[s] of v[r, (n // group)*R + q] * M[r, n].

    v [>=P, G*R] float32; m [>=P, W] float32 or uint16 (bf16 bits); acc [S, R, W]
    float32; W a multiple of OUTER_COLS and of group, group of OUTER_COLS.
    """
    R = acc.shape[1]
    W = m.shape[1]
    blocks = W // OUTER_COLS
    rank_blocks = (R + MR - 1) // MR
    for i in prange(n_active * blocks * rank_blocks):
        s = i // (blocks * rank_blocks)
        n0 = (i // rank_blocks) % blocks * OUTER_COLS
        q0 = i % rank_blocks * MR
        q_last = min(q0 + MR, R) - 1
        vq = (n0 // group) * R
        v0, v1, v2, v3 = vq + q0, vq + min(q0 + 1, q_last), vq + min(q0 + 2, q_last), vq + q_last
        e = active[s]
        c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
        c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
        for r in range(offsets[e], offsets[e + 1]):
            a0 = vload_f32(m, r * W + n0)
            a1 = vload_f32(m, r * W + n0 + LANES)
            b = vsplat(v[r, v0])
            c00 = vfma(b, a0, c00)
            c01 = vfma(b, a1, c01)
            b = vsplat(v[r, v1])
            c10 = vfma(b, a0, c10)
            c11 = vfma(b, a1, c11)
            b = vsplat(v[r, v2])
            c20 = vfma(b, a0, c20)
            c21 = vfma(b, a1, c21)
            b = vsplat(v[r, v3])
            c30 = vfma(b, a0, c30)
            c31 = vfma(b, a1, c31)
        at = (s * R + q0) * W + n0
        vstore(acc, at, c00)
        vstore(acc, at + LANES, c01)
        if q_last >= q0 + 1:
            vstore(acc, at + W, c10)
            vstore(acc, at + W + LANES, c11)
        if q_last >= q0 + 2:
            vstore(acc, at + 2 * W, c20)
            vstore(acc, at + 2 * W + LANES, c21)
        if q_last >= q0 + 3:
            vstore(acc, at + 3 * W, c30)
            vstore(acc, at + 3 * W + LANES, c31)
