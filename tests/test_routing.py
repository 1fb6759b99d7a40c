"""Routing kernels: counting sort, gather, weighted combine and its gradient."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe.kernels.routing import combine_rows, gather_rows, pair_grads, round_rows, route_pairs
from nbmoe.reference import round_bf16
from helpers import BF16, assert_fp32_sums, rel


def _route(ids, E):
    T, k = ids.shape
    out = dict(slot_of_expert=np.zeros(E, np.int64), offsets=np.zeros(E + 1, np.int64),
               order=np.zeros(T * k, np.int64), rows=np.zeros((T, k), np.int64),
               active=np.zeros(E, np.int64))
    P, S = route_pairs(ids, out["slot_of_expert"], out["offsets"], out["order"], out["rows"],
                       out["active"])
    return P, S, out


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5), st.integers(0, 20), st.integers(0, 2**31 - 1))
def test_route_pairs_is_a_stable_counting_sort(E, k, T, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, E, (T, k))
    P, S, out = _route(ids, E)
    flat = ids.ravel()
    kept = np.flatnonzero(flat >= 0)
    expected_order = kept[np.argsort(flat[kept], kind="stable")]
    assert P == kept.size and np.array_equal(out["order"][:P], expected_order)
    assert np.array_equal(out["offsets"], np.concatenate([[0], np.cumsum(np.bincount(flat[kept], minlength=E))]))
    active = np.unique(flat[kept])
    assert S == active.size and np.array_equal(out["active"][:S], active)
    for r, pair in enumerate(out["order"][:P]):
        assert out["rows"].ravel()[pair] == r and np.searchsorted(out["offsets"], r, "right") - 1 == flat[pair]
    assert np.all(out["rows"][ids < 0] == -1)


def test_gather_rows_pads_with_zeros():
    rng = np.random.default_rng(1)
    x = rng.integers(1, 1 << 15, (5, 20)).astype(np.uint16)
    order = np.array([7, 0, 9, 3])                   # pairs t * k + j with k = 2
    xs = np.full((6, 32), 0xFFFF, np.uint16)
    gather_rows(x, order, 2, 4, xs)
    assert np.array_equal(xs[:4, :20], x[order // 2]) and not np.any(xs[:4, 20:])
    assert np.all(xs[4:] == 0xFFFF)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_combine_and_pair_grads(E, k, H, seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 10))
    ids = rng.integers(-1, E, (T, k))
    P, _, out = _route(ids, E)
    rows = out["rows"]
    Hp = -(-H // 32) * 32
    weights = rng.random((T, k)).astype(np.float32)
    d32 = np.zeros((P, Hp), np.float32)
    d32[:, :H] = rng.standard_normal((P, H))
    y = np.empty((T, H), np.uint16)
    empty16, empty32 = np.zeros((0, 0), np.uint16), np.zeros((0, 0), np.float32)
    combine_rows(rows, weights, d32, y, empty32, False)
    expected, magnitude = np.zeros((T, H)), np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            if rows[t, j] >= 0:
                term = weights[t, j] * d32[rows[t, j], :H].astype(np.float64)
                expected[t] += term
                magnitude[t] += np.abs(term)
    assert rel(y.view(BF16), round_bf16(expected)) < 2e-3
    # the fp32 forms: written, then added to (tensor-parallel parts), then rounded once
    y32 = np.full((T, H), np.nan, np.float32)
    combine_rows(rows, weights, d32, empty16, y32, False)
    assert_fp32_sums(y32, expected, magnitude, k)
    combine_rows(rows, weights, d32, empty16, y32, True)
    assert_fp32_sums(y32, 2 * expected, 2 * magnitude, 2 * k)
    y16 = np.empty((T, H), np.uint16)
    round_rows(y32, y16)
    assert np.array_equal(y16, y32.astype(BF16).view(np.uint16))

    grad_y = rng.standard_normal((T, H)).astype(BF16)
    d16 = np.zeros((P, Hp), np.uint16)
    d16[:, :H] = d32[:, :H].astype(BF16).view(np.uint16)
    G16 = np.full((P, Hp), 0xFFFF, np.uint16)
    grad_w = np.full((T, k), np.nan, np.float32)
    gy16 = np.full((T, Hp + 32), 0xFFFF, np.uint16)
    src, w_row = np.full(P, -1, np.int64), np.full(P, np.nan, np.float32)
    pair_grads(grad_y.view(np.uint16), rows, weights, d16, G16, grad_w, gy16, src, w_row)
    # grad_y copied with its pads zeroed, the row each LoRA product gathers G's from
    assert np.array_equal(gy16[:, :H], grad_y.view(np.uint16)) and not np.any(gy16[:, H:])
    gy = grad_y.astype(np.float64)
    for t in range(T):
        for j in range(k):
            r = rows[t, j]
            if r < 0:
                assert grad_w[t, j] == 0
                continue
            assert src[r] == t and w_row[r] == weights[t, j]
            G = weights[t, j] * grad_y[t].astype(np.float32)                # one fp32 product, rounded once to bf16
            assert np.array_equal(G16[r, :H], G.astype(BF16).view(np.uint16)) and not np.any(G16[r, H:])
            d = d16[r, :H].view(BF16).astype(np.float64)
            assert_fp32_sums(grad_w[t, j], gy[t] @ d, np.abs(gy[t]) @ np.abs(d), H)
