"""nbmoe.quantize and nbmoe.QuantizedWeight (docs/design.md §6, issue 8): the quantizer
table bit for bit, the checkpoint bit layouts, quantization error, memory, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe import QuantizedWeight, quantize
from helpers import BF16, rel

F32 = np.float32
FORMATS = ("int8", "int4_awq", "int4_k2")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def reference(w, fmt, g):
    """The §6 table, one group at a time in float32 scalars:
    -> codes int64 [E, N, K] (signed for int8 and int4_k2), scales float32 [E, N, G],
    zeros int64 [E, N, G] (0 but for int4_awq), dequantized float32 [E, N, K] rounded to bf16."""
    w = w.astype(F32)
    E, N, K = w.shape
    g = K if fmt == "int8" else g
    codes = np.zeros((E, N, K), np.int64)
    scales = np.zeros((E, N, K // g), F32)
    zeros = np.zeros((E, N, K // g), np.int64)
    dq = np.zeros((E, N, K), F32)
    for e, n, j in np.ndindex(E, N, K // g):
        x = w[e, n, j * g:(j + 1) * g]
        zero = F32(0)
        if fmt == "int8":
            s = F32(np.max(np.abs(x)) / F32(127))
            s = F32(1) if s == 0 else s
            q = np.clip(np.rint(x / s), -127, 127)
        elif fmt == "int4_awq":
            s = F32(max(F32(np.max(x) - np.min(x)), F32(1e-5)) / F32(15))
            zero = F32(min(max(np.rint(-np.min(x) / s), 0), 15))
            q = np.clip(np.rint(x / s) + zero, 0, 15)
        else:
            s = F32(BF16(np.max(np.abs(x)) / F32(7.5)))
            q = np.zeros(g, F32) if s == 0 else np.clip(np.rint(x / s), -8, 7)
        codes[e, n, j * g:(j + 1) * g] = q
        scales[e, n, j] = s
        zeros[e, n, j] = zero
        dq[e, n, j * g:(j + 1) * g] = ((q - zero) * s).astype(BF16)
    return codes, scales, zeros, dq


def nibbles(codes):
    """uint8 [..., K/2] -> int64 [..., K]: element k is nibble k % 2 of byte k // 2, low first."""
    k = np.arange(2 * codes.shape[-1])
    return (codes[..., k // 2].astype(np.int64) >> (4 * (k % 2))) & 15


def words(packed, order=range(8)):
    """int32 [..., M] -> int64 [..., 8M]: column 8c + order[i] is nibble i (bits 4i) of word c."""
    u = packed.view(np.uint32).astype(np.int64)
    out = np.zeros(packed.shape[:-1] + (8 * packed.shape[-1],), np.int64)
    for i, col in enumerate(order):
        out[..., col::8] = (u >> (4 * i)) & 15
    return out


def stored_scales(qw):
    """A QuantizedWeight's scales as float32 [E, N, G] (int8: G = 1)."""
    s = qw.scales.astype(F32)
    return s[..., None] if qw.format == "int8" else s


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    return np.array_equal(np.ascontiguousarray(a).view(unsigned), np.ascontiguousarray(b).view(unsigned))


@st.composite
def weights(draw):
    """(format, group, w): normal weights with row scales 1e-4..1e2, all-zero rows and
    groups, one-signed groups, and groups on a half-integer grid spanning [-7.5, 7.5]
    (rint ties, clipping)."""
    fmt = draw(st.sampled_from(FORMATS))
    g = draw(st.sampled_from([32, 64, 128]))
    E, N, K = draw(st.integers(1, 3)), draw(st.sampled_from([8, 16, 24])), g * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((E, N, K)) * 10.0 ** rng.uniform(-4, 2, (E, N, 1))
    groups = w.reshape(E, N, K // g, g)
    kind = rng.integers(0, 8, (E, N, K // g))
    groups[kind == 0] = 0
    grid = rng.integers(-15, 16, (int((kind == 1).sum()), g)) / 2
    grid[:, :2] = (-7.5, 7.5)
    groups[kind == 1] = grid
    groups[kind == 2] = -np.abs(groups[kind == 2]) - 1e-3  # one-signed groups: awq clips z
    groups[kind == 3] = np.abs(groups[kind == 3]) + 1e-3
    w[rng.random((E, N)) < 0.1] = 0
    return fmt, g, w.astype(draw(st.sampled_from([np.float32, BF16])))


@settings(max_examples=200, deadline=None)
@given(weights())
def test_quantize_follows_the_table(case):
    fmt, g, w = case
    qw = quantize(w, fmt, group_size=g)
    codes, scales, zeros, dq = reference(w, fmt, g)
    E, N, K = w.shape
    assert (qw.format, qw.shape, qw.group_size) == (fmt, (E, N, K), None if fmt == "int8" else g)
    if fmt == "int8":
        assert qw.codes.dtype == np.int8 and qw.scales.dtype == np.float32 and qw.zeros is None
        assert np.array_equal(qw.codes, codes)
        assert same_bits(qw.scales, scales[..., 0])
    else:
        assert qw.codes.dtype == np.uint8 and qw.codes.shape == (E, N, K // 2)
        assert qw.scales.shape == (E, N, K // g)
        stored = nibbles(qw.codes)
        if fmt == "int4_awq":
            assert qw.scales.dtype == np.float32 and qw.zeros.dtype == np.uint8
            assert np.array_equal(stored, codes) and np.array_equal(qw.zeros, zeros)
            assert same_bits(qw.scales, scales)
        else:
            assert qw.scales.dtype == BF16 and qw.zeros is None
            assert np.array_equal(stored - 8, codes)
            assert same_bits(qw.scales.astype(F32), scales)
    got = qw.dequantize()
    assert got.dtype == np.float32 and np.array_equal(got, dq)
    assert np.array_equal(qw.dequantize(expert=E - 1), dq[E - 1])

    # |dequant - w| <= s/2 where the code is not clipped (+ float32 slack, + the bf16 rounding)
    S = np.repeat(scales, K // scales.shape[2], axis=2).astype(np.float64)
    Z = np.repeat(zeros, K // zeros.shape[2], axis=2)
    w64 = w.astype(F32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        unclipped = np.rint(w64 / S) + Z == codes
    err = np.abs(got - w64)
    bound = S * (0.5 + 2.0**-16) + np.abs(got) * 2.0**-8
    assert np.all((err <= bound) | ~unclipped)


@pytest.mark.parametrize("fmt, g, bound", [("int8", None, 0.025),
                                           ("int4_awq", 32, 0.13), ("int4_awq", 128, 0.20),
                                           ("int4_k2", 32, 0.13), ("int4_k2", 128, 0.20)])
def test_quantization_error(fmt, g, bound):
    """rel = mean|dq - w| / mean|w| on N(0, 1/fan_in) weights, E=2, N=64, K=2048. Measured
    (seed 0): int8 0.0090; int4_awq g32 0.087, g128 0.109; int4_k2 g32 0.101, g128 0.119."""
    K = 2048
    w = (np.random.default_rng(0).standard_normal((2, 64, K)) / np.sqrt(K)).astype(BF16)
    assert rel(quantize(w, fmt, group_size=g).dequantize(), w.astype(F32)) <= bound


@pytest.mark.parametrize("K", [128, 2048])
@pytest.mark.parametrize("fmt, g, ratio", [("int8", None, 0.55),
                                           ("int4_k2", 32, 0.30), ("int4_k2", 64, 0.30),
                                           ("int4_k2", 128, 0.30),
                                           ("int4_awq", 64, 0.30), ("int4_awq", 128, 0.30),
                                           ("int4_awq", 32, 0.33)])
def test_nbytes(K, fmt, g, ratio):
    """Bytes held over raw bf16 bytes. The §6 bound int4 <= 0.30 holds for int4_k2 from
    g = 32 and for int4_awq at its usual g >= 64 (0.25 + 2.5/g); an int4_awq group of 32
    holds 0.25 + 2.5/32 = 0.328 (its float32 scale alone is 4/64)."""
    E, N = 2, 16
    w = np.random.default_rng(1).standard_normal((E, N, K)).astype(BF16)
    qw = quantize(w, fmt, group_size=g)
    zeros = 0 if qw.zeros is None else qw.zeros.nbytes
    assert qw.nbytes == qw.codes.nbytes + qw.scales.nbytes + zeros
    expected = {"int8": 0.5 + 2 / K, "int4_k2": 0.25 + 1 / (g or 1), "int4_awq": 0.25 + 2.5 / (g or 1)}[fmt]
    assert qw.nbytes / (E * N * K * 2) == expected <= ratio


def test_int8_by_hand():
    w = np.zeros((1, 2, 5), F32)
    w[0, 0] = [127, -63.5, 0.5, 1.5, -127]  # s = 1: ties round to even
    qw = quantize(w, "int8")
    assert qw.codes.tolist() == [[[127, -64, 0, 2, -127], [0, 0, 0, 0, 0]]]
    assert qw.scales.tolist() == [[1.0, 1.0]]  # the zero row gets s = 1
    assert quantize(np.full((1, 1, 2), 1e-44, F32), "int8").scales.tolist() == [[1.0]]  # max|w|/127 -> 0


def test_k2_layout_by_hand():
    """q = -8..7 along one row is stored as 0..15: nibble k of word 0 holds k, of word 1 k + 8."""
    w = np.array([[[-7.5] + list(range(-7, 8))]], F32)  # max|w| = 7.5: s = 1, rint(-7.5) = -8
    qw = quantize(w, "int4_k2", group_size=16)
    packed, scale = qw.to_k2()
    assert packed.tolist() == [[[0x76543210, 0xFEDCBA98 - 2**32]]]
    assert scale.astype(F32).tolist() == [[[1.0]]]
    assert qw.codes.tolist() == [[[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]]
    assert qw.dequantize().tolist() == [[list(range(-8, 8))]]
    # ties to even, clipping at +8 -> 7, and an all-zero group (s = 0, q = 0)
    w = np.array([[[7.5, 2.5, 3.5, -0.5, 0, 0, 0, 0]]], F32)
    qw = quantize(w, "int4_k2", group_size=4)
    assert (nibbles(qw.codes) - 8).tolist() == [[[7, 2, 4, 0, 0, 0, 0, 0]]]
    assert qw.scales.astype(F32).tolist() == [[[1.0, 0.0]]]


def test_awq_layout_by_hand():
    """Nibble i of a word holds column [0, 2, 4, 6, 1, 3, 5, 7][i]: columns 0..7 holding
    0..7 give nibbles 0, 2, 4, 6, 1, 3, 5, 7 from the low end, the word 0x75316420."""
    word = sum(col << (4 * i) for i, col in enumerate(AWQ_ORDER))
    assert word == 0x75316420
    qweight = np.array([[[word], [0]]], np.int32)  # K = 2: row k = 0 holds q[0, n] = n
    qzeros = np.array([[[0x11111111]]], np.int32)  # z = 1 for every column
    scales = np.full((1, 1, 8), 0.5, np.float16)
    qw = QuantizedWeight.from_awq(qweight, qzeros, scales, group_size=2)
    assert qw.shape == (1, 8, 2)
    assert nibbles(qw.codes)[0, :, 0].tolist() == list(range(8))
    assert qw.zeros.tolist() == [[[1]] * 8]
    assert qw.dequantize()[0].tolist() == [[(n - 1) * 0.5, -0.5] for n in range(8)]
    assert all(same_bits(a, b) for a, b in zip(qw.to_awq(), (qweight, qzeros, scales)))


def random_bits(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("seed", range(4))
def test_k2_round_trip(seed):
    rng = np.random.default_rng(seed)
    E, N, K, g = 2, 8, 64, 32
    packed = random_bits(rng, (E, N, K // 8), np.int32)
    scale = random_bits(rng, (E, N, K // g), np.uint16).view(BF16)  # any bits, NaN included
    qw = QuantizedWeight.from_k2(packed, scale, weight_shape=np.array([[N, K]] * E, np.int64))
    assert (qw.format, qw.shape, qw.group_size) == ("int4_k2", (E, N, K), g)
    out = qw.to_k2()
    assert same_bits(out[0], packed) and same_bits(out[1], scale)
    finite = np.isfinite(scale.astype(F32))
    s = np.repeat(scale.astype(F32), g, axis=2)
    with np.errstate(invalid="ignore"):  # 0 * inf
        want = ((words(packed) - 8) * s).astype(BF16).astype(F32)
        got = qw.dequantize()
    assert np.array_equal(got[np.repeat(finite, g, axis=2)], want[np.repeat(finite, g, axis=2)])
    # and the other way: an online quantized weight exports and imports unchanged
    w = rng.standard_normal((E, N, 128)).astype(BF16)
    for gs in (32, 64):
        qw = quantize(w, "int4_k2", group_size=gs)
        back = QuantizedWeight.from_k2(*qw.to_k2(), group_size=gs)
        assert same_bits(back.codes, qw.codes) and same_bits(back.scales, qw.scales)
        assert back.group_size == gs


@pytest.mark.parametrize("seed", range(4))
def test_awq_round_trip(seed):
    rng = np.random.default_rng(seed)
    E, N, K, g = 2, 16, 128, 64
    qweight = random_bits(rng, (E, K, N // 8), np.int32)
    qzeros = random_bits(rng, (E, K // g, N // 8), np.int32)
    bits = random_bits(rng, (E, K // g, N), np.uint16)
    bits = np.where(bits & 0x7C00 == 0x7C00, bits & 0x83FF, bits)  # finite: subnormals, -0 kept
    scales = bits.view(np.float16)
    qw = QuantizedWeight.from_awq(qweight, qzeros, scales, g)
    assert (qw.format, qw.shape, qw.group_size) == ("int4_awq", (E, N, K), g)
    assert all(same_bits(a, b) for a, b in zip(qw.to_awq(), (qweight, qzeros, scales)))
    # W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]
    q = words(qweight, AWQ_ORDER)
    z = np.repeat(words(qzeros, AWQ_ORDER), g, axis=1)
    s = np.repeat(scales.astype(F32), g, axis=1)
    want = ((q - z) * s).astype(F32).astype(BF16).astype(F32).transpose(0, 2, 1)
    assert np.array_equal(qw.dequantize(), want)
    again = QuantizedWeight.from_awq(*qw.to_awq(), g)
    assert same_bits(again.codes, qw.codes) and same_bits(again.zeros, qw.zeros)
    assert same_bits(again.scales, qw.scales)


def test_awq_online_export():
    """Scales exactly representable in float16 export; the float32 ones the online
    quantizer generally makes are refused rather than rounded."""
    grid = np.tile(np.arange(-7.5, 8), (1, 8, 4)).astype(F32)  # every group spans 15: s = 1
    qw = quantize(grid, "int4_awq", group_size=16)
    assert qw.scales.tolist() == [[[1.0] * 4] * 8]
    back = QuantizedWeight.from_awq(*qw.to_awq(), 16)
    assert all(same_bits(getattr(back, a), getattr(qw, a)) for a in ("codes", "scales", "zeros"))
    w = np.random.default_rng(2).standard_normal((1, 8, 64)).astype(F32)
    with pytest.raises(ValueError, match=r"to_awq: the scale of expert 0, row 0, group 0 = .* "
                                         r"is not exactly a float16"):
        quantize(w, "int4_awq", group_size=32).to_awq()


def test_int8_round_trip():
    rng = np.random.default_rng(3)
    q = random_bits(rng, (2, 8, 24), np.int8)
    scale = random_bits(rng, (2, 8), np.uint32).view(F32)
    qw = QuantizedWeight.from_int8(q, scale)
    assert (qw.format, qw.shape, qw.group_size) == ("int8", (2, 8, 24), None)
    assert all(same_bits(a, b) for a, b in zip(qw.to_int8(), (q, scale)))
    qw = quantize(rng.standard_normal((2, 8, 24)).astype(BF16), "int8", group_size=128)
    back = QuantizedWeight.from_int8(*qw.to_int8())
    assert same_bits(back.codes, qw.codes) and same_bits(back.scales, qw.scales)


def test_stored_arrays_are_owned_and_read_only():
    w = np.random.default_rng(4).standard_normal((2, 8, 64)).astype(BF16)
    before = w.copy()
    qw = quantize(w, "int4_awq", group_size=32)
    assert same_bits(w, before)
    for name in ("codes", "scales", "zeros"):
        assert not getattr(qw, name).flags.writeable
        with pytest.raises(AttributeError):
            setattr(qw, name, None)
    packed, scale = quantize(w, "int4_k2", group_size=32).to_k2()
    qw = QuantizedWeight.from_k2(packed, scale)
    codes = qw.codes.copy()
    packed[...] = 0
    assert np.array_equal(qw.codes, codes)
    assert "int4_k2" in repr(qw) and str(qw.nbytes) in repr(qw)


W = np.ones((2, 8, 64), F32)
PACKED, SCALE = quantize(W, "int4_k2", group_size=32).to_k2()
QWEIGHT = np.zeros((2, 64, 2), np.int32)
QZEROS = np.zeros((2, 2, 2), np.int32)
AWQ_SCALES = np.ones((2, 2, 16), np.float16)


@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize(W, "int3"), ValueError,
     r"quantize: format: expected one of int8, int4_awq, int4_k2, got 'int3'"),
    (lambda: quantize(W, "bf16"), ValueError, r"quantize: format: expected one of"),
    (lambda: quantize(W, "int4_k2"), ValueError,
     r"quantize: group_size: expected a positive even int, got None"),
    (lambda: quantize(W, "int4_awq", group_size=0), ValueError, r"quantize: group_size: .* got 0"),
    (lambda: quantize(W, "int4_awq", group_size=-32), ValueError, r"quantize: group_size: .* got -32"),
    (lambda: quantize(W, "int4_k2", group_size=33), ValueError, r"quantize: group_size: .* got 33"),
    (lambda: quantize(W, "int4_k2", group_size=32.0), ValueError, r"quantize: group_size: .* got 32.0"),
    (lambda: quantize(W, "int4_k2", group_size=True), ValueError, r"quantize: group_size: .* got True"),
    (lambda: quantize(W, "int4_k2", group_size=48), ValueError,
     r"quantize: group_size: expected a divisor of K = 64, got 48"),
    (lambda: quantize(W.astype(np.float64), "int8"), TypeError,
     r"quantize: w: expected dtype bfloat16 or float32, got float64"),
    (lambda: quantize(W.astype(np.float16), "int8"), TypeError, r"quantize: w: expected dtype"),
    (lambda: quantize(W.tolist(), "int8"), TypeError, r"quantize: w: expected a numpy.ndarray"),
    (lambda: quantize(W[0], "int8"), ValueError, r"quantize: w: expected a non-empty \[E, N, K\], "
                                                 r"got shape \[8, 64\]"),
    (lambda: quantize(W[:, :0], "int8"), ValueError, r"quantize: w: expected a non-empty"),
    (lambda: QuantizedWeight.from_int8(W, np.ones((2, 8), F32)), ValueError,
     r"from_int8: q: expected int8 \[E, N, K\], got float32 \[2, 8, 64\]"),
    (lambda: QuantizedWeight.from_int8(W.astype(np.int8), np.ones((2, 9), F32)), ValueError,
     r"from_int8: scale: expected float32 \[E, N\] = \[2, 8\], got float32 \[2, 9\]"),
    (lambda: QuantizedWeight.from_int8(W.astype(np.int8), np.ones((2, 8))), ValueError,
     r"from_int8: scale: expected float32 .* got float64"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT.astype(F32), QZEROS, AWQ_SCALES, 32), ValueError,
     r"from_awq: qweight: expected int32 \[E, K, N/8\], got float32 \[2, 64, 2\]"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT[0], QZEROS, AWQ_SCALES, 32), ValueError,
     r"from_awq: qweight: expected int32 \[E, K, N/8\], got int32 \[64, 2\]"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES, 48), ValueError,
     r"from_awq: group_size: expected a divisor of K = 64, got 48"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES, 31), ValueError,
     r"from_awq: group_size: expected a positive even int, got 31"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES.astype(F32), 32), ValueError,
     r"from_awq: scales: expected float16 \[E, K/g, N\], got float32"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES[..., :12], 32), ValueError,
     r"from_awq: scales: N = 12 is not a multiple of 8"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES[..., :8], 32), ValueError,
     r"from_awq: scales: expected float16 \[E, K/g, N\] = \[2, 2, 16\], got float16 \[2, 2, 8\]"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS, AWQ_SCALES, 64), ValueError,
     r"from_awq: scales: expected float16 \[E, K/g, N\] = \[2, 1, 16\], got float16 \[2, 2, 16\]"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS[:, :, :1], AWQ_SCALES, 32), ValueError,
     r"from_awq: qzeros: expected int32 \[E, K/g, N/8\] = \[2, 2, 2\], got int32 \[2, 2, 1\]"),
    (lambda: QuantizedWeight.from_awq(QWEIGHT, QZEROS.view(np.uint32), AWQ_SCALES, 32), ValueError,
     r"from_awq: qzeros: expected int32 .* got uint32"),
    (lambda: QuantizedWeight.from_k2(PACKED.astype(np.int64), SCALE), ValueError,
     r"from_k2: weight_packed: expected int32 \[E, N, K/8\], got int64 \[2, 8, 8\]"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE.astype(F32)), ValueError,
     r"from_k2: weight_scale: expected bfloat16 \[E, N, K/g\] = \[2, 8, 2\], got float32"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, group_size=64), ValueError,
     r"from_k2: weight_scale: expected bfloat16 \[E, N, K/g\] = \[2, 8, 1\], got bfloat16 \[2, 8, 2\]"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, group_size=40), ValueError,
     r"from_k2: group_size: expected a divisor of K = 64, got 40"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, weight_shape=np.array([[8, 64], [8, 60]])), ValueError,
     r"from_k2: weight_shape\[1\] = \(8, 60\): K = 60 is not a multiple of 8"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, weight_shape=np.array([[8, 64], [16, 64]])), ValueError,
     r"from_k2: weight_shape\[1\] = \(16, 64\): expected \(N, K\) of weight_packed"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, weight_shape=np.array([8, 64])), ValueError,
     r"from_k2: weight_shape: expected int32 or int64 \[E, 2\] = \[2, 2\], got int64 \[2\]"),
    (lambda: QuantizedWeight.from_k2(PACKED, SCALE, weight_shape=np.ones((2, 2), F32)), ValueError,
     r"from_k2: weight_shape: expected int32 or int64 .* got float32"),
    (lambda: quantize(W, "int4_k2", group_size=32).to_awq(), ValueError,
     r"to_awq: expected an int4_awq weight, got int4_k2"),
    (lambda: quantize(W, "int8").to_k2(), ValueError, r"to_k2: expected an int4_k2 weight, got int8"),
    (lambda: quantize(W, "int4_awq", group_size=32).to_int8(), ValueError,
     r"to_int8: expected an int8 weight, got int4_awq"),
    (lambda: quantize(W[:, :4], "int4_awq", group_size=32).to_awq(), ValueError,
     r"to_awq: N = 4 is not a multiple of 8"),
    (lambda: quantize(W[..., :12], "int4_k2", group_size=6).to_k2(), ValueError,
     r"to_k2: K = 12 is not a multiple of 8"),
    (lambda: quantize(W, "int8").dequantize(expert=2), ValueError,
     r"dequantize: expert: expected an int in \[0, 1\], got 2"),
    (lambda: quantize(W, "int8").dequantize(expert=1.0), TypeError, r"dequantize: expert: expected an int"),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(dtype, bad):
    w = np.ones((2, 3, 64), F32)
    w[1, 2, 5] = w[1, 2, 7] = bad
    for fmt in FORMATS:
        with pytest.raises(ValueError, match=rf"quantize: w\[1, 2, 5\] = {bad}: expected finite weights"):
            quantize(w.astype(dtype), fmt, group_size=32)


def test_awq_range_overflow():
    w = np.zeros((1, 2, 64), F32)
    w[0, 1, 40], w[0, 1, 41] = 3e38, -3e38
    with pytest.raises(ValueError, match=r"quantize: w\[0, 1, 32:64\]: max w - min w overflows float32"):
        quantize(w, "int4_awq", group_size=32)
    scale = quantize(w, "int4_k2", group_size=32).scales[0, 1, 1]  # k2 and int8 cannot overflow
    assert F32(scale) == F32(BF16(F32(3e38) / F32(7.5)))
