"""Measurement: a realistic layer, the PyTorch eager baseline, FLOP and byte counts, the
machine's ceilings, and a side-by-side timing of both, in one process, same threads.

The baseline is ``nbmoe.torch.eager_experts``, the one ``python -m nbmoe finetune``
measures against too: what transformers runs for a MoE block with PEFT-style LoRA (a
Python loop over the experts hit, ``index_add_`` of the weighted outputs, one LoRA tensor
per expert), here bf16 throughout, backward through torch autograd. Both sides time the
steady state of a training loop: torch accumulates LoRA gradients into its ``.grad``
tensors, nbmoe into the arrays of an earlier backward (``accumulate_into``). Both get the
same routing, uniform or Zipf-skewed (``routing``). torch is imported only by the
functions that need it.
"""

import os
import time
from dataclasses import dataclass

import ml_dtypes
import numba
import numpy as np

from . import checks
from .kernels.gemm import PackedMatrix, padded
from .kernels.peak import ACC, amx_spin, dpbf16_spin, fma_spin, read_stream
from .cache import bytes_per_token
from .layer import LoRAWeights, MoELayer
from .reference import LORA_FIELDS

QWEN3_30B_A3B = dict(experts=128, topk=8, hidden=2048, intermediate=768, rank=16)


def layer_weights(E, H, I, r, seed=0):
    """Base weights ~ N(0, 1/fan_in) in bf16 and LoRA factors (float32, B nonzero so every
    gradient path carries signal) - the scale of a trained model."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale, dtype=ml_dtypes.bfloat16):
        # one expert at a time through a reused float32 buffer: no GiB-sized temporaries
        out = np.empty(shape, dtype)
        buf = np.empty(shape[1:], np.float32)
        for e in range(shape[0]):
            rng.standard_normal(out=buf, dtype=np.float32)
            buf *= np.float32(scale)
            out[e] = buf
        return out

    gate, up = normal((E, I, H), H ** -0.5), normal((E, I, H), H ** -0.5)
    down = normal((E, H, I), I ** -0.5)
    lora = None
    if r:
        f32 = np.float32
        lora = LoRAWeights(normal((E, r, H), H ** -0.5, f32), normal((E, I, r), 0.1 * r ** -0.5, f32),
                           normal((E, r, H), H ** -0.5, f32), normal((E, I, r), 0.1 * r ** -0.5, f32),
                           normal((E, r, I), I ** -0.5, f32), normal((E, H, r), 0.1 * r ** -0.5, f32),
                           alpha=2.0 * r)
    return gate, up, down, lora


def routing(T, E, k, seed=0, skew=None):
    """x-independent routing: ids [T, k], k distinct experts per token, and softmax-like
    weights [T, k]. ``skew`` None: every expert equally popular; ``skew`` s >= 0: Zipf-like,
    the expert of popularity rank i (ranks a random permutation) drawn with probability
    proportional to 1 / i^s, k per token without replacement (Gumbel-top-k)."""
    checks.integer("T", T, 0)
    E = checks.integer("E", E, 1)
    checks.integer("k", k, 1, E)
    rng = np.random.default_rng(seed + 1)
    log_p = np.zeros(E)
    if skew is not None:
        if checks.finite_real("skew", skew) < 0:
            raise ValueError(f"skew: expected a number >= 0, got {skew}")
        log_p = -skew * np.log(np.arange(1, E + 1))[rng.permutation(E)]
    ids = np.argsort(-(log_p + rng.gumbel(size=(T, E))), axis=1)[:, :k].astype(np.int64)
    weights = rng.dirichlet(np.ones(k), size=T).astype(np.float32)
    return ids, weights


def activations(T, H, seed=0):
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16)
    grad_y = rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16)
    return x, grad_y


def flops(T, k, H, I, r):
    """(forward, backward) FLOPs of the layer, base GEMMs plus LoRA products.

    forward: 3 projections of H x I per pair, LoRA r (H + I) per projection;
    backward: the input gradient through every base weight (frozen: no weight
    gradient), and per projection the LoRA input gradient plus dA and dB."""
    pairs = T * k
    base = 2 * pairs * 3 * H * I
    lora = 2 * pairs * 3 * r * (H + I)
    return base + lora, base + 2 * lora


def weight_bytes(ids, E, H, I, stored_nbytes=None, lora=None):
    """Bytes a pass must read for the experts a call touches, each once: their stored
    weights (``stored_nbytes``: a layer's ``packed_nbytes``, all E experts, scales
    included; raw bf16 if None) plus, with ``lora``, their six LoRA factors as given."""
    active = np.unique(ids[ids >= 0]).size if ids.size else 0
    per_expert = 3 * H * I * 2 if stored_nbytes is None else stored_nbytes / E
    if lora is not None:
        per_expert += sum(getattr(lora, name).nbytes for name in LORA_FIELDS) / E
    return active * per_expert


@dataclass
class Ceilings:
    peak_gflops: float     # the route's instruction, all threads
    peak_of: str           # which instruction
    read_gbs: float        # streaming read, all threads

    @staticmethod
    def best(a, b):
        """The higher of two measurements of each ceiling: a shared host's read bandwidth
        moves during a run (35-60 GB/s on the Zen 4 VM of bench/RESULTS.md), and the
        ceiling is the best it did."""
        return Ceilings(max(a.peak_gflops, b.peak_gflops), a.peak_of, max(a.read_gbs, b.read_gbs))

    def roofline_s(self, flop, nbytes):
        return max(flop / (self.peak_gflops * 1e9), nbytes / (self.read_gbs * 1e9))


# route -> (spin kernel, FLOP per iteration per work item, iterations, instruction)
_SPINS = {"generic": (fma_spin, 2 * 16 * ACC, 2_000_000, "fp32 FMA"),
          "avx512": (fma_spin, 2 * 16 * ACC, 2_000_000, "fp32 FMA"),
          "avx512_bf16": (dpbf16_spin, 64 * ACC, 2_000_000, "vdpbf16ps"),
          "amx": (amx_spin, 4 * 16 * 16 * 32 * 2, 200_000, "tdpbf16ps")}


def measure_ceilings(route, read_mib=1024):
    """The peak of ``route``'s instruction and the read bandwidth, best of a few runs
    (shared machines vary run to run: the best is the ceiling)."""
    route.require()
    spin, flop, iters, instruction = _SPINS[route.name]
    threads = numba.get_num_threads()
    out = np.zeros(threads, np.float32)
    spin(10, out)
    peak = max(flop * iters * threads / _timed(lambda: spin(iters, out)) for _ in range(4))
    data = np.ones(read_mib << 18, np.float32)
    read_stream(data, 64)
    bandwidth = max(data.nbytes / _timed(lambda: read_stream(data, 64)) for _ in range(3))
    return Ceilings(peak / 1e9, instruction, bandwidth / 1e9)


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn, repeat, warmup=1):
    return interleaved({None: fn}, repeat, warmup)[None]


def interleaved(fns, repeat, warmup=1):
    """{name: median s} of the callables ``fns`` ({name: fn}), timed in ``repeat`` rounds
    of one call each, after ``warmup`` rounds: every contender sees the same seconds of a
    shared machine (the 2-vCPU VMs lose up to half their compute rate for seconds at a
    time: timed one after the other, an avx512_bf16 GEMM and torch's differed 2x in a
    notebook run)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


class EagerExperts:
    """The eager baseline, ``nbmoe.torch.eager_experts``, on these weights: bf16 throughout
    (LoRA factors too), one LoRA tensor per expert, the LoRA ones requiring grad."""

    def __init__(self, gate, up, down, lora):
        import torch

        from .torch import to_torch

        def tensor(a, grad=False):
            return to_torch(np.ascontiguousarray(a), torch.bfloat16).requires_grad_(grad)

        self.gate_up = torch.cat([tensor(gate), tensor(up)], dim=1)          # [E, 2I, H], gate first
        self.down = tensor(down)
        self.lora, self.scaling = None, 1.0
        if lora is not None:
            self.lora = {n: [tensor(a, grad=True) for a in getattr(lora, n)] for n in LORA_FIELDS}
            self.scaling = lora.alpha / lora.gate_a.shape[1]

    def forward(self, x, ids, weights):
        from .torch import eager_experts

        return eager_experts(x, ids, weights, self.gate_up, self.down, self.lora, self.scaling)


@dataclass
class Row:
    T: int
    nbmoe_fwd_s: float
    eager_fwd_s: float
    nbmoe_step_s: float
    eager_step_s: float
    fwd_flop: float
    step_flop: float
    fwd_bytes: float       # stored bytes of the experts touched, once per pass
    step_bytes: float
    weight_format: str = "bf16"
    stored_nbytes: int = 0  # the layer's packed_nbytes
    tp: int = 1             # tensor-parallel parts, in this one process


# the group of each int4 format in the checkpoints users have: Kimi-K2 32, AWQ 128
CHECKPOINT_GROUP = {"int4_k2": 32, "int4_awq": 128}


def format_layer(gate, up, down, lora, fmt, max_tokens, group_size=None, **options):
    """The ``MoELayer`` a bench times in weight format ``fmt``: int4 groups ``group_size`` or
    ``CHECKPOINT_GROUP``; ``options`` go to ``MoELayer`` (route, tp)."""
    return MoELayer(gate, up, down, lora=lora, max_tokens=max_tokens, weight_format=fmt,
                    group_size=group_size or CHECKPOINT_GROUP.get(fmt), **options)


def side_by_side(gate, up, down, lora, tokens, k, repeat=3, route=None, skew=None, formats=("bf16",),
                 group_size=None, tps=(1,)):
    """Time nbmoe (one layer per weight format in ``formats`` and part count in ``tps``; int4
    groups ``group_size`` or ``CHECKPOINT_GROUP``) and the eager baseline (bf16) on the same
    data (``routing(T, E, k, skew=skew)``), forward and forward+backward, for each T in
    ``tokens``; torch uses Numba's thread count. Returns (the first layer, rows: one ``Row``
    per T, format and tp)."""
    import torch

    from .torch import to_torch

    torch.set_num_threads(numba.get_num_threads())
    E, I, H = gate.shape
    r = 0 if lora is None else lora.gate_a.shape[1]
    layers = {(fmt, tp): format_layer(gate, up, down, lora, fmt, max(tokens), group_size, route=route, tp=tp)
              for fmt in formats for tp in tps}
    eager = EagerExperts(gate, up, down, lora)
    rows = []
    for T in tokens:
        ids, weights = routing(T, E, k, skew=skew)
        x, grad_y = activations(T, H)
        tx, tg, tids = to_torch(x), to_torch(grad_y), to_torch(ids)
        tw = to_torch(weights, torch.bfloat16)

        def eager_fwd():
            with torch.no_grad():
                eager.forward(tx, tids, tw)

        def eager_step():
            xg = tx.detach().requires_grad_(True)
            wg = tw.detach().requires_grad_(True)
            eager.forward(xg, tids, wg).backward(tg)

        fwd_flop, bwd_flop = flops(T, k, H, I, r)
        forwards, steps = {"eager": eager_fwd}, {"eager": eager_step}
        for key, layer in layers.items():
            forwards[key], steps[key] = _nbmoe_passes(layer, x, ids, weights, grad_y, lora is not None)
        fwd, step = interleaved(forwards, repeat), interleaved(steps, repeat)
        for (fmt, tp), layer in layers.items():
            nbytes = weight_bytes(ids, E, H, I, layer.packed_nbytes, lora)
            rows.append(Row(T, fwd[fmt, tp], fwd["eager"], step[fmt, tp], step["eager"], fwd_flop,
                            fwd_flop + bwd_flop, nbytes, 2 * nbytes, fmt, layer.packed_nbytes, tp))
    return next(iter(layers.values())), rows


def _nbmoe_passes(layer, x, ids, weights, grad_y, accumulate):
    """(forward, forward + backward) of ``layer`` as callables; the step accumulates the
    LoRA gradients into those of a first backward, run here."""
    layer.forward(x, ids, weights, save_for_backward=True)
    held = layer.backward(grad_y) if accumulate else None

    def forward():
        layer.forward(x, ids, weights)

    def step():
        layer.forward(x, ids, weights, save_for_backward=True)
        layer.backward(grad_y, accumulate_into=held)

    return forward, step


def resident_bytes():
    """This process's resident memory now (Linux ``/proc/self/statm``), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def memory_step(layers=4, E=8, k=8, H=2048, I=768, r=16, T=4096, steps=2, seed=0):
    """A training step of ``layers`` MoE layers at T tokens (every forward saved, then every
    backward in reverse), ``steps`` times: resident growth over the weights after the
    forwards and after each step, against what the code says it holds (saved slots and
    the shared scratch). Returns a dict of bytes."""
    from .scratch import SHARED

    stack = []
    for i in range(layers):
        gate, up, down, lora = layer_weights(E, H, I, r, seed + i)
        stack.append(MoELayer(gate, up, down, lora=lora, max_tokens=T))
    ids, weights = routing(T, E, k, seed)
    x, grad_y = activations(T, H, seed)
    for layer in stack:                                   # compile, size k; small: commits little
        layer.forward(x[:1], ids[:1], weights[:1], save_for_backward=True)
        layer.backward(grad_y[:1])
    base = resident_bytes()
    out = {"weights": sum(layer.packed_nbytes for layer in stack), "after_forwards": [], "after_step": []}
    for _ in range(steps):
        held = x
        for layer in stack:
            held = layer.forward(held, ids, weights, save_for_backward=True)
        out["after_forwards"].append(resident_bytes() - base)
        g = grad_y
        for layer in reversed(stack):
            g = layer.backward(g).input
        out["after_step"].append(resident_bytes() - base)
    out["saved"] = layers * bytes_per_token(H, I, r, k) * T
    out["scratch"] = SHARED.nbytes
    return out


def single_gemm(routes, M=512, K=2048, N=1536, repeat=20):
    """({contender: median s}, FLOP) for one bf16 GEMM ``a [M, K] @ w [N, K]^T``: each
    route of ``routes`` on nbmoe's packed ``w`` (keyed by route name), and
    ``"torch.matmul"``, timed ``interleaved``; each route's result is checked against the
    float64 product first."""
    import torch

    from .torch import to_torch

    torch.set_num_threads(numba.get_num_threads())
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32).astype(ml_dtypes.bfloat16)
    w = (rng.standard_normal((N, K), dtype=np.float32) * K ** -0.5).astype(ml_dtypes.bfloat16)
    packed = PackedMatrix(w.view(np.uint16))
    out = np.empty((M, padded(N)), np.float32)
    ta, tw = to_torch(a), to_torch(w)
    reference = a.astype(np.float64) @ w.astype(np.float64).T
    contenders = {route.name: lambda route=route: packed.matmul(route, a.view(np.uint16), out) for route in routes}
    contenders["torch.matmul"] = lambda: torch.matmul(ta, tw.T)
    for route in routes:
        # fp32 sums of K bf16 products of unit-variance terms: |error| ~ 1e-5, a wrong
        # tile or pad is O(1)
        err = float(np.abs(contenders[route.name]() - reference).max())
        if not err < 1e-3:
            raise RuntimeError(f"single_gemm: route {route.name!r} is off the float64 product by {err:.3g}")
    return interleaved(contenders, repeat), 2 * M * N * K
