"""Compile grouped_gemm for the given routes on the CPU Numba targets (set NUMBA_CPU_NAME to
target another) without running it; print, as JSON, how often marker instructions occur
in each route's assembly, and the host-independent features of the target."""

import json
import re
import sys

import numba
from numba import types

from nbmoe.config import JIT_PARALLEL
from nbmoe.kernels import gemm
from nbmoe.kernels.isa import RouteType

MARKERS = ("vfmadd", "vdpbf16ps", "tdpbf16ps", "ldtilecfg", "tileloadd", "zmm", "ymm")


def array(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def signature(route):
    return (RouteType(route), array(types.uint32, 2), array(types.uint32, 4), array(types.int64, 1),
            array(types.int64, 1), array(types.int64, 2), array(types.float32, 2),
            array(types.float32, 3), types.int64, types.float32, array(types.float32, 2),
            array(types.uint16, 2))


counts = {}
for route in sys.argv[1:]:
    kernel = numba.njit(**dict(JIT_PARALLEL, cache=False))(gemm.grouped_gemm.py_func)
    sig = signature(route)
    kernel.compile(sig)
    asm = kernel.inspect_asm(sig)
    counts[route] = {m: len(re.findall(m, asm)) for m in MARKERS}
print(json.dumps(counts))
