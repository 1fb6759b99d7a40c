"""Splitting parallel work by cost: one contiguous run of items per thread.

Numba's ``prange`` hands each thread one contiguous, equal-length chunk of its
iteration space. Where items differ in cost (an expert's rows under a skewed router)
that loads one thread with the heavy items. Kernels here instead ``prange`` over runs
cut by ``balanced`` from the items' costs; which thread computes an item never changes
what it computes, so results stay independent of the thread count.
"""

import numpy as np
from numba import njit

from ..config import JIT


@njit(**JIT)
def balanced(cost, n_chunks):
    """bounds [n_chunks + 1]: items ``bounds[c]:bounds[c+1]`` form run ``c``, contiguous,
    each summing to about ``total / n_chunks`` of ``cost`` [n] (int64 >= 0). Item i goes to
    the run its cost midpoint falls in, so no run is off by more than one item's cost."""
    n = cost.shape[0]
    total = max(cost.sum(), 1)
    bounds = np.empty(n_chunks + 1, np.int64)
    bounds[0] = 0
    c = 0
    before = 0
    for i in range(n):
        run = min((2 * before + cost[i]) * n_chunks // (2 * total), n_chunks - 1)
        while c < run:
            c += 1
            bounds[c] = i
        before += cost[i]
    while c < n_chunks:
        c += 1
        bounds[c] = n
    return bounds
