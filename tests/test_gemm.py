"""The stored weight layout and the grouped GEMM (both directions, every format, the fused
LoRA epilogue) against float64."""

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbmoe
from nbmoe.kernels import gemm, isa
from nbmoe.kernels.gemm import ROW_SLACK, TILE_N, PackedMatrix, PackedWeight, grouped_gemm, padded
from nbmoe.reference import round_bf16
from nbmoe.scratch import zeros as aligned_zeros
from conftest import ROUTE_PARAMS
from helpers import BF16, assert_fp32_sums, rel



def _unpack(codes, N, K):
    """The inverse of the bf16 layout: [E, Np/16, Kp/2, 16] uint32 -> [E, N, K] uint16."""
    E, blocks, pairs, _ = codes.shape
    halves = codes.view(np.uint16).reshape(E, blocks, pairs, 16, 2)
    return halves.transpose(0, 1, 3, 2, 4).reshape(E, blocks * 16, pairs * 2)[:, :N, :K]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 70), st.integers(1, 2))
def test_bf16_layout_round_trips(E, N, K, parts):
    rng = np.random.default_rng(N * 100 + K)
    ws = [rng.integers(0, 1 << 16, (E, N, K)).astype(np.uint16) for _ in range(parts)]
    codes = PackedWeight(ws, "bf16").codes
    Np = padded(N)
    for i, w in enumerate(ws):
        block = _unpack(codes[:, i * Np // 16:(i + 1) * Np // 16], Np, padded(K))
        assert np.array_equal(block[:, :N, :K], w)
        assert not np.any(block[:, N:, :]) and not np.any(block[:, :, K:])          # pads: zero


FORMATS = [("bf16", None), ("int8", None), ("int4_awq", 32), ("int4_awq", 64), ("int4_k2", 32)]


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@settings(max_examples=30, deadline=None)
@given(E=st.integers(1, 4), N=st.sampled_from([16, 40, 64, 96]), K=st.sampled_from([64, 128]),
       fmt=st.sampled_from(FORMATS), most=st.sampled_from([2, 9, 40]), seed=st.integers(0, 2**31 - 1))
def test_both_directions_multiply_by_the_stored_weights(route, E, N, K, fmt, most, seed):
    # forward (a W^T) and backward (g W) from one stored copy, every format: each equals the
    # float64 product with dequantize()'s weights to fp32 summation error - the bound a
    # backward on any other weights (a re-rounded or re-quantized transpose) breaks
    rng = np.random.default_rng(seed)
    kind, group = fmt
    w = (rng.standard_normal((E, N, K)) * K ** -0.5).astype(np.float32)
    if kind == "bf16":
        weights = w.astype(BF16)
        packed, W = PackedWeight([weights.view(np.uint16)], kind), weights.astype(np.float64)
    else:
        q = nbmoe.quantize(w, kind, group)
        packed, W = PackedWeight([q], kind), q.dequantize().astype(np.float64)
    counts = rng.integers(0, most + 1, E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    P = int(offsets[-1])
    slot_of_expert = np.where(counts > 0, np.cumsum(counts > 0) - 1, -1).astype(np.int64)
    none = np.zeros((0, 0), np.uint16)
    for transposed, (cols, inner) in ((False, (N, K)), (True, (K, N))):
        a = np.zeros((P + ROW_SLACK, padded(inner)), np.uint16)
        a[:P, :inner] = rng.standard_normal((P, inner)).astype(BF16).view(np.uint16)
        out = np.full((P, padded(cols)), np.nan, np.float32)
        grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slot_of_expert,
                     np.zeros((P, 0), np.float32), np.zeros((E, 0, padded(cols)), np.float32), padded(cols),
                     np.float32(0), out, none, transposed=transposed)
        x = a[:P, :inner].view(BF16).astype(np.float64)
        for e in np.flatnonzero(counts):
            rows = slice(offsets[e], offsets[e + 1])
            m = W[e] if transposed else W[e].T
            assert_fp32_sums(out[rows, :cols], x[rows] @ m, np.abs(x[rows]) @ np.abs(m), inner)
            assert not np.any(out[rows, cols:])                                    # pad columns: zero


def _problem(rng, counts, groups, N, K):
    """A grouped GEMM's inputs for experts of ``counts`` rows: (offsets, P, active,
    slot_of_expert, w [E, groups * N, K] bf16, its PackedWeight, the bf16 rows a [P +
    ROW_SLACK, Kp] uint16)."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    P = int(offsets[-1])
    active = np.flatnonzero(counts)
    slot_of_expert = np.full(len(counts), -1, np.int64)
    slot_of_expert[active] = np.arange(active.size)
    w = rng.standard_normal((len(counts), groups * N, K)).astype(BF16)
    packed = PackedWeight([w[:, g * N:(g + 1) * N].view(np.uint16) for g in range(groups)], "bf16")
    a = np.zeros((P + ROW_SLACK, padded(K)), np.uint16)
    a[:P, :K] = rng.standard_normal((P, K)).astype(BF16).view(np.uint16)
    return offsets, P, active, slot_of_expert, w, packed, a


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 5), N=st.integers(1, 80), K=st.integers(1, 80), R=st.sampled_from([0, 1, 4]),
       groups=st.sampled_from([1, 2]), most=st.sampled_from([3, 9, 40]), seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_matches_float64(route, E, N, K, R, groups, most, seed):
    # up to 40 rows an expert: full blocks and tails of every route (4; 8 and 12; 32 rows)
    rng = np.random.default_rng(seed)
    Np = padded(N)
    offsets, P, active, slot_of_expert, w, packed, a = _problem(rng, rng.integers(0, most + 1, E), groups, N, K)
    lora_l = rng.standard_normal((P + 2, groups * R)).astype(np.float32)
    lora_r = np.zeros((max(active.size, 1), R, groups * Np), np.float32)
    for g in range(groups):
        lora_r[:, :, g * Np:g * Np + N] = rng.standard_normal((max(active.size, 1), R, N))
    scale = np.float32(0.75)
    out32 = np.full((P + 2, groups * Np), np.nan, np.float32)
    out16 = np.zeros((P + 2, groups * Np), np.uint16)
    grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slot_of_expert, lora_l, lora_r, Np,
                 scale, out32, out16)
    x = a.view(BF16).astype(np.float64)
    for e in active:
        rows = slice(offsets[e], offsets[e + 1])
        s = slot_of_expert[e]
        for g in range(groups):
            cols = slice(g * Np, g * Np + N)
            wt = w[e, g * N:(g + 1) * N].astype(np.float64).T
            lo, hi = scale * lora_l[rows, g * R:(g + 1) * R].astype(np.float64), lora_r[s, :, cols]
            ref = x[rows, :K] @ wt + lo @ hi
            magnitude = np.abs(x[rows, :K]) @ np.abs(wt) + np.abs(lo) @ np.abs(hi)
            assert_fp32_sums(out32[rows, cols], ref, magnitude, K + R + 1)
            assert rel(out16[rows, cols].view(BF16), round_bf16(ref)) < 4e-3
            assert not np.any(out32[rows, g * Np + N:(g + 1) * Np])          # pad columns: zero
    assert np.all(np.isnan(out32[P:]))                                        # rows past P: untouched


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@pytest.mark.parametrize("transposed", [False, True])
def test_an_expert_with_a_slot_but_no_rows_writes_nothing(route, transposed):
    # every expert given a slot, idle ones too (a caller's own slots; route_pairs gives
    # idle experts -1): the same bits as with -1, and no row written past P. The few-row
    # forward of an empty expert once stored its first row: the next expert's, or row P.
    rng = np.random.default_rng(7)
    N, K, R = 64, 96, 16
    counts = np.array([0, 2, 0, 1, 0])
    offsets, P, active, slot_of_expert, _, packed, a = _problem(rng, counts, 1, N, K)
    inner, cols = (N, padded(K)) if transposed else (K, N)
    a = np.zeros((P + ROW_SLACK, padded(inner)), np.uint16)
    a[:P, :inner] = rng.standard_normal((P, inner)).astype(BF16).view(np.uint16)
    lora_l = rng.standard_normal((P, R)).astype(np.float32)
    lora_r = rng.standard_normal((len(counts), R, cols + 16)).astype(np.float32)
    outs = []
    for slots, by_slot in ((slot_of_expert, lora_r[active]), (np.arange(len(counts), dtype=np.int64), lora_r)):
        out32 = np.full((P + 2, cols), np.nan, np.float32)
        grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slots, lora_l, by_slot, cols,
                     np.float32(0.5), out32, np.zeros((0, 0), np.uint16), transposed=transposed)
        outs.append(out32)
    assert not np.any(np.isnan(outs[0][:P])) and np.array_equal(outs[0], outs[1], equal_nan=True)
    assert np.all(np.isnan(outs[1][P:]))                                    # rows past P: untouched


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@pytest.mark.parametrize("R, groups", [(16, 2), (32, 1)])
def test_epilogue_turns_caller_b_as_load_does(route, R, groups):
    """The caller's B [E, N, R] per group, turned per item into the thread's tile, gives
    the bits of the ``load`` buffer of B^T: the same FMAs in the same order."""
    rng = np.random.default_rng(R)
    E, N, K = 5, 64, 96
    counts = np.array([0, 1, 3, 40, 9])                      # idle, one row, tail, blocks
    offsets, P, active, slot_of_expert, _, packed, a = _problem(rng, counts, groups, N, K)
    lora_l = rng.standard_normal((P, groups * R)).astype(np.float32)
    bs = tuple(rng.standard_normal((E, N, R)).astype(np.float32) for _ in range(groups))
    buffer = np.concatenate([b[active].transpose(0, 2, 1) for b in bs], axis=2)
    outs = []
    for lora_r in (np.ascontiguousarray(buffer), bs):
        out32 = np.full((P, groups * N), np.nan, np.float32)
        grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slot_of_expert, lora_l, lora_r, N,
                     np.float32(0.5), out32, np.zeros((0, 0), np.uint16))
        outs.append(out32)
    assert not np.any(np.isnan(outs[0])) and np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@pytest.mark.parametrize("ranks", [(16, 16), (16,)])
def test_backward_epilogue_reads_caller_a_as_load_does(route, ranks):
    """The product by W^T takes the caller's A [E, R_j, Kp] (gate_a, up_a: ranks stacked;
    or down_a alone) in place of the ``load`` buffer: each item copies its 32 columns of
    every rank into the thread's tile, the same FMAs in the same order, the same bits."""
    rng = np.random.default_rng(len(ranks))
    E, N, K = 5, 64, 96
    counts = np.array([0, 1, 3, 40, 9])                      # idle, one row, tail, blocks
    offsets, P, active, slot_of_expert, _, packed, _ = _problem(rng, counts, 1, N, K)
    at = rng.standard_normal((P + ROW_SLACK, N)).astype(BF16).view(np.uint16)
    lora_l = rng.standard_normal((P, sum(ranks))).astype(np.float32)
    As = tuple(rng.standard_normal((E, R, padded(K))).astype(np.float32) for R in ranks)
    buffer = np.zeros((E, sum(ranks), padded(K) + 16), np.float32)
    buffer[:, :, :padded(K)] = np.concatenate(As, axis=1)
    outs = []
    for lora_r in (buffer[active], As):
        out32 = np.full((P, padded(K)), np.nan, np.float32)
        grouped_gemm(isa.Route(route, ""), at.view(np.uint32), packed, offsets, slot_of_expert, lora_l, lora_r,
                     padded(K), np.float32(0.5), out32, np.zeros((0, 0), np.uint16), transposed=True)
        outs.append(out32)
    assert not np.any(np.isnan(outs[0])) and np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_outputs_stored_past_the_caches_hold_the_same_bits(route, monkeypatch):
    """Outputs over ``STREAM_BYTES`` (forced to 0 here) go out through non-temporal
    stores where aligned: the same fp32 and bf16 bits; unaligned ones are stored as ever."""
    rng = np.random.default_rng(3)
    E, N, K, R = 4, 64, 96, 16
    offsets, P, active, slot_of_expert, _, packed, a = _problem(rng, np.array([2, 17, 0, 9]), 1, N, K)
    lora_l = rng.standard_normal((P, R)).astype(np.float32)
    lora_r = rng.standard_normal((E, R, N + 16)).astype(np.float32)
    outs = []
    for stream_bytes, shift in ((1 << 40, 0), (0, 0), (0, 1)):
        monkeypatch.setattr(gemm, "STREAM_BYTES", stream_bytes)
        out32 = aligned_zeros((P * N + 1,), np.float32)[shift:shift + P * N].reshape(P, N)   # shift: unaligned
        out16 = aligned_zeros((P, N), np.uint16)
        assert gemm.streams(out32, P) == (stream_bytes == 0 and shift == 0)
        assert gemm.streams(out16, P) == (stream_bytes == 0)
        grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slot_of_expert, lora_l, lora_r, N,
                     np.float32(0.5), out32, out16)
        outs.append((out32.copy(), out16.copy()))
    for out32, out16 in outs[1:]:
        assert np.array_equal(out32, outs[0][0]) and np.array_equal(out16, outs[0][1])


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@pytest.mark.parametrize("K", [96, 640])
def test_held_rows_store_the_bits_of_direct_stores(route, K, monkeypatch):
    """Blocks that hold their rows for the next block to store (``HOLD_PAIRS``; avx512_bf16)
    write the bits of blocks that store at once, in both directions and for every set of
    outputs: at K = 640 every held line is stored inside the next K loop, at 96 most after
    it, and the thread's last block's at the end of its run; rows past P stay untouched."""
    rng = np.random.default_rng(K)
    N, R = 64, 16
    counts = np.array([0, 1, 3, 40, 9, 12, 8, 24])           # tails, clamped, 8- and 12-row blocks
    offsets, P, active, slot_of_expert, _, packed, a = _problem(rng, counts, 1, N, K)
    at = rng.standard_normal((P + ROW_SLACK, N)).astype(BF16).view(np.uint16)
    lora_l = rng.standard_normal((P, R)).astype(np.float32)
    ups = {False: rng.standard_normal((len(counts), R, N + 16)).astype(np.float32),
           True: rng.standard_normal((len(counts), R, padded(K) + 16)).astype(np.float32)}
    for transposed, rows, cols in ((False, a, N), (True, at, padded(K))):
        for outputs in ("32", "16", "32 16"):
            outs = []
            for hold_pairs in (0, 1 << 20):                  # never hold, always hold
                monkeypatch.setattr(gemm, "HOLD_PAIRS", hold_pairs)
                out32 = np.full((P + 2, cols), np.nan, np.float32) if "32" in outputs else np.zeros((0, 0), np.float32)
                out16 = np.full((P + 2, cols), 0xFFFF, np.uint16) if "16" in outputs else np.zeros((0, 0), np.uint16)
                grouped_gemm(isa.Route(route, ""), rows.view(np.uint32), packed, offsets, slot_of_expert, lora_l,
                             ups[transposed], cols, np.float32(0.5), out32, out16, transposed=transposed)
                outs.append((out32, out16))
            (direct32, direct16), (held32, held16) = outs
            assert np.array_equal(direct32, held32, equal_nan=True) and np.array_equal(direct16, held16)
            assert not np.any(np.isnan(direct32[:P])) and np.all(np.isnan(direct32[P:]))
            assert np.all(direct16[P:] == 0xFFFF) and not np.any(direct16[:P] == 0xFFFF)


@numba.njit
def _blocks(route, n):
    """The row counts ``block_take`` gives the blocks of an expert of ``n`` rows, in order."""
    takes, m = [0], 0
    while m < n:
        takes.append(gemm.block_take(route, n - m))
        m += takes[-1]
    return takes[1:]


@pytest.mark.parametrize("route, sizes", [("avx512_bf16", {8, 12}), ("avx512", {4}), ("amx", {32})])
def test_blocks_cover_an_expert(route, sizes):
    # avx512_bf16's 12- and 8-row blocks, both directions: a clamped tail of an expert of 8
    # rows or more repeats at most 3 rows (8-row blocks alone: up to 5; fewer than 8 rows
    # are one 8-row block); a tail of fewer than CLAMP_ROWS rows runs row by row
    for n in range(1, 300):
        takes = _blocks(isa.Route(route, ""), n)
        assert set(takes) <= sizes and sum(takes) >= n > sum(takes) - takes[-1]
        tail = n - (sum(takes) - takes[-1])
        if sizes == {8, 12} and n >= gemm.MR_BF16 and tail >= gemm.CLAMP_ROWS:
            assert sum(takes) - n <= 3, (n, takes)


@pytest.mark.parametrize("fmt", ["int4_awq", "int4_k2"])
def test_int4_groups_must_be_whole_pads(fmt):
    # a backward item's 16 pairs read one group's scales: a group of 16 columns would
    # straddle two, so it is refused when packed, not decoded with the wrong scales
    q = nbmoe.quantize(np.ones((1, 16, 64), np.float32), fmt, 16)
    with pytest.raises(ValueError, match="parts: int4 group_size: expected a multiple of 32, got 16"):
        PackedWeight([q], fmt)


@given(st.integers(1, 1 << 20))
def test_padding_is_the_least_whole_tiling(n):
    # N padded: whole work items of TILE_N columns; K padded: whole 64-byte AMX tile rows (32 bf16)
    p, tiling = padded(n), math.lcm(TILE_N, 32)
    assert p % tiling == 0 and n <= p < n + tiling


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@pytest.mark.parametrize("K", [70, 64, 2048])
def test_packed_matrix_matmul(route, K):
    """K = 64 reads a C-order ``a`` in place (routes but amx); K = 2048 (rows 4 KiB apart,
    one L1 set) and a strided view of the same values go through the padded copy: the
    same bits either way."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, K)).astype(BF16)
    w = rng.standard_normal((50, K)).astype(BF16)
    packed = PackedMatrix(w.view(np.uint16))
    out = packed.matmul(isa.Route(route, ""), a.view(np.uint16))
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    assert out.shape == (37, 50)
    assert_fp32_sums(out, a64 @ w64.T, np.abs(a64) @ np.abs(w64).T, K)
    assert (packed._operand.shape[0] > 0) == (route == "amx" or K != 64)
    strided = np.repeat(a.view(np.uint16), 2, axis=0)[::2]
    assert np.array_equal(packed.matmul(isa.Route(route, ""), strided), out)
