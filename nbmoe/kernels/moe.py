"""Fused MoE forward and backward over all experts: the kernels of this package in order.

Shapes: T tokens, k slots, P routed pairs (skipped slots dropped), E experts, S active
experts, H hidden, I intermediate, r LoRA rank, Hp / Ip padded to ``gemm.PAD``;
``s = alpha / r``. ``cache`` is the ``ForwardCache`` slot, ``ws`` the ``Workspace``.

Forward::

    route_pairs(topk_ids)               -> offsets, order, rows                (cache)
    gather_rows(x)                      -> xs [P, Hp] bf16                     (ws)
    project(xs, [A_g; A_u])             -> xa_gu [P, 2r] fp32                  (cache)
    grouped_gemm(xs, W_gu) + s xa_gu [B_g|B_u]^T -> gu = g | u [P, 2Ip] bf16   (cache)
    silu_mul(gu)                        -> h [P, Ip] bf16                      (ws)
    project(h, A_d)                     -> xa_d [P, r] fp32                    (cache)
    grouped_gemm(h, W_d) + s xa_d B_d^T -> d [P, Hp] fp32 (ws) and bf16        (cache)
    combine_rows(d, topk_weights)       -> y [T, H] bf16

The forward reads the LoRA factors where the caller keeps them (``_forward_factors``:
float32, C order, unpadded; B turned per GEMM item), else loads them first.

Backward (routing, gu, d, xa_* from the cache; h recomputed; B^T loaded into the
factor buffers for the projections, both A read by the epilogues where the caller keeps
them, as the forward reads B, else loaded too)::

    pair_grads(grad_y, d)               -> G16 = bf16(w grad_y) [P, Hp], grad_w [T, k],
                                           gy = grad_y padded, each row's token and w
    project(G, B_d^T)                   -> gb_d = G B_d [P, r]   (G = w gy[token] on the fly)
    grouped_gemm^T(G16, W_d) + s gb_d A_d -> grad_h [P, Ip] fp32
    silu_mul_backward(grad_h, gu)       -> dgu = dg | du [P, 2Ip] fp32 (+ bf16 dgu16),
                                           h again (with LoRA, for dA_d: the forward's bits)
    project(dgu, [B_g|B_u]^T)           -> gb_gu = dg B_g | du B_u [P, 2r]
    grouped_gemm^T(dgu16, [W_g; W_u]) + s gb_gu [A_g; A_u] -> grad_x per pair [P, Hp] fp32
    combine_rows(grad_x per pair, 1)    -> grad_x [T, H] bf16
    outer(...)                          -> dA_g, dA_u (x[token]), dB_g, dB_u (dgu),
                                           dA_d (h), dB_d (gy[token], v = xa_d w), each times
                                           s: the A gradients into the caller's arrays where
                                           ``_in_place``

The base-weight GEMMs take bf16 operands (G16, dgu16: what bf16 dot-product instructions
need); every LoRA product takes G and dgu unrounded, so a low-rank gradient, a sum that
can cancel, carries no bf16 rounding of its operands. G = w grad_y is never stored in
fp32: its two LoRA products gather grad_y's rows (bf16 as given) and scale by w, a row's
sum (``project``) or v (``outer``). Zen 4, 2 threads, Qwen3-30B-A3B layer, T=1024 step:
the 67 MB G was written once past the caches and read twice from DRAM.

Saved: x (token order, padded), routing, gu, d (bf16), xa_gu, xa_d. Recomputed:
h = silu(g) * u and sigmoid(g), both in ``silu_mul_backward`` (one exp; h bit-identical).
Nothing else survives a call.
Backward reads x's rows through each pair's token (``src``), not regathered into expert
order: the 4 MB of x stay in L3 where the 34 MB gathered copy was written and read back.
"""

import numba
import numpy as np

from .activation import silu_mul, silu_mul_backward
from .gemm import ROW_SLACK, PackedWeight, grouped_gemm, longer, padded, streams
from .lora import load, outer, project, row_blocks, store
from .routing import combine_rows, gather_rows, pair_grads, route_pairs
from .simd import LANES

_EMPTY_F32 = np.zeros((0, 0), np.float32)
_EMPTY_U16 = np.zeros((0, 0), np.uint16)
_NO_ROWS = np.zeros(0, np.int64)               # ``project`` / ``outer`` reading m's own rows,
_NO_SCALES = np.zeros(0, np.float32)           # unscaled


class PackedWeights:
    """The layer's base weights, one stored copy each (``gemm.PackedWeight``), in format ``fmt``:

    gu [E, 2Ip/16, Hp/2, 16] codes = [W_gate; W_up]   (forward gate/up; W^T for grad_x)
    d  [E, Hp/16, Ip/2, 16] codes  = W_down           (forward down; W^T for grad_h)

    Backward multiplies by the transposes of these same codes (``transposed=True``):
    panels are decoded into per-thread scratch, never stored.
    """

    def __init__(self, gate, up, down, fmt):
        self.gu = PackedWeight([gate, up], fmt)
        self.d = PackedWeight([down], fmt)

    @property
    def nbytes(self):
        return self.gu.nbytes + self.d.nbytes


class Workspace:
    """Scratch of one call, sized for ``pairs`` rows; nothing in it outlives the call.

    ``alloc(name, shape, dtype)`` gives each array (``nbmoe.scratch``'s shared buffers, or
    ``scratch.new_array``); contents may be stale: every kernel writes before it
    reads (``lora.load`` writes the LoRA factors' pads too)."""

    def __init__(self, E, H, I, r, T, k, alloc):
        Hp, Ip = padded(H), padded(I)
        pairs = T * k
        operand = pairs + ROW_SLACK                        # GEMM A operands: whole tiles are read
        f32, u16 = np.float32, np.uint16
        self.xs = alloc("xs", (operand, longer(Hp, u16)), u16)
        self.d32 = alloc("d32", (pairs, Hp), f32)          # forward d; backward grad_x per pair
        self.gy = alloc("gy", (T, longer(Hp, u16)), u16)  # grad_y padded: G = w gy[token]
        self.src = alloc("src", (pairs,), np.int64)        # a row's token, and its w
        self.w_row = alloc("w_row", (pairs,), f32)
        self.G16 = alloc("G16", (operand, longer(Hp, u16)), u16)
        self.grad_h = alloc("grad_h", (pairs, Ip), f32)
        self.dgu = alloc("dgu", (pairs, longer(2 * Ip, f32)), f32)
        self.dgu16 = alloc("dgu16", (operand, 2 * Ip), u16)
        self.gb_d = alloc("gb_d", (pairs, r), f32)
        self.xa_w = alloc("xa_w", (pairs, r), f32)         # xa_d w: dB_d's v
        self.gb_gu = alloc("gb_gu", (pairs, 2 * r), f32)
        self.h = alloc("h", (operand, Ip), u16)            # silu(g) * u: recomputed, not saved
        # LoRA factors per active slot (fp32, padded, rows a line longer), and their gradients
        self.a_gu = alloc("a_gu", (E, 2 * r, longer(Hp, f32)), f32)
        self.bt_gu = alloc("bt_gu", (E, r, longer(2 * Ip, f32)), f32)
        self.a_d = alloc("a_d", (E, r, longer(Ip, f32)), f32)
        self.bt_d = alloc("bt_d", (E, r, longer(Hp, f32)), f32)
        self.da_gu = alloc("da_gu", (E, 2 * r, Hp), f32)
        self.dbt_gu = alloc("dbt_gu", (E, r, 2 * Ip), f32)
        self.da_d = alloc("da_d", (E, r, Ip), f32)
        self.dbt_d = alloc("dbt_d", (E, r, Hp), f32)

    def arrays(self):
        return [v for v in vars(self).values() if isinstance(v, np.ndarray)]


def _lora_parts(lora, ws, Ip, Hp):
    """Per LoRA array: (name, factor buffer, its gradient buffer, row and column where
    the array sits in them, and the padded width of its span). Buffers hold every factor
    in A layout [S, r, K]."""
    r = lora.rank
    return [("gate_a", ws.a_gu, ws.da_gu, 0, 0, Hp), ("up_a", ws.a_gu, ws.da_gu, r, 0, Hp),
            ("gate_b", ws.bt_gu, ws.dbt_gu, 0, 0, Ip), ("up_b", ws.bt_gu, ws.dbt_gu, 0, Ip, Ip),
            ("down_a", ws.a_d, ws.da_d, 0, 0, Ip), ("down_b", ws.bt_d, ws.dbt_d, 0, 0, Hp)]


def _a_layout(name, arr):
    """A LoRA array (or its gradient) seen in A layout: B [E, N, r] through its transpose."""
    return arr.transpose(0, 2, 1) if name.endswith("_b") else arr


def _load_lora(lora, cache, ws, Ip, Hp, skip=()):
    """``load`` every LoRA array but those named in ``skip`` into its factor buffer."""
    for name, factor, _, row0, col0, width in _lora_parts(lora, ws, Ip, Hp):
        if name not in skip:
            load(_a_layout(name, getattr(lora, name)), cache.active, cache.n_active, factor, row0, col0, width)


def _in_place(name, arr, Ip, Hp):
    """Whether a kernel can read (forward) or write (backward, A gradients) LoRA array
    ``name`` where the caller keeps it: float32, C order, unpadded (A [E, r, K]: K the
    padded width, a row read or written whole touches no neighbour; B [E, N, r]: N the
    padded height, r a multiple of 16, turned 16 x 16 per GEMM item)."""
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        return False
    padded_dim = Hp if name in ("gate_a", "up_a", "down_b") else Ip
    if name.endswith("_a"):
        return arr.shape[2] == padded_dim
    return arr.shape[1] == padded_dim and arr.shape[2] % LANES == 0


def _forward_factors(lora, cache, ws, Ip, Hp):
    """The forward's LoRA factors: (index, A arrays) of its two projections, x [A_g; A_u]^T
    and h A_d^T, then the up factors of its two GEMM epilogues, [B_g | B_u] and B_d. The
    caller's arrays where ``_in_place`` (a projection indexes them by expert; a
    GEMM takes a tuple of B), else ``load``'s buffers (indexed by slot; B^T), which this
    loads. gate and up go one way together.

    In place skips a copy read straight back: at T=16 on the Qwen3-30B-A3B layer the
    active factors are 44 MB, written and read again (Zen 4, 2 threads: the forward's
    factor loads took 3.3 ms of 34).
    """
    a_gu, a_d, b_gu, b_d = _factors_in_place(lora, cache, ws, Ip, Hp, (("gate_a", "up_a"), ("down_a",),
                                                                      ("gate_b", "up_b"), ("down_b",)))
    experts = np.arange(cache.slot_of_expert.shape[0], dtype=np.int64)
    return ((experts, a_gu) if a_gu else (cache.slot_of_expert, (ws.a_gu,)),
            (experts, a_d) if a_d else (cache.slot_of_expert, (ws.a_d,)),
            b_gu or ws.bt_gu, b_d or ws.bt_d)


def _factors_in_place(lora, cache, ws, Ip, Hp, groups):
    """Per group of LoRA names (gate and up go one way together): the caller's arrays
    where all are ``_in_place``, else None; ``load``s every other factor."""
    where = [all(_in_place(name, getattr(lora, name), Ip, Hp) for name in names) for names in groups]
    _load_lora(lora, cache, ws, Ip, Hp, skip=[name for names, ok in zip(groups, where) if ok for name in names])
    return [tuple(getattr(lora, name) for name in names) if ok else None for names, ok in zip(groups, where)]


def _combine(rows, weights, src, out, add):
    """``combine_rows`` into bf16 ``out`` (uint16), or fp32 ``out`` (added to with ``add``)."""
    if out.dtype == np.uint16:
        combine_rows(rows, weights, src, out, _EMPTY_F32, False)
    else:
        combine_rows(rows, weights, src, _EMPTY_U16, out, add)


def forward(route, packed, lora, x, topk_ids, topk_weights, cache, ws, y, add=False):
    """Run the forward of the module docstring; fills ``cache`` and ``y``.

    x [T, H] uint16 (bf16 bits); topk_ids [T, k] int64; topk_weights [T, k] float32;
    lora: ``None`` or an object with the six arrays (float32 or uint16), ``rank``
    and ``scale``; y [T, H] uint16 (written, rounded once) or float32 (this part's
    fp32 sum, written, or with ``add`` added: tensor-parallel parts, ``nbmoe.tp``).
    """
    route.require()
    T, k = topk_ids.shape
    Ip = cache.gu.shape[1] // 2
    Hp = cache.d.shape[1]
    cache.T = T
    cache.topk_ids[:T] = topk_ids
    cache.topk_weights[:T] = topk_weights
    P, cache.n_active = route_pairs(cache.topk_ids[:T], cache.slot_of_expert, cache.offsets,
                                    cache.order, cache.rows[:T], cache.active)
    cache.P = P
    if P == 0:
        if not add:
            y[:] = 0
        return
    gather_rows(x, cache.order, k, P, ws.xs)
    scale = np.float32(lora.scale if lora is not None else 0.0)
    b_gu, b_d = ws.bt_gu, ws.bt_d
    if lora is not None:
        a_gu, a_d, b_gu, b_d = _forward_factors(lora, cache, ws, Ip, Hp)
        rows = row_blocks(cache.offsets, cache.active, cache.n_active)
        project(ws.xs, cache.offsets, rows, *a_gu, Hp, cache.xa_gu, _NO_ROWS, _NO_SCALES)
    grouped_gemm(route, ws.xs.view(np.uint32), packed.gu, cache.offsets, cache.slot_of_expert,
                 cache.xa_gu, b_gu, Ip, scale, _EMPTY_F32, cache.gu)
    silu_mul(cache.gu, P, ws.h)
    if lora is not None:
        project(ws.h, cache.offsets, rows, *a_d, Ip, cache.xa_d, _NO_ROWS, _NO_SCALES)
    grouped_gemm(route, ws.h.view(np.uint32), packed.d, cache.offsets, cache.slot_of_expert,
                 cache.xa_d, b_d, Hp, scale, ws.d32, cache.d)
    _combine(cache.rows[:T], cache.topk_weights[:T], ws.d32, y, add)


def _grad_outs(names, buffer, grads, cache, Ip, Hp, scale, accumulate):
    """``outer``'s (outs, index, scale, accumulate) for the gradients of LoRA arrays
    ``names``, and the names it writes in place: for A arrays, the caller's gradient arrays
    themselves where ``_in_place`` (scaled, added to with ``accumulate``); else ``buffer``
    (indexed by slot, for ``store``; B gradients come out of ``outer`` as B^T). In place
    skips a buffer written, read back and written again: at T=1024 on the Qwen3-30B-A3B
    layer the A gradients of the active experts are 40 MB (Zen 4, 2 threads: their stores
    2.0-2.5 ms, ``outer`` +0.5 ms)."""
    arrays = tuple(getattr(grads, name) for name in names)
    if all(name.endswith("_a") and _in_place(name, arr, Ip, Hp) for name, arr in zip(names, arrays)):
        experts = np.arange(cache.slot_of_expert.shape[0], dtype=np.int64)
        return ((arrays * 2)[:2], experts, scale, accumulate), names
    return ((buffer,) * 2, cache.slot_of_expert, np.float32(1), False), ()


def backward(route, packed, lora, cache, ws, grad_y, grads, accumulate, add_input=False):
    """Run the backward of the module docstring from ``cache``; fills ``grads``.

    grad_y [T, H] uint16; grads: an object with ``input`` [T, H] uint16 (rounded once)
    or float32 (written, or with ``add_input`` added to, as ``forward``'s y) and
    ``topk_weights`` [T, k] float32, and with LoRA, the six float32 gradients in LoRA
    shapes (any strides); ``accumulate``: add into them (else overwrite the active
    experts' parts: the caller zero-initialises).
    """
    route.require()
    T, P, S = cache.T, cache.P, cache.n_active
    Ip = cache.gu.shape[1] // 2
    Hp = cache.d.shape[1]
    rows = cache.rows[:T]
    # dgu (fp32, for the LoRA products) goes past the caches when large (gemm.STREAM_BYTES);
    # G16 and dgu16, the operands of the very next GEMM, are stored plainly: G16 streamed at
    # T=1024 (34 MB, about the L3), that GEMM took 36.7-37.4 ms against 35.0-35.8 (Zen 5)
    pair_grads(grad_y, rows, cache.topk_weights[:T], cache.d, ws.G16, grads.topk_weights, ws.gy, ws.src, ws.w_row)
    if P == 0:
        if not add_input:
            grads.input[:] = 0
        return
    scale = np.float32(lora.scale if lora is not None else 0.0)
    a_gu, a_d = ws.a_gu, ws.a_d
    if lora is not None:
        # B^T loaded (the projections need it whole), A read in place by the GEMM items
        # (``gemm._item_lora``). Zen 4, 2 threads, T=1024 step of the Qwen3-30B-A3B layer,
        # alternated: _load_lora 5.1 / 5.5 -> 2.2 / 2.6 ms, the W^T GEMMs tied
        caller_gu, caller_d = _factors_in_place(lora, cache, ws, Ip, Hp, (("gate_a", "up_a"), ("down_a",)))
        a_gu, a_d = caller_gu or ws.a_gu, caller_d or ws.a_d
        row_items = row_blocks(cache.offsets, cache.active, S)
        project(ws.gy, cache.offsets, row_items, cache.slot_of_expert, (ws.bt_d,), Hp, ws.gb_d, ws.src, ws.w_row)
    grouped_gemm(route, ws.G16.view(np.uint32), packed.d, cache.offsets, cache.slot_of_expert,
                 ws.gb_d, a_d, Ip, scale, ws.grad_h, _EMPTY_U16, transposed=True)
    silu_mul_backward(ws.grad_h, cache.gu, P, ws.dgu, ws.dgu16, ws.h if lora is not None else _EMPTY_U16,
                      streams(ws.dgu, P))
    if lora is not None:
        project(ws.dgu, cache.offsets, row_items, cache.slot_of_expert, (ws.bt_gu,), Ip, ws.gb_gu, _NO_ROWS,
                _NO_SCALES)
    grouped_gemm(route, ws.dgu16.view(np.uint32), packed.gu, cache.offsets, cache.slot_of_expert,
                 ws.gb_gu, a_gu, Hp, scale, ws.d32, _EMPTY_U16, transposed=True)
    _combine(rows, np.ones((T, rows.shape[1]), np.float32), ws.d32, grads.input, add_input)
    if lora is None:
        return
    runs = numba.get_num_threads()
    np.multiply(cache.xa_d[:P], ws.w_row[:P, None], out=ws.xa_w[:P])
    written = ()
    for names, v, m, group, buffer, src in ((("gate_a", "up_a"), ws.gb_gu, cache.x, Hp, ws.da_gu, ws.src),
                                            (("gate_b", "up_b"), cache.xa_gu, ws.dgu, Ip, ws.dbt_gu, _NO_ROWS),
                                            (("down_a",), ws.gb_d, ws.h, Ip, ws.da_d, _NO_ROWS),
                                            (("down_b",), ws.xa_w, ws.gy, Hp, ws.dbt_d, ws.src)):
        outs, in_place = _grad_outs(names, buffer, grads, cache, Ip, Hp, scale, accumulate)
        outer(v, m, cache.offsets, cache.active, S, group, *outs, runs, src)
        written += in_place
    for name, _, acc, row0, col0, _ in _lora_parts(lora, ws, Ip, Hp):
        if name not in written:
            store(acc, cache.active, S, row0, col0, scale, accumulate, _a_layout(name, getattr(grads, name)))
