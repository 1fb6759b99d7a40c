"""Uniform against Zipf-skewed routing, nbmoe alone: what splitting work by cost
(``nbmoe/kernels/schedule.py``) buys. Qwen3-30B-A3B layer, r=16; median of 5 after a
warm-up. Run: ``python bench/bench_schedule.py`` (``bench/RESULTS.md`` has the numbers)."""

import time

import numpy as np

import nbmoe
from nbmoe.bench import QWEN3_30B_A3B, activations, layer_weights, routing


def median_ms(fn, repeat=6):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times[1:]))


def main(tokens=(128, 1024), skew=1.2):
    E, k, H, I, r = (QWEN3_30B_A3B[n] for n in ("experts", "topk", "hidden", "intermediate", "rank"))
    gate, up, down, lora = layer_weights(E, H, I, r)
    layer = nbmoe.MoELayer(gate, up, down, lora=lora, max_tokens=max(tokens))
    for T in tokens:
        x, grad_y = activations(T, H)
        for s in (None, skew):
            ids, w = routing(T, E, k, skew=s)
            held = [None]

            def step():
                layer.forward(x, ids, w, save_for_backward=True)
                held[0] = layer.backward(grad_y, accumulate_into=held[0])

            share = np.bincount(ids.ravel(), minlength=E).max() / ids.size
            print(f"T={T:5d} routing {'uniform' if s is None else f'zipf s={s}':12s} busiest expert "
                  f"{share:.3f} of pairs: fwd {median_ms(lambda: layer.forward(x, ids, w)):8.1f} ms, "
                  f"fwd+bwd {median_ms(step):8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
