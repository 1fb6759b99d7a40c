"""silu(g) * u and its backward, on bf16 operands in fp32, against float64."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe.kernels.activation import silu_mul, silu_mul_backward
from nbmoe.reference import round_bf16
from nbmoe.scratch import zeros as aligned_zeros
from helpers import BF16, rel


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.sampled_from([32, 64, 96]), st.integers(0, 2**31 - 1))
def test_silu_mul_forward_and_backward(P, Ip, seed):
    rng = np.random.default_rng(seed)
    gu = (rng.standard_normal((P, 2 * Ip)) * 3).astype(BF16)
    gu[0, :4] = np.array([-100.0, 100.0, 0.0, -0.0])          # saturated sigmoid and zeros
    g, u = gu[:, :Ip].astype(np.float64), gu[:, Ip:].astype(np.float64)
    h = np.empty((P, Ip), np.uint16)
    silu_mul(gu.view(np.uint16), P, h)
    sig = 1.0 / (1.0 + np.exp(-g))
    assert rel(h.view(BF16), round_bf16(g * sig * u)) < 2e-3
    assert np.all(np.isfinite(h.view(BF16).astype(np.float32)))

    grad_h = rng.standard_normal((P, Ip)).astype(np.float32)
    dgu, dgu16 = np.empty((P, 2 * Ip), np.float32), np.empty((P, 2 * Ip), np.uint16)
    h_again = np.empty((P, Ip), np.uint16)
    silu_mul_backward(grad_h, gu.view(np.uint16), P, dgu, dgu16, h_again, False)
    assert np.array_equal(h_again, h)                          # the forward's h, bit for bit
    dg = grad_h * u * sig * (1 + g * (1 - sig))
    du = grad_h * g * sig
    assert rel(dgu[:, :Ip], dg) < 1e-5 and rel(dgu[:, Ip:], du) < 1e-5
    assert np.array_equal(dgu16, dgu.astype(BF16).view(np.uint16))
    # stored past the caches (aligned rows, as gemm.streams requires): the same bits
    past, past16 = aligned_zeros((P, 2 * Ip), np.float32), aligned_zeros((P, 2 * Ip), np.uint16)
    silu_mul_backward(grad_h, gu.view(np.uint16), P, past, past16, np.zeros((0, 0), np.uint16), True)  # no h
    assert np.array_equal(past, dgu) and np.array_equal(past16, dgu16)
