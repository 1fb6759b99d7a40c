"""Where a forward or a training step of the MoE layer spends its time, kernel by kernel.

Wraps each kernel ``nbmoe.kernels.moe`` calls with a timer (the four GEMM calls apart:
forward gate_up, forward down, backward down, backward gate_up) and prints the mean per
call over ``--reps`` runs after a timed warm-up: the profiles behind the misses in
``bench/RESULTS.md``. Qwen3-30B-A3B layer, r=16, uniform routing, the best route of this
CPU; a step accumulates its LoRA gradients into persistent buffers, as ``python -m nbmoe
bench`` does. Run: ``python bench/bench_phases.py T {fwd,step} [--reps N] [--format F]
[--per-call]`` (int4 groups as ``bench.CHECKPOINT_GROUP``; ``--per-call``: a kernel called
more than once a run, ``project`` or ``outer``, timed per call in call order).
"""

import argparse
import collections
import time

import numpy as np

from nbmoe import bench
from nbmoe.kernels import moe
from nbmoe.quant import FORMATS

SHAPE = bench.QWEN3_30B_A3B
KERNELS = ["route_pairs", "gather_rows", "row_blocks", "project", "grouped_gemm", "silu_mul", "combine_rows",
           "pair_grads", "silu_mul_backward", "_load_lora", "outer", "store"]
GEMMS = ["forward gate_up", "forward down", "backward down", "backward gate_up"]


def timed(times, name, fn):
    """``fn`` recording its wall time under ``name``, in call order; a GEMM under its place
    in the pass (each direction calls two: gate_up then down forward, down then gate_up
    backward)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        key = name
        if name == "grouped_gemm":
            pair = GEMMS[2:] if kwargs.get("transposed", False) else GEMMS[:2]
            key = pair[(len(times[pair[0]]) + len(times[pair[1]])) % 2]
        times[key].append(time.perf_counter() - t0)
        return out
    return wrapper


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tokens", type=int)
    parser.add_argument("mode", choices=["fwd", "step"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--format", default="bf16", choices=["bf16", *FORMATS])
    parser.add_argument("--per-call", action="store_true",
                        help="time each call of a run apart (project, outer, ... as 'name #i', in call order)")
    args = parser.parse_args()
    E, k, H, I = SHAPE["experts"], SHAPE["topk"], SHAPE["hidden"], SHAPE["intermediate"]
    gate, up, down, lora = bench.layer_weights(E, H, I, SHAPE["rank"])
    layer = bench.format_layer(gate, up, down, lora, args.format, max(args.tokens, 16))
    ids, weights = bench.routing(args.tokens, E, k)
    x, grad_y = bench.activations(args.tokens, H)
    grads = None

    def run():
        nonlocal grads
        layer.forward(x, ids, weights, save_for_backward=args.mode == "step")
        if args.mode == "step":
            grads = layer.backward(grad_y, accumulate_into=grads)

    totals = []
    for _ in range(3 + args.reps):
        t0 = time.perf_counter()
        run()
        totals.append(time.perf_counter() - t0)
    times = collections.defaultdict(list)
    for name in KERNELS:
        setattr(moe, name, timed(times, name, getattr(moe, name)))
    for _ in range(args.reps):
        run()
    if args.per_call:                       # every run calls the same kernels in the same order
        for name, spent in list(times.items()):
            calls = len(spent) // args.reps
            if calls > 1:
                del times[name]
                for i in range(calls):
                    times[f"{name} #{i}"] = spent[i::calls]
    print(f"T={args.tokens} {args.mode}: median {np.median(totals[3:]) * 1e3:.2f} ms unwrapped, "
          f"best {min(totals[3:]) * 1e3:.2f}; per run, wrapped:")
    for name, spent in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:20s} {sum(spent) / args.reps * 1e3:8.2f} ms  ({len(spent) // args.reps} calls)")
    print(f"  {'all of them':20s} {sum(map(sum, times.values())) / args.reps * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
