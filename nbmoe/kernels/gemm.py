"""Grouped GEMM on stored (bf16 or quantized) weights, with the LoRA term fused into the epilogue.

For every expert ``e`` and its rows ``offsets[e]:offsets[e+1]`` of the expert-ordered
activations::

    out[m, n] = sum_k a[m, k] * W[e, n, k]                      (bf16 x bf16, fp32 accumulate)
              + scale * sum_q lora_l[m, g*R + q] * lora_r[s, q, n]   (fp32; g = n // group_n)

then stored as fp32 (``out32``) and/or rounded to bf16 (``out16``) - past the caches when
larger than the last-level cache (``STREAM_BYTES``) and aligned. ``s`` is the expert's
active slot. ``lora_l`` holds the LoRA down-projections of the rows (``x A^T``, ...),
``lora_r`` the per-slot up factors (``B^T``, ...) of ``lora.load``; ``group_n`` lets one
GEMM carry two adapters side by side (gate | up). ``R == 0`` means no LoRA. In place of
``lora_r`` the forward passes the caller's B arrays themselves, one per group: each item
turns its 32 x R block into the thread's scratch (``_item_lora``); the backward passes
the caller's A arrays, each item copying its 32 columns of every rank there (the next
item's hinted into L2: ``_hint_a``). No copy of the factors is written and read back.

Layout (shared by every route and format)
-----------------------------------------
Each base weight ``W [E, N, K]`` is stored once (``PackedWeight``), in its format, as
``codes [E, Np/16, Kp/2, 16]``: lane ``j`` of column block ``b`` at pair ``p`` holds the
pair ``(W[e, 16b+j, 2p], W[e, 16b+j, 2p+1])`` - the VNNI pair order of ``vdpbf16ps``
and AMX ``tdpbf16ps``:

======== ============ ================================= ==============================
format   codes        scales [E, Np/16, groups, 16]     weight the kernels multiply by
======== ============ ================================= ==============================
bf16     uint32       (none)                            the bf16 pair itself
int8     uint16       float32, one group                bf16(q * s)
int4_awq uint8 (*)    float32, Kp/g; zeros u8 alike     bf16((q - z) * s)
int4_k2  uint8 (*)    bf16, Kp/g groups                 bf16((q - 8) * s)
======== ============ ================================= ==============================

(*) the 32 nibbles of a 16-lane pair vector in the order ``simd.vdequant`` reads:
lanes 0..7 in the low nibbles, lanes 8..15 in the high ones (``PackedWeight._nibble_order``).

``Np``, ``Kp`` are ``N``, ``K`` rounded up to ``PAD``; pad codes and scales are zero, and
activation pad columns must be zero too (0 * NaN would poison a sum).

Panels. The forward product needs pairs along K - the stored order: bf16 is read in
place, a quantized item first decodes its 32 columns over all of K (``vdequant``, 16
lanes a step) into the thread's scratch - or, for an expert with a few rows (up to
``decoding_rows``: 4 where ``vdpbf16ps`` runs), decodes each pair vector in registers once
for all its rows (``_rows_decoding``), its quantized codes hinted ahead (``_ahead``, and
the next item's first lines and scales: ``_ahead_item``). The backward
product (by ``W^T``, output columns along K) needs pairs along N: each item turns its 32
columns of ``W^T`` from the same codes, 16 x 16 blocks at a time (``_turn8``): bf16 pairs
through ``vtranspose8``, 4-bit codes on the bf16 routes turned first and then looked up
in each output pair's 32 bf16 levels (``isa.vturn4_bf16``). Both
directions therefore multiply by the same bf16 values, bit for bit, and nothing but the
one stored copy lives between calls (like a BLAS packing B panels, per thread, in cache).

In both directions an item's blocks hint the codes of the thread's next item, a share
per block, one line per K step (``_next_sources``, ``_hint``): without it the first
block of every item waits on DRAM. Zen 4, 2 threads, Qwen3-30B-A3B layer at T=1024:
forward gate_up 130.5 -> 126.2 ms, forward down 77.0 -> 72.5 ms. The forward hints into
L2 (into L1 too: gate_up 126 -> 131 ms, the hints evict the rows of the block); the
backward into L1 as well, since its panel build reads them with 16 x 16 transposes, not
in the hardware prefetchers' streams: L2 only 162-166 / 78-80 ms for gate_up / down,
L1 146-147 / 70-71 ms (per-block panel builds of the next item in place of one at item
start: no further gain). ``amx`` hints into L2 only, its block's share spread over its
K steps: Emerald Rapids, 2 threads, T=1024 forward gate_up 107 -> 81 ms against one burst
per block (a burst of a 128 KiB panel's lines stalls the tile loads behind it).

Work split
----------
A work item is (expert, 32-column tile) for each expert with a slot and rows. Its cost
is the rows it multiplies plus ``PANEL_COST`` for streaming its 32 columns of weights;
``make_tasks`` cuts the list into one contiguous run of about equal cost per thread
(``balanced``), so a skewed router (a few experts taking most tokens) does not load one
thread with every heavy expert, and orders the experts so that each run also gets its
share of the experts (``_mixed``), so of the weights to stream. ``prange`` runs over the
runs; each owns a row of the per-thread scratch (``thread_scratch``). The item walks its
expert's rows a block at a time; each route's ``_block`` keeps its accumulators in
registers (vector or tile) over all of K, then runs the shared epilogue (``_finish4`` on
four register rows at a time, ``_finish_row`` on one): the LoRA term, then the stores.
avx512_bf16's register blocks put their rows in the thread's scratch (``_hold4``) and
store them from there: at once, or, where they write densely through the caches, during
the K loop of the thread's next block (``HOLD_PAIRS``). Each output element is written by
exactly one item, summed in a fixed order: results do not depend on the thread count or
the cut.

Routes slot in through ``_block`` and ``block_take``: one ``@overload`` per route.
"""

import glob

import numba
import numpy as np
from numba import njit, prange
from numba import types
from numba.extending import overload

from ..config import JIT, JIT_PARALLEL
from .isa import BF16_ROUTES, tile_dpbf16, tile_load, tile_store, tile_zero, vdequant_bf16, vdpbf16, vturn4_bf16
from .lora import rank_row
from .schedule import balanced
from .simd import (LANES, f32_from_bits, prefetch, prefetch_l2, vdequant, vfma2, vload, vload_bf16, vload_u8,
                   vcopy_line, vpair_hi, vpair_lo, vput, vsplat, vsplat_pair, vstore, vtranspose8, vtranspose16,
                   vzero)

PAD = 32          # N and K padding: two vectors of output, one AMX tile of K
TILE_N = 32       # output columns per work item (two 16-lane vectors, two AMX tiles)
MR = 4            # rows per block: generic / avx512
MR_BF16 = 8       # rows per block: avx512_bf16, and a wide block of
MR_WIDE = 12      # 12 rows (24 accumulators) where the expert's rows fill it (``block_take``)
MR_AMX = 32       # rows per block: amx (two 16-row tiles)
# avx512_bf16: a tail of at least this many rows runs as a whole block with its last row
# repeated (the repeats write the same values to that row), not row by row: one row keeps
# only two vdpbf16ps chains in flight, a third of the peak. Zen 4, 2 threads, Qwen3-30B-A3B
# layer: T=128 fwd 77 -> 67 ms, T=1024 GEMMs 3-4% faster; at 2 no further gain.
CLAMP_ROWS = 3
ROW_SLACK = MR_AMX  # rows every A operand has past its last pair: a block reads whole tiles


def longer(n, dtype):
    """A row of ``n`` elements plus one 64-byte cache line: the row length of the LoRA
    factor buffers, of the fp32 operands of the LoRA products (G, dgu) and of the bf16
    operands with rows of H (xs, G16). Rows of a power-of-two length (4 or 8 KiB at
    H = 2048) all fall in one L1 set: ``load`` turning B^T 16 rows at a time missed on
    every store, ``outer`` walking an expert's rows down a 32-column strip missed on every
    row, a GEMM block's 8 rows filled one set. Zen 4, 2 threads, Qwen3-30B-A3B layer: B_down
    of 81 experts 0.42 -> 0.20 ms; the outer products of a T=128 step 5.3 -> 4.5 ms; the
    T=1024 forward gate_up GEMM 132.7 -> 129.9 ms. ``PackedMatrix``'s copied operand too
    (16 rows of 4 KiB in one set per AMX tile): Emerald Rapids, 2 threads, amx M=512
    K=2048 N=1536, 691 -> 1273-1639 GFLOP/s."""
    return n + 64 // np.dtype(dtype).itemsize


# Rows this many bytes apart (or a multiple) fall in one L1 set: an L1 indexed by virtual
# address spans one 4 KiB page per way (Zen 4: 32 KiB / 8 ways, Zen 5: 48 KiB / 12, Intel
# since Sandy Bridge alike).
SET_SPAN = 4096


def reads_past_last(route):
    """Whether ``route``'s blocks read A rows past an expert's last (whole AMX tiles: the
    ``ROW_SLACK`` rows); the vector routes read rows ``<= last`` only."""
    return route.name == "amx"


# An item's fixed cost in rows: streaming a 32-column panel of weights takes as long as
# about 16 rows of products on it (2-thread Zen 4: 35 GB/s read, 460 GFLOP/s vdpbf16ps;
# 32 x K bf16 = 64K bytes at 17 GB/s a thread vs 64K FLOP a row at 230 GFLOP/s).
PANEL_COST = 16


def padded(n):
    return -(-n // PAD) * PAD


@njit(inline="always", **JIT)
def _store_row(m, n0, c0, c1, out):
    """Store one output row's 32 columns as fp32 and/or bf16; ``out`` = (out32, out16,
    stream32, stream16, hold): an output with its flag set is stored past the caches
    (``vput``; ``grouped_gemm`` says when); ``hold``: whether avx512_bf16's blocks hold
    their rows for the next block to store (``HOLD_PAIRS``)."""
    out32, out16, stream32, stream16, _ = out
    if out32.size:
        at = m * out32.shape[1] + n0
        vput(out32, at, c0, stream32)
        vput(out32, at + LANES, c1, stream32)
    if out16.size:
        at = m * out16.shape[1] + n0
        vput(out16, at, c0, stream16)
        vput(out16, at + LANES, c1, stream16)


@njit(inline="always", **JIT)
def _finish_row(m, n0, c0, c1, lora, out):
    """Epilogue of one output row: add the LoRA term, store (tails and ``amx``; the
    register blocks run ``_finish4``). ``lora`` = (lora_l, l0, up, at, ld, R, scale): the
    item's up-factor row q at ``up[at + q * ld:][:32]`` (``_item_lora``)."""
    lora_l, l0, up, at, ld, R, scale = lora
    for q in range(R):
        b0, b1 = vload(up, at + q * ld), vload(up, at + q * ld + LANES)
        c0, c1 = vfma2(vsplat(scale * lora_l[m, l0 + q]), b0, b1, c0, c1)
    _store_row(m, n0, c0, c1, out)


@njit(inline="always", **JIT)
def _lora4(r0, r1, r2, r3, c00, c01, c10, c11, c20, c21, c30, c31, lora):
    """The LoRA term of four rows of a register block: each row of the up factor loaded
    once for the four, four independent FMA chains; per element the same sums in the same
    order as ``_finish_row``."""
    lora_l, l0, up, at, ld, R, scale = lora
    for q in range(R):
        b0, b1 = vload(up, at + q * ld), vload(up, at + q * ld + LANES)
        c00, c01 = vfma2(vsplat(scale * lora_l[r0, l0 + q]), b0, b1, c00, c01)
        c10, c11 = vfma2(vsplat(scale * lora_l[r1, l0 + q]), b0, b1, c10, c11)
        c20, c21 = vfma2(vsplat(scale * lora_l[r2, l0 + q]), b0, b1, c20, c21)
        c30, c31 = vfma2(vsplat(scale * lora_l[r3, l0 + q]), b0, b1, c30, c31)
    return c00, c01, c10, c11, c20, c21, c30, c31


@njit(inline="always", **JIT)
def _finish4(r0, r1, r2, r3, n0, c00, c01, c10, c11, c20, c21, c30, c31, lora, out):
    """Epilogue of four rows of a register block: the LoRA term (``_lora4``), then the stores."""
    c00, c01, c10, c11, c20, c21, c30, c31 = _lora4(r0, r1, r2, r3, c00, c01, c10, c11, c20, c21, c30, c31, lora)
    _store_row(r0, n0, c00, c01, out)
    _store_row(r1, n0, c10, c11, out)
    _store_row(r2, n0, c20, c21, out)
    _store_row(r3, n0, c30, c31, out)


# A block stores its rows when its K loop ends; through the caches each line is first read
# for ownership, and a burst of them stalls the block. The forward down (fp32 and bf16 out:
# 3 lines a row per 384 K pairs) ran at 80% of the forward gate_up's rate, 89% with its
# outputs written to 64 L2-resident rows. So avx512_bf16's register blocks put their
# results, LoRA added and rounded, in the thread's scratch (``_hold4``), and where a block
# writes at least one line per ``HOLD_PAIRS`` K pairs of a row and some output goes through
# the caches, they stay held there: the thread's next 12-row block stores them, a line
# every ``DRAIN_STEPS`` of its K steps (``_drain_step``); what it leaves, and what other
# blocks would, is stored after the K loop (``_drain_rest``), and otherwise at once. Zen 5,
# 2 threads, Qwen3-30B-A3B layer, old and new alternated in one process (medians of 12-20
# runs, bit-identical): T=1024 forward down 36.2 -> 34.1 ms and 32.2 -> 30.5 (its fp32 out
# past the caches, bf16 through them), T=512 22.2 -> 20.9; the GEMM alone, both outputs
# through the caches (W [2048, 768], the rows of T=1024) 39.6-40.8 -> 34.9-37.1, int8 40.4
# -> 36.0. With every output past the caches it lost (T=2048: 62.8 -> 65.8), as did sparse
# writers (backward gate_up, 2 lines per 768 pairs: 75.8 -> 78.0): they store at once. The
# drain's test in the 8-row blocks' K loop, where the backward runs, cost its gate_up 1.2
# ms (68.1 -> 69.3); one epilogue for stored and held rows, not two, took the kernel's
# compile from 46 to 34 s. DRAIN_STEPS 4 and 16 the same as 8; 32 no gain.
DRAIN_STEPS = 8
HOLD_PAIRS = 256


@njit(inline="always", **JIT)
def _hold4(rows, slot, c, lora, held, out):
    """``_finish4`` of four ``rows`` (``_dp4``'s accumulators ``c``) into held rows ``slot
    .. slot + 3`` of the thread's ``held`` = (fp32 values [>= 12 * 32], their bf16 bits
    [12 * 32] uint16, ids [2 + 12] int64: count, n0, rows; the block notes the first
    two) in place of the outputs: rounded
    here, so the drain copies lines; rounding in the K loop kept its constants in
    registers, and an accumulator went to the stack."""
    c = _lora4(rows[0], rows[1], rows[2], rows[3], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], lora)
    _hold_row(held, slot, c[0], c[1], out)
    _hold_row(held, slot + 1, c[2], c[3], out)
    _hold_row(held, slot + 2, c[4], c[5], out)
    _hold_row(held, slot + 3, c[6], c[7], out)
    ids = held[2]
    _note(ids, 2 + slot, rows[0])
    _note(ids, 3 + slot, rows[1])
    _note(ids, 4 + slot, rows[2])
    _note(ids, 5 + slot, rows[3])


@njit(**JIT)
def _note(ids, i, value):
    """``ids[i] = value`` for the held row ids, as a call: written as an item assignment in
    the ``prange`` body (inlined), the stores of rows vanished and every held row went to
    row 0 (Numba 0.68.1; its dead-code pass for parallel loops does not see the ``view``
    of the thread's scratch as an alias of it). Calls it keeps; LLVM inlines them."""
    ids[i] = value


@njit(inline="always", **JIT)
def _hold_row(held, slot, c0, c1, out):
    """One row's 32 columns into held row ``slot``: the fp32 values and/or their bf16
    bits, as ``out`` has them."""
    vals, vals16 = held[0], held[1]
    at = slot * TILE_N
    if out[0].size:
        vstore(vals, at, c0)
        vstore(vals, at + LANES, c1)
    if out[1].size:
        vput(vals16, at, c0, False)
        vput(vals16, at + LANES, c1, False)


@njit(inline="always", **JIT)
def _lines(out32, out16):
    """Lines one row of 32 columns stores: two of fp32, one of bf16."""
    return 2 * (out32.size > 0) + (out16.size > 0)


@njit(inline="always", **JIT)
def _drain_line(vals, vals16, ids, i, out32, out16, stream32, stream16):
    """Store held line ``i``: of row ``i // _lines``, an fp32 half or the bf16 row. The
    arrays come unpacked: a tuple unpacked in the K loop took a reference count call there."""
    per = _lines(out32, out16)
    r, kind = i // per, i % per if out32.size else 2
    m, at = ids[2 + r], r * TILE_N
    if kind < 2:
        vcopy_line(vals, at + kind * LANES, out32, m * out32.shape[1] + ids[1] + kind * LANES, stream32)
    else:
        vcopy_line(vals16, at, out16, m * out16.shape[1] + ids[1], stream16)


@njit(inline="always", **JIT)
def _drain_step(vals, vals16, ids, p, out32, out16, stream32, stream16):
    """At K step ``p``, the held line it is due, if any."""
    if p % DRAIN_STEPS == 0:
        i = p // DRAIN_STEPS
        if i < _lines(out32, out16) * ids[0]:
            _drain_line(vals, vals16, ids, i, out32, out16, stream32, stream16)


@njit(inline="always", **JIT)
def _drain_rest(held, steps, out):
    """The held lines ``steps`` K steps of ``_drain_step`` did not store; none held after."""
    vals, vals16, ids = held
    out32, out16, stream32, stream16, _ = out
    for i in range((steps + DRAIN_STEPS - 1) // DRAIN_STEPS, _lines(out32, out16) * ids[0]):
        _drain_line(vals, vals16, ids, i, out32, out16, stream32, stream16)
    _note(ids, 0, 0)


@njit(inline="always", **JIT)
def _item_lora(e, slot, n0, lora_l, ups, up_flat, turned, transposed, group_n, scale, tile):
    """The epilogue's ``lora`` tuple for item (``e``, columns ``n0 .. n0 + 31``).

    ``ups`` (two float32 C arrays): with ``turned``, the caller's factors - in the product
    by ``W``, B [E, N_g, R] of the groups (gate_b, up_b or down_b twice), whose 32 x R
    block the item turns into ``tile`` [R * 32] (16 x 16 blocks in registers,
    ``vtranspose16``); by ``W^T``, A [E, R_j, Kp] (gate_a, up_a or down_a twice) whose
    ranks stack to the R of one group, the item's 32 columns of each rank copied into
    ``tile``; else one ``load`` buffer [S, R, >=Np] of B^T (or A) rows, read in place
    (``up_flat``: its flat view).
    """
    g = n0 // group_n
    if turned and transposed:
        R = lora_l.shape[1]
        for q in range(R):
            a, at = rank_row(ups, e, q)
            vstore(tile, q * TILE_N, vload(a, at + n0))
            vstore(tile, q * TILE_N + LANES, vload(a, at + n0 + LANES))
        return lora_l, 0, tile, 0, TILE_N, R, scale
    if turned:
        b = ups[g]
        N, R = b.shape[1], b.shape[2]
        n = n0 - g * group_n
        for q0 in range(0, R, LANES):
            for half in range(2):
                vtranspose16(b, (e * N + n + half * LANES) * R + q0, R, tile, q0 * TILE_N + half * LANES, TILE_N)
        return lora_l, g * R, tile, 0, TILE_N, R, scale
    R, ld = ups[0].shape[1], ups[0].shape[2]
    return lora_l, g * R, up_flat, slot * R * ld + n0, ld, R, scale


@njit(inline="always", **JIT)
def _hint_a(ups, R, e, n0):
    """Hint into L2 the lines ``_item_lora`` copies for item (``e``, ``n0``): the item
    before asks for them. Zen 4, 2 threads, the backward gate_up GEMM of a T=1024 batch
    (8192 rows, 128 experts), R=32, alternated with reading the ``load`` buffer: 143.5-147.5
    ms from the buffer, 145.2-146.0 in place with the hints, 2.2-2.4 ms slower without."""
    for q in range(R):
        a, at = rank_row(ups, e, q)
        prefetch_l2(a, at + n0)
        prefetch_l2(a, at + n0 + LANES)


def block_take(route, n):
    """Rows the next ``_block`` call covers on ``route`` when the expert has ``n`` rows
    left (a tail block clamps them to its last), in the product by ``W`` and by ``W^T``."""


@overload(block_take, jit_options=JIT)
def _block_take(route, n):
    """avx512_bf16 cuts an expert into 12- and 8-row blocks, as many 12 as leave a whole
    number of 8 for the rest rounded up to 4 rows (16 left: two 8), so a tail repeats at
    most 3 rows, not 5 (a clamped tail costs a whole block; one or two rows alone as much:
    they stream the block's weights for two chains of products). Zen 5, 2 threads, 128
    experts with the real row counts of a T=1024 batch (42-79 each), R=16, alternated with
    8-row blocks: W [2048, 768] 42.3 / 41.2 -> 38.3 / 37.3 ms; the layer's T=1024 step,
    forward gate_up 59.7 / 57.9 -> 57.4 / 55.5, forward down 36.6 / 34.3 -> 34.6 / 32.5.
    The backward too: on Zen 5 its 12-row blocks had lost up to 5% (W^T of [1536, 2048],
    96 rows each: 94.6 -> 101.3 ms) and its layer GEMMs tied, but on Zen 4 (2 threads,
    the row counts of a uniform T=1024 batch, R=16, three alternated runs of 40) they
    gain: W^T of [1536, 2048] best 146.1 / 148.4 / 147.0 -> 143.9 / 145.2 / 144.7 ms,
    of [2048, 768] 70.9 / 72.6 / 77.6 -> 67.8 / 70.7 / 72.8; the T=1024 step best 477.7
    -> 458.3 ms (30 alternated rounds), T=128 tied (160.7 / 159.8)."""
    if route.route == "avx512_bf16":
        def impl(route, n):
            r4 = (n + 3) // 4 * 4
            return MR_WIDE if r4 >= MR_WIDE and r4 != 2 * MR_BF16 else MR_BF16
        return impl
    rows = {"generic": MR, "avx512": MR, "amx": MR_AMX}[route.route]
    return lambda route, n: rows


# Forward: experts with at most this many rows decode each pair vector in registers once
# for all their rows (``_rows_decoding``), no panel. Zen 4, 2 threads, 64 experts x R rows,
# W [1536, 2048], forward, old and new alternated (one register row before, else the
# panel): avx512_bf16 R = 2 int4_k2 14.6-16.2 -> 8.7-10.1 ms, int8 16.9 -> 8.4-9.4, bf16
# 11.7-16.0 -> 10.5-12.8; R = 3 int4_k2 16.3-17.2 -> 10.3-11.3; R = 4 int4_k2 16.7-17.8
# -> 11.7-12.7, bf16 12.0-14.9 -> 14.3-14.6. Two passes of four rows for R = 5..8 (each
# decoding again) gained nothing over the panel. The fp32 FMA routes are bound by their
# widening FMAs, not the decode: R = 2 the same, R = 4 int4_k2 23.2-23.8 -> 25.8-26.2; one.
DECODING_ROWS = 4
DECODING_ROWS_FMA = 1


def decoding_rows(route):
    """Rows up to which an expert's forward decodes in registers on ``route`` (at most the
    four ``_rows_decoding`` holds)."""


@overload(decoding_rows, jit_options=JIT)
def _decoding_rows(route):
    rows = DECODING_ROWS_FMA if route.route in ("generic", "avx512") else DECODING_ROWS
    return lambda route: rows


def _block(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
    """Rows ``m .. m + rows - 1`` (those ``<= last``; ``rows`` from ``block_take``) of ``a`` (uint32 bf16 pairs)
    times the two 16-column blocks of packed weights at flat offset ``w0``, through the
    epilogue. Rows past ``last`` may be read (``ROW_SLACK``), never written.
    ``held`` = (results [SCRATCH] float32, bf16 bits, ids) is the calling thread's own:
    ``amx``'s tile results, the rows avx512_bf16 holds (``_hold4``). Meanwhile it hints the
    lines of ``plan`` of ``pf`` into cache (``_hint``)."""


@njit(inline="always", **JIT)
def _hint(pf, plan, p):
    """Hint line ``p`` of ``plan`` into cache, if it has one. ``plan`` = (base, first,
    count, shift, stride, step, near): its lines are ``first .. first + count - 1`` of a
    list in runs of ``2**shift`` lines, line ``i`` at ``pf.flat[base + (i >> shift) *
    stride + (i % 2**shift) * step]``; ``near`` hints into L1 as well, else into L2. A block
    calls it once per K step: spread out, the hints keep the loads in flight without
    stalling the products a burst would."""
    base, first, count, shift, stride, step, near = plan
    if p < count:
        i = first + p
        at = base + (i >> shift) * stride + (i & ((1 << shift) - 1)) * step
        if near:
            prefetch(pf, at)
        else:
            prefetch_l2(pf, at)


@njit(inline="always", **JIT)
def _hint_share(pf, plan, s, steps):
    """Step ``s`` of ``steps``'s share of the lines of ``plan`` (``amx``: many lines a K step)."""
    count = plan[2]
    for p in range(count * s // steps, count * (s + 1) // steps):
        _hint(pf, plan, p)


@njit(inline="always", **JIT)
def _hints(pf, plan, p0):
    """The lines of ``plan`` from ``p0`` on, at once."""
    for p in range(p0, plan[2]):
        _hint(pf, plan, p)


@njit(inline="always", **JIT)
def _next_sources(codes, transposed, e, tile):
    """(base, lines, shift, stride): the codes item (``e``, ``tile``) reads, as a ``_hint``
    list. Forward: the item's two column blocks, one contiguous run. Backward: its 16
    pairs of every column block, runs of 16 x 16 codes a whole block of K apart, which no
    hardware prefetcher follows."""
    NB, KP2 = codes.shape[1], codes.shape[2]
    if transposed:
        shift = 2 + (codes.itemsize >= 2) + (codes.itemsize >= 4)      # 16 x 16 codes: 4 * itemsize lines
        return (e * NB * KP2 + tile * (TILE_N // 2)) * LANES, NB << shift, shift, KP2 * LANES
    return (e * NB + tile * (TILE_N // LANES)) * KP2 * LANES, TILE_N * KP2 * codes.itemsize // 64, ONE_RUN, 0


@njit(**JIT)
def _pair_fma(x, b0l, b0h, b1l, b1h, c0, c1):
    """One row's VNNI pair ``x`` into its two accumulators: c += lo(x) b_lo + hi(x) b_hi."""
    c0, c1 = vfma2(vsplat(f32_from_bits(x << np.uint32(16))), b0l, b1l, c0, c1)
    return vfma2(vsplat(f32_from_bits(x & np.uint32(0xFFFF0000))), b0h, b1h, c0, c1)


def _pair_step(route, x, b0, b1, c0, c1):
    """One row's bf16 pair ``x`` against two 16-column weight pair vectors: (c0, c1) +=."""


@overload(_pair_step, jit_options=JIT)
def _pair_step_route(route, x, b0, b1, c0, c1):
    if route.route in ("generic", "avx512"):
        return lambda route, x, b0, b1, c0, c1: _pair_fma(x, vpair_lo(b0), vpair_hi(b0), vpair_lo(b1),
                                                          vpair_hi(b1), c0, c1)
    return lambda route, x, b0, b1, c0, c1: _dp2(vsplat_pair(x), b0, b1, c0, c1)   # amx CPUs have it too


@njit(inline="always", **JIT)
def _row(route, a, r, w, w0, k2):
    """Row ``r`` of ``a`` times the two 16-column blocks at ``w0``, over all of K: (c0, c1)."""
    w1 = w0 + k2 * LANES
    c0, c1 = vzero(), vzero()
    for p in range(k2):
        c0, c1 = _pair_step(route, a[r, p], vload(w, w0 + p * LANES), vload(w, w1 + p * LANES), c0, c1)
    return c0, c1


@njit(inline="always", **JIT)
def _tail_rows(route, a, m, last, w, w0, k2, n0, lora, out):
    """Rows m..last, fewer than a block: one at a time over the (by now cached) weights,
    not a clamped block of duplicate rows (decode: one row per expert, no wasted work)."""
    for r in range(m, last + 1):
        c0, c1 = _row(route, a, r, w, w0, k2)
        _finish_row(r, n0, c0, c1, lora, out)


@overload(_block, jit_options=JIT, inline="always")
def _block_fma(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
    """generic / avx512: widen each weight pair to two fp32 vectors once per step, 2 FMAs
    per row; 4 rows x 32 columns = 8 accumulators (fits 16 registers of any vector ISA).
    Fewer rows than a block go to ``_tail_rows``."""
    if route.route not in ("generic", "avx512"):
        return None

    def impl(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
        w1 = w0 + k2 * LANES
        if last - m + 1 < MR:
            _hints(pf, plan, 0)
            _tail_rows(route, a, m, last, w, w0, k2, n0, lora, out)
            return
        r1, r2, r3 = m + 1, m + 2, m + 3
        c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
        c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
        for p in range(k2):
            _hint(pf, plan, p)
            b0 = vload(w, w0 + p * LANES)
            b1 = vload(w, w1 + p * LANES)
            b0l, b0h, b1l, b1h = vpair_lo(b0), vpair_hi(b0), vpair_lo(b1), vpair_hi(b1)
            c00, c01 = _pair_fma(a[m, p], b0l, b0h, b1l, b1h, c00, c01)
            c10, c11 = _pair_fma(a[r1, p], b0l, b0h, b1l, b1h, c10, c11)
            c20, c21 = _pair_fma(a[r2, p], b0l, b0h, b1l, b1h, c20, c21)
            c30, c31 = _pair_fma(a[r3, p], b0l, b0h, b1l, b1h, c30, c31)
        _hints(pf, plan, k2)
        _finish4(m, r1, r2, r3, n0, c00, c01, c10, c11, c20, c21, c30, c31, lora, out)
    return impl


@njit(**JIT)
def _dp2(x, b0, b1, c0, c1):
    return vdpbf16(c0, x, b0), vdpbf16(c1, x, b1)


@njit(inline="always", **JIT)
def _dp4(a, p, rows, b0, b1, c):
    """Four ``rows``' pair ``p`` against the step's two weight vectors: ``c`` = their
    eight accumulators (row by row, two each)."""
    c00, c01 = _dp2(vsplat_pair(a[rows[0], p]), b0, b1, c[0], c[1])
    c10, c11 = _dp2(vsplat_pair(a[rows[1], p]), b0, b1, c[2], c[3])
    c20, c21 = _dp2(vsplat_pair(a[rows[2], p]), b0, b1, c[4], c[5])
    c30, c31 = _dp2(vsplat_pair(a[rows[3], p]), b0, b1, c[6], c[7])
    return c00, c01, c10, c11, c20, c21, c30, c31


@njit(inline="always", **JIT)
def _step_pairs(w, w0, w1, p, pf, plan):
    """K step ``p``'s two weight vectors (columns ``n0 .. n0 + 31``), after its share of
    the next item's hints."""
    _hint(pf, plan, p)
    return vload(w, w0 + p * LANES), vload(w, w1 + p * LANES)


@njit(inline="always", **JIT)
def _rows4(m, last):
    """Rows ``m .. m + 3``, those past ``last`` clamped to it."""
    return m, min(m + 1, last), min(m + 2, last), min(m + 3, last)


@njit(inline="always", **JIT)
def _bf16_steps(a, rows0, rows1, rows2, w, w0, k2, pf, plan, held, out, wide):
    """avx512_bf16's K loop: the accumulators (``_dp4``'s, four rows each) of ``rows0``,
    ``rows1`` and, ``wide``, ``rows2``; ``wide``, it meanwhile stores the lines the
    thread's block before held, if any (``_drain_step``)."""
    vals, vals16, ids = held
    out32, out16, stream32, stream16, _ = out
    w1 = w0 + k2 * LANES
    z = vzero()
    c0 = c1 = c2 = (z, z, z, z, z, z, z, z)
    for p in range(k2):
        b0, b1 = _step_pairs(w, w0, w1, p, pf, plan)
        if wide:
            _drain_step(vals, vals16, ids, p, out32, out16, stream32, stream16)
        c0, c1 = _dp4(a, p, rows0, b0, b1, c0), _dp4(a, p, rows1, b0, b1, c1)
        if wide:
            c2 = _dp4(a, p, rows2, b0, b1, c2)
    _hints(pf, plan, k2)
    return c0, c1, c2


@overload(_block, jit_options=JIT, inline="always")
def _block_bf16(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
    """avx512_bf16: one ``vdpbf16ps`` per row and 16 columns per K pair, the row's pair
    broadcast; 8 rows x 32 columns = 16 accumulators of the 32 zmm registers, or 12 rows
    = 24 where ``block_take`` gives 12 (``rows``). A tail of ``CLAMP_ROWS`` or more rows
    repeats its last row to fill the block; fewer go to ``_tail_rows``. Its rows go
    through the thread's scratch (``_hold4``), stored after the K loop, or, where ``out``
    says so, held for the next block to store (``HOLD_PAIRS``)."""
    if route.route != "avx512_bf16":
        return None

    def impl(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
        if last - m + 1 < CLAMP_ROWS:
            _hints(pf, plan, 0)
            _tail_rows(route, a, m, last, w, w0, k2, n0, lora, out)
            return
        rows0, rows1, rows2 = _rows4(m, last), _rows4(min(m + 4, last), last), _rows4(min(m + 8, last), last)
        wide = rows == MR_WIDE
        if wide:                                    # constant flags: one loop each
            c = _bf16_steps(a, rows0, rows1, rows2, w, w0, k2, pf, plan, held, out, True)
        else:
            c = _bf16_steps(a, rows0, rows1, rows2, w, w0, k2, pf, plan, held, out, False)
        _drain_rest(held, k2 if wide else 0, out)   # the lines the K loop did not store
        _hold4(rows0, 0, c[0], lora, held, out)
        _hold4(rows1, 4, c[1], lora, held, out)
        if wide:
            _hold4(rows2, 8, c[2], lora, held, out)
        _note(held[2], 0, rows)
        _note(held[2], 1, n0)
        if not out[4]:                              # not held for the next block: stored now
            _drain_rest(held, 0, out)
    return impl


@overload(_block, jit_options=JIT, inline="always")
def _block_amx(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
    """amx: 2 x 2 tiles of 16 x 16 fp32 (32 rows x 32 columns) over K in steps of 32:
    per step 2 A tiles (16 rows x 32 bf16) and 2 B tiles (16 pairs x 16 columns: 1 KiB
    contiguous in the packed layout), 4 ``tdpbf16ps``; 8 tile registers. A block of at
    most 16 rows uses one row of tiles. The fp32 result goes through the thread's 4 KiB
    scratch to the shared epilogue."""
    if route.route != "amx":
        return None

    def impl(route, a, m, last, rows, w, w0, k2, n0, lora, out, held, pf, plan):
        scratch = held[0]
        base, first, count, shift, stride, step, _ = plan
        l2 = (base, first, count, shift, stride, step, False)
        ld = a.shape[1]
        w1 = w0 + k2 * LANES
        c00, c01 = tile_zero(), tile_zero()
        if last - m < 16:
            for p in range(0, k2, 16):
                _hint_share(pf, l2, p // 16, k2 // 16)
                a0 = tile_load(a, m * ld + p, ld * 4)
                c00 = tile_dpbf16(c00, a0, tile_load(w, w0 + p * LANES, 64))
                c01 = tile_dpbf16(c01, a0, tile_load(w, w1 + p * LANES, 64))
        else:
            c10, c11 = tile_zero(), tile_zero()
            for p in range(0, k2, 16):
                _hint_share(pf, l2, p // 16, k2 // 16)
                a0 = tile_load(a, m * ld + p, ld * 4)
                a1 = tile_load(a, (m + 16) * ld + p, ld * 4)
                b0 = tile_load(w, w0 + p * LANES, 64)
                b1 = tile_load(w, w1 + p * LANES, 64)
                c00 = tile_dpbf16(c00, a0, b0)
                c01 = tile_dpbf16(c01, a0, b1)
                c10 = tile_dpbf16(c10, a1, b0)
                c11 = tile_dpbf16(c11, a1, b1)
            tile_store(scratch, 16 * TILE_N, TILE_N * 4, c10)
            tile_store(scratch, 16 * TILE_N + LANES, TILE_N * 4, c11)
        tile_store(scratch, 0, TILE_N * 4, c00)
        tile_store(scratch, LANES, TILE_N * 4, c01)
        # four rows at a time (``_finish4``: each up-factor row loaded once for the four,
        # four FMA chains), not row by row. Emerald Rapids, 2 threads, 128 experts x 64
        # rows, R=16: W [2048, 768] 69.6 -> 44.7 ms, W [1536, 2048] 85.9 -> 74.4 ms
        n = min(MR_AMX, last - m + 1)
        for i in range(0, n - 3, 4):
            at = i * TILE_N
            _finish4(m + i, m + i + 1, m + i + 2, m + i + 3, n0,
                     vload(scratch, at), vload(scratch, at + LANES),
                     vload(scratch, at + TILE_N), vload(scratch, at + TILE_N + LANES),
                     vload(scratch, at + 2 * TILE_N), vload(scratch, at + 2 * TILE_N + LANES),
                     vload(scratch, at + 3 * TILE_N), vload(scratch, at + 3 * TILE_N + LANES), lora, out)
        for i in range(n & ~3, n):
            _finish_row(m + i, n0, vload(scratch, i * TILE_N), vload(scratch, i * TILE_N + LANES),
                        lora, out)
    return impl


@njit(**JIT)
def _mixed(busiest, counts):
    """``busiest`` (experts, busiest first) reordered so that every prefix holds about the
    same share of the rows as of the experts: the busiest left while the rows taken trail
    the experts taken, else the idlest left (the share of rows stays above that of the
    experts less ``1/n``, and below it plus one expert's share of the rows). Any run cut
    by cost then streams about its share of the weights while it multiplies its share of
    the rows. Busiest first, a skewed router gave one of two threads 14 experts that were
    mostly products and the other 115 that were mostly weight reads, which did not hide
    under products. Zen 4, 2 threads, Qwen3-30B-A3B layer, T=1024, Zipf s=1.2 (busiest
    expert 11.8% of the pairs), alternated with the old order: forward 234.8 / 234.7 ->
    212.8 / 210.5 ms, step 505.8 / 505.2 -> 490.5 / 481.1 (uniform routing: a tie)."""
    n = busiest.size
    total = counts[busiest].sum()
    order = np.empty_like(busiest)
    lo, hi, rows = 0, n - 1, 0
    for j in range(n):
        if rows * n <= total * j:
            e = busiest[lo]
            lo += 1
        else:
            e = busiest[hi]
            hi -= 1
        order[j] = e
        rows += counts[e]
    return order


@njit(**JIT)
def make_tasks(offsets, slot_of_expert, n_tiles, n_chunks):
    """Work items ``tasks [n, 2]`` = (expert, tile) for the active experts with rows, in
    ``_mixed`` order, and ``bounds [n_chunks + 1]``: ``balanced`` runs of rows +
    ``PANEL_COST`` each. An expert with a slot but no rows gets no item: the few-row
    forward stores its first row unconditionally, which for an empty expert is the next
    expert's row (or one past the last)."""
    E = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:E]
    experts = np.argsort(-counts, kind="mergesort")
    experts = _mixed(experts[(slot_of_expert[experts] >= 0) & (counts[experts] > 0)], counts)
    tasks = np.empty((experts.size * n_tiles, 2), np.int64)
    cost = np.empty(experts.size * n_tiles, np.int64)
    i = 0
    for e in experts:
        for tile in range(n_tiles):
            tasks[i, 0] = e
            tasks[i, 1] = tile
            cost[i] = counts[e] + PANEL_COST
            i += 1
    return tasks, balanced(cost, n_chunks)


def _group_scales(codes, scales, zeros, sc):
    """(zero points ``u32x16``, scales ``f32x16``) of 16 columns of one group, at
    ``scales.flat[sc:sc+16]`` (format: module docstring); unused for bf16."""


@overload(_group_scales, jit_options=JIT, inline="always")
def _group_scales_format(codes, scales, zeros, sc):
    if codes.dtype == types.uint32:
        return lambda codes, scales, zeros, sc: (vsplat_pair(0), vzero())
    if codes.dtype == types.uint16:
        return lambda codes, scales, zeros, sc: (vsplat_pair(0), vload(scales, sc))
    if scales.dtype == types.float32:
        return lambda codes, scales, zeros, sc: (vload_u8(zeros, sc), vload(scales, sc))
    return lambda codes, scales, zeros, sc: (8, vload_bf16(scales, sc))


def _decode(route, codes, at, zero, scale):
    """The 16 bf16 pairs of ``codes.flat[at:at+16]`` as a ``u32x16``, with the group's
    ``_group_scales``. Routes with bf16 instructions round with them
    (``isa.vdequant_bf16``): the same bits, fewer steps."""


@overload(_decode, jit_options=JIT, inline="always")
def _decode_format(route, codes, at, zero, scale):
    if codes.dtype == types.uint32:
        return lambda route, codes, at, zero, scale: vload(codes, at)
    if route.route in BF16_ROUTES:
        return lambda route, codes, at, zero, scale: vdequant_bf16(codes, at, zero, scale)
    return lambda route, codes, at, zero, scale: vdequant(codes, at, zero, scale)


def _forward_panel(route, codes, flat, scales, zeros, group_pairs, e, nb0, panel):
    """(array, offset) of the two 16-column blocks ``nb0, nb0 + 1`` of expert ``e`` in
    VNNI order over all of K: the stored codes themselves for bf16, else ``panel``
    [2 * Kp/2 * 16] uint32 filled by decoding them."""


@overload(_forward_panel, jit_options=JIT, inline="always")
def _forward_panel_format(route, codes, flat, scales, zeros, group_pairs, e, nb0, panel):
    if codes.dtype == types.uint32:
        return lambda route, codes, flat, scales, zeros, group_pairs, e, nb0, panel: \
            (flat, (e * codes.shape[1] + nb0) * codes.shape[2] * LANES)

    def impl(route, codes, flat, scales, zeros, group_pairs, e, nb0, panel):
        NB, KP2 = codes.shape[1], codes.shape[2]
        G = scales.shape[2]
        for b in range(2):
            at = (e * NB + nb0 + b) * KP2 * LANES
            for g in range(G):                          # K is whole groups: G * group_pairs == KP2
                zero, scale = _group_scales(codes, scales, zeros, ((e * NB + nb0 + b) * G + g) * LANES)
                for p in range(g * group_pairs, (g + 1) * group_pairs):
                    vstore(panel, (b * KP2 + p) * LANES, _decode(route, flat, at + p * LANES, zero, scale))
        return panel, 0
    return impl


def _turn8(route, codes, flat, scales, zeros, g, e, nb, p, panel, j, tmp):
    """``panel.flat[j + 16 q]`` (q = 0..7) := the pairs along N of block ``nb``'s 16 rows at
    its pairs ``p .. p + 7`` (16 columns of group ``g``): ``vtranspose8`` of the stored
    bf16 pairs in place; of 8 vectors decoded into ``tmp`` [128] uint32 for int8, and for
    int4 on routes without bf16 instructions; else ``isa.vturn4_bf16``, which turns the
    4-bit codes first and then looks up their bf16 levels. Zen 4, one thread, N = 64, K =
    128 (codes in L1), a 16 x 16 block: int4_k2 20.2 -> 10.6 ns, int4_awq 23.5 -> 16.5;
    bf16 8.1 (``bench/RESULTS.md``, seventeenth pass)."""


@overload(_turn8, jit_options=JIT, inline="always")
def _turn8_format(route, codes, flat, scales, zeros, g, e, nb, p, panel, j, tmp):
    if codes.dtype == types.uint32:
        def impl(route, codes, flat, scales, zeros, g, e, nb, p, panel, j, tmp):
            vtranspose8(flat, ((e * codes.shape[1] + nb) * codes.shape[2] + p) * LANES, panel, j)
        return impl
    if codes.dtype == types.uint8 and route.route in BF16_ROUTES:
        def impl(route, codes, flat, scales, zeros, g, e, nb, p, panel, j, tmp):
            at = ((e * codes.shape[1] + nb) * codes.shape[2] + p) * LANES
            vturn4_bf16(flat, at, scales, zeros, ((e * codes.shape[1] + nb) * scales.shape[2] + g) * LANES, panel, j)
        return impl

    def impl(route, codes, flat, scales, zeros, g, e, nb, p, panel, j, tmp):
        at = ((e * codes.shape[1] + nb) * codes.shape[2] + p) * LANES
        zero, scale = _group_scales(codes, scales, zeros, ((e * codes.shape[1] + nb) * scales.shape[2] + g) * LANES)
        for i in range(8):
            vstore(tmp, i * LANES, _decode(route, flat, at + i * LANES, zero, scale))
        vtranspose8(tmp, 0, panel, j)
    return impl


# Decoding in registers keeps the out-of-order window full of decode work: it runs too
# short a way ahead of its loads to keep DRAM busy, so ``_rows_decoding`` hints each
# stream's line this far ahead into L2 (``_ahead``; a hint past the last code never
# faults). Zen 5, 2 threads, 128 experts x 1 row, W [1536, 2048] forward, read ~45-50
# GB/s: int8 14.5-20.0 -> 9.6-10.3 ms (0.81-0.85 of the read rate), int4_awq 10.7-18.8
# -> 8.5-11.4, int4_k2 and bf16 within the VM's spread; 4096 the same as 2048, into L1
# as well no better. A panel's decode gains nothing from it:
# writing and reading back its 128 KiB bounds it.
AHEAD_BYTES = 2048


def _ahead(flat, at, p):
    """At pair ``p`` of the quantized code vectors from ``flat[at]`` on, hint the line
    ``AHEAD_BYTES`` further into L2, once per line (bf16 pairs, read in place, hint
    nothing: the hardware prefetchers keep up with them)."""


@overload(_ahead, jit_options=JIT, inline="always")
def _ahead_codes(flat, at, p):
    """The pairs per line and the distance are constants of the code type: ``flat.itemsize``
    is a run-time field, and ``p % (64 // (16 * itemsize))`` compiled to an ``idiv`` per
    pair that bounded the decode. Zen 5, 2 threads, 128 experts x 1 row, W [1536, 2048],
    two runs each: int4_awq 9.47 / 7.69 -> 6.81 / 7.32 ms, int4_k2 13.70 / 13.11 -> 9.72 /
    9.24; int8 (bound by the reads) 8.94 / 11.19 -> 9.38 / 9.63."""
    if flat.dtype.bitwidth >= 32:
        return lambda flat, at, p: None
    per_line = 64 // (LANES * flat.dtype.bitwidth // 8)
    ahead = AHEAD_BYTES // (LANES * flat.dtype.bitwidth // 8)

    def impl(flat, at, p):
        if p % per_line == 0:
            prefetch_l2(flat, at + (p + ahead) * LANES)
    return impl


# An item's first ``AHEAD_BYTES`` of each stream are beyond ``_ahead``'s reach, so the item
# before it on the thread hints them (``_ahead_item``). Zen 5, 2 threads, 128 experts x 1
# row, forward, 12 rounds interleaved in one process (a contended minute, reads ~31-37
# GB/s): down shape W [2048, 768] (12 KiB streams) int8 median 10.95 -> 10.32 ms,
# int4_awq 12.21 -> 11.56; gate_up shape W [1536, 2048] (32 KiB streams) int8 18.48 ->
# 18.36; bf16 hinted the same way 13.55 -> 13.95, so it is not (as in ``_ahead``).
# The item's scales (and zeros) too, all of them: each group's decode waits on its scale
# line, and short scale streams (12 lines a block at K=768, group 32) end before the
# hardware prefetchers follow them. Zen 5, 2 threads, 128 experts x 1 row, W [2048,
# 768], group 32, 3 alternated rounds: int4_k2 7.40-8.45 -> 4.04-4.20 ms, int4_awq
# 8.03-11.47 -> 5.24-5.56.
@njit(inline="always", **JIT)
def _ahead_item(codes, flat, scales, zeros, e, tile):
    """Hint the first ``AHEAD_BYTES`` of both quantized code streams of item (``e``,
    ``tile``) into L2, and all of its scales and zeros (bf16 nothing)."""
    if flat.itemsize < 4:
        KP2 = codes.shape[2]
        at0 = _next_sources(codes, False, e, tile)[0]
        for at in (at0, at0 + KP2 * LANES):
            for i in range(0, min(AHEAD_BYTES // flat.itemsize, KP2 * LANES), 64 // flat.itemsize):
                prefetch_l2(flat, at + i)
        G = scales.shape[2]
        s0 = (e * codes.shape[1] + tile * (TILE_N // LANES)) * G * LANES
        for i in range(0, 2 * G * LANES, 64 // scales.itemsize):
            prefetch_l2(scales, s0 + i)
        if zeros.size:
            for i in range(0, 2 * G * LANES, 64 // zeros.itemsize):
                prefetch_l2(zeros, s0 + i)


@njit(inline="always", **JIT)
def _rows_decoding(route, a, m, last, codes, flat, scales, zeros, group_pairs, e, nb0, n0, lora, out):
    """Rows ``m .. min(m + 3, last)`` of ``a`` times blocks ``nb0, nb0 + 1`` of expert ``e``,
    through the epilogue, decoding each pair vector in registers once for all of them: no
    panel stored and read back (bf16: read in place once, not once per row). The row
    count ``n`` is loop-invariant: LLVM unswitches the loop into one per count, so one
    row keeps two accumulators and does no work for absent rows."""
    NB, KP2 = codes.shape[1], codes.shape[2]
    G = scales.shape[2]
    at0 = (e * NB + nb0) * KP2 * LANES
    at1 = at0 + KP2 * LANES
    n = min(last - m + 1, 4)
    r1, r2, r3 = min(m + 1, last), min(m + 2, last), min(m + 3, last)
    c00, c01, c10, c11 = vzero(), vzero(), vzero(), vzero()
    c20, c21, c30, c31 = vzero(), vzero(), vzero(), vzero()
    for g in range(G):
        z0, s0 = _group_scales(codes, scales, zeros, ((e * NB + nb0) * G + g) * LANES)
        z1, s1 = _group_scales(codes, scales, zeros, ((e * NB + nb0 + 1) * G + g) * LANES)
        for p in range(g * group_pairs, (g + 1) * group_pairs):
            _ahead(flat, at0, p)
            _ahead(flat, at1, p)
            b0 = _decode(route, flat, at0 + p * LANES, z0, s0)
            b1 = _decode(route, flat, at1 + p * LANES, z1, s1)
            c00, c01 = _pair_step(route, a[m, p], b0, b1, c00, c01)
            if n > 1:
                c10, c11 = _pair_step(route, a[r1, p], b0, b1, c10, c11)
            if n > 2:
                c20, c21 = _pair_step(route, a[r2, p], b0, b1, c20, c21)
            if n > 3:
                c30, c31 = _pair_step(route, a[r3, p], b0, b1, c30, c31)
    _finish_row(m, n0, c00, c01, lora, out)
    if n > 1:
        _finish_row(r1, n0, c10, c11, lora, out)
    if n > 2:
        _finish_row(r2, n0, c20, c21, lora, out)
    if n > 3:
        _finish_row(r3, n0, c30, c31, lora, out)


@njit(inline="always", **JIT)
def _backward_panel(route, codes, flat, scales, zeros, group_pairs, e, p0, panel, tmp):
    """``panel`` [2 * Np/2 * 16] uint32 := the VNNI layout of ``W[e]^T`` for the 32 output
    columns ``2 p0 .. 2 p0 + 31``: block b, pair q, lane j holds ``(W[2q, 2 p0 + 16 b + j],
    W[2q + 1, ...])``, each 16 x 16 block turned by ``_turn8``. Zen 5, 2 threads, bf16: ~2 us
    an item of W [1536, 2048] inside the backward (``bench/bench_panels.py``), ~12% of it at
    64 rows an expert; built a K chunk at a time into L1, or a share of the next item's
    panel per block of this one, it was no faster (the shuffles take the products' issue
    slots: ``bench/RESULTS.md``, eleventh pass)."""
    NB, KP2 = codes.shape[1], codes.shape[2]
    q_pairs = NB * 8
    line = 64 // flat.itemsize
    g = p0 // group_pairs          # the item's 16 pairs lie in one group: int4 groups are whole PADs
    for nb in range(NB):
        # blocks nb sit a whole block of K pairs apart: fetch the one PREFETCH_BLOCKS ahead
        ahead = ((e * NB + min(nb + PREFETCH_BLOCKS, NB - 1)) * KP2 + p0) * LANES
        for i in range(0, 16 * LANES, line):
            prefetch(flat, ahead + i)
        for b in range(2):
            _turn8(route, codes, flat, scales, zeros, g, e, nb, p0 + 8 * b, panel, (b * q_pairs + 8 * nb) * LANES, tmp)


# Items of fewer blocks hint nothing: they stream their panel no faster than the hardware
# prefetchers fetch it, and the hints only add traffic. Zen 4, 2 threads, Qwen3-30B-A3B
# layer, T=16 forward, compared at the same read rate of the VM (it moves between 35 and
# 60 GB/s from minute to minute): at ~35 GB/s 33.9-35.3 ms hinting every item, 31.1-31.3
# ms without; at ~60 GB/s 29.1 against 23.5-24.3.
HINT_BLOCKS = 2
ONE_RUN = 62       # the ``_hint`` shift of a list that is one run: i >> 62 == 0 for any line
SCRATCH = MR_AMX * TILE_N          # words of a thread's AMX block results (float32)
HELD16 = MR_WIDE * TILE_N          # the words of held rows' bf16 bits in them, then of their ids
HELD_IDS = HELD16 + MR_WIDE * TILE_N // 2
# Backward panels: prefetch distance in 16-row blocks. Zen 4, 2 threads, 128 experts x 1
# row, W^T of [1536, 2048] bf16: 77 ms without prefetch, 50 with 2 or 4 blocks, 48 with 8.
PREFETCH_BLOCKS = 4
TMP = 8 * LANES                    # words of 8 decoded vectors
_SCRATCH = [np.zeros((0, 0), np.uint32)]


def thread_scratch(words):
    """[threads, >= words] uint32, one row per ``prange`` run (Numba's thread count now),
    grown on demand and reused by every call: no allocation inside the kernels."""
    threads = numba.get_num_threads()
    rows, have = _SCRATCH[0].shape
    if rows < threads or have < words:
        _SCRATCH[0] = np.zeros((max(rows, threads), max(have, words)), np.uint32)
    return _SCRATCH[0][:threads]


@njit(**JIT_PARALLEL)
def _grouped_gemm(route, a, codes, flat, scales, zeros, group_pairs, transposed, offsets, slot_of_expert, tasks,
                  bounds, lora_l, ups, turned, group_n, scale, out, scratch):
    k2 = codes.shape[1] * 8 if transposed else codes.shape[2]
    at_tile = SCRATCH + TMP + 2 * k2 * LANES
    up_flat = ups[0].reshape(-1)
    for c in prange(bounds.shape[0] - 1):
        own = scratch[c]                                    # this run's scratch: no sharing
        results = own[:SCRATCH].view(np.float32)
        # held rows (avx512_bf16, ``hold``) in the words amx keeps its tile results in:
        # fp32 values, bf16 bits, then the ids (count, n0, rows: 2 + MR_WIDE int64)
        ids = own[HELD_IDS:HELD_IDS + 2 * (2 + MR_WIDE)].view(np.int64)
        held = (results, own[HELD16:HELD_IDS].view(np.uint16), ids)
        _note(ids, 0, 0)
        tmp = own[SCRATCH:SCRATCH + TMP]
        panel = own[SCRATCH + TMP:at_tile]
        tile = own[at_tile:].view(np.float32)
        for i in range(bounds[c], bounds[c + 1]):
            e = tasks[i, 0]
            n0 = tasks[i, 1] * TILE_N
            lora = _item_lora(e, slot_of_expert[e], n0, lora_l, ups, up_flat, turned, transposed, group_n, scale,
                              tile)
            if turned and transposed and i + 1 < bounds[c + 1]:
                _hint_a(ups, lora_l.shape[1], tasks[i + 1, 0], tasks[i + 1, 1] * TILE_N)
            last = offsets[e + 1] - 1
            if not transposed and last - offsets[e] < decoding_rows(route):
                if i + 1 < bounds[c + 1]:
                    _ahead_item(codes, flat, scales, zeros, tasks[i + 1, 0], tasks[i + 1, 1])
                _rows_decoding(route, a, offsets[e], last, codes, flat, scales, zeros, group_pairs, e, n0 // LANES, n0,
                               lora, out)
                continue
            if transposed:
                _backward_panel(route, codes, flat, scales, zeros, group_pairs, e, n0 // 2, panel, tmp)
                src, w0 = panel, 0
            else:
                src, w0 = _forward_panel(route, codes, flat, scales, zeros, group_pairs, e, n0 // LANES, panel)
            blocks = 0
            m = offsets[e]
            while m <= last:
                m += block_take(route, last - m + 1)
                blocks += 1
            base, lines, shift, stride = 0, 0, ONE_RUN, 0
            if blocks >= HINT_BLOCKS and i + 1 < bounds[c + 1]:
                base, lines, shift, stride = _next_sources(codes, transposed, tasks[i + 1, 0], tasks[i + 1, 1])
            m = offsets[e]
            for j in range(blocks):                 # the next item's codes, a share per block
                first = lines * j // blocks
                plan = (base, first, lines * (j + 1) // blocks - first, shift, stride, 64 // flat.itemsize, transposed)
                take = block_take(route, last - m + 1)
                _block(route, a, m, last, take, src, w0, k2, n0, lora, out, held, flat, plan)
                m += take
        if out[4]:
            _drain_rest(held, 0, out)


def _cache_bytes():
    """The largest cache of CPU 0 as Linux reports it (sysfs), else 32 MiB."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=32 << 20)


# An output larger than the last-level cache cannot stay there for the pass that reads it
# next, so it is stored past the caches (``vput``: no read of each line before it is
# written): the GEMMs' outputs, and the fp32 ones of ``pair_grads`` and
# ``silu_mul_backward``. Zen 4, 2 threads, Qwen3-30B-A3B layer at T=1024 (32 MiB L3):
# forward down 72.5 -> 69.0 ms, backward gate_up 147.6 -> 142.5, backward down 71.2 ->
# 69.0; Zen 5, the same step, three alternated pairs: pair_grads 4.16 / 4.22 / 3.08 ->
# 3.42 / 2.85 / 3.33 ms, silu_mul_backward 3.41 / 3.95 / 2.28 -> 2.88 / 2.33 / 2.80.
STREAM_BYTES = _cache_bytes()


def streams(out, rows):
    """Whether ``rows`` rows of ``out`` are stored past the caches: more than
    ``STREAM_BYTES``, rows aligned to the bytes one store writes (64 fp32, 32 bf16)."""
    align = LANES * out.itemsize
    return bool(rows * out.strides[0] > STREAM_BYTES and out.ctypes.data % align == 0
                and out.strides[0] % align == 0)


def grouped_gemm(route, a, w, offsets, slot_of_expert, lora_l, lora_r, group_n, scale, out32, out16,
                 transposed=False):
    """The grouped GEMM of the module docstring, on every thread, balanced by cost.

    a [>=P + ROW_SLACK, Kp/2] uint32 (bf16 pairs, expert order); w: the ``PackedWeight``
    of ``W [E, N, K]``; offsets [E+1] int64; slot_of_expert [E] int64; lora_l [>=P, G*R]
    float32; lora_r: a ``load`` buffer [S, R, >=Np] float32 (per active slot: B^T, or A),
    or a tuple of the caller's arrays, float32, C order, read in place (``_item_lora``):
    by ``W``, B [E, N_g, R], one per group (gate_b, up_b; or down_b), N_g == group_n, R
    a multiple of 16; by ``W^T``, A [E, R_j, Kp] of one group (gate_a, up_a; or down_a),
    ranks stacking to lora_l's columns; group_n: columns per LoRA group; out32 [>=P, Np]
    float32 or empty; out16 [>=P, Np] uint16 or empty. With ``transposed`` the product
    is by ``W^T`` from the same codes: ``a`` [.., Np/2], outputs ``Kp`` columns wide.
    """
    route.require()
    NB, KP2 = w.codes.shape[1], w.codes.shape[2]
    k2, tiles = (NB * 8, 2 * KP2 // TILE_N) if transposed else (KP2, NB * LANES // TILE_N)
    turned = isinstance(lora_r, tuple)
    ups = (lora_r * 2)[:2] if turned else (lora_r, lora_r)      # one type for both kinds: one compile
    tile = (lora_l.shape[1] if transposed else ups[0].shape[2]) * TILE_N if turned else 0
    scratch = thread_scratch(SCRATCH + TMP + 2 * k2 * LANES + tile)
    tasks, bounds = make_tasks(offsets, slot_of_expert, tiles, scratch.shape[0])
    stream32, stream16 = streams(out32, offsets[-1]), streams(out16, offsets[-1])
    cached = bool(out32.size and not stream32) or bool(out16.size and not stream16)
    hold = route.name == "avx512_bf16" and cached and _lines(out32, out16) * HOLD_PAIRS >= k2
    _grouped_gemm(route, a, w.codes, w.codes.reshape(-1), w.scales, w.zeros, w.group_pairs, transposed, offsets,
                  slot_of_expert, tasks, bounds, lora_l, ups, turned, group_n, scale,
                  (out32, out16, stream32, stream16, hold), scratch)


@njit(**JIT_PARALLEL)
def pack_pairs(src, out, block0):
    """out[block0 + n // 16, p, n % 16] = src[n, p]: one expert's pairs (bf16 pairs uint32,
    int8 pairs uint16, nibble pairs uint8) ``src [N, Kp/2]`` into ``out [>=block0 + N/16,
    Kp/2, 16]``, zero-initialised by the caller (pads stay zero)."""
    N, KP2 = src.shape
    for b in prange((N + LANES - 1) // LANES):
        for p in range(KP2):
            for j in range(min(LANES, N - b * LANES)):
                out[block0 + b, p, j] = src[b * LANES + j, p]


_CODE_DTYPE = {"bf16": np.uint32, "int8": np.uint16, "int4_awq": np.uint8, "int4_k2": np.uint8}
_NO_SCALES = np.zeros((0, 1, 1, LANES), np.float32)
_NO_ZEROS = np.zeros((0, 1, 1, LANES), np.uint8)


class PackedWeight:
    """One stored copy of ``W [E, N, K]`` - or of several weights stacked along N, each
    padded to ``PAD`` (gate | up) - in its format, in the layout of the module docstring.

    ``parts``: uint16 arrays (bf16 bits) [E, N_i, K] for ``"bf16"``, else
    ``nbmoe.QuantizedWeight`` objects of format ``fmt``, all with the same E and K (int4:
    K a multiple of ``PAD``, so groups never straddle a padded column). Packs one expert
    at a time: no float32 or whole-weight temporary.
    """

    def __init__(self, parts, fmt):
        E, _, K = parts[0].shape
        Kp = padded(K)
        heights = [padded(p.shape[1]) for p in parts]
        Np = sum(heights)
        self.format = fmt
        self.codes = np.zeros((E, Np // LANES, Kp // 2, LANES), _CODE_DTYPE[fmt])
        self.scales, self.zeros, self.group_pairs = _NO_SCALES, _NO_ZEROS, Kp // 2
        if fmt == "int8":
            self.scales = np.zeros((E, Np // LANES, 1, LANES), np.float32)
        elif fmt != "bf16":
            g = parts[0].group_size
            if g % PAD:         # a backward item's 16 pairs must lie in one group (``_backward_panel``)
                raise ValueError(f"parts: int4 group_size: expected a multiple of {PAD}, got {g}")
            self.group_pairs = g // 2
            self.scales = np.zeros((E, Np // LANES, Kp // g, LANES), np.float32 if fmt == "int4_awq" else np.uint16)
            if fmt == "int4_awq":
                self.zeros = np.zeros((E, Np // LANES, Kp // g, LANES), np.uint8)
        buf = np.zeros((max(p.shape[1] for p in parts), Kp), np.uint16 if fmt == "bf16" else np.uint8)
        col = 0
        for part, height in zip(parts, heights):
            N = part.shape[1]
            for e in range(E):
                pack_pairs(self._pairs(part, e, buf[:N]), self.codes[e], col // LANES)
                if fmt.startswith("int4"):
                    mine = self.codes[e, col // LANES:(col + height) // LANES]
                    mine[:] = self._nibble_order(mine)
                if fmt != "bf16":
                    self._store_groups(self.scales, e, col, part.scales[e])
                if fmt == "int4_awq":
                    self._store_groups(self.zeros, e, col, part.zeros[e])
            col += height

    @staticmethod
    def _store_groups(out, e, col, values):
        """values [N, groups] (int8: [N]) into ``out [E, Np/16, groups, 16]`` at rows
        ``col .. col + N`` of expert ``e``: block-major, so a panel reads its groups in
        one stream."""
        values = np.asarray(values).reshape(values.shape[0], -1).view(out.dtype)
        N, G = values.shape
        rows = np.zeros((-(-N // LANES) * LANES, G), out.dtype)
        rows[:N] = values
        out[e, col // LANES:col // LANES + rows.shape[0] // LANES] = rows.reshape(-1, LANES, G).transpose(0, 2, 1)

    @staticmethod
    def _nibble_order(pairs):
        """Standard nibble pairs [..., 16 lanes] (byte j = lo | hi << 4 of lane j) into the
        order ``simd.vdequant`` reads: byte d = nibble d % 2 of lane d // 2, with that of
        lane 8 + d // 2 in the high nibble."""
        halves = np.stack([pairs & 15, pairs >> 4], axis=-1)               # [..., lane, lo/hi]
        low, high = halves[..., :8, :].reshape(pairs.shape), halves[..., 8:, :].reshape(pairs.shape)
        return (low | (high << 4)).astype(np.uint8)

    def _pairs(self, part, e, buf):
        """Expert ``e`` of ``part`` as pairs [N, Kp/2] along K (bf16 and int8 through ``buf``
        [N, Kp], zero padded; int4 codes are already nibble pairs, K == Kp)."""
        K = part.shape[2]
        if self.format == "bf16":
            buf[:, :K] = part[e]
            return buf.view(np.uint32)
        if self.format == "int8":
            buf.view(np.int8)[:, :K] = part.codes[e]
            return buf.view(np.uint16)
        return part.codes[e]

    @property
    def nbytes(self):
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes


class PackedMatrix:
    """One bf16 weight ``W [N, K]`` packed once; ``matmul`` computes ``a @ W.T`` in fp32.

    The plain GEMM of the layer's kernels (one expert, no LoRA), for users and for the
    side-by-side with ``torch.matmul``. ``a`` is read in place where it can be: C order, K
    a multiple of ``PAD``, rows not a multiple of ``SET_SPAN`` apart, and a route whose
    blocks read no row past the last (all but ``amx``). Otherwise it is copied into a
    padded operand buffer (grown as needed, reused; rows ``longer``): rows past M are read
    as whole tiles, never written. An avx512_bf16 block's 12 rows 4 KiB apart overflow an
    8-way L1 set: Zen 4, 2 threads, M=512 K=2048 N=1536, in place 8.6 ms, copied 7.6-7.9
    (the copy 0.05 of it).
    """

    def __init__(self, w):
        N, K = w.shape
        self.shape = (N, K)
        self.packed = PackedWeight([w.reshape(1, N, K)], "bf16")
        self._operand = np.zeros((0, longer(padded(K), np.uint16)), np.uint16)
        self._no_lora = np.zeros((1, 0, padded(N)), np.float32)

    def matmul(self, route, a, out=None):
        """a [M, K] uint16 (bf16 bits) -> out [M, N] float32 (a view of a padded array
        unless N is a multiple of ``PAD``; pass ``out`` [M, padded(N)] to reuse one)."""
        N, K = self.shape
        M = a.shape[0]
        if not reads_past_last(route) and K == padded(K) and a.flags.c_contiguous and a.strides[0] % SET_SPAN:
            operand = a
        else:
            if self._operand.shape[0] < M + ROW_SLACK:
                self._operand = np.zeros((M + ROW_SLACK, longer(padded(K), np.uint16)), np.uint16)
            self._operand[:M, :K] = a
            operand = self._operand
        out = np.empty((M, padded(N)), np.float32) if out is None else out
        offsets = np.array([0, M], np.int64)
        slot = np.zeros(1, np.int64)
        lora_l = np.zeros((M, 0), np.float32)
        grouped_gemm(route, operand.view(np.uint32), self.packed, offsets, slot, lora_l, self._no_lora,
                     padded(N), np.float32(0), out, np.zeros((0, 0), np.uint16))
        return out[:, :N]
