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
- quantized weights decode 16 lanes of code pairs at a time (``vdequant``) into VNNI
  bf16 pairs: ``bf16((q - z) * s)``, the one rounding every kernel applies to them.
- ``vtranspose8`` turns 8 vectors of VNNI pairs along K into 8 vectors of pairs along N
  (the backward operand) in registers: 24 two-source shuffles, no scalar moves.
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
def vsplat_at(typingctx, arr, i):
    """Broadcast ``arr.flat[i]`` of a float32 C array to 16 lanes: one load with broadcast,
    the index used as it is (Numba's ``arr[r, q]`` adds the wrap of negative indices,
    a test and a move per load in an inner loop)."""
    if not (_c_array(arr, types.float32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        return _splat(builder, LLVM_F32X16, builder.load(at, align=4))
    return f32x16(arr, i), codegen


@intrinsic
def vsplat_pair(typingctx, x):
    """Broadcast one uint32 (a bf16 pair, a zero point) to all 16 lanes of a ``u32x16``."""
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
    """Store 16 lanes to ``arr.flat[i:i+16]``: a ``f32x16`` to float32, a ``u32x16`` to uint32."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in _VECTOR_OF
            and isinstance(i, types.Integer) and v == _VECTOR_OF[arr.dtype][0]):
        return None
    vec_ty = _VECTOR_OF[arr.dtype][1]

    def codegen(context, builder, sig, args):
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], vec_ty)
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
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I16X16)
        builder.store(_bf16_bits(builder, args[2]), ptr, align=2)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


def _bf16_bits(builder, value):
    """16 float32 lanes rounded to bf16 bits (nearest-even, NaN kept quiet), as i16 x 16."""
    rounded = _round_to_bf16_bits(builder, value)
    is_nan = builder.fcmp_unordered("uno", value, value)
    high = builder.lshr(builder.bitcast(value, LLVM_I32X16), _const_i32x16(16))
    quiet = builder.or_(high, _const_i32x16(0x40))
    return builder.trunc(builder.select(is_nan, quiet, rounded), _I16X16)


def _put(builder, value, ptr, stream, size, align):
    """Store ``value`` (``size`` bytes) at ``ptr``: with ``stream`` (an i1) a non-temporal
    store, which does not read the lines first (``ptr`` then aligned to ``size``), else an
    ordinary one aligned to ``align``."""
    with builder.if_else(stream) as (past, plain):
        with past:
            store = builder.store(value, ptr, align=size)
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
        with plain:
            builder.store(value, ptr, align=align)


@intrinsic
def vput(typingctx, arr, i, v, stream):
    """Store 16 float32 lanes to ``arr.flat[i:i+16]`` (float32 ``arr``; uint16: rounded to
    bf16 as ``vstore_bf16``); with ``stream``, past the caches: a non-temporal store, which
    does not read the lines first, the address then aligned to the bytes stored (64, 32)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in (types.float32, types.uint16)
            and isinstance(i, types.Integer) and v == f32x16 and isinstance(stream, types.Boolean)):
        return None
    bf16 = arr.dtype == types.uint16

    def codegen(context, builder, sig, args):
        value, vec_ty, size = (_bf16_bits(builder, args[2]), _I16X16, 32) if bf16 else (args[2], LLVM_F32X16, 64)
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], vec_ty)
        _put(builder, value, ptr, args[3], size, size // LANES)
        return context.get_dummy_value()
    return types.none(arr, i, v, stream), codegen


@intrinsic
def vcopy_line(typingctx, src, i, dst, j, stream):
    """Copy one 64-byte line, ``src.flat[i:]`` to ``dst.flat[j:]`` (C arrays of one dtype,
    float32 or uint16: 16 or 32 elements), the bits as they are; with ``stream``, past
    the caches (a non-temporal store, ``dst`` then aligned to 64 bytes)."""
    if not (isinstance(src, types.Array) and src.layout == "C" and src.dtype in (types.float32, types.uint16)
            and isinstance(dst, types.Array) and dst.layout == "C" and dst.dtype == src.dtype
            and isinstance(i, types.Integer) and isinstance(j, types.Integer) and isinstance(stream, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        line = builder.load(lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], LLVM_I32X16),
                            align=src.dtype.bitwidth // 8)
        ptr = lane_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3], LLVM_I32X16)
        _put(builder, line, ptr, args[4], 64, dst.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(src, i, dst, j, stream), codegen


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


@intrinsic
def vload_pairs(typingctx, arr, i):
    """16 bf16 pairs at ``arr.flat[i:i+32]`` (uint16 bits) as a ``u32x16``: lane j holds
    element ``i + 2j`` in its low half and ``i + 2j + 1`` in its high half."""
    if not (_c_array(arr, types.uint16) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], LLVM_I32X16),
                            align=2)
    return u32x16(arr, i), codegen


def _zip(a, b, first):
    """Typing and codegen of lanes ``first .. first + 7`` of ``a`` and ``b`` interleaved."""
    if not (a == b == f32x16):
        return None
    mask = ir.Constant(ir.VectorType(_I32, LANES), [first + c // 2 + (LANES if c % 2 else 0) for c in range(LANES)])

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[1], mask)
    return f32x16(a, b), codegen


@intrinsic
def vzip_lo(typingctx, a, b):
    """Lanes 0..7 of ``a`` and ``b`` interleaved: ``(a0, b0, a1, b1, ..., a7, b7)``."""
    return _zip(a, b, 0)


@intrinsic
def vzip_hi(typingctx, a, b):
    """Lanes 8..15 of ``a`` and ``b`` interleaved: ``(a8, b8, ..., a15, b15)``."""
    return _zip(a, b, LANES // 2)


def vload_strip(arr, i):
    """32 values ``arr.flat[i:i+32]`` of a float32 or bf16 (uint16 bits) array as two
    ``f32x16`` in the strip's own lane order: float32 in order (``i..i+15``, ``i+16..i+31``),
    bf16 as its 16 pairs, the even elements then the odd ones (one load, a shift and a
    mask: no widening shuffles). ``vstrip_order`` turns sums kept in that order back."""


@overload(vload_strip, jit_options=JIT)
def _vload_strip(arr, i):
    if _c_array(arr, types.uint16):
        def pairs(arr, i):
            w = vload_pairs(arr, i)
            return vpair_lo(w), vpair_hi(w)
        return pairs
    if _c_array(arr, types.float32):
        return lambda arr, i: (vload(arr, i), vload(arr, i + LANES))
    return None


def vstrip_order(arr, c0, c1):
    """Two ``f32x16`` in ``vload_strip``'s lane order for ``arr``'s dtype, as 32 values in
    order (the first 16, the last 16)."""


@overload(vstrip_order, jit_options=JIT)
def _vstrip_order(arr, c0, c1):
    if _c_array(arr, types.uint16):
        return lambda arr, c0, c1: (vzip_lo(c0, c1), vzip_hi(c0, c1))
    if _c_array(arr, types.float32):
        return lambda arr, c0, c1: (c0, c1)
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


_I8 = ir.IntType(8)
_I16X32 = ir.VectorType(_I16, 2 * LANES)
_CODE_BITS = {types.uint16: 8, types.uint8: 4}      # code-pair element -> bits per code


def _round_to_bf16_bits(builder, value):
    """Round-to-nearest-even of float32 lanes (NaN: the caller's to handle); the bf16 bits
    in the low 16 of an i32."""
    bits = builder.bitcast(value, LLVM_I32X16)
    bias = builder.add(_const_i32x16(0x7FFF), builder.and_(builder.lshr(bits, _const_i32x16(16)),
                                                           _const_i32x16(1)))
    return builder.lshr(builder.add(bits, bias), _const_i32x16(16))


@intrinsic
def vdequant(typingctx, codes, i, zero, scale):
    """16 lanes of quantized pairs at ``codes.flat[i:i+16]`` as VNNI bf16 pairs:
    lane j = ``bf16((lo_j - zero[j]) * scale[j]) | bf16((hi_j - zero[j]) * scale[j]) << 16``.

    codes uint16: lane j's two int8 codes (lo first; signed), 32 bytes in lane order.
    codes uint8: 16 bytes of nibbles, lane-pair order: byte d holds ``(lo|hi of lane d//2)``
    (``d % 2`` picks lo or hi) in its low nibble and the same of lane ``8 + d//2`` in its
    high nibble (unsigned 0..15) - so the low nibbles are lanes 0..7 in pair order, the
    high nibbles lanes 8..15, and the rounded halves concatenate into pairs with no
    shuffle. zero ``u32x16``, or one integer for all lanes (int4_k2's 8; ignored for int8);
    scale ``f32x16``. ``(q - z) * s`` is one float32 multiply of an exact integer, then one
    rounding.
    """
    if not is_code_pairs(codes, i, zero, scale):
        return None

    def codegen(context, builder, sig, args):
        first, second = dequant_lanes(context, builder, sig, args)
        halves = [builder.trunc(_round_to_bf16_bits(builder, v), _I16X16) for v in (first, second)]
        pairs = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        return builder.bitcast(pairs, LLVM_I32X16)
    return u32x16(codes, i, zero, scale), codegen


def is_code_pairs(codes, i, zero, scale):
    """The argument types ``vdequant`` (and its x86 twin in ``isa``) accept."""
    return (isinstance(codes, types.Array) and codes.layout == "C" and codes.dtype in _CODE_BITS
            and isinstance(i, types.Integer) and (zero == u32x16 or isinstance(zero, types.Integer))
            and scale == f32x16)


_LANES_0_7 = ir.Constant(ir.VectorType(_I32, LANES), [j // 2 for j in range(LANES)])
_LANES_8_15 = ir.Constant(ir.VectorType(_I32, LANES), [8 + j // 2 for j in range(LANES)])


_LEVELS = ir.Constant(LLVM_F32X16, [float(q) for q in range(LANES)])


def dequant_lanes(context, builder, sig, args, lookup=None):
    """``vdequant``'s float32 values before rounding, as two ``<16 x float>``: the pairs of
    lanes 0..7 (lo, hi, lo, hi, ...) and of lanes 8..15 (LLVM IR values).

    ``lookup(builder, table, index)``, where given, picks each lane's entry of a 16-float
    table by the low 4 bits of its index (x86 ``vpermps``): with one zero for all lanes
    (int4_k2) a nibble's level ``q - z`` comes from one lookup of its unmasked byte in a
    table of ``q - z``, in place of a mask, a subtract and a conversion. Zeros per lane
    (int4_awq) keep the integer path: a lookup of ``q``, then the zeros subtracted, made
    the backward's panel decode slower (Zen 5, 2 threads, 128 experts x 1 row, W^T of
    [1536, 2048]: 31-38 ms against 17.4-17.7), the forward no faster."""
    bytes16 = ir.VectorType(_I8, LANES)
    at = context.cast(builder, args[1], sig.args[1], types.intp)
    ptr = lane_ptr(context, builder, sig.args[0], args[0], types.intp, at, bytes16)
    scale = args[3]
    scales = builder.shuffle_vector(scale, scale, _LANES_0_7), builder.shuffle_vector(scale, scale, _LANES_8_15)
    if _CODE_BITS[sig.args[0].dtype] == 8:          # int8: 32 signed bytes in lane order
        upper = lane_ptr(context, builder, sig.args[0], args[0], types.intp,
                         builder.add(at, ir.Constant(at.type, 8)), bytes16)
        return tuple(builder.fmul(builder.sitofp(builder.sext(builder.load(p, align=1), LLVM_I32X16), LLVM_F32X16), s)
                     for p, s in zip((ptr, upper), scales))
    wide = builder.zext(builder.load(ptr, align=1), LLVM_I32X16)    # nibbles: low = lanes 0..7, high = 8..15
    nibbles = wide, builder.lshr(wide, _const_i32x16(4))
    if isinstance(sig.args[2], types.Integer):      # one zero for all lanes
        zero = _splat(builder, LLVM_I32X16, context.cast(builder, args[2], sig.args[2], types.int32))
        zeros = zero, zero
        if lookup is not None:
            table = builder.fsub(_LEVELS, builder.sitofp(zero, LLVM_F32X16))
            return tuple(builder.fmul(lookup(builder, table, n), s) for n, s in zip(nibbles, scales))
    else:
        zeros = builder.shuffle_vector(args[2], args[2], _LANES_0_7), builder.shuffle_vector(args[2], args[2], _LANES_8_15)
    return tuple(builder.fmul(builder.sitofp(builder.sub(builder.and_(n, _const_i32x16(15)), z), LLVM_F32X16), s)
                 for n, z, s in zip(nibbles, zeros, scales))


def _prefetch(locality):
    def typer(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = builder.bitcast(lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I8),
                                  ir.IntType(8).as_pointer())
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
                "llvm.prefetch.p0")
            builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
            return context.get_dummy_value()
        return types.none(arr, i), codegen
    return typer


@intrinsic
def prefetch(typingctx, arr, i):
    """Hint the cache line holding ``arr.flat[i]`` into all cache levels (``llvm.prefetch``,
    read, high locality): strided panel reads the hardware prefetchers do not follow."""
    return _prefetch(3)(typingctx, arr, i)


@intrinsic
def prefetch_l2(typingctx, arr, i):
    """Hint the cache line holding ``arr.flat[i]`` into L2 and beyond, not L1
    (``prefetcht1``): data wanted a whole work item from now, too much for L1."""
    return _prefetch(2)(typingctx, arr, i)


def _transpose16_masks():
    """Shuffle masks of a 16 x 16 transpose of 32-bit lanes in four butterfly stages:
    stage bit b swaps bit b of the row and the column index, so row r takes lane c from
    row ``r ^ b``, lane ``c ^ b`` where those bits differ. Returns [(b, mask for row r,
    mask for row r ^ b)] (r with bit b clear; lanes 16.. name the second operand)."""
    stages = []
    for b in (1, 2, 4, 8):
        low = [c if not c & b else LANES + (c ^ b) for c in range(LANES)]           # row r: bit b clear
        high = [(c ^ b) if not c & b else LANES + c for c in range(LANES)]          # row r ^ b
        stages.append((b, low, high))
    return stages


_STAGES16 = _transpose16_masks()


@intrinsic
def vtranspose16(typingctx, src, i, ld_src, dst, j, ld_dst):
    """dst[j + c * ld_dst + r] = src[i + r * ld_src + c] for r, c < 16, offsets in elements
    from each array's first element (any layout: the caller computes them from its
    strides): a 16 x 16 block of float32 turned in registers (16 loads, 64 two-source
    shuffles, 16 stores)."""
    if not (isinstance(src, types.Array) and src.dtype == types.float32 and _c_array(dst, types.float32)
            and all(isinstance(t, types.Integer) for t in (i, ld_src, j, ld_dst))):
        return None

    def codegen(context, builder, sig, args):
        def at(base, ld, row):
            base = context.cast(builder, args[base], sig.args[base], types.intp)
            ld = context.cast(builder, args[ld], sig.args[ld], types.intp)
            return builder.add(base, builder.mul(ld, ir.Constant(ir.IntType(64), row)))

        rows = [builder.load(lane_ptr(context, builder, sig.args[0], args[0], types.intp, at(1, 2, r),
                                      LLVM_F32X16), align=4) for r in range(LANES)]
        for b, low, high in _STAGES16:
            new = list(rows)
            for r in range(LANES):
                if r & b:
                    continue
                new[r] = builder.shuffle_vector(rows[r], rows[r ^ b], ir.Constant(ir.VectorType(_I32, LANES), low))
                new[r ^ b] = builder.shuffle_vector(rows[r], rows[r ^ b], ir.Constant(ir.VectorType(_I32, LANES), high))
            rows = new
        for c in range(LANES):
            builder.store(rows[c], lane_ptr(context, builder, sig.args[3], args[3], types.intp, at(4, 5, c),
                                            LLVM_F32X16), align=4)
        return context.get_dummy_value()
    return types.none(src, i, ld_src, dst, j, ld_dst), codegen


@intrinsic
def vload_u8(typingctx, arr, i):
    """16 bytes at ``arr.flat[i:i+16]`` (uint8), zero-extended to a ``u32x16``."""
    if not (_c_array(arr, types.uint8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = lane_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.VectorType(_I8, LANES))
        return builder.zext(builder.load(ptr, align=1), LLVM_I32X16)
    return u32x16(arr, i), codegen


def _transpose8_masks():
    """Shuffle masks, on <32 x i16> views, of an 8 x 8 transpose of 64-bit cells in three
    butterfly stages (stage bit b swaps cell c^b of row r^b), then the 2 x 2 transpose of
    16-bit halves inside each cell. Returns [(b, mask for row r, mask for row r^b)] and
    the in-cell mask."""
    def cell(src, c):                      # halfword indices of cell c of source 0 or 1
        return [32 * src + 4 * c + h for h in range(4)]
    stages = []
    for b in (1, 2, 4):
        keep, swap = [], []
        for c in range(8):
            keep += cell(1, c ^ b) if c & b else cell(0, c)
            swap += cell(1, c) if c & b else cell(0, c ^ b)
        stages.append((b, keep, swap))
    inner = [4 * c + o for c in range(8) for o in (0, 2, 1, 3)]
    return stages, inner


_STAGES, _INNER = _transpose8_masks()


@intrinsic
def vtranspose8(typingctx, src, i, dst, j):
    """VNNI pairs along K -> pairs along N, 16 columns x 16 rows at a time.

    Reads 8 ``u32x16`` at ``src.flat[i + 16 p]`` (p = 0..7): lane n holds the bf16 pair
    ``(W[n, 2p], W[n, 2p+1])`` of 16 rows n. Writes 8 ``u32x16`` at ``dst.flat[j + 16 q]``
    (q = 0..7): lane k holds ``(W[2q, k], W[2q+1, k])`` for the 16 columns k = 0..15.
    (Pair p's cell for rows 2q, 2q+1 is 4 halfwords; the 8 x 8 matrix of such cells is
    transposed and each cell's 2 x 2 halves swapped.)
    """
    if not (_c_array(src, types.uint32) and _c_array(dst, types.uint32)
            and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        rows = []
        for p in range(8):
            at = builder.add(context.cast(builder, args[1], sig.args[1], types.intp),
                             ir.Constant(ir.IntType(64), 16 * p))
            ptr = lane_ptr(context, builder, sig.args[0], args[0], types.intp, at, _I16X32)
            rows.append(builder.load(ptr, align=4))
        for b, keep, swap in _STAGES:
            new = list(rows)
            for r in range(8):
                if r & b:
                    continue
                new[r] = builder.shuffle_vector(rows[r], rows[r ^ b], ir.Constant(ir.VectorType(_I32, 32), keep))
                new[r ^ b] = builder.shuffle_vector(rows[r], rows[r ^ b], ir.Constant(ir.VectorType(_I32, 32), swap))
            rows = new
        inner = ir.Constant(ir.VectorType(_I32, 32), _INNER)
        for q in range(8):
            out = builder.shuffle_vector(rows[q], rows[q], inner)
            at = builder.add(context.cast(builder, args[3], sig.args[3], types.intp),
                             ir.Constant(ir.IntType(64), 16 * q))
            builder.store(out, lane_ptr(context, builder, sig.args[2], args[2], types.intp, at, _I16X32), align=4)
        return context.get_dummy_value()
    return types.none(src, i, dst, j), codegen
