"""Quantized base weights, each stored once (docs/design.md §6).

``quantize(w, format, group_size)`` turns expert weights ``w [E, N, K]`` (bfloat16 or
float32) into a ``QuantizedWeight``; ``QuantizedWeight.from_int8 / from_awq / from_k2``
import checkpoint tensors without passing through bf16, ``to_int8 / to_awq / to_k2``
export them bit for bit. Plain NumPy; quantizing and importing work one expert at a
time, so no float32 copy of a whole [E, N, K] weight is made.

Quantizers (float32 arithmetic on each weight's float32 value, ``rint`` rounds half to
even, groups of ``group_size`` run along K, per expert and row):

========  =============  =====================================  ============================  ===========
format    per            scale s (and zero z)                   code q                        dequant
========  =============  =====================================  ============================  ===========
int8      row (e, n)     s = max|w| / 127 (float32),            clip(rint(w / s), -127, 127)  q * s
                         1 where that is 0
int4_awq  (e, n, group)  s = max(max w - min w, 1e-5) / 15      clip(rint(w / s) + z, 0, 15)  (q - z) * s
                         (float32); z = clip(rint(-min w / s),
                         0, 15)
int4_k2   (e, n, group)  s = bfloat16(max|w| / 7.5)             clip(rint(w / s), -8, 7);     q * s
                                                                0 where s == 0
========  =============  =====================================  ============================  ===========

``dequantize()`` gives the dequant column rounded once to bf16 (nearest even), as
float32: the weights forward and backward both use. (int8: "1 where that is 0" covers
the all-zero row and a float32 row so tiny that max|w| / 127 underflows to 0.)

Storage, read-only attributes of a ``QuantizedWeight`` (what the kernels consume):

- int8: ``codes`` int8 [E, N, K]; ``scales`` float32 [E, N]; ``zeros`` None.
- int4_awq: ``codes`` uint8 [E, N, K/2], element k is nibble k % 2 of byte k // 2 (low
  nibble first), the code 0..15; ``scales`` float32 [E, N, K/g]; ``zeros`` uint8
  [E, N, K/g], 0..15. Checkpoint scales are float16 and are widened exactly.
- int4_k2: ``codes`` as int4_awq, holding q + 8; ``scales`` bfloat16 [E, N, K/g];
  ``zeros`` None.

``nbytes`` against the raw bf16 bytes E*N*K*2: int8 0.5 + 2/K; int4_k2 0.25 + 1/g
(0.281 at g = 32); int4_awq 0.25 + 2.5/g (0.289 at g = 64, 0.270 at g = 128, 0.328 at
g = 32). So the §6 bound int4 <= 0.30 holds for int4_k2 at g >= 32 and for int4_awq at
its usual g >= 64. An awq group needs its exact float32 scale and a 4-bit zero, 4.5
bytes at least, so no storage keeping the float32 quantizer fits 0.30 at g = 32;
packing the zeros as nibbles would save 0.008 and moves no group size across the
bound, so they stay one byte each.

Checkpoint layouts (per expert; the ``from_*`` / ``to_*`` tensors are stacked over E):

- K2 / compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [N, K/8], element
  k of a row is nibble k % 8 (bits 4*(k % 8)) of word k // 8, stored as q + 8;
  ``weight_scale`` bfloat16 [N, K/g] (g = 32 in Kimi-K2); ``weight_shape`` [N, K].
- AWQ GEMM (AutoAWQ): ``qweight`` int32 [K, N/8] (transposed), nibble i of word c holds
  column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; ``qzeros`` int32 [K/g, N/8], same order;
  ``scales`` float16 [K/g, N]; W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n].

Checkpoint codes and scales are taken as stored: every bit pattern is accepted.
"""

import numbers

import numpy as np

from .checks import BF16, integer, ndarray

FORMATS = ("int8", "int4_awq", "int4_k2")

_AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of an AWQ word holds column 8c + _AWQ_ORDER[i]
_AWQ_COLUMNS = np.argsort(_AWQ_ORDER)  # column j of a word is nibble _AWQ_COLUMNS[j]
_SHIFTS = np.arange(8, dtype=np.uint32) * 4


def _format(where, value):
    if value not in FORMATS:
        raise ValueError(f"{where}: format: expected one of {', '.join(FORMATS)}, got {value!r}")


def _group_size(where, value, K):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % 2:
        raise ValueError(f"{where}: group_size: expected a positive even int, got {value!r}")
    if K % value:
        raise ValueError(f"{where}: group_size: expected a divisor of K = {K}, got {value}")
    return int(value)


def _tensor(where, name, arr, dtype, labels, expected=None):
    """A checkpoint tensor of ``dtype`` and ``len(labels)`` dims, of shape ``expected`` if given."""
    ndarray(f"{where}: {name}", arr)
    if arr.dtype != dtype or arr.ndim != len(labels) or (expected is not None and arr.shape != expected):
        want = f"[{', '.join(labels)}]" + ("" if expected is None else f" = {list(expected)}")
        raise ValueError(f"{where}: {name}: expected {np.dtype(dtype).name} {want}, "
                         f"got {arr.dtype} {list(arr.shape)}")
    return arr


def _readonly(arr):
    arr.flags.writeable = False
    return arr


def _pack_pairs(q):
    """uint8 [..., K] codes 0..15 -> uint8 [..., K/2], element k in nibble k % 2 of byte k // 2."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack_pairs(c):
    q = np.empty(c.shape[:-1] + (2 * c.shape[-1],), np.uint8)
    q[..., 0::2] = c & 15
    q[..., 1::2] = c >> 4
    return q


def _unpack_words(words):
    """int32 [..., M] -> uint8 [..., M, 8], nibble i = bits 4i of each word."""
    return ((words.view(np.uint32)[..., None] >> _SHIFTS) & 15).astype(np.uint8)


def _pack_words(nibbles):
    """uint8 [..., M, 8] 0..15 -> int32 [..., M], nibble i in bits 4i."""
    return (nibbles.astype(np.uint32) << _SHIFTS).sum(axis=-1, dtype=np.uint32).view(np.int32)


def _int8(w, _):
    """float32 [N, K] -> codes int8 [N, K], scales float32 [N], zeros None."""
    s = np.abs(w).max(axis=1) / np.float32(127)
    s[s == 0] = 1
    return np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), s, None


def _int4_awq(w, g):
    """float32 [N, K] -> codes uint8 [N, K/2], scales float32 [N, K/g], zeros uint8 [N, K/g]."""
    wg = w.reshape(w.shape[0], -1, g)
    lo = wg.min(axis=2)
    with np.errstate(over="ignore"):  # max w - min w beyond float32: refused by quantize
        s = np.maximum(wg.max(axis=2) - lo, np.float32(1e-5)) / np.float32(15)
    z = np.clip(np.rint(-lo / s), 0, 15)
    q = np.clip(np.rint(wg / s[..., None]) + z[..., None], 0, 15).astype(np.uint8)
    return _pack_pairs(q.reshape(w.shape)), s, z.astype(np.uint8)


def _int4_k2(w, g):
    """float32 [N, K] -> codes uint8 [N, K/2] (q + 8), scales bfloat16 [N, K/g], zeros None."""
    wg = w.reshape(w.shape[0], -1, g)
    s = (np.abs(wg).max(axis=2) / np.float32(7.5)).astype(BF16)
    s32 = s.astype(np.float32)[..., None]
    q = np.divide(wg, s32, out=np.zeros_like(wg), where=s32 != 0)
    q = np.clip(np.rint(q), -8, 7) + 8
    return _pack_pairs(q.astype(np.uint8).reshape(w.shape)), s, None


class QuantizedWeight:
    """Expert weights [E, N, K] in one stored quantized copy (module docstring: formats,
    storage, layouts). Built by ``quantize`` or the ``from_*`` constructors; the
    constructor takes arrays already in the storage layout and does not check them.

    ``format`` "int8" | "int4_awq" | "int4_k2"; ``shape`` (E, N, K); ``group_size`` the
    k-group of the int4 formats (None for int8); ``codes``, ``scales``, ``zeros`` the
    stored arrays (read-only); ``nbytes`` the bytes they hold.
    """

    __slots__ = ("_format", "_shape", "_group_size", "_codes", "_scales", "_zeros")

    def __init__(self, format, shape, group_size, codes, scales, zeros=None):
        self._format = format
        self._shape = tuple(shape)
        self._group_size = group_size
        self._codes = _readonly(codes)
        self._scales = _readonly(scales)
        self._zeros = None if zeros is None else _readonly(zeros)

    format = property(lambda self: self._format)
    shape = property(lambda self: self._shape)
    group_size = property(lambda self: self._group_size)
    codes = property(lambda self: self._codes)
    scales = property(lambda self: self._scales)
    zeros = property(lambda self: self._zeros)

    @property
    def nbytes(self):
        """codes + scales + zeros bytes."""
        return self._codes.nbytes + self._scales.nbytes + (0 if self._zeros is None else self._zeros.nbytes)

    def __repr__(self):
        return (f"QuantizedWeight(format={self._format!r}, shape={self._shape}, "
                f"group_size={self._group_size}, nbytes={self.nbytes})")

    def dequantize(self, expert=None):
        """The weights both passes use: the table's dequantized value, rounded once to bf16
        (nearest even), as float32 [E, N, K]; or float32 [N, K] of one expert, ``expert``
        an int in [0, E), to keep memory low."""
        E, N, K = self._shape
        if expert is not None:
            return self._dequantize(integer("dequantize: expert", expert, 0, E - 1))
        out = np.empty((E, N, K), np.float32)
        for e in range(E):
            out[e] = self._dequantize(e)
        return out

    def _dequantize(self, e):
        if self._format == "int8":
            w = self._codes[e].astype(np.float32) * self._scales[e][:, None]
        else:
            N, K = self._shape[1:]
            q = _unpack_pairs(self._codes[e]).astype(np.float32).reshape(N, -1, self._group_size)
            s = self._scales[e].astype(np.float32)[..., None]
            z = np.float32(8) if self._zeros is None else self._zeros[e].astype(np.float32)[..., None]
            w = ((q - z) * s).reshape(N, K)
        return w.astype(BF16).astype(np.float32)

    def slice(self, axis, start, stop):
        """The weights [:, start:stop, :] (``axis`` 1, N) or [:, :, start:stop] (``axis`` 2, K)
        as a QuantizedWeight viewing this one's arrays: the part a tensor-parallel rank holds.
        A K slice of an int4 format starts and stops on its groups (int8 scales are per row)."""
        E, N, K = self._shape
        axis = integer("slice: axis", axis, 1, 2)
        size = (N, K)[axis - 1]
        start = integer("slice: start", start, 0, size - 1)
        stop = integer("slice: stop", stop, start + 1, size)
        if axis == 1:
            cut = slice(start, stop)
            return QuantizedWeight(self._format, (E, stop - start, K), self._group_size, self._codes[:, cut],
                                   self._scales[:, cut], None if self._zeros is None else self._zeros[:, cut])
        if self._format == "int8":
            return QuantizedWeight("int8", (E, N, stop - start), None, self._codes[:, :, start:stop], self._scales)
        g = self._group_size
        if start % g or (stop % g and stop != K):
            raise ValueError(f"slice: K range [{start}, {stop}) of {self._format} must start and stop on "
                             f"its groups of {g}")
        groups = slice(start // g, -(-stop // g))
        return QuantizedWeight(self._format, (E, N, stop - start), g, self._codes[:, :, start // 2:stop // 2],
                               self._scales[:, :, groups], None if self._zeros is None else self._zeros[:, :, groups])

    @classmethod
    def from_int8(cls, q, scale):
        """q int8 [E, N, K], scale float32 [E, N]: W[e, n, k] = q[e, n, k] * scale[e, n]."""
        _tensor("from_int8", "q", q, np.int8, ("E", "N", "K"))
        E, N, K = q.shape
        _tensor("from_int8", "scale", scale, np.float32, ("E", "N"), (E, N))
        return cls("int8", (E, N, K), None, np.array(q, order="C"), np.array(scale, order="C"))

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size):
        """AutoAWQ GEMM tensors stacked over E: qweight int32 [E, K, N/8], qzeros int32
        [E, K/g, N/8], scales float16 [E, K/g, N]; g = ``group_size``."""
        where = "from_awq"
        _tensor(where, "qweight", qweight, np.int32, ("E", "K", "N/8"))
        E, K, N8 = qweight.shape
        g = _group_size(where, group_size, K)
        G = K // g
        _tensor(where, "scales", scales, np.float16, ("E", "K/g", "N"))
        if scales.shape[2] % 8:
            raise ValueError(f"{where}: scales: N = {scales.shape[2]} is not a multiple of 8 "
                             "(AWQ packs 8 columns per int32)")
        _tensor(where, "scales", scales, np.float16, ("E", "K/g", "N"), (E, G, 8 * N8))
        _tensor(where, "qzeros", qzeros, np.int32, ("E", "K/g", "N/8"), (E, G, N8))
        N = 8 * N8
        codes = np.empty((E, N, K // 2), np.uint8)
        zeros = np.empty((E, N, G), np.uint8)
        s = np.empty((E, N, G), np.float32)
        for e in range(E):
            codes[e] = _pack_pairs(_unpack_words(qweight[e])[..., _AWQ_COLUMNS].reshape(K, N).T)
            zeros[e] = _unpack_words(qzeros[e])[..., _AWQ_COLUMNS].reshape(G, N).T
            s[e] = scales[e].T
        return cls("int4_awq", (E, N, K), g, codes, s, zeros)

    @classmethod
    def from_k2(cls, weight_packed, weight_scale, group_size=32, weight_shape=None):
        """compressed-tensors ``pack-quantized`` tensors stacked over E: weight_packed int32
        [E, N, K/8], weight_scale bfloat16 [E, N, K/g]; ``weight_shape`` int32 or int64
        [E, 2], optional, checked to be (N, K) for every expert."""
        where = "from_k2"
        _tensor(where, "weight_packed", weight_packed, np.int32, ("E", "N", "K/8"))
        E, N, K8 = weight_packed.shape
        K = 8 * K8
        if weight_shape is not None:
            ndarray(f"{where}: weight_shape", weight_shape)
            if weight_shape.dtype not in (np.int32, np.int64) or weight_shape.shape != (E, 2):
                raise ValueError(f"{where}: weight_shape: expected int32 or int64 [E, 2] = [{E}, 2], "
                                 f"got {weight_shape.dtype} {list(weight_shape.shape)}")
            bad = np.argwhere((weight_shape != (N, K)).any(axis=1))
            if len(bad):
                e = bad[0, 0]
                n, k = (int(x) for x in weight_shape[e])
                why = f"K = {k} is not a multiple of 8" if k % 8 else "expected (N, K) of weight_packed"
                raise ValueError(f"{where}: weight_shape[{e}] = ({n}, {k}): {why}; weight_packed "
                                 f"{list(weight_packed.shape)} holds (N, K) = ({N}, {K})")
        g = _group_size(where, group_size, K)
        _tensor(where, "weight_scale", weight_scale, BF16, ("E", "N", "K/g"), (E, N, K // g))
        # a little-endian int32 holding nibbles 0..7 is 4 bytes holding nibble pairs (0, 1) .. (6, 7)
        codes = np.array(weight_packed, dtype="<i4", order="C").view(np.uint8).reshape(E, N, K // 2)
        return cls("int4_k2", (E, N, K), g, codes, np.array(weight_scale, order="C"))

    def _export(self, where, format):
        if self._format != format:
            raise ValueError(f"{where}: expected an {format} weight, got {self._format}")

    def to_int8(self):
        """-> (q int8 [E, N, K], scale float32 [E, N]), new arrays."""
        self._export("to_int8", "int8")
        return self._codes.copy(), self._scales.copy()

    def to_awq(self):
        """-> (qweight int32 [E, K, N/8], qzeros int32 [E, K/g, N/8], scales float16
        [E, K/g, N]). N must be a multiple of 8, and every scale exactly a float16: the
        online quantizer's float32 scales generally are not, and are not rounded here."""
        self._export("to_awq", "int4_awq")
        E, N, K = self._shape
        if N % 8:
            raise ValueError(f"to_awq: N = {N} is not a multiple of 8 (AWQ packs 8 columns per int32)")
        s16 = self._scales.astype(np.float16)
        inexact = s16.astype(np.float32).view(np.uint32) != self._scales.view(np.uint32)
        if inexact.any():
            e, n, j = np.argwhere(inexact)[0]
            raise ValueError(f"to_awq: the scale of expert {e}, row {n}, group {j} = "
                             f"{float(self._scales[e, n, j])!r} is not exactly a float16 (AWQ checkpoint "
                             "scales are float16; float32 scales are not rounded on export)")
        G = K // self._group_size
        qweight = np.empty((E, K, N // 8), np.int32)
        for e in range(E):
            q = _unpack_pairs(self._codes[e]).T.reshape(K, N // 8, 8)
            qweight[e] = _pack_words(q[..., _AWQ_ORDER])
        qzeros = _pack_words(self._zeros.transpose(0, 2, 1).reshape(E, G, N // 8, 8)[..., _AWQ_ORDER])
        return qweight, qzeros, np.ascontiguousarray(s16.transpose(0, 2, 1))

    def to_k2(self):
        """-> (weight_packed int32 [E, N, K/8], weight_scale bfloat16 [E, N, K/g]).
        K must be a multiple of 8."""
        self._export("to_k2", "int4_k2")
        K = self._shape[2]
        if K % 8:
            raise ValueError(f"to_k2: K = {K} is not a multiple of 8 (K2 packs 8 codes per int32)")
        return self._codes.view("<i4").astype(np.int32), self._scales.copy()


_QUANTIZERS = {"int8": _int8, "int4_awq": _int4_awq, "int4_k2": _int4_k2}


def quantize(w, format, group_size=None):
    """Quantize expert weights w bfloat16 or float32 [E, N, K] to ``format`` ("int8",
    "int4_awq", "int4_k2") with k-groups of ``group_size`` (a positive even divisor of K;
    ignored for int8, whose group is the row). -> QuantizedWeight. Non-finite weights
    are refused."""
    _format("quantize", format)
    ndarray("quantize: w", w)
    if w.dtype not in (BF16, np.float32):
        raise TypeError(f"quantize: w: expected dtype bfloat16 or float32, got {w.dtype}")
    if w.ndim != 3 or 0 in w.shape:
        raise ValueError(f"quantize: w: expected a non-empty [E, N, K], got shape {list(w.shape)}")
    E, N, K = w.shape
    g = None if format == "int8" else _group_size("quantize", group_size, K)
    if format == "int8":
        codes, scales, zeros = np.empty((E, N, K), np.int8), np.empty((E, N), np.float32), None
    else:
        codes = np.empty((E, N, K // 2), np.uint8)
        scales = np.empty((E, N, K // g), np.float32 if format == "int4_awq" else BF16)
        zeros = np.empty((E, N, K // g), np.uint8) if format == "int4_awq" else None
    for e in range(E):
        w32 = w[e].astype(np.float32)
        if not np.isfinite(w32).all():
            n, k = np.argwhere(~np.isfinite(w32))[0]
            raise ValueError(f"quantize: w[{e}, {n}, {k}] = {w32[n, k]}: expected finite weights")
        codes[e], scales[e], z = _QUANTIZERS[format](w32, g)
        if not np.isfinite(scales[e]).all():  # only int4_awq's can overflow
            n, j = np.argwhere(~np.isfinite(scales[e]))[0]
            raise ValueError(f"quantize: w[{e}, {n}, {j * g}:{(j + 1) * g}]: max w - min w overflows "
                             "float32")
        if zeros is not None:
            zeros[e] = z
    return QuantizedWeight(format, (E, N, K), g, codes, scales, zeros)
