"""CPU features, the kernel route, the ``Route`` value kernels dispatch on, and the x86
instructions the fast routes reach through LLVM intrinsics.

A route names the micro-kernel family that runs every GEMM:

=========== ================================================ ======================
route       inner product                                    needs
=========== ================================================ ======================
amx         ``tdpbf16ps`` on 16x16 fp32 tiles (K = 32)       amx-bf16, amx-tile
avx512_bf16 ``vdpbf16ps`` on VNNI pairs                      avx512bf16
avx512      fp32 FMA after bf16 -> fp32 widening             avx512f, avx512bw
generic     the same portable vector IR, any CPU Numba targets (none)
=========== ================================================ ======================

``NBMOE_ISA`` (or ``MoELayer(route=...)``) overrides the choice; naming a route the CPU
lacks is a ``RuntimeError`` that says what is missing, never a crash.

A ``Route`` is an identity, apart from the permission to run it. Kernels take it as
their first argument; Numba types it as ``RouteType(name)``, so each route compiles (and
caches) its own specialisation, and any route can be named, typed and compiled on any
host (tests compile the routes a host lacks for another CPU in a subprocess and read the
assembly). Running is gated: every launcher calls ``route.require()`` first, which
checks the CPU features and, for ``amx``, asks Linux for tile state - the only place that
asks. ``NBMOE_DENY_AMX=1`` makes that request fail as a kernel without AMX support would:
it runs a whole test suite on an AMX host as on one without.

Intrinsics (llvmlite has no ``bfloat`` or ``x86_amx`` type: ``_Named`` prints one):

- ``vdpbf16(acc, a, b)``: ``llvm.x86.avx512bf16.dpbf16ps.512``, lane j:
  ``acc[j] + a.lo[j] b.lo[j] + a.hi[j] b.hi[j]`` on bf16 pairs.
- ``vdequant_bf16``: ``simd.vdequant`` with both roundings in one
  ``vcvtne2ps2bf16`` (``llvm.x86.avx512bf16.cvtne2ps2bf16.512``): 1 instruction where
  the portable integer rounding takes 10; the same round-to-nearest-even bits. Nibble
  levels of int4_k2 (one zero point) come from ``vpermps`` table lookups
  (``llvm.x86.avx512.permvar.sf.512``): 3 instructions fewer a decoded vector. Zen 5, 2
  threads, 128 experts x 1 row, W [2048, 768], group 32, 3 alternated rounds: 4.08-4.45
  -> 3.71-4.17 ms.
- ``vturn4_bf16``: the backward's 16 x 16 block of 4-bit codes turned to pairs along N
  and decoded in one step: two byte gathers (``vpermt2b`` where the CPU has VBMI) put
  each output's two rows side by side, and ``vpermw`` (``llvm.x86.avx512.permvar.hi.512``)
  looks the nibbles up in a table of that row pair's 32 bf16 levels, built by two
  multiplies and one ``vcvtne2ps2bf16``: no decoded words are turned. Zen 4, one thread,
  codes in L1, a block: int4_k2 20.2 -> 10.6 ns, int4_awq 23.5 -> 16.5 (bf16 8.1).
- AMX tiles travel through Numba as ``<256 x i32>`` vectors (a 1 KiB tile), cast to
  ``x86_amx`` around each ``llvm.x86.*.internal`` intrinsic, as clang's ``__tile1024i``
  does; LLVM's AMX passes keep them in tile registers and emit ``ldtilecfg``. Every tile
  here is 16 rows x 64 bytes. Linux grants a process AMX state only on request:
  ``enable_amx`` asks once (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``).
"""

import ctypes
import functools
import os
import platform

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

from ..config import JIT_PARALLEL
from .simd import (LLVM_F32X16, LLVM_I32X16, _I16X32, _I32, _LEVELS, _const_i32x16, _splat, dequant_lanes, f32x16,
                   is_code_pairs, lane_ptr, u32x16)

ROUTES = ("amx", "avx512_bf16", "avx512", "generic")

# the LLVM feature names each route needs
_NEEDS = {
    "amx": ("amx-bf16", "amx-tile", "avx512bf16"),
    "avx512_bf16": ("avx512bf16", "avx512f", "avx512bw"),
    "avx512": ("avx512f", "avx512bw"),
    "generic": (),
}
BF16_ROUTES = tuple(r for r in ROUTES if "avx512bf16" in _NEEDS[r])    # those with vdpbf16ps, vcvtne2ps2bf16
REPORTED_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512bf16", "amx-tile", "amx-bf16")


class Route:
    """A kernel route, passed to every kernel launcher; see the module docstring.

    Constructing one needs nothing of the host; ``require`` is the gate to running it.
    """

    __slots__ = ("name", "reason")

    def __init__(self, name, reason):
        if name not in ROUTES:
            raise RuntimeError(f"route {name!r}: expected one of {ROUTES}")
        self.name = name
        self.reason = reason

    def __repr__(self):
        return f"Route({self.name!r})"

    def require(self):
        """Raise ``RuntimeError`` unless this host can run the route now. For ``amx`` this
        asks Linux for tile state (once per process): without it the first tile
        instruction is SIGILL."""
        missing = _missing(self.name, host_features())
        if missing:
            raise RuntimeError(f"route {self.name!r}: this CPU lacks {', '.join(missing)}; "
                               f"routes it can run: {runnable()}")
        if self.name == "amx":
            _require_amx_state()


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


@functools.cache
def _read_host_features():
    flags = llvm.get_host_cpu_features()
    return {name: bool(flags.get(name, False)) for name in REPORTED_FEATURES}


def host_features():
    """``{llvm_feature_name: bool}`` for the features that decide a route (read once)."""
    return dict(_read_host_features())


def host_cpu_name():
    return llvm.get_host_cpu_name()


def _missing(name, features):
    return [f for f in _NEEDS[name] if not features.get(f, False)]


def choose_route(requested=None, features=None):
    """The route to run: ``requested`` (or ``$NBMOE_ISA``), else the best the CPU supports.

    Raises ``RuntimeError`` when the requested route is unknown or needs CPU features
    (or, for AMX, kernel permission) the host lacks.
    """
    features = host_features() if features is None else features
    label = "route" if requested else "NBMOE_ISA"
    requested = requested or os.environ.get("NBMOE_ISA")
    if requested:
        if requested not in ROUTES:
            raise RuntimeError(f"{label}={requested!r}: expected one of {ROUTES}")
        missing = _missing(requested, features)
        if missing:
            raise RuntimeError(f"{label}={requested!r}: this CPU lacks {', '.join(missing)}; "
                               f"routes it can run: {runnable(features)}")
        if requested == "amx":
            _require_amx_state()
        return Route(requested, f"requested by {label}")
    return Route(runnable(features)[0], "best route this CPU supports")


def runnable(features=None):
    """The routes this host can run, best first."""
    features = host_features() if features is None else features
    return [r for r in ROUTES if not _missing(r, features) and (r != "amx" or enable_amx())]


@njit(**JIT_PARALLEL)
def _touch_threads(out):
    for i in prange(out.shape[0]):
        out[i] = i


def threading_layer():
    """(name, threads) of Numba's parallel backend; starts it if no kernel has yet."""
    _touch_threads(np.zeros(numba.get_num_threads(), np.int64))
    return numba.threading_layer(), numba.get_num_threads()


_AMX_REFUSED = [None]


def enable_amx():
    """Ask Linux once for AMX tile state for this process; True if granted (or not needed:
    another x86-64 OS). ``NBMOE_DENY_AMX=1`` refuses without asking."""
    if _AMX_REFUSED[0] is None:
        _AMX_REFUSED[0] = ""
        if os.environ.get("NBMOE_DENY_AMX", "") not in ("", "0"):
            _AMX_REFUSED[0] = "denied by NBMOE_DENY_AMX"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            _AMX_REFUSED[0] = f"AMX is x86-64 only, this is {platform.machine()}"
        elif platform.system() == "Linux":
            arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(arch_prctl, req_xcomp_perm, xtiledata) != 0:
                _AMX_REFUSED[0] = f"errno {ctypes.get_errno()}"
    return _AMX_REFUSED[0] == ""


def _require_amx_state():
    if not enable_amx():
        raise RuntimeError(f"route 'amx': the kernel refused AMX tile state "
                           f"(arch_prctl ARCH_REQ_XCOMP_PERM): {_AMX_REFUSED[0]}")


class _Named(ir.Type):
    """An LLVM type llvmlite cannot spell (``bfloat``, ``x86_amx``), printed by name."""

    def __init__(self, name):
        self.name = name

    def _to_string(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, _Named) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


_BF16X32 = ir.VectorType(_Named("bfloat"), 32)
_AMX = _Named("x86_amx")
_I16 = ir.IntType(16)
_I64 = ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()
_TILE_VEC = ir.VectorType(ir.IntType(32), 256)
_ROWS = ir.Constant(_I16, 16)
_BYTES = ir.Constant(_I16, 64)


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@intrinsic
def vdpbf16(typingctx, acc, a, b):
    """``vdpbf16ps``: acc[j] += a.lo[j] * b.lo[j] + a.hi[j] * b.hi[j] (bf16 pairs, fp32 sum)."""
    if not (acc == f32x16 and a == u32x16 and b == u32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = _declare(builder, "llvm.x86.avx512bf16.dpbf16ps.512", LLVM_F32X16, [LLVM_F32X16, _BF16X32, _BF16X32])
        return builder.call(fn, [args[0], builder.bitcast(args[1], _BF16X32), builder.bitcast(args[2], _BF16X32)])
    return f32x16(acc, a, b), codegen


def _vpermps(builder, table, index):
    """Lane j := ``table[index[j] & 15]`` (``vpermps``: the upper index bits are ignored)."""
    fn = _declare(builder, "llvm.x86.avx512.permvar.sf.512", LLVM_F32X16, [LLVM_F32X16, LLVM_I32X16])
    return builder.call(fn, [table, index])


@intrinsic
def vdequant_bf16(typingctx, codes, i, zero, scale):
    """``simd.vdequant`` on CPUs with AVX512_BF16: the same bf16 pairs, both halves rounded
    by one ``vcvtne2ps2bf16`` (its low 16 words from the second operand)."""
    if not is_code_pairs(codes, i, zero, scale):
        return None

    def codegen(context, builder, sig, args):
        first, second = dequant_lanes(context, builder, sig, args, _vpermps)
        return builder.bitcast(_cvtne2ps2bf16(builder, first, second), LLVM_I32X16)
    return u32x16(codes, i, zero, scale), codegen


def _cvtne2ps2bf16(builder, low, high):
    """``vcvtne2ps2bf16``: two ``<16 x float>`` rounded to one ``<32 x i16>`` of bf16 bits,
    ``low``'s in words 0..15 (the instruction's second operand)."""
    fn = _declare(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", _BF16X32, [LLVM_F32X16, LLVM_F32X16])
    return builder.bitcast(builder.call(fn, [high, low]), _I16X32)


def _turn_mask(half):
    """``vturn4_bf16``'s byte gather: byte ``8p + 4kk + 2t + v`` of the result holds byte
    ``16p + 8 half + 4v + 2t + kk`` of the 128 code bytes (``kk``: which of pair p's two
    K columns, ``t``: which row of the output pair, ``v``: which of its two outputs)."""
    return [16 * p + 8 * half + 4 * v + 2 * t + kk
            for p in range(8) for kk in range(2) for t in range(2) for v in range(2)]


_TURN_MASKS = [ir.Constant(ir.VectorType(_I32, 64), _turn_mask(h)) for h in range(2)]
_I8X64 = ir.VectorType(ir.IntType(8), 64)
_NIBBLE = ir.Constant(_I8X64, [15] * 64)
_ODD_ROW = ir.Constant(_I8X64, [16 * ((pos >> 1) & 1) for pos in range(64)])    # index 16 + q: the pair's hi row
_K2_LEVELS = ir.Constant(LLVM_F32X16, [float(c - 8) for c in range(16)])


def _pair_table(builder, context, sig, args, q, zeros):
    """The 32 bf16 words ``vpermw`` looks pair ``q``'s codes up in: entry ``c`` (and ``16 + c``)
    is ``bf16((c - z) * s)`` of row ``2q`` (``2q + 1``) of the block's group: the one
    multiply and rounding ``vdequant_bf16`` applies, so the same bits. ``zeros``: int4_awq's
    16 zero points as float32 (``_zeros_f32``)."""
    scales_ty, scales, at = sig.args[2], args[2], args[4]
    row = builder.add(context.cast(builder, at, sig.args[4], types.intp), ir.Constant(_I64, 2 * q))
    if scales_ty.dtype == types.uint16:           # int4_k2: bf16 scales, the one zero 8
        both = builder.load(lane_ptr(context, builder, scales_ty, scales, types.intp, row, _I32), align=4)
        both = _splat(builder, LLVM_I32X16, both)       # (s[2q] | s[2q+1] << 16) in every lane
        lo = builder.bitcast(builder.shl(both, _const_i32x16(16)), LLVM_F32X16)
        hi = builder.bitcast(builder.and_(both, _const_i32x16(0xFFFF0000)), LLVM_F32X16)
        halves = [builder.fmul(_K2_LEVELS, s) for s in (lo, hi)]
    else:                                      # int4_awq: float32 scales, a zero per row
        halves = []
        for r in range(2):
            s = builder.load(lane_ptr(context, builder, scales_ty, scales, types.intp,
                                      builder.add(row, ir.Constant(_I64, r)), ir.FloatType()))
            z = builder.shuffle_vector(zeros, zeros, ir.Constant(LLVM_I32X16, [2 * q + r] * 16))
            level = builder.fsub(_LEVELS, z)
            halves.append(builder.fmul(level, _splat(builder, LLVM_F32X16, s)))
    return _cvtne2ps2bf16(builder, *halves)


def _zeros_f32(builder, context, sig, args):
    """int4_awq's 16 zero points of the group as one ``<16 x float>``, converted once for
    the 8 tables (a scalar conversion per row took 2.1 ns more a block: Zen 4, one
    thread, codes in L1: 18.4 -> 16.5 ns; held in memory for broadcast operands, 16.9)."""
    zeros = builder.load(lane_ptr(context, builder, sig.args[3], args[3], sig.args[4], args[4],
                                  ir.VectorType(ir.IntType(8), 16)), align=1)
    return builder.uitofp(zeros, LLVM_F32X16)


@intrinsic
def vturn4_bf16(typingctx, codes, i, scales, zeros, at, dst, j):
    """``vtranspose8`` of the 8 vectors ``vdequant_bf16`` decodes from 4-bit codes, in one
    step that turns the codes, not the decoded words: the same bits, 8 ``u32x16`` at
    ``dst.flat[j + 16 q]`` (lane k: the bf16 pair of rows ``2q, 2q + 1`` at column k).

    codes uint8: the 128 bytes at ``codes.flat[i:]`` of one 16-row block's pairs ``p ..
    p + 7`` (the stored nibble order, ``simd.vdequant``), all in one group; scales: that
    group's 16 rows at ``scales.flat[at:]``, bf16 bits (uint16: int4_k2, zero 8) or
    float32 with uint8 ``zeros`` (int4_awq). Two byte gathers put the codes of every
    output's two rows side by side, the nibbles become indices (+16 for the pair's second
    row), and one ``vpermw`` per output looks them up in a 32-word table of that pair's
    bf16 levels (``_pair_table``): about 8 instructions an output where decoding (7) and
    then turning the words (4) took 11, and fewer of them shuffles (2-3 for 7)."""
    if not (isinstance(codes, types.Array) and codes.layout == "C" and codes.dtype == types.uint8
            and isinstance(scales, types.Array) and scales.layout == "C"
            and scales.dtype in (types.uint16, types.float32)
            and isinstance(zeros, types.Array) and zeros.layout == "C" and zeros.dtype == types.uint8
            and isinstance(dst, types.Array) and dst.layout == "C" and dst.dtype == types.uint32
            and all(isinstance(x, types.Integer) for x in (i, at, j))):
        return None

    def codegen(context, builder, sig, args):
        start = context.cast(builder, args[1], sig.args[1], types.intp)
        x = [builder.load(lane_ptr(context, builder, sig.args[0], args[0], types.intp,
                                   builder.add(start, ir.Constant(_I64, 64 * h)), _I8X64), align=16)
             for h in range(2)]
        index = [None] * 8
        for h in range(2):
            z = builder.shuffle_vector(x[0], x[1], _TURN_MASKS[h])
            for nib, bytes_ in enumerate((z, builder.lshr(z, ir.Constant(_I8X64, [4] * 64)))):
                words = builder.bitcast(builder.or_(builder.and_(bytes_, _NIBBLE), _ODD_ROW), _I16X32)
                # vpermw reads an index's low 5 bits: output v of the word's two is byte v
                index[2 * h + 4 * nib] = words
                index[2 * h + 4 * nib + 1] = builder.lshr(words, ir.Constant(_I16X32, [8] * 32))
        fn = _declare(builder, "llvm.x86.avx512.permvar.hi.512", _I16X32, [_I16X32, _I16X32])
        base = context.cast(builder, args[6], sig.args[6], types.intp)
        zeros = _zeros_f32(builder, context, sig, args) if sig.args[2].dtype == types.float32 else None
        for q in range(8):
            out = builder.call(fn, [_pair_table(builder, context, sig, args, q, zeros), index[q]])
            at_q = builder.add(base, ir.Constant(_I64, 16 * q))
            builder.store(out, lane_ptr(context, builder, sig.args[5], args[5], types.intp, at_q, _I16X32), align=4)
        return context.get_dummy_value()
    return types.none(codes, i, scales, zeros, at, dst, j), codegen


class TileType(types.Type):
    """An AMX tile of 16 rows x 64 bytes, carried as ``<256 x i32>``."""

    def __init__(self):
        super().__init__(name="amx_tile")


tile = TileType()


@register_model(TileType)
class _TileModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _TILE_VEC)


def _to_amx(builder, value):
    return builder.call(_declare(builder, "llvm.x86.cast.vector.to.tile.v256i32", _AMX, [_TILE_VEC]), [value])


def _from_amx(builder, value):
    return builder.call(_declare(builder, "llvm.x86.cast.tile.to.vector.v256i32", _TILE_VEC, [_AMX]), [value])


def _byte_ptr(context, builder, sig, args):
    ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.IntType(8))
    return builder.bitcast(ptr, _I8P)


@intrinsic
def tile_zero(typingctx):
    """A zero tile (``tilezero``)."""
    def codegen(context, builder, sig, args):
        return _from_amx(builder, builder.call(_declare(builder, "llvm.x86.tilezero.internal", _AMX, [_I16, _I16]),
                                               [_ROWS, _BYTES]))
    return tile(), codegen


@intrinsic
def tile_load(typingctx, arr, i, stride):
    """16 rows of 64 bytes from ``arr.flat[i:]``, rows ``stride`` bytes apart (``tileloadd``)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(i, types.Integer)
            and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig, args)
        step = context.cast(builder, args[2], sig.args[2], types.int64)
        fn = _declare(builder, "llvm.x86.tileloadd64.internal", _AMX, [_I16, _I16, _I8P, _I64])
        return _from_amx(builder, builder.call(fn, [_ROWS, _BYTES, ptr, step]))
    return tile(arr, i, stride), codegen


@intrinsic
def tile_store(typingctx, arr, i, stride, t):
    """Store a tile's 16 rows of 64 bytes to ``arr.flat[i:]``, ``stride`` bytes apart."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(i, types.Integer)
            and isinstance(stride, types.Integer) and t == tile):
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig, args)
        step = context.cast(builder, args[2], sig.args[2], types.int64)
        fn = _declare(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [_I16, _I16, _I8P, _I64, _AMX])
        builder.call(fn, [_ROWS, _BYTES, ptr, step, _to_amx(builder, args[3])])
        return context.get_dummy_value()
    return types.none(arr, i, stride, t), codegen


@intrinsic
def tile_dpbf16(typingctx, c, a, b):
    """``tdpbf16ps``: c [16 x 16 fp32] += a [16 x 32 bf16] . b [16 pairs x 16 cols, VNNI]."""
    if not (c == a == b == tile):
        return None

    def codegen(context, builder, sig, args):
        fn = _declare(builder, "llvm.x86.tdpbf16ps.internal", _AMX, [_I16, _I16, _I16, _AMX, _AMX, _AMX])
        amx = [_to_amx(builder, v) for v in args]
        return _from_amx(builder, builder.call(fn, [_ROWS, _BYTES, _BYTES] + amx))
    return tile(c, a, b), codegen
