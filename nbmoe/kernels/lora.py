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

The factors ``F`` live in per-slot fp32 buffers padded to the GEMM's ``Np``/``Kp``:
``load_a`` copies ``A [E, R, K]`` rows, ``load_bt`` transposes ``B [E, N, R]``;
``store_a`` / ``store_bt`` are their mirrors for the gradients. The caller's arrays
(float32, or bf16 as uint16 bits, any strides: TP slices are views) are read on every
call, never kept: an in-place optimizer step is seen by the next call.

Determinism: ``project`` gives each row to one thread; ``outer`` gives each
(slot, 32-column block) to one thread, which sums that expert's rows in row order
into its own private accumulator.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..config import JIT, JIT_PARALLEL
from .simd import bf16_to_f32

OUTER_COLS = 32   # columns per ``outer`` work item


def as_f32(x):
    """A LoRA element as float32: bf16 bits (uint16) are widened, float32 passes."""


@overload(as_f32, jit_options=JIT)
def _as_f32(x):
    if x == types.uint16:
        return lambda x: bf16_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


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
    """dst[s, q, col0 + n] = src[active[s], n, q]: src [E, N, R] -> dst [S, R, >=col0+N] float32."""
    _, N, R = src.shape
    for s in prange(n_active):
        e = active[s]
        for n in range(N):
            for q in range(R):
                dst[s, q, col0 + n] = as_f32(src[e, n, q])


@njit(**JIT_PARALLEL)
def store_a(acc, active, n_active, row0, scale, out):
    """out[active[s]] = scale * acc[s, row0:row0+R, :K]: the mirror of ``load_a``."""
    _, R, K = out.shape
    for s in prange(n_active):
        out[active[s]] = scale * acc[s, row0:row0 + R, :K]


@njit(**JIT_PARALLEL)
def store_bt(acc, active, n_active, col0, scale, out):
    """out[active[s]] = scale * acc[s, :, col0:col0+N].T: the mirror of ``load_bt``."""
    _, N, R = out.shape
    for s in prange(n_active):
        out[active[s]] = scale * acc[s, :, col0:col0 + N].T


@njit(**JIT_PARALLEL)
def project(m, row_slot, P, f, group, out):
    """out[r, g*R + q] = sum_{k < group} M[r, g*group + k] * f[row_slot[r], q, g*group + k].

    m [>=P, W] float32 or uint16 (bf16 bits); row_slot [>=P]; f [S, R, W] float32;
    out [>=P, (W/group)*R] float32.
    """
    R = f.shape[1]
    groups = m.shape[1] // group
    for r in prange(P):
        s = row_slot[r]
        row = np.empty(m.shape[1], np.float32)
        for k in range(m.shape[1]):
            row[k] = as_f32(m[r, k])
        for g in range(groups):
            for q in range(R):
                acc = np.float32(0.0)
                for k in range(g * group, (g + 1) * group):
                    acc += row[k] * f[s, q, k]
                out[r, g * R + q] = acc


@njit(**JIT_PARALLEL)
def outer(v, m, offsets, active, n_active, group, acc):
    """acc[s, q, n] = sum over rows r of expert active[s] of v[r, (n // group)*R + q] * M[r, n].

    v [>=P, G*R] float32; m [>=P, W] float32 or uint16 (bf16 bits); acc [S, R, W] float32
    (W a multiple of OUTER_COLS and of group).
    """
    R = acc.shape[1]
    blocks = m.shape[1] // OUTER_COLS
    for i in prange(n_active * blocks):
        s = i // blocks
        n0 = (i % blocks) * OUTER_COLS
        v0 = (n0 // group) * R
        e = active[s]
        mine = np.zeros((R, OUTER_COLS), np.float32)    # this work item's private sum
        row = np.empty(OUTER_COLS, np.float32)
        for r in range(offsets[e], offsets[e + 1]):
            for n in range(OUTER_COLS):
                row[n] = as_f32(m[r, n0 + n])
            for q in range(R):
                coef = v[r, v0 + q]
                for n in range(OUTER_COLS):
                    mine[q, n] += coef * row[n]
        acc[s, :, n0:n0 + OUTER_COLS] = mine
