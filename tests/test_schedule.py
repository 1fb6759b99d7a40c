"""Work split by cost: ``schedule.balanced`` and the GEMM's tasks under a skewed router."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe.kernels.gemm import PANEL_COST, _mixed, make_tasks
from nbmoe.kernels.schedule import balanced


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=60), st.integers(1, 9))
def test_balanced_runs_cover_in_order_and_are_even(costs, n_chunks):
    cost = np.array(costs, np.int64)
    bounds = balanced(cost, n_chunks)
    assert bounds.shape == (n_chunks + 1,) and bounds[0] == 0 and bounds[-1] == cost.size
    assert np.all(np.diff(bounds) >= 0)
    sums = np.array([cost[bounds[c]:bounds[c + 1]].sum() for c in range(n_chunks)])
    # each run is within one item's cost of the even share
    assert np.all(np.abs(sums - cost.sum() / n_chunks) <= max(costs, default=0))


def _zipf_offsets(E, pairs, s, seed):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** s
    counts = rng.multinomial(pairs, p / p.sum())[rng.permutation(E)]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), counts


def test_skewed_router_is_split_evenly_across_threads():
    # Zipf(1.2) popularity over 128 experts, T = 1024, k = 8: the busiest expert takes ~1/5
    # of the pairs. Contiguous equal-count chunks of the items busiest first (Numba's own
    # prange split) gave one of 2 threads 1.6x the other's rows; the cost-balanced runs
    # are within one item.
    offsets, counts = _zipf_offsets(128, 8192, 1.2, seed=0)
    slot_of_expert = np.where(counts > 0, np.cumsum(counts > 0) - 1, -1).astype(np.int64)
    n_tiles = 48
    for threads in (2, 3, 16):
        tasks, bounds = make_tasks(offsets, slot_of_expert, n_tiles, threads)
        assert sorted(map(tuple, tasks)) == [(e, t) for e in np.flatnonzero(counts) for t in range(n_tiles)]
        cost = counts[tasks[:, 0]] + PANEL_COST
        runs = np.array([cost[bounds[c]:bounds[c + 1]].sum() for c in range(threads)])
        assert runs.max() - runs.min() <= 2 * cost.max()
        assert runs.max() <= 1.05 * cost.sum() / threads
        if threads <= 3:
            # and each run its share of the experts, so of the weights it streams: 2824 /
            # 3320 items of 2 runs, 1932-2118 of 3 (busiest first: 334 / 5810, 108-5089).
            # At 16 the busiest experts each fill runs alone, whatever the order.
            items = np.diff(bounds)
            assert items.max() <= 1.2 * items.min()
    busiest = np.repeat(np.sort(counts[counts > 0])[::-1], n_tiles) + PANEL_COST
    equal = np.array_split(busiest, 2)
    assert max(c.sum() for c in equal) / min(c.sum() for c in equal) > 1.5      # the old split


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=1, max_size=130))
def test_mixed_order_keeps_rows_and_experts_in_step(rows):
    counts = np.array(rows, np.int64)
    busiest = np.argsort(-counts, kind="mergesort")
    order = _mixed(busiest, counts)
    assert sorted(order) == list(range(counts.size))
    n, total = counts.size, counts.sum()
    # every prefix of j experts: its share of the rows minus j / n lies in (-1/n, max/total)
    gap = np.cumsum(counts[order]) * n - total * np.arange(1, n + 1)
    assert np.all(gap > -total) and np.all(gap < n * counts.max())


def test_experts_without_rows_get_no_items():
    # a slot without rows (a caller's own slots) or rows without a slot: no work item
    offsets = np.array([0, 0, 3, 3, 4, 6], np.int64)          # rows 0, 3, 0, 1, 2
    slot_of_expert = np.array([0, 1, 2, -1, 3], np.int64)
    tasks, bounds = make_tasks(offsets, slot_of_expert, 2, 2)
    assert [tuple(t) for t in tasks] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert bounds[0] == 0 and bounds[-1] == 4
