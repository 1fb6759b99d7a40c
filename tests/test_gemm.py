"""VNNI packing and the grouped GEMM with its fused LoRA epilogue, against float64."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe.kernels import isa
from nbmoe.kernels.gemm import PAD, ROW_SLACK, TILE_N, PackedMatrix, grouped_gemm, make_tasks, pack_vnni, padded
from nbmoe.reference import round_bf16
from conftest import RUNNABLE
from helpers import BF16, assert_fp32_sums, rel



def _unpack(packed, N, K):
    """The inverse of pack_vnni: [E, Np/16, Kp/2, 16] uint32 -> [E, N, K] uint16."""
    E, blocks, pairs, _ = packed.shape
    halves = packed.view(np.uint16).reshape(E, blocks, pairs, 16, 2)
    return halves.transpose(0, 1, 3, 2, 4).reshape(E, blocks * 16, pairs * 2)[:, :N, :K]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 70), st.booleans())
def test_pack_vnni_round_trips(E, N, K, transposed):
    rng = np.random.default_rng(N * 100 + K)
    w = rng.integers(0, 1 << 16, (E, K, N) if transposed else (E, N, K)).astype(np.uint16)
    src = w.transpose(0, 2, 1) if transposed else w
    packed = np.zeros((E, padded(N) // 16, padded(K) // 2, 16), np.uint32)
    pack_vnni(src, packed, 0, 0)
    assert np.array_equal(_unpack(packed, N, K), src)
    assert not np.any(_unpack(packed, padded(N), padded(K))[:, N:, :]) and \
        not np.any(_unpack(packed, padded(N), padded(K))[:, :, K:])


@pytest.mark.parametrize("route", RUNNABLE)
@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 5), N=st.integers(1, 80), K=st.integers(1, 80), R=st.sampled_from([0, 1, 4]),
       groups=st.sampled_from([1, 2]), most=st.sampled_from([3, 9, 40]), seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_matches_float64(route, E, N, K, R, groups, most, seed):
    # up to 40 rows an expert: full blocks and tails of every route (4, 8 and 32 rows)
    rng = np.random.default_rng(seed)
    Np, Kp = padded(N), padded(K)
    counts = rng.integers(0, most + 1, E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    P = int(offsets[-1])
    active = np.flatnonzero(counts)
    slot_of_expert = np.full(E, -1, np.int64)
    slot_of_expert[active] = np.arange(active.size)
    w = rng.standard_normal((E, groups * N, K)).astype(BF16)
    packed = np.zeros((E, groups * Np // 16, Kp // 2, 16), np.uint32)
    for g in range(groups):
        pack_vnni(w[:, g * N:(g + 1) * N].view(np.uint16), packed, g * Np // 16, 0)
    a = np.zeros((P + ROW_SLACK, Kp), np.uint16)
    a[:P, :K] = rng.standard_normal((P, K)).astype(BF16).view(np.uint16)
    lora_l = rng.standard_normal((P + 2, groups * R)).astype(np.float32)
    lora_r = np.zeros((max(active.size, 1), R, groups * Np), np.float32)
    for g in range(groups):
        lora_r[:, :, g * Np:g * Np + N] = rng.standard_normal((max(active.size, 1), R, N))
    scale = np.float32(0.75)
    out32 = np.full((P + 2, groups * Np), np.nan, np.float32)
    out16 = np.zeros((P + 2, groups * Np), np.uint16)
    tasks = make_tasks(offsets, slot_of_expert, groups * Np // TILE_N)
    grouped_gemm(isa.Route(route, ""), a.view(np.uint32), packed, offsets, slot_of_expert, tasks, lora_l, lora_r, Np,
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


def test_padding_constants():
    assert PAD % TILE_N == 0 and TILE_N % 16 == 0
    assert padded(1) == PAD and padded(PAD) == PAD and padded(PAD + 1) == 2 * PAD


@pytest.mark.parametrize("route", RUNNABLE)
def test_packed_matrix_matmul(route):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 70)).astype(BF16)
    w = rng.standard_normal((50, 70)).astype(BF16)
    out = PackedMatrix(w.view(np.uint16)).matmul(isa.Route(route, ""), a.view(np.uint16))
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    assert out.shape == (37, 50)
    assert_fp32_sums(out, a64 @ w64.T, np.abs(a64) @ np.abs(w64).T, 70)
