"""Saved forwards (nbmoe/cache.py): memory sized by the call, returned by backward to a
pool any layer's next save reuses."""

import numpy as np

from nbmoe.cache import SAVED, ForwardCache, SavedPool, bytes_per_token
from helpers import Problem


def _counted(E, H, I, r, T, k):
    count = SavedPool.carve(None)
    ForwardCache(E, H, I, r, T, k, alloc=count)
    return count.used


def test_a_saved_forward_holds_what_its_call_needs_not_max_tokens():
    SAVED.release()
    problem = Problem(seed=0, E=4, k=2, H=64, I=32, r=4, T=6)
    layer = problem.layer(max_tokens=4096)
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights, save_for_backward=True)
    (cache,) = layer._stack.slots()
    held = cache.buffer.nbytes
    assert held == _counted(4, 64, 32, 4, 6, 2)
    # the per-token bytes of docs/design.md §5 (2Hp + 64 + 20k + k (8 + 4Ip + 2Hp + 12r)),
    # plus the per-expert routing arrays and the 64-byte alignment of 12 arrays
    per_token = 2 * 64 + 64 + 20 * 2 + 2 * (8 + 4 * 32 + 2 * 64 + 12 * 4)
    assert bytes_per_token(64, 32, 4, 2) == per_token
    fixed = 8 * (3 * 4 + 1) + 64 * 12
    assert 6 * per_token <= held <= 6 * per_token + fixed
    assert sum(a.nbytes for a in cache.arrays()) <= held


def test_released_memory_is_reused_by_any_layer():
    SAVED.release()
    a = Problem(seed=1, E=4, k=2, H=64, I=32, r=4, T=8)
    b = Problem(seed=2, E=3, k=2, H=32, I=32, r=2, T=5)               # another shape, needs less
    layer_a, layer_b = a.layer(max_tokens=8), b.layer(max_tokens=5)
    layer_a.forward(a.x, a.topk_ids, a.topk_weights, save_for_backward=True)
    first = layer_a._stack.slots()[0].buffer
    layer_a.backward(a.grad_y)
    assert SAVED.nbytes == first.nbytes
    y = layer_b.forward(b.x, b.topk_ids, b.topk_weights, save_for_backward=True)
    assert layer_b._stack.slots()[0].buffer is first and SAVED.nbytes == 0
    grads = layer_b.backward(b.grad_y)
    alone_y, alone = b.run(max_tokens=5)                                # stale pool contents change nothing
    assert np.array_equal(y.view(np.uint16), alone_y.view(np.uint16))
    assert np.array_equal(grads.input.view(np.uint16), alone.input.view(np.uint16))


def test_the_pool_holds_no_more_buffers_than_saves_ever_at_once():
    SAVED.release()
    layers = [Problem(seed=s, E=4, k=2, H=64, I=32, r=2, T=4 + 4 * s) for s in range(3)]
    built = [p.layer(max_tokens=16) for p in layers]
    for _ in range(3):                            # growing calls: each save replaces a too-small buffer
        for p, layer in zip(layers, built):
            layer.forward(p.x, p.topk_ids, p.topk_weights, save_for_backward=True)
            layer.backward(p.grad_y)
    assert len(SAVED._free) == 1 and SAVED.nbytes == _counted(4, 64, 32, 2, 12, 2)
