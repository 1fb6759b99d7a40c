"""Route choice from CPU features, the NBMOE_ISA override, and route typing for Numba."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from numba import typeof

import nbmoe
from nbmoe.kernels import isa

SCRIPTS = pathlib.Path(__file__).parent / "scripts"
NONE = {f: False for f in isa.REPORTED_FEATURES}
ALL = {f: True for f in isa.REPORTED_FEATURES}


def test_best_implemented_route_is_chosen(monkeypatch):
    monkeypatch.delenv("NBMOE_ISA", raising=False)
    assert isa.choose_route(features=NONE).name == "generic"
    assert isa.choose_route(features=dict(NONE, avx512f=True, avx512bw=True)).name == "avx512"
    assert isa.choose_route(features=ALL).name == isa.runnable(ALL)[0]


@pytest.mark.parametrize("requested, features, message", [
    ("avx9000", ALL, r"route='avx9000': expected one of \('amx', 'avx512_bf16', 'avx512', 'generic'\)"),
    ("amx", NONE, r"route='amx': this CPU lacks amx-bf16, amx-tile, avx512bf16"),
    ("avx512", dict(NONE, avx512f=True), r"route='avx512': this CPU lacks avx512bw"),
])
def test_unavailable_routes_are_clear_errors(requested, features, message):
    with pytest.raises(RuntimeError, match=message):
        isa.choose_route(requested, features)


def test_environment_override(monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", "generic")
    route = isa.choose_route(features=ALL)
    assert route.name == "generic" and route.reason == "requested by NBMOE_ISA"
    assert isa.choose_route("avx512", ALL).reason == "requested by route"


def test_amx_route_needs_kernel_permission(monkeypatch):
    monkeypatch.setattr(isa, "_AMX_REFUSED", ["errno 22"])
    with pytest.raises(RuntimeError, match=r"route 'amx': the kernel refused AMX tile state .*errno 22"):
        isa.Route("amx", "")
    assert isa.choose_route(features=ALL).name == "avx512_bf16"      # the next best, no crash
    assert "amx" not in isa.runnable(ALL)


def test_each_route_is_its_own_numba_type():
    generic = typeof(isa.Route("generic", ""))
    assert generic == typeof(isa.Route("generic", "other reason"))
    assert generic != typeof(isa.Route("amx", ""))


def test_info_reports_features_route_and_threads():
    about = nbmoe.info()
    assert set(about["features"]) == set(isa.REPORTED_FEATURES)
    assert about["route"] == isa.runnable()[0] and about["route_reason"]
    assert about["threading_layer"] in ("omp", "tbb", "workqueue") and about["threads"] >= 1


def _route_asm(cpu, *routes):
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")      # "": the CPU's own features
    done = subprocess.run([sys.executable, str(SCRIPTS / "route_asm.py"), *routes], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_route_compiles_to_its_instructions():
    # compiled for a CPU that has them all, whatever this host has; nothing runs
    asm = _route_asm("sapphirerapids", *isa.ROUTES)
    assert asm["generic"]["vfmadd"] and asm["avx512"]["zmm"]
    assert asm["avx512_bf16"]["vdpbf16ps"] >= 16                     # the 8 x 2 register tile
    amx = asm["amx"]
    assert amx["ldtilecfg"] and amx["tileloadd"] and amx["tdpbf16ps"] >= 4


def test_avx512_bf16_compiles_for_zen4():
    assert _route_asm("znver4", "avx512_bf16")["avx512_bf16"]["vdpbf16ps"] >= 16


def test_generic_route_needs_no_avx512():
    generic = _route_asm("x86-64-v3", "generic")["generic"]
    assert generic["vfmadd"] and generic["ymm"] and not generic["zmm"]


def test_generic_route_runs_when_compiled_for_avx2():
    # x86-64-v3 (AVX2 + FMA) is a subset of every host that runs this suite's fast routes
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64-v3", NUMBA_CPU_FEATURES="", NBMOE_ISA="generic")
    done = subprocess.run([sys.executable, "-m", "nbmoe", "run", "-E", "4", "-k", "2", "-H", "64", "-I", "48",
                           "-r", "4", "-T", "16", "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "route generic" in done.stdout and done.stdout.rstrip().endswith("OK")
