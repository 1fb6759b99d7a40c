"""The layer's forward or training step, this checkout against another commit, alternated in one process.

A shared VM's speed moves by 5-15% from minute to minute, so two bench runs minutes apart
cannot tell a 2% change from the noise. Here the other commit's ``nbmoe`` package is
extracted (``git archive``) into a temporary directory under another name, both layers
are built on the same weights, routing and gradients, and their runs alternate (ABBA) in
one process: both see the same minutes of the host. First it checks that both give the
same bits (output and every gradient). Qwen3-30B-A3B layer, r=16, uniform routing, the
best route of this CPU. Run: ``python bench/bench_ab.py REV [T] [--rounds N] [--pass
step|fwd] [--format F]`` from the repository (T 1024, 30 rounds unless given;
``bench/RESULTS.md`` has the numbers).
"""

import argparse
import importlib
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import nbmoe

FIELDS = ("input", "topk_weights", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def other_package(rev, into):
    """Import ``rev``'s nbmoe package, extracted under ``into`` as ``nbmoe_other``."""
    root = pathlib.Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "nbmoe"], check=True, capture_output=True).stdout
    target = pathlib.Path(into) / "nbmoe_other"
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive, check=True)
    sys.path.insert(0, into)
    return importlib.import_module("nbmoe_other")


def step_of(package, T, fmt, training):
    """A run of the layer built by ``package``, and the dict its last outputs land in."""
    bench = importlib.import_module(package.__name__ + ".bench")
    shape = bench.QWEN3_30B_A3B
    E, H, I = shape["experts"], shape["hidden"], shape["intermediate"]
    gate, up, down, lora = bench.layer_weights(E, H, I, shape["rank"])
    layer = bench.format_layer(gate, up, down, lora, fmt, T)
    ids, weights = bench.routing(T, E, shape["topk"])
    x, gy = bench.activations(T, H)
    last = {}

    def run():
        last["y"] = layer.forward(x, ids, weights, save_for_backward=training)
        if training:
            last["g"] = layer.backward(gy)
    return run, last


def same_bits(a, b, training):
    def eq(u, v):
        return np.array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))
    return eq(a["y"], b["y"]) and (not training or all(eq(getattr(a["g"], f), getattr(b["g"], f)) for f in FIELDS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare this checkout against")
    parser.add_argument("T", type=int, nargs="?", default=1024)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--pass", dest="which", choices=("step", "fwd"), default="step")
    parser.add_argument("--format", default="bf16")
    args = parser.parse_args()
    training = args.which == "step"
    with tempfile.TemporaryDirectory() as into:
        packages = (nbmoe, other_package(args.rev, into))
        runs = [step_of(p, args.T, args.format, training) for p in packages]
        for run, _ in runs:
            run()
            run()
        print(f"T={args.T} {args.which} {args.format}: the same bits: {same_bits(runs[0][1], runs[1][1], training)}")
        times = ([], [])
        for i in range(args.rounds):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                runs[j][0]()
                times[j].append(time.perf_counter() - t0)
    for name, t in zip(("this checkout", args.rev), times):
        print(f"  {name:14s} median {np.median(t) * 1e3:8.2f} ms  min {min(t) * 1e3:8.2f}")


if __name__ == "__main__":
    main()
