"""Compile the grouped GEMM for the given routes and weight formats on the CPU Numba targets
(set NUMBA_CPU_NAME to target another) without running it; print, as JSON keyed
"route/format", how often marker instructions occur in the assembly."""

import json
import re
import sys

import numba
from numba import types

from nbmoe.config import JIT_PARALLEL
from nbmoe.kernels import gemm
from nbmoe.kernels.isa import RouteType

MARKERS = ("vfmadd", "vdpbf16ps", "tdpbf16ps", "ldtilecfg", "tileloadd", "zmm", "ymm", "vcvtdq2ps", "vpermw")
# codes, scales, zeros dtypes of each stored format (nbmoe/kernels/gemm.py)
FORMATS = {"bf16": (types.uint32, types.float32, types.uint8), "int8": (types.uint16, types.float32, types.uint8),
           "int4_awq": (types.uint8, types.float32, types.uint8), "int4_k2": (types.uint8, types.uint16, types.uint8)}


def array(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def signature(route, fmt):
    codes, scales, zeros = FORMATS[fmt]
    # _grouped_gemm(route, a, codes, flat, scales, zeros, group_pairs, transposed, offsets, slot_of_expert,
    #               tasks, bounds, lora_l, ups, turned, group_n, scale, (out32, out16, stream32, stream16,
    #               hold), scratch)
    return (RouteType(route), array(types.uint32, 2), array(codes, 4), array(codes, 1), array(scales, 4),
            array(zeros, 4), types.int64, types.boolean, array(types.int64, 1), array(types.int64, 1),
            array(types.int64, 2), array(types.int64, 1), array(types.float32, 2),
            types.UniTuple(array(types.float32, 3), 2), types.boolean, types.int64, types.float32,
            types.Tuple((array(types.float32, 2), array(types.uint16, 2), types.boolean, types.boolean, types.boolean)),
            array(types.uint32, 2))


counts = {}
for spec in sys.argv[1:]:
    route, _, fmt = spec.partition("/")
    kernel = numba.njit(**dict(JIT_PARALLEL, cache=False))(gemm._grouped_gemm.py_func)
    sig = signature(route, fmt or "bf16")
    kernel.compile(sig)
    asm = kernel.inspect_asm(sig)
    counts[spec] = {m: len(re.findall(m, asm)) for m in MARKERS}
print(json.dumps(counts))
