"""Route choice from CPU features, the NBMOE_ISA override, and route typing for Numba."""

import pytest
from numba import typeof

import nbmoe
from nbmoe.kernels import isa

NONE = {f: False for f in isa.REPORTED_FEATURES}
ALL = {f: True for f in isa.REPORTED_FEATURES}


def test_best_implemented_route_is_chosen(monkeypatch):
    monkeypatch.delenv("NBMOE_ISA", raising=False)
    for features in (NONE, ALL):
        route = isa.choose_route(features=features)
        assert route.name in isa.IMPLEMENTED
    assert isa.choose_route(features=NONE).name == "generic"


@pytest.mark.parametrize("requested, features, message", [
    ("avx9000", ALL, r"NBMOE_ISA='avx9000': expected one of \('amx', 'avx512_bf16', 'avx512', 'generic'\)"),
    ("amx", NONE, r"NBMOE_ISA='amx': this CPU lacks amx-bf16, amx-tile, avx512bf16"),
    ("avx512", dict(NONE, avx512f=True), r"NBMOE_ISA='avx512': this CPU lacks avx512bw"),
])
def test_unavailable_routes_are_clear_errors(requested, features, message):
    with pytest.raises(RuntimeError, match=message):
        isa.choose_route(requested, features)


def test_environment_override(monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", "generic")
    route = isa.choose_route(features=ALL)
    assert route.name == "generic" and route.reason == "requested by NBMOE_ISA"


def test_each_route_is_its_own_numba_type():
    generic = typeof(isa.Route("generic", ""))
    assert generic == typeof(isa.Route("generic", "other reason"))
    assert generic != typeof(isa.Route("amx", ""))


def test_info_reports_features_route_and_threads():
    about = nbmoe.info()
    assert set(about["features"]) == set(isa.REPORTED_FEATURES)
    assert about["route"] in isa.IMPLEMENTED and about["route_reason"]
    assert about["threading_layer"] in ("omp", "tbb", "workqueue") and about["threads"] >= 1
