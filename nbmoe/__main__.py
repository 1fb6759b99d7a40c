"""The command line: ``python -m nbmoe run | info | bench``.

run    the main job: a Qwen3-30B-A3B-shaped MoE LoRA layer (E=128, k=8, H=2048, I=768,
       r=16) with random weights at realistic scale, T=512 tokens, a few forward +
       backward steps; prints the route, time per step, GFLOP/s and a check of sampled
       tokens against the float64 reference. Every size is a flag.
info   nbmoe.info(): CPU features, kernel route, threading layer.
memory resident memory of a multi-layer training step, against the bytes the code says it holds.
bench  nbmoe against PyTorch eager (same process, same threads) across T, with the
       fraction of this machine's measured roofline; uniform or Zipf-skewed routing.
finetune  LoRA fine-tuning of a tiny Qwen3-MoE (built from a config, no download) on a
       synthetic task, with nbmoe experts: the loss curve, then training tokens/s with
       nbmoe against the eager baseline experts (the bench's). Needs torch and transformers.
       --peft: the adapters are PEFT's (get_peft_model), against PEFT on eager experts.
"""

import argparse
import math
import sys
import time

import numba
import numpy as np
from tqdm import tqdm

from . import __version__, bench, info, reference
from .bench import QWEN3_30B_A3B
from .cache import bytes_per_token
from .checks import BF16
from .layer import WEIGHT_FORMATS, MoELayer
from .quant import quantize
from .kernels import isa


def _shape_flags(parser, tokens):
    d = QWEN3_30B_A3B
    parser.add_argument("--experts", "-E", type=int, default=d["experts"])
    parser.add_argument("--topk", "-k", type=int, default=d["topk"])
    parser.add_argument("--hidden", "-H", type=int, default=d["hidden"])
    parser.add_argument("--intermediate", "-I", type=int, default=d["intermediate"])
    parser.add_argument("--rank", "-r", type=int, default=d["rank"], help="LoRA rank, 0 for none")
    parser.add_argument("--tokens", "-T", type=int, nargs="+" if tokens is None else None,
                        default=tokens or [1, 16, 128, 1024, 4096])
    parser.add_argument("--threads", type=int, default=None, help="Numba (and torch) threads")
    parser.add_argument("--seed", type=int, default=0)


def _bar(iterable=None, disable=None, **kwargs):
    """A tqdm progress bar on stderr, drawn only on a terminal (``disable=None``): piped or
    logged output gets none (every number it shows is printed afterwards)."""
    return tqdm(iterable, disable=disable, file=sys.stderr, **kwargs)


def _zipf_s(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _header():
    about = info()
    route = about["route"] or f"none ({about['route_reason']})"
    print(f"nbmoe {__version__} | route {route} ({about['route_reason']}) | cpu {about['cpu']} | "
          f"numba {about['numba']}, {about['threading_layer']} x {about['threads']} threads")


def _rel(got, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got).astype(np.float64) - ref).mean() / max(np.abs(ref).mean(), 1e-30))


def cmd_run(args):
    E, k, H, I, r, T = args.experts, args.topk, args.hidden, args.intermediate, args.rank, args.tokens
    _header()
    print(f"layer: E={E} k={k} H={H} I={I} r={r}, T={T} tokens ({T * k} routed pairs)")
    t = time.perf_counter()
    gate, up, down, lora = bench.layer_weights(E, H, I, r, args.seed)
    print(f"weights: {3 * E * H * I * 2 / 2**30:.2f} GiB bf16 made in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    group = args.group_size or bench.CHECKPOINT_GROUP.get(args.format)
    layer = MoELayer(gate, up, down, lora=lora, max_tokens=T, weight_format=args.format, group_size=group)
    print(f"stored once in {time.perf_counter() - t:.1f} s as {layer.weight_format}"
          f"{f' (group {layer.group_size})' if layer.group_size else ''}: {layer.packed_nbytes / 2**30:.2f} GiB, "
          f"{layer.packed_nbytes / (3 * E * H * I * 2):.3f} of raw bf16; route {layer.route.name}")
    if args.format != "bf16":                     # the reference runs on the weights both passes use
        gate, up, down = (quantize(w, args.format, group).dequantize().astype(BF16) for w in (gate, up, down))
    ids, weights = bench.routing(T, E, k, args.seed)
    x, grad_y = bench.activations(T, H, args.seed)
    t = time.perf_counter()
    layer.forward(x[:1], ids[:1], weights[:1], save_for_backward=True)
    layer.backward(grad_y[:1])
    print(f"kernels compiled or loaded from cache in {time.perf_counter() - t:.1f} s")
    fwd_t, bwd_t = [], []
    steps = _bar(range(args.steps), desc="steps", unit="step")
    for _ in steps:
        t0 = time.perf_counter()
        y = layer.forward(x, ids, weights, save_for_backward=True)
        t1 = time.perf_counter()
        grads = layer.backward(grad_y)
        t2 = time.perf_counter()
        fwd_t.append(t1 - t0)
        bwd_t.append(t2 - t1)
        steps.set_postfix_str(f"fwd {fwd_t[-1] * 1e3:.0f} ms, bwd {bwd_t[-1] * 1e3:.0f} ms")
    fwd_flop, bwd_flop = bench.flops(T, k, H, I, r)
    f, b = float(np.median(fwd_t)), float(np.median(bwd_t))
    print(f"forward   {f * 1e3:9.1f} ms  {fwd_flop / f / 1e9:7.1f} GFLOP/s")
    print(f"backward  {b * 1e3:9.1f} ms  {bwd_flop / b / 1e9:7.1f} GFLOP/s")
    print(f"step      {(f + b) * 1e3:9.1f} ms  {(fwd_flop + bwd_flop) / (f + b) / 1e9:7.1f} GFLOP/s  "
          f"({T / (f + b):.0f} tokens/s)")
    sample = np.random.default_rng(args.seed).choice(T, size=min(args.check, T), replace=False)
    y_ref, saved = reference.forward(x[sample], ids[sample], weights[sample], gate, up, down, lora)
    g_ref = reference.backward(saved, grad_y[sample])
    checks = [("y", _rel(y[sample], y_ref), 0.01),
              ("grad_x", _rel(grads.input[sample], g_ref["input"]), 0.02),
              ("grad_w", _rel(grads.topk_weights[sample], g_ref["topk_weights"]), 0.02)]
    ok = all(err <= bound for _, err, bound in checks)
    detail = ", ".join(f"{name} rel {err:.2e} (<= {bound})" for name, err, bound in checks)
    print(f"check: {len(sample)} sampled tokens vs float64 reference: {detail}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_info(args):
    for key, value in info().items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in value.items())
        print(f"{key:18s} {value}")
    return 0


def cmd_bench(args):
    _header()
    E, k, H, I, r = args.experts, args.topk, args.hidden, args.intermediate, args.rank
    skew = (1.0 if args.zipf_s is None else args.zipf_s) if args.routing == "zipf" else None
    gate, up, down, lora = bench.layer_weights(E, H, I, r, args.seed)
    route = isa.choose_route(args.route)
    start = bench.measure_ceilings(route)
    layer, rows = bench.side_by_side(gate, up, down, lora, args.tokens, k, repeat=args.repeat,
                                     route=args.route, skew=skew, formats=args.format,
                                     group_size=args.group_size, tps=args.tp)
    ceilings = bench.Ceilings.best(start, bench.measure_ceilings(route))
    print(f"route {route.name}; measured before and after the run (the best), {numba.get_num_threads()} "
          f"threads: {ceilings.peak_of} peak {ceilings.peak_gflops:.0f} GFLOP/s, read {ceilings.read_gbs:.1f} GB/s")
    routing = "uniform" if skew is None else f"zipf s={skew:g}"
    print(f"layer: E={E} k={k} H={H} I={I} r={r}; routing {routing}; median of {args.repeat}; "
          f"roofline = max(FLOP / peak, stored weight + LoRA bytes / read) / time")
    raw = 3 * E * H * I * 2
    for fmt in args.format:
        stored = next(row.stored_nbytes for row in rows if row.weight_format == fmt and row.tp == args.tp[0])
        group = args.group_size or bench.CHECKPOINT_GROUP.get(fmt)
        print(f"  {fmt}{f' group {group}' if group and fmt.startswith('int4') else ''}: stored "
              f"{stored / 2**20:.0f} MiB, {stored / raw:.3f} of raw bf16")
    head = (f"{'T':>5} | {'pass':8} | {'format':13} | {'nbmoe ms':>9} | {'/ bf16':>6} | {'eager ms':>9} | "
            f"{'speedup':>7} | {'GFLOP/s':>7} | {'roofline':>8}")
    print(head)
    print("-" * len(head))
    base = {(row.T, row.weight_format, row.tp): row for row in rows}
    for row in rows:
        ref = base.get((row.T, "bf16", 1))
        label = row.weight_format + (f" tp={row.tp}" if row.tp != 1 else "")
        for name, ours, theirs, flop, nbytes, bf16 in (
                ("fwd", row.nbmoe_fwd_s, row.eager_fwd_s, row.fwd_flop, row.fwd_bytes,
                 ref and ref.nbmoe_fwd_s),
                ("fwd+bwd", row.nbmoe_step_s, row.eager_step_s, row.step_flop, row.step_bytes,
                 ref and ref.nbmoe_step_s)):
            ratio = f"{ours / bf16:6.2f}" if bf16 else f"{'-':>6}"
            print(f"{row.T:>5} | {name:8} | {label:13} | {ours * 1e3:9.2f} | {ratio} | "
                  f"{theirs * 1e3:9.2f} | {theirs / ours:6.2f}x | {flop / ours / 1e9:7.1f} | "
                  f"{ceilings.roofline_s(flop, nbytes) / ours:8.2f}")
    times, flop = bench.single_gemm([route])
    ours, theirs = times[route.name], times["torch.matmul"]
    print(f"single bf16 GEMM M=512 K=2048 N=1536: nbmoe {ours * 1e3:.2f} ms ({flop / ours / 1e9:.0f} GFLOP/s), "
          f"torch.matmul {theirs * 1e3:.2f} ms ({flop / theirs / 1e9:.0f} GFLOP/s): {theirs / ours:.2f}x")
    return 0


def cmd_memory(args):
    _header()
    E, k, H, I, r, T, n = args.E, args.k, args.H, args.I, args.r, args.T, args.layers
    print(f"{n} layers: E={E} k={k} H={H} I={I} r={r}, T={T}; every forward saved, then backward in reverse")
    got = bench.memory_step(n, E, k, H, I, r, T)
    gib = 2.0 ** -30
    per_token = bytes_per_token(H, I, r, k)
    print(f"stored weights {got['weights'] * gib:.2f} GiB (resident before the step, not counted below)")
    print(f"expected: saved {got['saved'] * gib:.2f} GiB ({per_token} bytes per token per layer) + shared "
          f"scratch {got['scratch'] * gib:.2f} GiB = {(got['saved'] + got['scratch']) * gib:.2f} GiB")
    for i, (fwd, step) in enumerate(zip(got["after_forwards"], got["after_step"])):
        print(f"step {i + 1}: resident growth after the forwards {fwd * gib:.2f} GiB, after the step {step * gib:.2f} GiB")
    saved_per_layer = got["saved"] / n
    projected = args.project * saved_per_layer + got["scratch"]
    print(f"projected to {args.project} layers: saved {args.project * saved_per_layer * gib:.1f} GiB + scratch "
          f"{got['scratch'] * gib:.2f} GiB = {projected * gib:.1f} GiB")
    return 0


def _needs(*modules):
    """None if importable, else the message saying how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return (f"this command needs {', '.join(missing)}: pip install torch==2.13.0 && "
                f"pip install 'nbmoe[torch,transformers,peft]' (the CPU build of torch; an unpinned "
                f"torch pulls CUDA packages)")
    return None


def _ranks(tp, timeout_s):
    """Join the process group torchrun set up (gloo, collectives bounded by ``timeout_s``);
    (rank, world); each rank gets its share of this host's cores."""
    import datetime
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise SystemExit(f"python -m nbmoe finetune --tp {tp}: expected {tp} processes, got WORLD_SIZE={world}; "
                         f"run it as torchrun --nproc-per-node {tp} -m nbmoe finetune --tp {tp}")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // local)))
    return dist.get_rank(), world


def cmd_finetune(args):
    from . import finetune

    if args.tp > 1 and args.peft:
        raise SystemExit("python -m nbmoe finetune: --tp splits nbmoe's adapters, not PEFT's; drop --peft")
    rank, world = _ranks(args.tp, args.timeout) if args.tp > 1 else (0, 1)
    out = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        _header()
    cfg = finetune.TINY
    split = f"; tensor-parallel over {world} processes" if world > 1 else ""
    out(f"tiny Qwen3-MoE: {cfg['num_hidden_layers']} layers, E={cfg['num_experts']} k={cfg['num_experts_per_tok']} "
        f"H={cfg['hidden_size']} I={cfg['moe_intermediate_size']}, bf16; {'PEFT ' if args.peft else ''}"
        f"LoRA r={args.rank} on every expert; AdamW lr={args.lr}; batch {args.batch} x {args.length} tokens{split}")

    bar = _bar(total=args.steps, desc="training", unit="step", disable=None if rank == 0 else True)

    def report(step, loss):
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        bar.update()
        if step == args.steps:
            bar.close()

    losses, speed, stored = finetune.run(args.steps, args.batch, args.length, args.rank, 2.0 * args.rank, args.lr,
                                         args.seed, report=report, peft=args.peft, tp=world > 1)
    every = max(1, args.steps // 10)
    curve = ", ".join(f"{i + 1}: {losses[i]:.3f}" for i in range(0, args.steps, every))
    out(f"loss curve (step: loss): {curve}, {args.steps}: {losses[-1]:.3f}")
    out(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({1 - losses[-1] / losses[0]:.0%} lower)")
    if world > 1:
        import torch.distributed as dist

        per_rank = [None] * world
        dist.all_gather_object(per_rank, (stored, bench.resident_bytes()))
        out(f"training tokens/s: nbmoe experts {speed['nbmoe']:.0f} ({world} ranks, "
            f"{numba.get_num_threads()} threads each)")
        for r, (held, resident) in enumerate(per_rank):
            out(f"rank {r}: experts stored {held / 2**20:.2f} MiB, resident {resident / 2**20:.0f} MiB")
        dist.barrier()              # every rank done with its peers before any tears the group down
        dist.destroy_process_group()
        return 0
    (_, ours), (_, eager) = speed.items()
    out(f"training tokens/s: nbmoe experts {ours:.0f}, eager experts {eager:.0f} ({ours / eager:.2f}x); "
        f"experts stored {stored / 2**20:.2f} MiB, resident {bench.resident_bytes() / 2**20:.0f} MiB")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nbmoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job on its embedded default layer")
    _shape_flags(run, tokens=512)
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--check", type=int, default=8, help="tokens checked against the reference")
    run.add_argument("--format", choices=WEIGHT_FORMATS, default="bf16",
                     help="base-weight format, quantized online (checked against the reference on "
                          "the dequantized weights)")
    run.add_argument("--group-size", type=int, default=None,
                     help="int4 group (default: 32 for int4_k2, 128 for int4_awq, as their checkpoints)")
    sub.add_parser("info", help="CPU features, kernel route, threads")
    bench_parser = sub.add_parser("bench", help="nbmoe vs PyTorch eager across T")
    _shape_flags(bench_parser, tokens=None)
    bench_parser.add_argument("--repeat", type=int, default=3)
    bench_parser.add_argument("--route", choices=isa.ROUTES, default=None,
                              help="kernel route (default: NBMOE_ISA, else the best this CPU runs)")
    bench_parser.add_argument("--routing", choices=("uniform", "zipf"), default="uniform",
                              help="expert popularity: uniform, or Zipf-like (rank i drawn as 1 / i^s)")
    bench_parser.add_argument("--zipf-s", type=_zipf_s, default=None, help="the s of --routing zipf (default 1)")
    bench_parser.add_argument("--format", choices=WEIGHT_FORMATS, nargs="+", default=["bf16"],
                              help="base-weight formats, side by side (ratios against bf16 when listed)")
    bench_parser.add_argument("--group-size", type=int, default=None,
                              help="int4 group (default: 32 for int4_k2, 128 for int4_awq)")
    bench_parser.add_argument("--tp", type=int, nargs="+", default=[1],
                              help="tensor-parallel parts of each layer, in this one process (nbmoe.tp), side by "
                                   "side (ratios against bf16 tp=1 when listed)")
    mem = sub.add_parser("memory", help="resident memory of a multi-layer training step")
    mem.add_argument("--layers", type=int, default=4)
    for flag, default in (("-E", 8), ("-k", 8), ("-H", 2048), ("-I", 768), ("-r", 16), ("-T", 4096)):
        mem.add_argument(flag, type=int, default=default)
    mem.add_argument("--project", type=int, default=48, help="layers of the model to project to (Qwen3-30B-A3B: 48)")
    tune = sub.add_parser("finetune", help="LoRA fine-tuning of a tiny Qwen3-MoE on nbmoe")
    tune.add_argument("--steps", type=int, default=60)
    tune.add_argument("--batch", type=int, default=8)
    tune.add_argument("--length", type=int, default=64)
    tune.add_argument("--rank", type=int, default=16)
    tune.add_argument("--lr", type=float, default=1e-2)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--threads", type=int, default=None)
    tune.add_argument("--tp", type=int, default=1,
                      help="tensor-parallel ranks: run as torchrun --nproc-per-node N -m nbmoe finetune --tp N")
    tune.add_argument("--timeout", type=float, default=300.0,
                      help="seconds a collective may wait for the other ranks (--tp) before it fails")
    tune.add_argument("--peft", action="store_true",
                      help="PEFT's LoRA (get_peft_model, target_parameters on the experts) on nbmoe experts, "
                           "timed against PEFT on eager experts; needs peft")
    args = parser.parse_args(argv)
    if args.command == "bench" and args.zipf_s is not None and args.routing != "zipf":
        bench_parser.error("argument --zipf-s: applies to --routing zipf only")
    if getattr(args, "threads", None):
        numba.set_num_threads(args.threads)
    needs = {"bench": ("torch",), "finetune": ("torch", "transformers") + (("peft",) if getattr(args, "peft", False)
                                                                          else ())}.get(args.command, ())
    problem = _needs(*needs)
    if problem:
        print(f"python -m nbmoe {args.command}: {problem}", file=sys.stderr)
        return 2
    return {"run": cmd_run, "info": cmd_info, "bench": cmd_bench, "memory": cmd_memory,
            "finetune": cmd_finetune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
