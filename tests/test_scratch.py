"""One scratch for every layer (nbmoe/scratch.py): layers of different shapes and formats
share it, interleaved, with the results of separate runs; it grows to the largest call
and no further; calls from several threads take turns."""

import threading

import numpy as np
import pytest

import nbmoe
from nbmoe import scratch
from nbmoe.kernels.moe import Workspace
from nbmoe.cache import ForwardCache
from helpers import GRAD_NAMES, Problem

pytestmark = pytest.mark.usefixtures("each_route")     # the whole suite, once per route


def _same(a, b):
    return all(np.array_equal(np.asarray(getattr(a, n)), np.asarray(getattr(b, n))) for n in GRAD_NAMES)


def test_layers_of_different_shapes_interleave_on_one_scratch():
    # invariant 7 across layers: A's saved forward survives B's calls on the shared scratch
    a = Problem(seed=1, E=6, k=2, H=96, I=64, r=4, T=12)
    b = Problem(seed=2, E=3, k=3, H=40, I=72, r=2, T=7)
    alone_a, alone_b = a.run(max_tokens=12, weight_format="int4_k2", group_size=32), b.run(max_tokens=7)
    layer_a, layer_b = a.layer(max_tokens=12, weight_format="int4_k2", group_size=32), b.layer(max_tokens=7)
    ya = layer_a.forward(a.x, a.topk_ids, a.topk_weights, save_for_backward=True)
    yb = layer_b.forward(b.x, b.topk_ids, b.topk_weights, save_for_backward=True)
    layer_a.forward(a.x[:5], a.topk_ids[:5], a.topk_weights[:5])          # scratch only
    gb = layer_b.backward(b.grad_y)
    ga = layer_a.backward(a.grad_y)
    assert np.array_equal(ya.view(np.uint16), alone_a[0].view(np.uint16)) and _same(ga, alone_a[1])
    assert np.array_equal(yb.view(np.uint16), alone_b[0].view(np.uint16)) and _same(gb, alone_b[1])


def _call_bytes(E, H, I, r, T, k):
    """What one call takes from the scratch: its Workspace and (forward) its cache."""
    ws = Workspace(E, H, I, r, T, k, scratch.new_array)
    cache = ForwardCache(E, H, I, r, T, k)
    return sum(a.nbytes for a in ws.arrays()), sum(a.nbytes for a in cache.arrays())


def test_scratch_grows_to_the_largest_call_and_no_further():
    scratch.SHARED.release()
    small = Problem(seed=3, E=4, k=2, H=64, I=32, r=2, T=5)
    big = Problem(seed=4, E=8, k=2, H=128, I=96, r=4, T=20)
    layers = [small.layer(max_tokens=5), big.layer(max_tokens=20)]
    for p, layer in zip((small, big), layers):
        layer.forward(p.x, p.topk_ids, p.topk_weights)
        layer.forward(p.x, p.topk_ids, p.topk_weights, save_for_backward=True)
        layer.backward(p.grad_y)
    ws, cache = _call_bytes(8, 128, 96, 4, 20, 2)
    assert scratch.SHARED.nbytes == ws + cache          # the big call's needs, held once
    held = scratch.SHARED.nbytes
    for p, layer in zip((small, big, small), layers + layers[:1]):
        layer.forward(p.x, p.topk_ids, p.topk_weights)
    assert scratch.SHARED.nbytes == held                # no call grows it again


def test_calls_from_several_threads_take_turns():
    problems = [Problem(seed=10 + i, E=4, k=2, H=64, I=64, r=2, T=16) for i in range(3)]
    alone = [p.run(max_tokens=16) for p in problems]
    layers = [p.layer(max_tokens=16) for p in problems]
    results = [None] * 3

    def work(i):
        p = problems[i]
        for _ in range(5):
            y = layers[i].forward(p.x, p.topk_ids, p.topk_weights, save_for_backward=True)
            results[i] = (y, layers[i].backward(p.grad_y))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y, g), (y0, g0) in zip(results, alone):
        assert np.array_equal(y.view(np.uint16), y0.view(np.uint16)) and _same(g, g0)


def test_buffers_start_on_a_cache_line():
    """Scratch, new arrays and saved-forward buffers start on ``ALIGN`` bytes: what a
    GEMM needs to store its large outputs past the caches (``gemm.streams``)."""
    pool = scratch.Scratch()
    arrays = [pool.array(f"a{n}", (n, 3), dtype) for n, dtype in ((5, np.uint16), (7, np.float32), (1, np.uint8))]
    arrays += [scratch.new_array("x", (3, 5), np.float32), scratch.zeros((0,), np.float32)]
    cache = ForwardCache(4, 64, 32, 8, 5, 2, alloc=nbmoe.cache.SavedPool.carve(nbmoe.cache.SavedPool().take(1 << 16)))
    arrays += cache.arrays()
    assert all(a.ctypes.data % scratch.ALIGN == 0 for a in arrays if a.size)
    assert all(not np.any(a) for a in arrays[:5])
