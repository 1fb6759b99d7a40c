"""``MoELayer``: the public contract of docs/design.md §1.

The layer validates every argument before any work, packs the base weights once,
owns the forward caches and the scratch, and runs ``kernels.moe`` on its route.
"""

from dataclasses import dataclass

import numpy as np

from . import checks
from .cache import CacheEmptyError, CacheStack, ForwardCache, SavedForward
from .kernels import moe
from .kernels.gemm import PAD
from .kernels.isa import ROUTES, choose_route
from .kernels.routing import round_rows
from .quant import QuantizedWeight, quantize
from .scratch import SHARED
from .reference import LORA_FIELDS
from .tp import lora_part, partition

WEIGHT_FORMATS = ("bf16", "int8", "int4_awq", "int4_k2")
DEFAULT_GROUP_SIZE = 128             # int4 quantized online: AWQ's usual group


@dataclass(eq=False)
class LoRAWeights:
    """LoRA adapters on the gate, up and down projections of every expert.

    gate_a, up_a [E, r, H]; gate_b, up_b [E, I, r]; down_a [E, r, I]; down_b [E, H, r];
    float32 or bfloat16, any strides. ``P(x) = W x + (alpha / r) * B (A x)``.
    The layer holds these arrays by reference and reads them on every call: an
    in-place update (an optimizer step) is seen by the next forward.
    """

    gate_a: np.ndarray
    gate_b: np.ndarray
    up_a: np.ndarray
    up_b: np.ndarray
    down_a: np.ndarray
    down_b: np.ndarray
    alpha: float = 32.0


@dataclass(eq=False)
class MoEGrads:
    """What ``MoELayer.backward`` returns.

    input [T, H] bfloat16; topk_weights [T, k] float32; the six LoRA gradients float32
    in LoRA shapes (zero for experts no token reached), or None without LoRA.
    """

    input: np.ndarray
    topk_weights: np.ndarray
    gate_a: np.ndarray = None
    gate_b: np.ndarray = None
    up_a: np.ndarray = None
    up_b: np.ndarray = None
    down_a: np.ndarray = None
    down_b: np.ndarray = None


def _accumulator(holder, name, shape):
    """The float32 array of ``holder`` (an MoEGrads) that a LoRA gradient is added into."""
    if not isinstance(holder, MoEGrads):
        raise TypeError(f"accumulate_into: expected nbmoe.MoEGrads, got {type(holder).__qualname__}")
    arr = checks.ndarray(f"accumulate_into.{name}", getattr(holder, name))
    if arr.dtype != np.float32:
        raise TypeError(f"accumulate_into.{name}: expected dtype float32, got {arr.dtype}")
    checks.shape(f"accumulate_into.{name}", arr, shape, "(the LoRA array's shape)")
    return arr


class _LoRAView:
    """The validated LoRA arrays of one call (float32, or bf16 as uint16 views)."""

    def __init__(self, arrays, rank, alpha):
        for name, arr in arrays.items():
            setattr(self, name, arr)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank


def _part_lora(holder, i0, i1, rank=None, alpha=None):
    """What tensor-parallel part [i0, i1) of I reads of six LoRA arrays (factors, or their
    gradients): views, never copies (``nbmoe.tp.lora_part``)."""
    arrays = {name: lora_part(name, getattr(holder, name), i0, i1) for name in LORA_FIELDS}
    return _LoRAView(arrays, rank, alpha) if rank is not None else MoEGrads(None, None, **arrays)


def int4_group_problem(group_size, H, I):
    """Why the int4 kernels cannot run experts of hidden size H and intermediate size I in
    K groups of ``group_size`` (a group must not straddle a 32-column panel), or None."""
    for name, K in (("H (gate_proj, up_proj)", H), ("I (down_proj)", I)):
        if group_size % PAD or K % group_size:
            return (f"the int4 kernels need a multiple of {PAD} that divides every K, here {name} = {K}; "
                    f"got {group_size}")
    return None


def base_weights(gate_proj, up_proj, down_proj, weight_format, group_size):
    """(format, group_size, [gate, up, down]) from bf16/float32 arrays (quantized online
    to ``weight_format``, bf16 if None; int4 groups of ``group_size``, 128 if None) or
    three ``QuantizedWeight`` of one format (which ``weight_format`` and ``group_size``,
    if given, must match). bf16 parts are uint16 bits. ``group_size`` applies to the int4
    formats only (the contract's own example passes it with bf16): elsewhere it is None."""
    given = [isinstance(w, QuantizedWeight) for w in (gate_proj, up_proj, down_proj)]
    if weight_format is not None:
        checks.choice("weight_format", weight_format, WEIGHT_FORMATS)
    if group_size is not None:
        group_size = checks.integer("group_size", group_size, 1)
    if any(given):
        if not all(given):
            raise TypeError(f"gate_proj, up_proj, down_proj: expected three nbmoe.QuantizedWeight or three "
                            f"arrays, got {', '.join(type(w).__qualname__ for w in (gate_proj, up_proj, down_proj))}")
        parts = [gate_proj, up_proj, down_proj]
        formats = [w.format for w in parts]
        if len(set(formats)) > 1:
            raise ValueError(f"gate_proj, up_proj, down_proj: expected one format, got {formats}")
        fmt = formats[0]
        if weight_format not in (None, fmt):
            raise ValueError(f"weight_format: {weight_format!r} contradicts the QuantizedWeight objects, "
                             f"which are {fmt!r}; pass weight_format=None or {fmt!r}")
        groups = [w.group_size for w in parts]
        if len(set(groups)) > 1:
            raise ValueError(f"gate_proj, up_proj, down_proj: expected one group_size, got {groups}")
        if group_size is not None and fmt != "int8" and group_size != groups[0]:
            raise ValueError(f"group_size: {group_size} contradicts the QuantizedWeight objects' "
                             f"group_size {groups[0]}; pass None or {groups[0]}")
        group_size = groups[0]
        E, I, H = gate_proj.shape
        for name, w, want, labels in (("up_proj", up_proj, (E, I, H), "(E, I, H)"),
                                      ("down_proj", down_proj, (E, H, I), "(E, H, I)")):
            if w.shape != want:
                raise ValueError(f"{name}: expected shape {labels} = {want} (from gate_proj), got {w.shape}")
    else:
        fmt = weight_format or "bf16"
        gate = checks.bf16_bits("gate_proj", gate_proj, (None, None, None), "(E, I, H)")
        E, I, H = gate.shape
        if min(E, I, H) < 1:
            raise ValueError(f"gate_proj: expected E, I, H >= 1, got shape {(E, I, H)}")
        up = checks.bf16_bits("up_proj", up_proj, (E, I, H), "(E, I, H)")
        down = checks.bf16_bits("down_proj", down_proj, (E, H, I), "(E, H, I)")
        if fmt.startswith("int4") and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        parts = [gate, up, down]
    if fmt.startswith("int4"):
        problem = int4_group_problem(group_size, H, I)
        if problem:
            raise ValueError(f"group_size: {problem}")
    else:
        group_size = None              # bf16 and int8 have no K groups: the argument does not apply
    if not any(given) and fmt != "bf16":
        parts = [quantize(w.view(checks.BF16), fmt, group_size) for w in parts]
    return fmt, group_size, parts


def expert_parts(I, tp, weight_format, group_size):
    """``nbmoe.tp.partition`` of an experts' I into ``tp`` parts, int4 formats on their K
    groups of ``group_size`` (down_proj's K is I); a ValueError that says so."""
    int4 = weight_format.startswith("int4")
    try:
        return partition(I, tp, group_size if int4 else 1)
    except ValueError as err:
        raise ValueError(f"{err}{f'; int4 parts align to group_size = {group_size}' if int4 else ''}") from None


def part_weights(weights, i0, i1):
    """The gate, up, down weights part [i0, i1) of I stores: gate/up rows, down columns
    (views; ``PackedWeights`` packs them into the part's own arrays)."""
    gate, up, down = weights
    if isinstance(gate, QuantizedWeight):
        return gate.slice(1, i0, i1), up.slice(1, i0, i1), down.slice(2, i0, i1)
    return gate[:, i0:i1], up[:, i0:i1], down[:, :, i0:i1]


class MoELayer:
    """The routed experts of one MoE layer, with optional LoRA, forward and backward.

    gate_proj, up_proj [E, I, H]; down_proj [E, H, I]: bfloat16 (or float32, rounded),
    quantized online to ``weight_format`` ("bf16" if None, "int8", "int4_awq", "int4_k2";
    int4 groups of ``group_size`` along K, 128 if None, a multiple of 32 dividing H and I)
    - or three ``nbmoe.QuantizedWeight`` of one format (``weight_format``/``group_size``
    then None or matching). Each weight is stored once (``packed_nbytes``); forward and
    backward multiply by exactly ``QuantizedWeight.dequantize()``'s values.
    ``Expert_e(x) = D_e(silu(G_e x) * U_e x)``; ``y[t] = sum_j w[t, j] Expert_{ids[t, j]}(x[t])``.

    max_tokens bounds T per call; cache_depth is how many forwards may be saved for
    backward at once; route picks the kernel route (default: ``$NBMOE_ISA``, else the best
    this CPU supports; ``nbmoe.info()`` lists them). The first forward's ``topk_ids`` fixes
    k (until ``resize``). A saved forward holds memory sized by its call, from a pool every
    layer shares (``nbmoe.cache.SAVED``); everything a call needs only while it runs lives
    in ``nbmoe.scratch.SHARED``, one pool for every layer.
    """

    def __init__(self, gate_proj, up_proj, down_proj, lora=None, weight_format=None,
                 group_size=None, tp=1, max_tokens=4096, cache_depth=1, route=None):
        tp = checks.integer("tp", tp, 1)
        self.max_tokens = checks.integer("max_tokens", max_tokens, 1)
        self.cache_depth = checks.integer("cache_depth", cache_depth, 0)
        fmt, group_size, weights = base_weights(gate_proj, up_proj, down_proj, weight_format, group_size)
        E, I, H = weights[0].shape
        self.parts = expert_parts(I, tp, fmt, group_size)
        self.num_experts, self.intermediate_size, self.hidden_size = E, I, H
        self.weight_format, self.group_size = fmt, group_size
        self.tp = tp
        if lora is not None and not isinstance(lora, LoRAWeights):
            raise TypeError(f"lora: expected nbmoe.LoRAWeights or None, got {type(lora).__qualname__}")
        self._lora = lora
        self.rank = None                   # fixed by the first read of the LoRA arrays
        self.rank = 0 if lora is None else self._lora_view().rank
        if route is not None:
            checks.choice("route", route, ROUTES)
        self.route = choose_route(route)
        self._packed = [moe.PackedWeights(*part_weights(weights, i0, i1), fmt) for i0, i1 in self.parts]
        self._k = None
        self._stack = None

    def __repr__(self):
        group = f", group_size={self.group_size}" if self.group_size else ""
        tp = f", tp={self.tp}" if self.tp != 1 else ""
        return (f"MoELayer(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, "
                f"r={self.rank}, weight_format={self.weight_format!r}{group}{tp}, route={self.route.name!r}, "
                f"max_tokens={self.max_tokens}, cache_depth={self.cache_depth}, saved={self.saved})")

    @property
    def lora(self):
        return self._lora

    @property
    def packed_nbytes(self):
        """Bytes of the stored base weights: one copy each, in their format, with scales
        and zero points (forward and backward both read it), summed over the parts."""
        return sum(p.nbytes for p in self._packed)

    @property
    def saved(self):
        """How many forwards are saved, awaiting backward."""
        return 0 if self._stack is None else len(self._stack)

    @property
    def top_k(self):
        """k, the slots per token that sized the buffers (None before the first forward)."""
        return self._k

    @property
    def newest_tag(self):
        """The tag of the newest saved forward (None if none): pass it to ``backward`` or
        ``discard`` when backward order is not last-in first-out."""
        return self._stack.peek().tag if self.saved else None

    def discard(self, tag):
        """Drop the saved forward ``tag`` without a backward (a graph freed unused).
        A tag already consumed or discarded is ignored."""
        if self._stack is not None:
            self._stack.drop(tag)

    def resize(self, max_tokens):
        """Grow (or shrink) the token capacity; only while no forward is saved."""
        max_tokens = checks.integer("max_tokens", max_tokens, 1)
        if self.saved:
            raise RuntimeError(f"resize: {self.saved} saved forwards still hold buffers of "
                               f"max_tokens={self.max_tokens}; run their backward first")
        self.max_tokens = max_tokens
        self._k, self._stack = None, None

    def _lora_view(self):
        lo = self._lora
        if lo is None:
            return None
        E, I, H = self.num_experts, self.intermediate_size, self.hidden_size
        gate_a = checks.lora_array("lora.gate_a", lo.gate_a, (E, self.rank, H), "(E, r, H)")
        r = gate_a.shape[1]
        if r < 1:
            raise ValueError(f"lora.gate_a: expected rank r >= 1, got shape {gate_a.shape}")
        arrays = dict(
            gate_a=gate_a,
            gate_b=checks.lora_array("lora.gate_b", lo.gate_b, (E, I, r), "(E, I, r)"),
            up_a=checks.lora_array("lora.up_a", lo.up_a, (E, r, H), "(E, r, H)"),
            up_b=checks.lora_array("lora.up_b", lo.up_b, (E, I, r), "(E, I, r)"),
            down_a=checks.lora_array("lora.down_a", lo.down_a, (E, r, I), "(E, r, I)"),
            down_b=checks.lora_array("lora.down_b", lo.down_b, (E, H, r), "(E, H, r)"))
        return _LoRAView(arrays, r, checks.finite_real("lora.alpha", lo.alpha))

    def _shape(self, part=None):
        """(E, H, I, r): what sizes this layer's caches and scratch (of one part: its I)."""
        I = self.intermediate_size if part is None else part[1] - part[0]
        return self.num_experts, self.hidden_size, I, self.rank

    def _buffers(self, k):
        if self._k is None:
            E, H, _, r = self._shape()
            sizes = [i1 - i0 for i0, i1 in self.parts]
            self._stack = CacheStack(self.cache_depth, lambda T: SavedForward(E, H, sizes, r, T, k))
            self._k = k
        elif k != self._k:
            raise ValueError(f"topk_ids: expected k = {self._k} slots per token (the k of this "
                             f"layer's first forward, which sized its buffers), got {k}")

    def forward(self, x, topk_ids, topk_weights, save_for_backward=False, partial=False):
        """y [T, H] bfloat16 from x [T, H] bfloat16 (or float32), topk_ids [T, k]
        int32/int64 (-1 = skipped slot), topk_weights [T, k] float32.

        With ``save_for_backward`` the forward is pushed onto the cache stack
        (``CacheOverflowError`` if full, raised before anything is written).
        ``partial``: y as float32, not rounded - this layer's share of a sum over
        tensor-parallel processes (``nbmoe.tp.dist``), rounded once after the reduction.
        """
        x16 = checks.bf16_bits("x", x, (None, self.hidden_size), "(T, H)")
        T = x16.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"x: {T} tokens exceed max_tokens = {self.max_tokens}; construct "
                             f"the layer with a larger max_tokens or split the call")
        ids = checks.topk_ids(topk_ids, T, self.num_experts)
        weights = checks.topk_weights(topk_weights, ids.shape)
        if not isinstance(save_for_backward, (bool, np.bool_)):
            raise TypeError(f"save_for_backward: expected a bool, got "
                            f"{type(save_for_backward).__qualname__}")
        lora = self._lora_view()
        k = ids.shape[1]
        self._buffers(k)
        y = np.empty((T, self.hidden_size), np.float32 if partial else np.uint16)
        with SHARED.lock:
            cache = None
            if save_for_backward:
                cache = self._stack.reserve(T)
                saved_x = cache.parts[0].x            # x and the routing: one copy the parts share
                saved_x[:T, :self.hidden_size] = x16
                saved_x[:T, self.hidden_size:] = 0
            # parts add their fp32 partial sums in part order, rounded once (one part: rounded directly)
            out = y if self.tp == 1 or partial else SHARED.array("tp.y32", (T, self.hidden_size), np.float32)
            for p, (part, packed) in enumerate(zip(self.parts, self._packed)):
                shape = self._shape(part)
                part_cache = cache.parts[p] if cache is not None else \
                    ForwardCache(*shape, T, k, alloc=SHARED.allocator("cache."))
                ws = moe.Workspace(*shape, T, k, alloc=SHARED.allocator("ws."))
                moe.forward(self.route, packed, self._part(lora, part), x16, ids, weights, part_cache, ws, out,
                            add=p > 0)
            if out is not y:
                round_rows(out, y)
        if save_for_backward:
            self._stack.push(cache)
        return y if partial else y.view(checks.BF16)

    def _part(self, lora, part):
        """The LoRA view part ``part`` reads (the whole view when tp = 1)."""
        if lora is None or self.tp == 1:
            return lora
        return _part_lora(lora, *part, lora.rank, lora.alpha)

    def backward(self, grad_y, accumulate_into=None, tag=None, partial=False):
        """Gradients of the newest saved forward (popped) from grad_y [T, H] bfloat16.

        Returns ``MoEGrads``; raises ``CacheEmptyError`` if no forward is saved.
        ``accumulate_into``: an ``MoEGrads`` (e.g. an earlier result) whose six LoRA
        arrays (float32, LoRA shapes) the LoRA gradients are added into, in place -
        gradient accumulation over micro-batches without allocating; the returned
        ``MoEGrads`` holds those same arrays. Without it the LoRA gradients are new
        arrays. ``tag`` (see ``newest_tag``) picks a saved forward other than the newest.
        ``partial``: ``input`` as float32, not rounded (as ``forward``'s ``partial``).
        """
        if self._stack is None:
            raise CacheEmptyError("backward: no saved forward; call forward(..., "
                                  "save_for_backward=True) first")
        cache = self._stack.peek(tag)
        T, k = cache.T, self._k
        gy = checks.bf16_bits("grad_y", grad_y, (T, self.hidden_size), "(T, H)")
        lora = self._lora_view()
        grads = MoEGrads(input=np.empty((T, self.hidden_size), np.float32 if partial else np.uint16),
                         topk_weights=np.empty((T, k), np.float32))
        if lora is None and accumulate_into is not None:
            raise ValueError("accumulate_into: this layer has no LoRA, so no gradient to accumulate")
        for name in LORA_FIELDS if lora is not None else ():
            shape = getattr(lora, name).shape
            setattr(grads, name, np.zeros(shape, np.float32) if accumulate_into is None
                    else _accumulator(accumulate_into, name, shape))
        accumulate = accumulate_into is not None
        with SHARED.lock:
            # parts in part order: grad_x summed in fp32 and rounded once (one part: written
            # directly), grad_w summed in fp32; every part adds its LoRA gradients into views
            # of ``grads`` (sliced ones into their slice, shared ones summed: part 0 onto
            # zeros or what the caller accumulates into)
            gx = grads.input if self.tp == 1 or partial else \
                SHARED.array("tp.gx32", (T, self.hidden_size), np.float32)
            gw = SHARED.array("tp.gw32", (T, k), np.float32) if self.tp != 1 else None
            for p, (part, packed) in enumerate(zip(self.parts, self._packed)):
                mine = _part_lora(grads, *part) if lora is not None else MoEGrads(None, None)
                mine.input, mine.topk_weights = gx, grads.topk_weights if p == 0 else gw
                ws = moe.Workspace(*self._shape(part), T, k, alloc=SHARED.allocator("ws."))
                moe.backward(self.route, packed, self._part(lora, part), cache.parts[p], ws, gy, mine,
                             accumulate=accumulate or p > 0, add_input=p > 0)
                if p > 0:
                    grads.topk_weights += gw
            if gx is not grads.input:
                round_rows(gx, grads.input)
        self._stack.pop(cache)
        if not partial:
            grads.input = grads.input.view(checks.BF16)
        return grads
