"""Numba flags and the package-wide cache stamp."""

from numba import njit

from nbmoe import config
from nbmoe.kernels import gemm, routing


def test_kernels_share_the_package_stamp():
    for kernel in (gemm.grouped_gemm, routing.route_pairs):
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
    assert config.FASTMATH <= {"contract", "reassoc", "arcp", "nsz", "afn"}
    assert config.JIT["cache"] and config.JIT_PARALLEL["parallel"]
