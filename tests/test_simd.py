"""The SIMD layer: bf16 rounding and widening, VNNI pair widening, FMA, ordered sums."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from nbmoe.kernels import isa
from nbmoe.kernels.isa import vdequant_bf16, vturn4_bf16
from nbmoe.scratch import zeros as aligned_zeros
from nbmoe.kernels.simd import (bf16_to_f32, f32_to_bf16, vcopy_line, vdequant, vfma, vhsum, vload, vload_bf16,
                                vload_strip, vload_u8, vpair_hi, vpair_lo, vsplat, vsplat_at, vput, vstore,
                                vstore_bf16, vstrip_order, vtranspose8, vtranspose16, vzero, vzip_hi, vzip_lo)


@njit
def _round_vector(x, out):
    for i in range(0, x.size, 16):
        vstore_bf16(out, i, vload(x, i))


@njit
def _round_scalar(x, out):
    for i in range(x.size):
        out[i] = f32_to_bf16(x[i])


@njit
def _widen(bits, vec_out, scalar_out):
    for i in range(0, bits.size, 16):
        vstore(vec_out, i, vload_bf16(bits, i))
    for i in range(bits.size):
        scalar_out[i] = bf16_to_f32(bits[i])


def _specials():
    ulp = np.float32(2.0 ** -7)
    values = [0.0, -0.0, 1.0, 1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 3.3895e38, 3.4e38, -3.4e38,
              np.inf, -np.inf, 1e-40, -1e-45, 2.0 ** -126, 65504.0, np.nan]
    return np.array(values + [0.0] * (32 - len(values)), np.float32)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=16))
def test_bf16_rounding_matches_ml_dtypes(patterns):
    x = np.concatenate([np.array(patterns, np.uint32).view(np.float32), _specials()])
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    for round_fn in (_round_vector, _round_scalar):
        got = np.empty(x.size, np.uint16)
        round_fn(x, got)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], expected[~nan])
        # NaN stays NaN, quiet, sign kept
        assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all(got[nan] & 0x0040)
        assert np.array_equal(got[nan] >> 15, x[nan].view(np.uint32) >> 31)


def test_bf16_widening_is_exact():
    bits = np.arange(0, 1 << 16, 7, dtype=np.uint16)[:9344]
    vec, scalar = np.empty(bits.size, np.float32), np.empty(bits.size, np.float32)
    _widen(bits, vec, scalar)
    expected = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    same = lambda a: np.array_equal(a.view(np.uint32), expected.view(np.uint32))
    assert same(vec) and same(scalar)


@njit
def _pair_dot(a_pairs, w, out):
    # out[j] = sum_p lo(a_p) lo(w[p, j]) + hi(a_p) hi(w[p, j]): the generic micro-kernel's step
    acc = vzero()
    for p in range(a_pairs.size):
        wv = vload(w, p * 16)
        lo = vsplat(bf16_to_f32(a_pairs[p] & 0xFFFF))
        hi = vsplat(bf16_to_f32(a_pairs[p] >> 16))
        acc = vfma(hi, vpair_hi(wv), vfma(lo, vpair_lo(wv), acc))
    vstore(out, 0, acc)
    return vhsum(acc)


def test_vnni_pair_widening_and_fma():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10).astype(ml_dtypes.bfloat16)               # 5 pairs
    w = rng.standard_normal((10, 16)).astype(ml_dtypes.bfloat16)         # [K, N]
    w_pairs = w.view(np.uint16).reshape(5, 2, 16).transpose(0, 2, 1).copy().view(np.uint32)[..., 0]
    out = np.empty(16, np.float32)
    total = _pair_dot(a.view(np.uint32), w_pairs.ravel(), out)
    expected = a.astype(np.float64) @ w.astype(np.float64)
    assert np.allclose(out, expected, rtol=1e-6, atol=1e-6)
    # the lane sum is a fixed tree, float32 throughout: lanes i + i+8, then +4, +2, +1
    tree = out.copy()
    while tree.size > 1:
        tree = tree[:tree.size // 2] + tree[tree.size // 2:]
    assert total == tree[0]


@njit
def _strip(arr, i, lanes, ordered):
    a0, a1 = vload_strip(arr, i)
    vstore(lanes, 0, a0)
    vstore(lanes, 16, a1)
    o0, o1 = vstrip_order(arr, a0, a1)
    vstore(ordered, 0, o0)
    vstore(ordered, 16, o1)


@njit
def _zip(a, b, out):
    x, y = vload(a, 0), vload(b, 0)
    vstore(out, 0, vzip_lo(x, y))
    vstore(out, 16, vzip_hi(x, y))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_strip_loads_in_its_lane_order_and_orders_back(dtype):
    """vload_strip: 32 elements as two f32x16, bf16 even elements then odd ones (float32 in
    order); vstrip_order turns them back into the 32 values in order, exactly."""
    values = np.random.default_rng(0).standard_normal(40).astype(ml_dtypes.bfloat16).astype(np.float32)
    arr = values.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == np.uint16 else values
    lanes, ordered = np.empty(32, np.float32), np.empty(32, np.float32)
    _strip(arr, 6, lanes, ordered)
    strip = values[6:38]
    expected = np.concatenate([strip[0::2], strip[1::2]]) if dtype == np.uint16 else strip
    assert np.array_equal(lanes, expected) and np.array_equal(ordered, strip)
    a, b, out = np.arange(16, dtype=np.float32), -np.arange(16, dtype=np.float32) - 1, np.empty(32, np.float32)
    _zip(a, b, out)
    assert np.array_equal(out, np.stack([a, b], axis=1).ravel())


@njit
def _dequant(codes, zeros, scales, out, bf16_route):
    for i in range(0, codes.size, 16):
        z, s = vload_u8(zeros, i), vload(scales, i)
        vstore(out, i, vdequant_bf16(codes, i, z, s) if bf16_route else vdequant(codes, i, z, s))


@njit
def _dequant_zero8(codes, scales, out, bf16_route):
    # one zero point for every lane, as int4_k2 passes it
    for i in range(0, codes.size, 16):
        s = vload(scales, i)
        vstore(out, i, vdequant_bf16(codes, i, 8, s) if bf16_route else vdequant(codes, i, 8, s))


@pytest.mark.parametrize("code_dtype,one_zero", [(np.uint16, False), (np.uint8, False), (np.uint8, True)])
@pytest.mark.parametrize("bf16_route", [False, True])
def test_dequant_rounds_once_to_nearest_even(code_dtype, one_zero, bf16_route):
    # every int8 pair (signed bytes) or random nibble pairs with every zero point (or the
    # one zero 8 for all lanes), times scales of every magnitude: bf16((q - z) * s) in both
    # halves, the bits of ml_dtypes' rounding; the x86 twin (vpermps levels, one
    # vcvtne2ps2bf16) gives the same bits
    if bf16_route and "avx512_bf16" not in isa.runnable():
        pytest.skip("vcvtne2ps2bf16 needs AVX512_BF16, which this CPU lacks (the portable twin is tested)")
    rng = np.random.default_rng(int(code_dtype().itemsize) + 2 * bf16_route + 4 * one_zero)
    n = 1 << 16
    codes = (np.arange(n) if code_dtype == np.uint16 else rng.integers(0, 256, n)).astype(code_dtype)
    zeros = (np.zeros(n) if code_dtype == np.uint16 else rng.integers(0, 16, n)).astype(np.uint8)
    if one_zero:
        zeros[:] = 8
    scales = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    out = np.empty(n, np.uint32)
    if one_zero:
        _dequant_zero8(codes, scales, out, bf16_route)
    else:
        _dequant(codes, zeros, scales, out, bf16_route)
    if code_dtype == np.uint16:
        lo, hi = codes.view(np.uint8)[0::2].view(np.int8), codes.view(np.uint8)[1::2].view(np.int8)
    else:   # per 16 bytes: low nibbles hold lanes 0..7 as (lo, hi) pairs, high nibbles lanes 8..15
        vec = codes.reshape(-1, 8, 2)
        lo = np.concatenate([vec[..., 0] & 15, vec[..., 0] >> 4], axis=1).ravel()
        hi = np.concatenate([vec[..., 1] & 15, vec[..., 1] >> 4], axis=1).ravel()
    for half, q in ((out & 0xFFFF, lo), (out >> 16, hi)):
        want = ((q.astype(np.float32) - zeros.astype(np.float32)) * scales).astype(ml_dtypes.bfloat16)
        assert np.array_equal(half.astype(np.uint16), want.view(np.uint16))


@njit
def _transpose(src, dst):
    vtranspose8(src, 0, dst, 0)


def test_transpose8_turns_pairs_along_k_into_pairs_along_n():
    w = np.random.default_rng(0).integers(0, 1 << 16, (16, 16)).astype(np.uint16)       # [n, k]
    along_k = w.reshape(16, 8, 2).transpose(1, 0, 2).copy().view(np.uint32)[..., 0]     # [p][n]
    out = np.zeros((8, 16), np.uint32)
    _transpose(along_k, out)
    along_n = w.reshape(8, 2, 16).transpose(0, 2, 1).copy().view(np.uint32)[..., 0]     # [q][k]
    assert np.array_equal(out, along_n)


@njit
def _turn_both_ways(codes, scales, scales32, zeros, decoded, turned, direct, awq):
    # every block of 128 code bytes with its own 16 scales: decode 8 vectors, then
    # vtranspose8 them (the portable order of work), and vturn4_bf16 in one step
    for b in range(codes.size // 128):
        s = vload(scales32, 16 * b)
        for p in range(8):
            at = 128 * b + 16 * p
            vstore(decoded, at, vdequant_bf16(codes, at, vload_u8(zeros, 16 * b), s) if awq
                   else vdequant_bf16(codes, at, 8, s))
        vtranspose8(decoded, 128 * b, turned, 128 * b)
        vturn4_bf16(codes, 128 * b, scales, zeros, 16 * b, direct, 128 * b)


@pytest.mark.parametrize("awq", [False, True])
def test_turn4_gives_the_bits_of_decode_then_transpose(awq):
    # random nibbles, every zero point (int4_awq) or the one zero 8 (int4_k2), scales of
    # every magnitude and the special ones (0, -0, +-inf, NaN, subnormal): the same bits
    if "avx512_bf16" not in isa.runnable():
        pytest.skip("vturn4_bf16 needs AVX512_BF16, which this CPU lacks (its route decodes, then transposes)")
    rng = np.random.default_rng(awq)
    blocks = 512
    codes = rng.integers(0, 256, 128 * blocks).astype(np.uint8)
    scales = (rng.standard_normal(16 * blocks) * 2.0 ** rng.integers(-30, 30, 16 * blocks)).astype(np.float32)
    scales[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40]
    zeros = rng.integers(0, 16, 16 * blocks).astype(np.uint8) if awq else np.zeros(0, np.uint8)
    stored = scales if awq else scales.astype(ml_dtypes.bfloat16).view(np.uint16)
    scales32 = scales if awq else stored.view(ml_dtypes.bfloat16).astype(np.float32)
    decoded, turned, direct = (np.zeros(128 * blocks, np.uint32) for _ in range(3))
    _turn_both_ways(codes, stored, scales32, zeros, decoded, turned, direct, awq)
    assert np.array_equal(direct, turned)


@njit
def _transpose16(src, i, ld_src, dst, j, ld_dst):
    vtranspose16(src, i, ld_src, dst, j, ld_dst)


def test_transpose16_turns_a_block_of_a_strided_view():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((3, 20, 24)).astype(np.float32)[1:, 2:, 3:]          # a view, any strides
    dst = np.full((18, 40), np.nan, np.float32)
    ld = src.strides[1] // 4
    _transpose16(src, 1 * ld + 2, ld, dst, 40 + 5, 40)                            # block at src[0, 1:17, 2:18]
    assert np.array_equal(dst[1:17, 5:21], src[0, 1:17, 2:18].T)
    dst[1:17, 5:21] = np.nan
    assert np.all(np.isnan(dst))                                                  # nothing else written


@njit
def _splat_at(arr, i, out):
    vstore(out, 0, vsplat_at(arr, i))


def test_splat_at_broadcasts_one_element_of_the_flat_array():
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)
    arr[2, 1] = np.nan
    out = np.zeros(16, np.float32)
    for i in (0, 7, 23):
        _splat_at(arr, i, out)
        assert np.array_equal(out, np.full(16, arr.flat[i]))
    _splat_at(arr, 13, out)
    assert np.all(np.isnan(out))


@njit
def _store_both(x, plain32, plain16, streamed32, streamed16):
    for i in range(0, x.size, 16):
        vstore(plain32, i, vload(x, i))
        vstore_bf16(plain16, i, vload(x, i))
        vput(streamed32, i, vload(x, i), True)
        vput(streamed16, i, vload(x, i), True)


def test_put_past_the_caches_stores_what_vstore_and_vstore_bf16_store():
    x = np.concatenate([_specials(), np.random.default_rng(0).standard_normal(32).astype(np.float32)])
    outs = [aligned_zeros(x.shape, dtype) for dtype in (np.float32, np.uint16, np.float32, np.uint16)]
    _store_both(x, *outs)
    assert np.array_equal(outs[0], x, equal_nan=True)
    assert np.array_equal(outs[2].view(np.uint32), outs[0].view(np.uint32))
    assert np.array_equal(outs[3], outs[1]) and np.array_equal(outs[1], x.astype(ml_dtypes.bfloat16).view(np.uint16))


@njit
def _copy_lines(src, dst, at, stream):
    for i in range(0, src.size, 64 // src.itemsize):
        vcopy_line(src, i, dst, at + i, stream)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
@pytest.mark.parametrize("stream", [False, True])
def test_copy_line_moves_the_bits_of_whole_lines(dtype, stream):
    """64 bytes a call, bits as they are (NaN payloads included), to an aligned line past
    the caches or to any offset through them; nothing outside the lines is touched."""
    bits = np.random.default_rng(1).integers(0, 2**32, 64, dtype=np.uint32)
    bits[:4] = [0x7FC00001, 0xFF800000, 0x00000001, 0x7F800001]          # NaN payloads, -inf, denormal
    src = bits.view(dtype)
    at = 0 if stream else 3                                               # a non-temporal store needs alignment
    dst = aligned_zeros((src.size + 64 // src.itemsize,), dtype)
    _copy_lines(src, dst, at, stream)
    assert np.array_equal(dst[at:at + src.size].view(np.uint16), src.view(np.uint16))
    assert not np.any(dst[:at]) and not np.any(dst[at + src.size:])
