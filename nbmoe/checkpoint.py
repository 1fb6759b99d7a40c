"""Checkpoint plumbing for ``nbmoe.torch.from_pretrained``, in NumPy (no torch).

- ``Checkpoint(folder)``: a local folder with ``config.json`` and ``model.safetensors``,
  or the shards that ``model.safetensors.index.json`` lists. Tensors are read one at a
  time with plain file reads into fresh NumPy arrays (bf16 as ``ml_dtypes.bfloat16``),
  never memory-mapped: a mapped shard's pages would count in the process's memory for
  as long as it stays open, so a whole shard could sit in RSS while only one tensor of
  it is wanted. Every name, dtype and shape is checked against the file headers
  (``expect``) before any tensor is read.
- ``quantization(config)``: the ``quantization_config`` of ``config.json`` as a
  ``Scheme`` (the nbmoe format its int4 linears load as, and their group), None
  without one, ``ValueError`` for one nbmoe cannot load: compressed-tensors
  ``pack-quantized`` int4 symmetric group ("Kimi-K2") -> ``int4_k2``; AWQ GEMM 4-bit
  with zero points -> ``int4_awq``.
- ``expert_layout`` / ``plan_experts`` / ``load_experts``: the routed experts of one
  experts module, found under its module name ``P`` as per-expert keys
  ``P.{e}.{gate,up,down}_proj.weight`` [N, K] (the hub layout, what transformers v5's
  ``save_pretrained`` writes), fused keys ``P.gate_up_proj`` [E, 2I, H] (gate first) and
  ``P.down_proj`` [E, H, I] (the in-memory layout), per-expert compressed-tensors keys
  ``.weight_packed`` / ``.weight_scale`` / ``.weight_shape``, or per-expert AWQ keys
  ``.qweight`` / ``.qzeros`` / ``.scales``. Quantized experts become ``QuantizedWeight``
  directly (``from_k2`` / ``from_awq``, never through bf16); bf16 ones are gathered
  into one layer's bf16 arrays, then kept (bf16) or quantized online.
- ``plan_linear`` / ``load_linear``: a non-expert tensor; a quantized linear
  (``X.weight_packed`` or ``X.qweight`` where the model has ``X.weight``) is dequantized
  to the bf16 values nbmoe's own kernels would use (``QuantizedWeight.dequantize``).

Checkpoint names are normalised before they are matched with the model's
(``normalize``): Mixtral's hub names (``block_sparse_moe``, experts' ``w1`` / ``w3`` /
``w2``) become the in-memory ones (``mlp``, ``gate_proj`` / ``up_proj`` / ``down_proj``).
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from .checks import BF16
from .quant import QuantizedWeight, quantize

_DTYPES = {"BF16": BF16, "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
           "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
           "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
           "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
           "BOOL": np.dtype(np.bool_)}
FLOATS = (BF16, np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# the per-expert tensors of each stored layout, the first one marking the layout
LAYOUTS = {"bf16": ("weight",), "int4_k2": ("weight_packed", "weight_scale", "weight_shape"),
           "int4_awq": ("qweight", "qzeros", "scales")}
_RENAMES = [(re.compile(r"\.block_sparse_moe\."), ".mlp."),
            (re.compile(r"(\.experts\.\d+)\.w1\."), r"\1.gate_proj."),
            (re.compile(r"(\.experts\.\d+)\.w3\."), r"\1.up_proj."),
            (re.compile(r"(\.experts\.\d+)\.w2\."), r"\1.down_proj.")]


def normalize(name):
    """A checkpoint tensor name as the model names it (Mixtral hub names renamed)."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def _dtype_name(dtype):
    return "bfloat16" if dtype == BF16 else np.dtype(dtype).name


class SafetensorsFile:
    """One ``.safetensors`` file: its header parsed, tensors read on demand."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = f.read(8)
            if len(size) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            n = int.from_bytes(size, "little")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from None
        self._base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {}                  # name -> (dtype code, shape, begin, end)
        for name, e in header.items():
            begin, end = e["data_offsets"]
            self.entries[name] = (e["dtype"], tuple(e["shape"]), begin, end)

    def dtype(self, name):
        """The NumPy dtype of ``name`` (ValueError for one NumPy lacks, e.g. float8)."""
        code = self.entries[name][0]
        if code not in _DTYPES:
            raise ValueError(f"{name} in {self.path}: dtype {code} is not supported by nbmoe's loader "
                             f"(supported: {', '.join(_DTYPES)})")
        return _DTYPES[code]

    def read(self, name):
        """A new array holding tensor ``name``."""
        _, shape, begin, end = self.entries[name]
        out = np.empty(shape, self.dtype(name))
        if out.nbytes != end - begin:
            raise ValueError(f"{name} in {self.path}: {end - begin} bytes stored for "
                             f"{_dtype_name(out.dtype)} {list(shape)} ({out.nbytes} bytes)")
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._base + begin)
            done = 0
            while done < len(buf):
                got = f.readinto(buf[done:])
                if not got:
                    raise ValueError(f"{name} in {self.path}: the file ends inside the tensor")
                done += got
        return out


class Checkpoint:
    """A local checkpoint folder (module docstring). ``config`` is ``config.json`` as a
    dict; names are the normalised ones (``normalize``); ``unread()`` lists the
    checkpoint's own names of tensors nothing read."""

    INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"

    def __init__(self, folder):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a checkpoint folder (no such directory)")
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{folder}: no config.json")
        with open(config) as f:
            self.config = json.load(f)
        index = os.path.join(folder, self.INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: expected a non-empty \"weight_map\"")
        elif os.path.isfile(os.path.join(folder, self.SINGLE)):
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder}: neither {self.SINGLE} nor {self.INDEX}")
        files = sorted(set(weight_map.values())) if weight_map else [self.SINGLE]
        self._files = {}
        for fname in files:
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index}: lists {fname}, which {folder} lacks")
            self._files[fname] = SafetensorsFile(path)
        self._where = {}                   # normalised name -> (file, its own name)
        for fname, sf in self._files.items():
            for own in sf.entries:
                if weight_map is not None and weight_map.get(own, fname) != fname:
                    continue               # the index puts it elsewhere
                name = normalize(own)
                if name in self._where:
                    raise ValueError(f"{folder}: {own} and {self._where[name][1]} both load as {name}")
                self._where[name] = (sf, own)
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if k not in self._files[f].entries]
            if lost:
                raise ValueError(f"{index}: maps {lost[0]} to {weight_map[lost[0]]}, which lacks it")
        self._read = set()

    def __contains__(self, name):
        return name in self._where

    def names(self):
        return list(self._where)

    def where(self, name):
        """"<its own name> in <file>", for messages."""
        sf, own = self._where[name]
        return f"{own} in {sf.path}"

    def shape(self, name):
        sf, own = self._where[name]
        return sf.entries[own][1]

    def position(self, name):
        """A sort key: reading names in this order reads each file front to back."""
        sf, own = self._where[name]
        return sf.path, sf.entries[own][2]

    def expect(self, name, dtypes, shape):
        """Check that ``name`` exists with one of ``dtypes`` and ``shape`` (None: any), from
        the headers alone: ValueError naming it, the expected and the found."""
        if name not in self._where:
            raise ValueError(f"checkpoint lacks {name}")
        sf, own = self._where[name]
        dtype = sf.dtype(own)
        got = sf.entries[own][1]
        if dtype not in dtypes or (shape is not None and got != tuple(shape)):
            want = " or ".join(_dtype_name(d) for d in dtypes) + ("" if shape is None else f" {list(shape)}")
            raise ValueError(f"{self.where(name)}: expected {want}, got {_dtype_name(dtype)} {list(got)}")

    def read(self, name):
        sf, own = self._where[name]
        self._read.add(name)
        return sf.read(own)

    def skip(self, name):
        """Mark ``name`` as consumed without reading it."""
        self._read.add(name)

    def unread(self):
        return sorted(self._where[n][1] for n in self._where if n not in self._read)


@dataclass(frozen=True)
class Scheme:
    """How a quantized checkpoint stores its int4 linears: nbmoe ``format`` and ``group_size``;
    ``method`` names the quantization_config for messages."""

    format: str
    group_size: int
    method: str


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def quantization(config):
    """``config["quantization_config"]`` as a ``Scheme``; None without one (module docstring)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    where = "config.json: quantization_config"
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: expected an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"{where}: quantization_status {status!r}: nbmoe loads compressed-tensors "
                             f"checkpoints whose weights are stored packed (\"compressed\")")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{where}: compressed-tensors without config_groups")
        sizes = set()
        for gname, group in groups.items():
            w = group.get("weights") or {}
            fmt = group.get("format") or qc.get("format")
            why = []
            if fmt != "pack-quantized":
                why.append(f"format {fmt!r} (nbmoe loads \"pack-quantized\")")
            if w.get("num_bits") != 4 or w.get("type", "int") != "int":
                why.append(f"weights {w.get('type', 'int')} {w.get('num_bits')}-bit (nbmoe loads int 4-bit)")
            if w.get("symmetric") is not True:
                why.append("asymmetric weights (nbmoe loads symmetric int4 as int4_k2)")
            if w.get("strategy") != "group" or not _positive_int(w.get("group_size")):
                why.append(f"strategy {w.get('strategy')!r} group_size {w.get('group_size')!r} "
                           "(nbmoe loads \"group\" with an int group_size)")
            if w.get("dynamic"):
                why.append("dynamic weight quantization")
            for act in ("input_activations", "output_activations"):
                if group.get(act):
                    why.append(f"quantized {act} (nbmoe quantizes weights only)")
            if why:
                raise ValueError(f"{where}: config_groups.{gname}: unsupported: {'; '.join(why)}")
            sizes.add(w["group_size"])
        if len(sizes) > 1:
            raise ValueError(f"{where}: config_groups with different group sizes {sorted(sizes)}")
        return Scheme("int4_k2", sizes.pop(), "compressed-tensors pack-quantized")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        why = []
        if qc.get("bits", qc.get("w_bit")) != 4:
            why.append(f"bits {qc.get('bits', qc.get('w_bit'))!r} (nbmoe loads 4)")
        if version != "gemm":
            why.append(f"version {qc.get('version')!r} (nbmoe loads the GEMM layout)")
        if qc.get("zero_point", True) is not True:
            why.append("zero_point false (nbmoe's int4_awq has zero points)")
        g = qc.get("group_size", qc.get("q_group_size"))
        if not _positive_int(g):
            why.append(f"group_size {g!r}")
        if why:
            raise ValueError(f"{where}: unsupported AWQ: {'; '.join(why)}")
        return Scheme("int4_awq", g, "AWQ GEMM")
    raise ValueError(f"{where}: unsupported quant_method {method!r}: nbmoe loads bf16 checkpoints, "
                     "\"compressed-tensors\" (pack-quantized int4 symmetric group, as Kimi-K2) and "
                     "\"awq\" (GEMM, 4-bit)")


def _needs_scheme(ckpt, name, scheme, fmt, what):
    if scheme is None or scheme.format != fmt:
        have = "no quantization_config" if scheme is None else f"a {scheme.method} quantization_config"
        raise ValueError(f"{ckpt.where(name)}: {what} tensors, but config.json has {have}")


def _layout_of(ckpt, base):
    """The stored layout of the linear ``base`` (``base.weight`` in the model), or None."""
    for fmt, suffixes in LAYOUTS.items():
        if f"{base}.{suffixes[0]}" in ckpt:
            return fmt
    return None


def _quantized_specs(fmt, base, N, K, g):
    """[(name, dtypes, shape)] of the tensors of one int4 linear W [N, K]."""
    if fmt == "int4_k2":
        return [(f"{base}.weight_packed", (np.dtype(np.int32),), (N, K // 8)),
                (f"{base}.weight_scale", (BF16,), (N, K // g)),
                (f"{base}.weight_shape", (np.dtype(np.int32), np.dtype(np.int64)), (2,))]
    return [(f"{base}.qweight", (np.dtype(np.int32),), (K, N // 8)),
            (f"{base}.qzeros", (np.dtype(np.int32),), (K // g, N // 8)),
            (f"{base}.scales", (np.dtype(np.float16),), (K // g, N))]


def _check_int4_dims(ckpt, name, fmt, N, K, g):
    packed, along = (K, "K") if fmt == "int4_k2" else (N, "N")
    if packed % 8 or K % g:
        raise ValueError(f"{ckpt.where(name)}: W [{N}, {K}] cannot be stored as {fmt} with group_size {g} "
                         f"({along} a multiple of 8 and K a multiple of the group)")


def plan_linear(ckpt, name, shape, scheme):
    """Check (from the headers) what loads the model tensor ``name`` of ``shape``: itself
    (a float tensor of that shape, or any dtype for a non-float buffer), or, for a 2-D
    ``X.weight``, a quantized linear under ``X``. ValueError naming what is missing/wrong."""
    base = name[:-len(".weight")] if name.endswith(".weight") else None
    fmt = "bf16" if name in ckpt else (_layout_of(ckpt, base) if base and len(shape) == 2 else None)
    if fmt is None:
        raise ValueError(f"checkpoint lacks {name}")
    if fmt == "bf16":
        ckpt.expect(name, FLOATS, shape)
        return fmt
    _needs_scheme(ckpt, f"{base}.{LAYOUTS[fmt][0]}", scheme, fmt, fmt)
    N, K = shape
    _check_int4_dims(ckpt, f"{base}.{LAYOUTS[fmt][0]}", fmt, N, K, scheme.group_size)
    for spec in _quantized_specs(fmt, base, N, K, scheme.group_size):
        ckpt.expect(*spec)
    return fmt


def source_name(ckpt, name, fmt):
    """The checkpoint tensor that marks where the model tensor ``name`` (planned as ``fmt``) is stored."""
    return name if fmt == "bf16" else f"{name[:-len('.weight')]}.{LAYOUTS[fmt][0]}"


def load_linear(ckpt, name, shape, fmt, scheme):
    """The tensor ``plan_linear`` planned, as an array: as stored (float), or a quantized
    linear dequantized to bfloat16 [N, K]."""
    if fmt == "bf16":
        return ckpt.read(name)
    base, g = name[:-len(".weight")], scheme.group_size
    if fmt == "int4_k2":
        packed, scale, wshape = (ckpt.read(f"{base}.{s}") for s in LAYOUTS[fmt])
        qw = QuantizedWeight.from_k2(packed[None], scale[None], g, wshape[None])
    else:
        qweight, qzeros, scales = (ckpt.read(f"{base}.{s}") for s in LAYOUTS[fmt])
        qw = QuantizedWeight.from_awq(qweight[None], qzeros[None], scales[None], g)
    return qw.dequantize(0).astype(BF16)


def expert_layout(ckpt, prefix):
    """How the experts module ``prefix`` is stored: "fused", "bf16" (per-expert .weight),
    "int4_k2" or "int4_awq"; ValueError naming the keys looked for."""
    if f"{prefix}.gate_up_proj" in ckpt or f"{prefix}.down_proj" in ckpt:
        return "fused"
    fmt = _layout_of(ckpt, f"{prefix}.0.gate_proj")
    if fmt is None:
        raise ValueError(f"checkpoint lacks the experts of {prefix}: expected {prefix}.gate_up_proj and "
                         f"{prefix}.down_proj, or per-expert {prefix}.{{e}}.{{gate,up,down}}_proj.weight "
                         f"(or .weight_packed, or .qweight), e.g. {prefix}.0.gate_proj.weight")
    return fmt


def _dims(proj, I, H):
    """(N, K) of one expert's projection."""
    return (H, I) if proj == "down_proj" else (I, H)


def plan_experts(ckpt, prefix, E, I, H, scheme):
    """Check every tensor the experts module ``prefix`` (E experts, [E, 2I, H] / [E, H, I])
    needs, from the headers; returns its layout (``expert_layout``)."""
    layout = expert_layout(ckpt, prefix)
    if layout == "fused":
        ckpt.expect(f"{prefix}.gate_up_proj", FLOATS, (E, 2 * I, H))
        ckpt.expect(f"{prefix}.down_proj", FLOATS, (E, H, I))
        return layout
    if layout != "bf16":
        _needs_scheme(ckpt, f"{prefix}.0.gate_proj.{LAYOUTS[layout][0]}", scheme, layout, f"{layout} expert")
    for e in range(E):
        for proj in PROJECTIONS:
            N, K = _dims(proj, I, H)
            base = f"{prefix}.{e}.{proj}"
            if layout == "bf16":
                ckpt.expect(f"{base}.weight", FLOATS, (N, K))
                continue
            if e == 0:
                _check_int4_dims(ckpt, f"{base}.{LAYOUTS[layout][0]}", layout, N, K, scheme.group_size)
            for spec in _quantized_specs(layout, base, N, K, scheme.group_size):
                ckpt.expect(*spec)
    extra = f"{prefix}.{E}.gate_proj"
    if _layout_of(ckpt, extra):
        raise ValueError(f"{ckpt.where(extra + '.' + LAYOUTS[_layout_of(ckpt, extra)][0])}: "
                         f"an expert beyond the model's {E}")
    return layout


def _as_bf16(a):
    return a if a.dtype == BF16 else a.astype(BF16)


def load_experts(ckpt, prefix, E, I, H, layout, weight_format, group_size, scheme):
    """The experts of ``prefix`` (planned by ``plan_experts``) in their stored format:
    ``("bf16", gate_up bf16 [E, 2I, H], down bf16 [E, H, I])`` when ``weight_format`` is
    bf16 (bf16 layouts only), else ``(format, (gate, up, down))`` of ``QuantizedWeight``:
    read as stored (int4 layouts) or quantized online (bf16 layouts) with ``group_size``.
    Memory beyond the result: quantizing per-expert keys holds one projection of the
    layer in bf16 (a third of the layer), fused keys the stored gate_up_proj (two thirds);
    int4 layouts hold one projection's stacked checkpoint tensors."""
    if layout in ("int4_k2", "int4_awq"):
        g = scheme.group_size
        parts = []
        for proj in PROJECTIONS:
            N, K = _dims(proj, I, H)
            specs = _quantized_specs(layout, f"{prefix}.0.{proj}", N, K, g)
            stacks = [np.empty((E,) + shape, dtypes[-1 if name.endswith("weight_shape") else 0])
                      for name, dtypes, shape in specs]
            names = [(e, i, f"{prefix}.{e}.{proj}.{LAYOUTS[layout][i]}") for e in range(E) for i in range(3)]
            for e, i, name in sorted(names, key=lambda t: ckpt.position(t[2])):
                stacks[i][e] = ckpt.read(name)
            if layout == "int4_k2":
                parts.append(QuantizedWeight.from_k2(stacks[0], stacks[1], g, stacks[2]))
            else:
                parts.append(QuantizedWeight.from_awq(stacks[0], stacks[1], stacks[2], g))
            del stacks
        return layout, tuple(parts)
    if layout == "fused":
        gate_up = _as_bf16(ckpt.read(f"{prefix}.gate_up_proj"))
        if weight_format != "bf16":        # gate and up quantized, then freed, before down is read
            parts = [quantize(gate_up[:, :I], weight_format, group_size),
                     quantize(gate_up[:, I:], weight_format, group_size)]
            del gate_up
            parts.append(quantize(_as_bf16(ckpt.read(f"{prefix}.down_proj")), weight_format, group_size))
            return weight_format, tuple(parts)
        return "bf16", gate_up, _as_bf16(ckpt.read(f"{prefix}.down_proj"))
    if weight_format != "bf16":            # one projection of every expert at a time: a third of a layer
        parts = []
        for proj in PROJECTIONS:
            w = np.empty((E,) + _dims(proj, I, H), BF16)
            for e in sorted(range(E), key=lambda e: ckpt.position(f"{prefix}.{e}.{proj}.weight")):
                w[e] = _as_bf16(ckpt.read(f"{prefix}.{e}.{proj}.weight"))
            parts.append(quantize(w, weight_format, group_size))
            del w
        return weight_format, tuple(parts)
    gate_up, down = np.empty((E, 2 * I, H), BF16), np.empty((E, H, I), BF16)
    names = [(e, proj, f"{prefix}.{e}.{proj}.weight") for e in range(E) for proj in PROJECTIONS]
    for e, proj, name in sorted(names, key=lambda t: ckpt.position(t[2])):
        target = down[e] if proj == "down_proj" else gate_up[e, :I] if proj == "gate_proj" else gate_up[e, I:]
        target[...] = _as_bf16(ckpt.read(name))
    return "bf16", gate_up, down
