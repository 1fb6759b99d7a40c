"""SwiGLU activation ``h = silu(g) * u`` and its backward, in fp32 on bf16 operands.

Forward::

    gu [P, 2*Ip] bf16 (g | u, cached) --silu_mul--> h [P, Ip] bf16 (cached)

Backward (recomputes ``s = sigmoid(g)`` from the cached pre-activation ``g``)::

    grad_h [P, Ip] fp32, gu --silu_mul_backward--> dgu [P, 2*Ip] fp32 and bf16 (dg | du)
    dg = grad_h * u * s * (1 + g * (1 - s)),   du = grad_h * g * s

16 lanes at a time (``Ip`` is a multiple of 16), ``exp`` by ``simd.vexp``. Pad columns
(g = u = 0) give h = dg = du = 0, as the next GEMM needs. Each row belongs to one thread.
"""

import numpy as np
from numba import njit, prange

from ..config import JIT_PARALLEL
from .simd import LANES, vexp, vload, vload_bf16, vput, vsplat, vstore_bf16


@njit(**JIT_PARALLEL)
def silu_mul(gu, P, h):
    """h[r, i] = bf16(silu(g) * u) with g = gu[r, i], u = gu[r, Ip + i]; gu [>=P, 2*Ip], h [>=P, Ip] uint16."""
    Ip = h.shape[1]
    one = vsplat(np.float32(1.0))
    for r in prange(P):
        for i in range(0, Ip, LANES):
            g = vload_bf16(gu, r * 2 * Ip + i)
            u = vload_bf16(gu, r * 2 * Ip + Ip + i)
            vstore_bf16(h, r * Ip + i, g * u / (one + vexp(-g)))


@njit(**JIT_PARALLEL)
def silu_mul_backward(grad_h, gu, P, dgu, dgu16, stream):
    """dgu[r] = dg | du from grad_h [>=P, Ip] float32 and the cached gu [>=P, 2*Ip] uint16.

    dgu [>=P, >=2*Ip] float32 feeds the LoRA products; dgu16 [>=P, 2*Ip], its bf16
    rounding, the base-weight GEMM (stored plainly); stream: store dgu past the caches
    (``gemm.streams``, which checks the alignment this needs)."""
    Ip = grad_h.shape[1]
    ld = dgu.shape[1]
    one = vsplat(np.float32(1.0))
    for r in prange(P):
        for i in range(0, Ip, LANES):
            g = vload_bf16(gu, r * 2 * Ip + i)
            u = vload_bf16(gu, r * 2 * Ip + Ip + i)
            s = one / (one + vexp(-g))
            dh = vload(grad_h, r * Ip + i)
            dg = dh * u * s * (one + g * (one - s))
            du = dh * g * s
            at = r * 2 * Ip + i
            vput(dgu, r * ld + i, dg, stream)
            vput(dgu, r * ld + Ip + i, du, stream)
            vstore_bf16(dgu16, at, dg)
            vstore_bf16(dgu16, at + Ip, du)
