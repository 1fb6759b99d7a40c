"""Expert-sorted routing: counting sort, gather, weighted combine and its gradient.

Dataflow (forward)::

    topk_ids [T, k] --route_pairs--> offsets [E+1], order [P], rows [T, k]
    x [T, H] --gather_rows(order)--> xs [P, Hp]          (expert order, zero pad)
    d [P, Hp] fp32 --combine_rows(rows, w)--> y [T, H]   (sum over slots in fp32, one rounding)

Backward::

    grad_y [T, H], w, cached d [P, Hp] --pair_grads--> G16 = bf16(w * grad_y) [P, Hp],
                                                       grad_w [T, k] = <grad_y, d>,
                                                       gy = grad_y padded, each row's token and w
    grad_x_pair [P, Hp] fp32 --combine_rows(rows, 1)--> grad_x [T, H]

A pair is one (token t, slot j); it becomes row ``rows[t, j]`` of the expert-ordered
buffers, ``-1`` for a skipped slot (``topk_ids == -1``), which is dropped here and
never reaches a GEMM. Rows of expert ``e`` are ``offsets[e]:offsets[e+1]``, pairs
in (t, j) order: the sort is stable, so every later sum has a fixed order.

Determinism: ``combine_rows`` and ``pair_grads`` give each token to one thread,
which sums its own slots in slot order; ``gather_rows`` writes each row once.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT, JIT_PARALLEL
from .simd import (LANES, bf16_to_f32, f32_to_bf16, vfma, vhsum, vload, vload_bf16, vsplat, vstore,
                   vstore_bf16, vzero)


@njit(**JIT)
def route_pairs(ids, slot_of_expert, offsets, order, rows, active):
    """Counting sort of the (token, slot) pairs by expert; returns (P, S): routed pairs
    and active experts.

    ids [T, k] int64 in [-1, E). Fills offsets [E+1], order [P] (pair index t*k + j
    per row), rows [T, k] (-1 for skipped slots), slot_of_expert [E] (index of expert
    e among the active ones, -1 if idle) and active [S] (its inverse).
    """
    T, k = ids.shape
    E = offsets.shape[0] - 1
    offsets[:] = 0
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= 0:
                offsets[ids[t, j] + 1] += 1
    S = 0
    for e in range(E):
        if offsets[e + 1] > 0:
            slot_of_expert[e] = S
            active[S] = e
            S += 1
        else:
            slot_of_expert[e] = -1
        offsets[e + 1] += offsets[e]
    cursor = offsets[:E].copy()
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            if e < 0:
                rows[t, j] = -1
                continue
            r = cursor[e]
            cursor[e] += 1
            order[r] = t * k + j
            rows[t, j] = r
    return offsets[E], S


@njit(**JIT_PARALLEL)
def gather_rows(x, order, k, P, xs):
    """xs[r, :H] = x[order[r] // k], zero pad: x [T, H] uint16 -> xs [>=P, Hp] uint16."""
    H = x.shape[1]
    for r in prange(P):
        t = order[r] // k
        xs[r, :H] = x[t]
        xs[r, H:] = 0


@njit(**JIT_PARALLEL)
def combine_rows(rows, weights, src, out16, out32, add):
    """sum_j weights[t, j] * src[rows[t, j], :H] over j with rows >= 0, in fp32: rounded once
    into out16[t] (bf16 bits), or into out32[t] (float32; with ``add`` added to what it
    holds: the fp32 sum over tensor-parallel parts, in part order).

    rows [T, k] int64; weights [T, k] float32; src [>=P, Np] float32; out16 [T, H] uint16
    or empty (0, 0); out32 [T, H] float32 when out16 is empty.
    """
    T, k = rows.shape
    bf16 = out16.shape[0] > 0
    H = out16.shape[1] if bf16 else out32.shape[1]
    ld = src.shape[1]
    body = H - H % LANES
    for t in prange(T):
        for c in range(0, body, LANES):
            acc = vzero()
            for j in range(k):
                r = rows[t, j]
                if r >= 0:
                    acc = vfma(vsplat(weights[t, j]), vload(src, r * ld + c), acc)
            if bf16:
                vstore_bf16(out16, t * H + c, acc)
            elif add:
                vstore(out32, t * H + c, acc + vload(out32, t * H + c))
            else:
                vstore(out32, t * H + c, acc)
        for c in range(body, H):
            s = np.float32(0.0)
            for j in range(k):
                r = rows[t, j]
                if r >= 0:
                    s += weights[t, j] * src[r, c]
            if bf16:
                out16[t, c] = f32_to_bf16(s)
            else:
                out32[t, c] = out32[t, c] + s if add else s


@njit(**JIT_PARALLEL)
def round_rows(src, out):
    """out = bf16(src), nearest even: src [T, H] float32 -> out [T, H] uint16."""
    T, H = src.shape
    body = H - H % LANES
    for t in prange(T):
        for c in range(0, body, LANES):
            vstore_bf16(out, t * H + c, vload(src, t * H + c))
        for c in range(body, H):
            out[t, c] = f32_to_bf16(src[t, c])


@njit(**JIT_PARALLEL)
def pair_grads(grad_y, rows, weights, d, G16, grad_w, gy, src, w_row):
    """Gradient of the combine: G[r] = w[t, j] * grad_y[t], grad_w[t, j] = <grad_y[t], d[r]>.

    G is stored only as its bf16 rounding G16, the operand of the base-weight GEMM; the
    LoRA products read G in fp32 from ``gy`` instead (``lora.project`` and ``lora.outer``
    gather rows ``src`` and scale by ``w_row``): no [P, Hp] fp32 copy is written and read
    back twice.

    grad_y [T, H] uint16; rows [T, k]; weights [T, k] float32; d [>=P, Hp] uint16
    (cached bf16 expert outputs); G16 [>=P, >=Hp] uint16, pads zeroed; grad_w [T, k]
    float32 (0 for skipped slots); gy [>=T, >=Hp] uint16 := grad_y, pads zeroed; src [>=P]
    int64 and w_row [>=P] float32: row r's token t and weight w[t, j].
    """
    T, k = rows.shape
    H = grad_y.shape[1]
    ld, ld_16 = d.shape[1], G16.shape[1]
    body = H - H % LANES
    for t in prange(T):
        gy[t, :H] = grad_y[t]
        gy[t, H:] = 0
        for j in range(k):
            r = rows[t, j]
            if r < 0:
                grad_w[t, j] = 0.0
                continue
            src[r] = t
            w_row[r] = weights[t, j]
            w = vsplat(weights[t, j])
            dot = vzero()
            for c in range(0, body, LANES):
                g_y = vload_bf16(grad_y, t * H + c)
                dot = vfma(g_y, vload_bf16(d, r * ld + c), dot)
                vstore_bf16(G16, r * ld_16 + c, vfma(w, g_y, vzero()))
            s = np.float32(0.0)
            for c in range(body, H):
                gy_c = bf16_to_f32(grad_y[t, c])
                s += gy_c * bf16_to_f32(d[r, c])
                G16[r, c] = f32_to_bf16(weights[t, j] * gy_c)
            G16[r, H:] = 0
            grad_w[t, j] = vhsum(dot) + s
