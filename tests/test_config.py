"""Numba flags and the package-wide cache stamp."""

import numba
import numpy as np
from numba import njit, prange

from nbmoe import config
from nbmoe.kernels import gemm, routing


def test_kernels_share_the_package_stamp():
    for kernel in (gemm.pack_pairs, routing.route_pairs):
        locator = kernel._cache._impl.locator
        assert type(locator).__name__.startswith("_Stamped")
        assert locator.get_source_stamp() == config._STAMP


def test_other_code_keeps_numba_defaults(tmp_path):
    @njit(cache=True)
    def elsewhere(x):
        return x + 1

    assert elsewhere(1) == 2
    assert not type(elsewhere._cache._impl.locator).__name__.startswith("_Stamped")


def test_fastmath_never_assumes_finite_values():
    @njit(**dict(config.JIT, cache=False))
    def specials(a):
        return np.isnan(a[0]), np.isinf(a[1])

    # under nnan / ninf (fastmath=True has both) LLVM folds these checks to False
    assert specials(np.array([np.nan, np.inf])) == (True, True)


def test_parallel_kernels_use_every_thread():
    @njit(**dict(config.JIT_PARALLEL, cache=False))
    def thread_ids(n):
        out = np.empty(n, np.int64)
        for i in prange(n):
            out[i] = numba.get_thread_id()
        return out

    assert len(set(thread_ids(1024))) == numba.get_num_threads()
