"""Route choice from CPU features, the NBMOE_ISA override, and route typing for Numba."""

import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest
from numba import typeof

import nbmoe
from nbmoe.kernels import isa
from nbmoe.kernels.gemm import PackedMatrix

SCRIPTS = pathlib.Path(__file__).parent / "scripts"
NONE = {f: False for f in isa.REPORTED_FEATURES}
ALL = {f: True for f in isa.REPORTED_FEATURES}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="Numba compiles for the host's architecture, and the x86 "
                                                      "routes' intrinsics lower only on x86-64; this host is "
                                                      f"{platform.machine()} (it runs the generic route)")


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
    monkeypatch.delenv("NBMOE_ISA", raising=False)
    monkeypatch.setattr(isa, "_AMX_REFUSED", ["errno 22"])
    with pytest.raises(RuntimeError, match=r"route 'amx': the kernel refused AMX tile state .*errno 22"):
        isa.choose_route("amx", ALL)
    assert isa.choose_route(features=ALL).name == "avx512_bf16"      # the next best, no crash
    assert "amx" not in isa.runnable(ALL)


def test_a_route_the_host_cannot_run_is_an_error_before_any_kernel(monkeypatch):
    # an AMX host without tile permission (simulated), or a host without AMX at all:
    # the launcher refuses; nothing reaches a tile instruction (which would be SIGILL)
    monkeypatch.setattr(isa, "_AMX_REFUSED", ["errno 22"])
    packed = PackedMatrix(np.zeros((16, 32), np.uint16))
    with pytest.raises(RuntimeError, match=r"route 'amx': (this CPU lacks amx|the kernel refused AMX tile state)"):
        packed.matmul(isa.Route("amx", ""), np.zeros((4, 32), np.uint16))


def test_deny_amx_switch_runs_as_a_host_without_amx():
    # NBMOE_DENY_AMX=1 refuses tile state without asking Linux: on an AMX host the whole
    # suite then runs as on one without (``NBMOE_DENY_AMX=1 python -m pytest``)
    code = ("import json; from nbmoe.kernels import isa; "
            "print(json.dumps([isa.enable_amx(), isa._AMX_REFUSED[0], isa.runnable(dict.fromkeys(isa.REPORTED_FEATURES, True))]))")
    env = dict(os.environ, NBMOE_DENY_AMX="1")
    env.pop("NBMOE_ISA", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    granted, why, routes = json.loads(done.stdout)
    assert not granted and why == "denied by NBMOE_DENY_AMX" and routes[0] == "avx512_bf16"


def test_each_route_is_its_own_numba_type():
    # any route is a value and a Numba type on any host: identity needs no permission
    generic = typeof(isa.Route("generic", ""))
    assert generic == typeof(isa.Route("generic", "other reason"))
    assert generic != typeof(isa.Route("amx", "")) != typeof(isa.Route("avx512_bf16", ""))


def test_info_reports_features_route_and_threads():
    about = nbmoe.info()
    assert set(about["features"]) == set(isa.REPORTED_FEATURES)
    assert about["route"] == isa.choose_route().name and about["route_reason"]
    assert about["routes_runnable"] == isa.runnable()
    assert about["threading_layer"] in ("omp", "tbb", "workqueue") and about["threads"] >= 1


def _route_asm(cpu, *routes):
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")      # "": the CPU's own features
    done = subprocess.run([sys.executable, str(SCRIPTS / "route_asm.py"), *routes], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@needs_x86_64
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_awq", "int4_k2"])
def test_every_route_compiles_to_its_instructions(fmt):
    # compiled for a CPU that has them all, whatever this host has; nothing runs. generic
    # and avx512 once (bf16): every format runs on them here (test_formats), and their
    # cross-compiles took ~25 s of each quantized format's 50 on a 2-core CI host
    routes = isa.ROUTES if fmt == "bf16" else ("avx512_bf16", "amx")
    asm = _route_asm("sapphirerapids", *(f"{route}/{fmt}" for route in routes))
    if fmt == "bf16":
        assert asm[f"generic/{fmt}"]["vfmadd"] and asm[f"avx512/{fmt}"]["zmm"]
    assert asm[f"avx512_bf16/{fmt}"]["vdpbf16ps"] >= 16                # the 8 x 2 register tile
    amx = asm[f"amx/{fmt}"]
    assert amx["ldtilecfg"] and amx["tileloadd"] and amx["tdpbf16ps"] >= 4
    if fmt == "int4_k2":    # its levels come from table lookups (isa.vdequant_bf16), no conversions
        assert asm[f"avx512_bf16/{fmt}"]["vcvtdq2ps"] == 0 and amx["vcvtdq2ps"] == 0
    elif fmt != "bf16":
        assert asm[f"avx512_bf16/{fmt}"]["vcvtdq2ps"] and amx["vcvtdq2ps"]
    if fmt.startswith("int4"):  # the backward turns the codes and looks levels up (isa.vturn4_bf16)
        assert asm[f"avx512_bf16/{fmt}"]["vpermw"] >= 8 and amx["vpermw"] >= 8


@pytest.mark.slow
@needs_x86_64
def test_avx512_bf16_compiles_for_zen4():
    asm = _route_asm("znver4", "avx512_bf16/bf16", "avx512_bf16/int4_k2")
    assert asm["avx512_bf16/bf16"]["vdpbf16ps"] >= 16 and asm["avx512_bf16/int4_k2"]["vdpbf16ps"] >= 16


@pytest.mark.slow
@needs_x86_64
def test_generic_route_needs_no_avx512():
    generic = _route_asm("x86-64-v3", "generic/bf16")["generic/bf16"]
    assert generic["vfmadd"] and generic["ymm"] and not generic["zmm"]


@pytest.mark.slow
@needs_x86_64
def test_generic_route_runs_when_compiled_for_avx2():
    # x86-64-v3 (AVX2 + FMA) is a subset of every host that runs this suite's fast routes
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64-v3", NUMBA_CPU_FEATURES="", NBMOE_ISA="generic")
    done = subprocess.run([sys.executable, "-m", "nbmoe", "run", "-E", "4", "-k", "2", "-H", "64", "-I", "48",
                           "-r", "4", "-T", "16", "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "route generic" in done.stdout and done.stdout.rstrip().endswith("OK")
