"""LoRA kernels: factor loads and gradient stores, projections and outer products."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe.kernels.lora import OUTER_COLS, load, outer, project, row_blocks, store
from helpers import BF16, assert_fp32_sums


@pytest.mark.parametrize("R", [3, 16])                # 16: B turned 16 x 16 both ways, K % 16 rows alone
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_load_and_store_mirror(dtype, R):
    rng = np.random.default_rng(0)
    E, K = 5, 20
    active = np.array([4, 1, 0, 0, 0])
    a = rng.standard_normal((E, R, K)).astype(dtype)
    src = a.view(np.uint16) if dtype == BF16 else a
    factors = np.full((E, 2 * R, 32), np.nan, np.float32)           # stale scratch
    load(src, active, 2, factors, R, 0, 32)
    assert np.array_equal(factors[:2, R:, :K], a[[4, 1]].astype(np.float32))
    assert np.all(factors[:2, R:, K:] == 0)                           # the span's pads: zero
    assert np.all(np.isnan(factors[:2, :R])) and np.all(np.isnan(factors[2:]))   # nothing else
    out = np.zeros((E, R, K), np.float32)
    store(factors, active, 2, R, 0, np.float32(2), False, out)
    assert np.array_equal(out[[4, 1]], 2 * a[[4, 1]].astype(np.float32)) and not np.any(out[[0, 2, 3]])
    store(factors, active, 2, R, 0, np.float32(1), True, out)
    assert np.array_equal(out[[4, 1]], 3 * a[[4, 1]].astype(np.float32)) and not np.any(out[[0, 2, 3]])

    b = rng.standard_normal((E, K, R)).astype(dtype)             # B [E, N, r] loads as B^T
    src = b.view(np.uint16) if dtype == BF16 else b
    factors = np.full((E, R, 64), np.nan, np.float32)
    load(src.transpose(0, 2, 1), active, 2, factors, 0, 32, 32)
    assert np.array_equal(factors[:2, :, 32:32 + K], b[[4, 1]].astype(np.float32).transpose(0, 2, 1))
    assert np.all(factors[:2, :, 32 + K:] == 0) and np.all(np.isnan(factors[:2, :, :32]))
    out = np.ones((E, K, R), np.float32)
    store(factors, active, 2, 0, 32, np.float32(2), True, out.transpose(0, 2, 1))
    assert np.array_equal(out[[4, 1]], 1 + 2 * b[[4, 1]].astype(np.float32)) and np.all(out[[0, 2, 3]] == 1)
    store(factors, active, 2, 0, 32, np.float32(2), False, out.transpose(0, 2, 1))
    assert np.array_equal(out[[4, 1]], 2 * b[[4, 1]].astype(np.float32)) and np.all(out[[0, 2, 3]] == 1)


@pytest.mark.parametrize("R", [16, 32])
def test_load_turns_contiguous_b_in_blocks(R):
    """B^T of float32 B with contiguous ranks takes the 16 x 16 register-turn path; a TP
    slice (a view along N) and a K that is not a multiple of 16 included."""
    rng = np.random.default_rng(1)
    E, N = 5, 60
    b = rng.standard_normal((E, N, R)).astype(np.float32)
    active = np.array([4, 1, 0, 0, 0])
    for view in (b, b[:, 7:44]):
        K = view.shape[1]
        factors = np.full((E, R + 2, 96), np.nan, np.float32)
        load(view.transpose(0, 2, 1), active, 2, factors, 1, 16, 64)
        assert np.array_equal(factors[:2, 1:R + 1, 16:16 + K], view[[4, 1]].transpose(0, 2, 1))
        assert np.all(factors[:2, 1:R + 1, 16 + K:80] == 0)
        assert np.all(np.isnan(factors[:2, 1:R + 1, :16])) and np.all(np.isnan(factors[:2, 1:R + 1, 80:]))
        assert np.all(np.isnan(factors[:2, 0]))
        assert np.all(np.isnan(factors[:2, R + 1])) and np.all(np.isnan(factors[2:]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 2]), st.integers(1, 10), st.sampled_from([np.float32, BF16]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_project_and_outer(S, groups, R, m_dtype, gathered, seed):
    """Both products over m's own rows, or (``gathered``) over rows ``src`` of another m,
    scaled by ``w_row`` in ``project`` (G = w grad_y read from grad_y)."""
    rng = np.random.default_rng(seed)
    group = OUTER_COLS * int(rng.integers(1, 3))
    W = groups * group
    counts = rng.integers(1, 6, S)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    active = np.arange(S)
    P = int(offsets[-1])
    slot_of_row = np.repeat(np.arange(S), counts)
    m = rng.standard_normal((P + 3 if gathered else P, W)).astype(m_dtype)
    m_arg = m.view(np.uint16) if m_dtype == BF16 else m
    src = rng.integers(0, m.shape[0], P) if gathered else np.zeros(0, np.int64)
    w_row = (rng.random(P) + 0.5).astype(np.float32) if gathered else np.zeros(0, np.float32)
    m64 = m.astype(np.float64)[src] if gathered else m.astype(np.float64)       # M, as outer reads it
    w64 = w_row.astype(np.float64) if gathered else np.ones(P)
    f = rng.standard_normal((S, R, W)).astype(np.float32)
    items = row_blocks(offsets, active, S)
    # one buffer indexed by slot, and the same ranks split over two arrays (gate_a | up_a
    # read in place) whose first axis is another order of the experts
    where = rng.permutation(S)
    split = int(rng.integers(1, R + 1))
    f_lo, f_hi = np.empty_like(f[:, :split]), np.empty_like(f[:, split:])
    f_lo[where], f_hi[where] = f[:, :split], f[:, split:]
    for index, fs in ((np.arange(S), (f,)), (where, (f_lo, f_hi))):
        out = np.zeros((P, groups * R), np.float32)
        project(m_arg, offsets, items, index, fs, group, out, src, w_row)
        for r in range(P):
            for g in range(groups):
                cols = slice(g * group, (g + 1) * group)
                f64 = f[slot_of_row[r], :, cols].astype(np.float64)
                assert_fp32_sums(out[r, g * R:(g + 1) * R], w64[r] * f64 @ m64[r, cols],
                                 w64[r] * np.abs(f64) @ np.abs(m64[r, cols]), group + gathered)   # + the scaling

    # outer into one buffer indexed by slot; and into the ranks split over two arrays in
    # another order of the experts (the A gradients in place), scaled and added to
    v = rng.standard_normal((P, groups * R)).astype(np.float32)
    acc = np.zeros((S, R, W), np.float32)
    outer(v, m_arg, offsets, active, S, group, (acc, acc), active, np.float32(1), False, 3, src)   # 3 runs: any
    before = rng.standard_normal((S, R, W)).astype(np.float32)
    g_lo, g_hi = np.empty_like(f_lo), np.empty_like(f_hi)
    g_lo[where], g_hi[where] = before[:, :split], before[:, split:]
    outer(v, m_arg, offsets, active, S, group, (g_lo, g_hi), where, np.float32(0.5), True, 3, src)
    added = np.concatenate([g_lo[where], g_hi[where]], axis=1)
    for s in range(S):
        rows = slice(offsets[s], offsets[s + 1])
        for g in range(groups):
            cols = slice(g * group, (g + 1) * group)
            vs = v[rows, g * R:(g + 1) * R].astype(np.float64)
            want, bound = vs.T @ m64[rows, cols], np.abs(vs).T @ np.abs(m64[rows, cols])
            assert_fp32_sums(acc[s, :, cols], want, bound, counts[s])
            assert_fp32_sums(added[s, :, cols], before[s, :, cols] + 0.5 * want,
                             np.abs(before[s, :, cols]) + 0.5 * bound, counts[s] + 1)
