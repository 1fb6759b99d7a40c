"""The layer's forward or training step, this checkout against another commit, alternated in one process.

A shared VM's speed moves by 5-15% from minute to minute, so two bench runs minutes apart
cannot tell a 2% change from the noise. Here the other commit's ``nbmoe`` package is
extracted (``git archive``) under another name, both layers are built on the same
weights, routing and gradients, and their runs alternate (ABBA) in one process: both see
the same minutes of the host. First it checks that both give the same bits (output and
every gradient). Qwen3-30B-A3B layer, r=16, uniform routing, the best route of this CPU.

Both layers read one copy of the packed base weights where the two commits store the same
bytes (``share_weights``): two copies in two places of memory can time apart by
themselves. Zen 4, 2 threads, one commit against itself (A/A): the T=1024 backward down
GEMM alone (W^T of [2048, 768], int4_k2), 30 alternated rounds, 79.0 / 69.9 ms median with
a copy each, 72.4 / 71.8 on one copy; the whole T=1024 step, 20 rounds in a noisy hour
(medians 498-541 ms), medians 1.5%, 1.7% and 0.4% apart on one copy, 2.7% and 0.3% with a
copy each - so in such an hour a change under ~2% is not resolved.

The extracted package is kept under ``$XDG_CACHE_HOME/nbmoe/bench_ab/<commit>``
(``~/.cache`` by default), so Numba's cache of its kernels outlives the run: a second run
against the same commit compiles nothing (Zen 4: 48 s for 20 rounds, 3:49 the first time).

Run: ``python bench/bench_ab.py REV [T] [--rounds N] [--pass step|fwd] [--format F]``
from the repository (T 1024, 30 rounds unless given; ``bench/RESULTS.md`` has the
numbers). ``REV`` = ``HEAD`` on a clean checkout measures the harness itself (A/A).
"""

import argparse
import importlib
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

import nbmoe

FIELDS = ("input", "topk_weights", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def other_package(rev):
    """Import ``rev``'s nbmoe package as ``nbmoe_other``, extracted once per commit."""
    root = pathlib.Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", rev + "^{commit}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    into = cache / "nbmoe" / "bench_ab" / sha
    target = into / "nbmoe_other"
    if not target.exists():
        archive = subprocess.run(["git", "-C", str(root), "archive", sha, "nbmoe"], check=True,
                                 capture_output=True).stdout
        partial = into / "partial"
        partial.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(partial), "--strip-components=1"], input=archive, check=True)
        partial.rename(target)
    sys.path.insert(0, str(into))
    return importlib.import_module("nbmoe_other")


def same(u, v):
    """Whether ``u`` and ``v`` are equal: arrays of one dtype and the same bytes, else ``==``."""
    if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
        u, v = np.asarray(u), np.asarray(v)
        return u.dtype == v.dtype and np.array_equal(u.view(np.uint8), v.view(np.uint8))
    return u == v


def same_store(a, b):
    """Whether two stored weights have the same fields, each ``same`` (``b`` may be None)."""
    wa, wb = vars(a), getattr(b, "__dict__", {})
    return wa.keys() == wb.keys() and all(same(wa[k], wb[k]) for k in wa)


def share_weights(this, other):
    """Point ``other``'s layer at ``this``'s packed base weights if each part stores the
    same fields (every code, scale and zero array the same bytes); whether it did."""
    mine, theirs = getattr(this, "_packed", None), getattr(other, "_packed", None)
    if mine is None or theirs is None or len(mine) != len(theirs):
        return False
    if not all(same_store(getattr(a, n), getattr(b, n, None)) for a, b in zip(mine, theirs) for n in ("gu", "d")):
        return False
    other._packed = mine
    return True


def step_of(package, T, fmt, training):
    """A run of the layer built by ``package``, the dict its last outputs land in, and the layer."""
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
    return run, last, layer


def same_bits(a, b, training):
    return same(a["y"], b["y"]) and (not training or all(same(getattr(a["g"], f), getattr(b["g"], f)) for f in FIELDS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare this checkout against")
    parser.add_argument("T", type=int, nargs="?", default=1024)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--pass", dest="which", choices=("step", "fwd"), default="step")
    parser.add_argument("--format", default="bf16")
    args = parser.parse_args()
    training = args.which == "step"
    packages = (nbmoe, other_package(args.rev))
    runs = [step_of(p, args.T, args.format, training) for p in packages]
    shared = share_weights(runs[0][2], runs[1][2])
    for run, _, _ in runs:
        run()
        run()
    print(f"T={args.T} {args.which} {args.format}: the same bits: {same_bits(runs[0][1], runs[1][1], training)}; "
          f"{'one copy of the weights' if shared else 'a copy of the weights each (stored differently)'}")
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
