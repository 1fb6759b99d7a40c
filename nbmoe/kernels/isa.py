"""CPU features, the kernel route, and the ``Route`` value kernels dispatch on.

A route names the micro-kernel family that runs every GEMM:

========== ================================================= ===================
route      inner product                                     needs
========== ================================================= ===================
amx        ``tdpbf16ps`` on 16x32 tiles                      amx-bf16, amx-tile
avx512_bf16 ``vdpbf16ps`` on VNNI pairs                      avx512bf16
avx512     fp32 FMA after bf16 -> fp32 widening              avx512f
generic    the same portable vector IR, any CPU Numba targets (none)
========== ================================================= ===================

``NBMOE_ISA`` overrides the choice; naming a route the CPU lacks, or one this
version does not implement, is a ``RuntimeError`` that says which and why.

Kernels take the ``Route`` as their first argument. Numba types it as
``RouteType(name)``, so each route compiles (and caches) its own specialisation
and a route the host lacks is never compiled for it.
"""

import os

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import NativeValue, models, register_model, typeof_impl, unbox

from ..config import JIT_PARALLEL

ROUTES = ("amx", "avx512_bf16", "avx512", "generic")
IMPLEMENTED = ("generic",)

# the LLVM feature names each route needs
_NEEDS = {
    "amx": ("amx-bf16", "amx-tile", "avx512bf16"),
    "avx512_bf16": ("avx512bf16", "avx512f", "avx512bw"),
    "avx512": ("avx512f", "avx512bw"),
    "generic": (),
}
REPORTED_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512bf16", "amx-tile", "amx-bf16")


class Route:
    """A kernel route, passed to every kernel launcher; see the module docstring."""

    __slots__ = ("name", "reason")

    def __init__(self, name, reason):
        self.name = name
        self.reason = reason

    def __repr__(self):
        return f"Route({self.name!r})"


class RouteType(types.Type):
    def __init__(self, name):
        self.route = name
        super().__init__(name=f"Route[{name}]")


register_model(RouteType)(models.OpaqueModel)


@typeof_impl.register(Route)
def _typeof_route(value, context):
    return RouteType(value.name)


@unbox(RouteType)
def _unbox_route(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def host_features():
    """``{llvm_feature_name: bool}`` for the features that decide a route."""
    flags = llvm.get_host_cpu_features()
    return {name: bool(flags.get(name, False)) for name in REPORTED_FEATURES}


def host_cpu_name():
    return llvm.get_host_cpu_name()


def _missing(name, features):
    return [f for f in _NEEDS[name] if not features.get(f, False)]


def choose_route(requested=None, features=None):
    """The route to run: ``requested`` (or ``$NBMOE_ISA``), else the best implemented one.

    Raises ``RuntimeError`` when the requested route is unknown, not implemented in
    this version, or needs CPU features the host lacks.
    """
    features = host_features() if features is None else features
    requested = os.environ.get("NBMOE_ISA") if requested is None else requested
    if requested:
        if requested not in ROUTES:
            raise RuntimeError(f"NBMOE_ISA={requested!r}: expected one of {ROUTES}")
        missing = _missing(requested, features)
        if missing:
            raise RuntimeError(
                f"NBMOE_ISA={requested!r}: this CPU lacks {', '.join(missing)}; "
                f"routes it can run: {[r for r in IMPLEMENTED if not _missing(r, features)]}")
        if requested not in IMPLEMENTED:
            raise RuntimeError(f"NBMOE_ISA={requested!r}: route not implemented in this "
                               f"version; implemented: {IMPLEMENTED}")
        return Route(requested, "requested by NBMOE_ISA")
    for name in ROUTES:
        if name in IMPLEMENTED and not _missing(name, features):
            return Route(name, "best implemented route this CPU supports")
    raise AssertionError("the generic route needs no feature")


@njit(**JIT_PARALLEL)
def _touch_threads(out):
    for i in prange(out.shape[0]):
        out[i] = i


def threading_layer():
    """(name, threads) of Numba's parallel backend; starts it if no kernel has yet."""
    _touch_threads(np.zeros(numba.get_num_threads(), np.int64))
    return numba.threading_layer(), numba.get_num_threads()
