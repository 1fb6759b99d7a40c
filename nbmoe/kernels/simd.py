"""SIMD values for Numba: 16-lane float32 / uint32 vectors that live in registers.

Numba has no vector type. The intrinsics here give kernels ``f32x16`` and ``u32x16``
values (LLVM ``<16 x float>`` / ``<16 x i32>``) held in SSA registers, so a
micro-kernel can keep a block of accumulators the way C intrinsics code does.
Every operation is portable LLVM IR: one instruction each on AVX-512, split by
LLVM into narrower ones elsewhere.

Conventions:

- bf16 values travel as their uint16 bit patterns (NumPy and Numba have no bf16).
- loads and stores take a C-contiguous array and a flat element offset; the
  caller guarantees the 16 lanes are in bounds (no check in the hot loop).
- a ``u32x16`` of packed weights holds 16 VNNI pairs: lane ``j`` carries the
  bf16 elements ``(w[j, 2p], w[j, 2p+1])`` in its low and high half.
- bf16 rounding is round-to-nearest-even; NaN stays NaN (quiet bit set).
- ``+ - * /`` and unary ``-`` work on ``f32x16`` values (IEEE, lane-wise); ``vexp`` is
  exp within 3 ulp (measured 2.7) over float32's normal range (``exp`` of ``-inf``/underflow is 0, of
  overflow ``inf``, NaN stays NaN).
"""

import operator

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from ..config import JIT

LANES = 16

_F32 = ir.FloatType()
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
LLVM_F32X16 = ir.VectorType(_F32, LANES)
LLVM_I32X16 = ir.VectorType(_I32, LANES)
_I16X16 = ir.VectorType(_I16, LANES)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


class U32x16(types.Type):
    def __init__(self):
        super().__init__(name="u32x16")


f32x16 = F32x16()
u32x16 = U32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, LLVM_F32X16)


@register_model(U32x16)
class _U32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, LLVM_I32X16)


def _c_array(ty, dtype):
    return isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype == dtype


def lane_ptr(context, builder, arr_ty, arr, idx_ty, idx, vec_ty):
    data = context.make_array(arr_ty)(context, builder, arr).data
    idx = context.cast(builder, idx, idx_ty, types.intp)
    return builder.bitcast(builder.gep(data, [idx]), vec_ty.as_pointer())


def _splat(builder, vec_ty, scalar):
    one = builder.insert_element(ir.Constant(vec_ty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
    return builder.shuffle_vector(one, ir.Constant(vec_ty, ir.Undefined), zeros)


def _const_i32x16(value):
    return ir.Constant(LLVM_I32X16, [value] * LANES)


@intrinsic
def vzero(typingctx):
    """A ``f32x16`` of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(LLVM_F32X16, None)
    return f32x16(), codegen


@intrinsic
def vsplat(typingctx, x):
    """Broadcast a float32 scalar to all 16 lanes."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[0], sig.args[0], types.float32)
        return _splat(builder, LLVM_F32X16, value)
    return f32x16(x), codegen


_VECTOR_OF = {types.float32: (f32x16, LLVM_F32X16), types.uint32: (u32x16, LLVM_I32X16)}


@intrinsic
def vsplat_pair(typingctx, x):
    """Broadcast one uint32 (a bf16 pair) to all 16 lanes of a ``u32x16``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, LLVM_I32X16, context.cast(builder, args[0], sig.args[0], types.uint32))
    return u32x16(x), codegen


@intrinsic
def vload(typingctx, arr, i):
    """16 lanes from ``arr.flat[i:i+16]``: a ``f32x16`` from a float32 array, a ``u32x16``
    (16 VNNI bf16 pairs) from a uint32 array."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in _VECTOR_OF
            and isinstance(i, types.Integer)):
        return None
    result, vec_ty = _VECTOR_OF[arr.dtype]

    def codegen(context, builder, sig, args):
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], vec_ty)
        return builder.load(ptr, align=4)
    return result(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """Store 16 float32 to ``arr.flat[i:i+16]``."""
    if not (_c_array(arr, types.float32) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], LLVM_F32X16)
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def vpair_lo(typingctx, w):
    """The even (low-half) bf16 of each pair, widened to float32: ``w << 16``."""
    if w != u32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.shl(args[0], _const_i32x16(16)), LLVM_F32X16)
    return f32x16(w), codegen


@intrinsic
def vpair_hi(typingctx, w):
    """The odd (high-half) bf16 of each pair, widened to float32: ``w & 0xFFFF0000``."""
    if w != u32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.and_(args[0], _const_i32x16(-65536)), LLVM_F32X16)
    return f32x16(w), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane-wise, fused (one rounding)."""
    if not (a == b == c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(LLVM_F32X16, [LLVM_F32X16] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
        return builder.call(fma, args)
    return f32x16(a, b, c), codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes by a fixed pairwise tree (lane i + lane i+8, then +4, +2, +1):
    four dependent adds instead of fifteen, the same order every time: deterministic."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        width = LANES
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
            high = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(_I32, width),
                                                                    list(range(width, 2 * width))))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(_I32, 0))
    return types.float32(v), codegen


@intrinsic
def vload_bf16(typingctx, arr, i):
    """16 bf16 (uint16 bits) from ``arr.flat[i:i+16]``, widened to float32."""
    if not (_c_array(arr, types.uint16) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I16X16)
        wide = builder.zext(builder.load(ptr, align=2), LLVM_I32X16)
        return builder.bitcast(builder.shl(wide, _const_i32x16(16)), LLVM_F32X16)
    return f32x16(arr, i), codegen


@intrinsic
def vstore_bf16(typingctx, arr, i, v):
    """Round 16 float32 to bf16 (nearest-even, NaN kept) and store the uint16 bits."""
    if not (_c_array(arr, types.uint16) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        value = args[2]
        bits = builder.bitcast(value, LLVM_I32X16)
        high = builder.lshr(bits, _const_i32x16(16))
        bias = builder.add(_const_i32x16(0x7FFF), builder.and_(high, _const_i32x16(1)))
        rounded = builder.lshr(builder.add(bits, bias), _const_i32x16(16))
        is_nan = builder.fcmp_unordered("uno", value, value)
        quiet = builder.or_(high, _const_i32x16(0x40))
        out = builder.trunc(builder.select(is_nan, quiet, rounded), _I16X16)
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I16X16)
        builder.store(out, ptr, align=2)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def f32_from_bits(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, _I32)
        elif value.type.width < 32:
            value = builder.zext(value, _I32)
        return builder.bitcast(value, _F32)
    return types.float32(x), codegen


@intrinsic
def bits_from_f32(typingctx, x):
    """The IEEE bit pattern of a float32, as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)
    return types.uint32(x), codegen


@njit(**JIT)
def vfma2(a, b0, b1, c0, c1):
    """One multiplier into two accumulators: ``(a*b0 + c0, a*b1 + c1)``, the step of every
    register tile here (LLVM inlines it; the tuple never leaves registers)."""
    return vfma(a, b0, c0), vfma(a, b1, c1)


@njit(**JIT)
def bf16_to_f32(bits):
    """uint16 bf16 bits -> float32 (exact)."""
    return f32_from_bits(np.uint32(bits) << np.uint32(16))


@njit(**JIT)
def f32_to_bf16(x):
    """float32 -> uint16 bf16 bits, round-to-nearest-even, NaN kept."""
    bits = bits_from_f32(np.float32(x))
    high = bits >> np.uint32(16)
    if x != x:
        return np.uint16(high | np.uint32(0x40))
    return np.uint16((bits + np.uint32(0x7FFF) + (high & np.uint32(1))) >> np.uint32(16))


def vload_f32(arr, i):
    """16 values of a float32 or bf16 (uint16 bits) array as ``f32x16``."""


@overload(vload_f32, jit_options=JIT)
def _vload_f32(arr, i):
    if _c_array(arr, types.uint16):
        return lambda arr, i: vload_bf16(arr, i)
    if _c_array(arr, types.float32):
        return lambda arr, i: vload(arr, i)
    return None


def as_f32(x):
    """A float32 or bf16 (uint16 bits) scalar as float32."""


@overload(as_f32, jit_options=JIT)
def _as_f32(x):
    if x == types.uint16:
        return lambda x: bf16_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


def _binary(op, name):
    @intrinsic
    def lanewise(typingctx, a, b):
        if not (a == b == f32x16):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])
        return f32x16(a, b), codegen

    @overload(op, jit_options=JIT)
    def _op(a, b):
        if a == b == f32x16:
            return lambda a, b: lanewise(a, b)
        return None


for _op, _name in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                   (operator.truediv, "fdiv")):
    _binary(_op, _name)


@intrinsic
def _vneg(typingctx, a):
    if a != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fneg(args[0])
    return f32x16(a), codegen


@overload(operator.neg, jit_options=JIT)
def _neg(a):
    if a == f32x16:
        return lambda a: _vneg(a)
    return None


def _vconst(value):
    return ir.Constant(LLVM_F32X16, [float(np.float32(value))] * LANES)


@intrinsic
def vexp(typingctx, x):
    """exp of 16 float32 lanes: n = round(x / ln2), r = x - n ln2 (two-part ln2),
    exp(r) by its degree-6 Taylor polynomial (|r| <= ln2/2), times 2^n
    built in the exponent bits (two steps, so n down to -149 reaches the subnormals)."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        def call(name, *vals):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(LLVM_F32X16, [LLVM_F32X16] * len(vals)),
                                                name)
            return builder.call(fn, list(vals))
        v = args[0]
        clamped = call("llvm.minnum.v16f32", call("llvm.maxnum.v16f32", v, _vconst(-104.0)), _vconst(89.0))
        n = call("llvm.rint.v16f32", builder.fmul(clamped, _vconst(1.4426950408889634)))
        r = builder.fsub(clamped, builder.fmul(n, _vconst(0.693145751953125)))
        r = builder.fsub(r, builder.fmul(n, _vconst(1.428606765330187e-06)))
        poly = _vconst(1.0 / 720)
        for c in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
            poly = call("llvm.fma.v16f32", poly, r, _vconst(c))
        ni = builder.fptosi(n, LLVM_I32X16)
        half = builder.ashr(ni, _const_i32x16(1))                      # 2^n = 2^(n/2) 2^(n - n/2)
        scale_a = builder.bitcast(builder.shl(builder.add(half, _const_i32x16(127)), _const_i32x16(23)), LLVM_F32X16)
        rest = builder.sub(ni, half)
        scale_b = builder.bitcast(builder.shl(builder.add(rest, _const_i32x16(127)), _const_i32x16(23)), LLVM_F32X16)
        out = builder.fmul(builder.fmul(poly, scale_a), scale_b)
        out = builder.select(builder.fcmp_ordered(">", v, _vconst(88.72283935546875)), _vconst(np.inf), out)
        out = builder.select(builder.fcmp_ordered("<", v, _vconst(-103.97208)), _vconst(0.0), out)
        return builder.select(builder.fcmp_unordered("uno", v, v), v, out)
    return f32x16(x), codegen
