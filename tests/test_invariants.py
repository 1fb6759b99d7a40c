"""The invariants of docs/design.md §8 that the seed log paid for, one named test each.

Invariants 2 (tp = N == tp = 1), 8 (LoRA reaches every TP part) and 12 (quantization
misconfiguration) belong to the tensor-parallel and quantized-format issues.
"""

import numba
import numpy as np
import pytest

import nbmoe
from nbmoe import reference, scratch
from nbmoe.reference import LORA_FIELDS
from helpers import BF16, GRAD_NAMES, Problem, assert_close, rel

pytestmark = pytest.mark.usefixtures("each_route")     # the whole suite, once per route


def _bits(a):
    return a.view(np.uint16) if a.dtype == BF16 else a


def _same(grads_a, grads_b):
    return all(np.array_equal(_bits(getattr(grads_a, n)), _bits(getattr(grads_b, n))) for n in GRAD_NAMES)


def test_invariant_1_buffers_have_the_contract_dtypes():
    problem = Problem(seed=1, E=4, k=2, H=48, I=32, r=4, T=7)
    y, grads = problem.run(max_tokens=7)
    assert y.dtype == BF16 and grads.input.dtype == BF16
    assert grads.topk_weights.dtype == np.float32
    for name in LORA_FIELDS:
        assert getattr(grads, name).dtype == np.float32
    # every element was written: a half-filled buffer would not match the reference
    assert_close(problem, y, grads)


def test_invariant_3_full_cache_stack_is_a_clear_error_and_keeps_earlier_caches():
    first = Problem(seed=2, E=4, k=2, H=32, I=24, r=2, T=5)
    second = Problem(seed=3, E=4, k=2, H=32, I=24, r=2, T=5)
    second.gate, second.up, second.down, second.lora = first.gate, first.up, first.down, first.lora
    layer = first.layer(max_tokens=5, cache_depth=2)
    layer.forward(first.x, first.topk_ids, first.topk_weights, save_for_backward=True)
    layer.forward(second.x, second.topk_ids, second.topk_weights, save_for_backward=True)
    with pytest.raises(nbmoe.CacheOverflowError, match="all 2 cache slots"):
        layer.forward(second.x, second.topk_ids, second.topk_weights, save_for_backward=True)
    layer.forward(first.x, first.topk_ids, first.topk_weights)      # forward-only never pushes
    assert layer.saved == 2
    for problem in (second, first):             # LIFO: the newest saved forward first
        y = problem.layer(max_tokens=5).forward(problem.x, problem.topk_ids, problem.topk_weights)
        assert_close(problem, y, layer.backward(problem.grad_y))
    assert layer.saved == 0
    with pytest.raises(nbmoe.CacheEmptyError):
        layer.backward(first.grad_y)


def test_invariant_4_test_data_at_realistic_scale():
    problem = Problem(seed=4, E=8, k=4, H=512, I=256, r=16, T=32)
    assert abs(problem.gate.astype(np.float64).std() * 512 ** 0.5 - 1) < 0.05
    assert abs(problem.down.astype(np.float64).std() * 256 ** 0.5 - 1) < 0.05
    assert abs(problem.x.astype(np.float64).std() - 1) < 0.05
    y, grads = problem.run(max_tokens=32)
    # outputs of order one, so a bf16 relative error means something
    assert 0.05 < np.abs(y.astype(np.float64)).mean() < 5
    assert_close(problem, y, grads)


def test_invariant_5_reference_is_float64_from_the_same_bf16_values():
    problem = Problem(seed=5, E=4, k=2, H=32, I=24, r=2, T=6)
    y_ref, grads_ref = problem.reference()
    assert y_ref.dtype == np.float64 and all(g.dtype == np.float64 for g in grads_ref.values())
    # the oracle reads bf16 values exactly: their float32 copies give identical results
    y32, saved32 = reference.forward(problem.x.astype(np.float32), problem.topk_ids, problem.topk_weights,
                                     problem.gate.astype(np.float32), problem.up.astype(np.float32),
                                     problem.down.astype(np.float32), problem.lora)
    assert np.array_equal(y_ref, y32)
    grads32 = reference.backward(saved32, problem.grad_y.astype(np.float32))
    assert all(np.array_equal(grads_ref[n], grads32[n]) for n in grads_ref)


def test_invariant_6_gradients_include_the_base_weight_terms():
    # LoRA B = 0 (the usual initialisation): every input gradient flows through the
    # base weights alone - through W_down into grad_h and W_gate, W_up into grad_x
    problem = Problem(seed=6, E=4, k=2, H=64, I=48, r=4, T=10)
    for name in ("gate_b", "up_b", "down_b"):
        getattr(problem.lora, name)[:] = 0
    y, grads = problem.run(max_tokens=10)
    assert_close(problem, y, grads)
    assert np.abs(grads.input.astype(np.float64)).mean() > 0.01
    assert np.abs(grads.gate_b).mean() > 0 and np.abs(grads.down_b).mean() > 0


def test_invariant_7_interleaved_caches_do_not_alias():
    one = Problem(seed=7, E=5, k=2, H=48, I=32, r=4, T=9)
    two = Problem(seed=8, E=5, k=2, H=48, I=32, r=4, T=6)
    two.gate, two.up, two.down, two.lora = one.gate, one.up, one.down, one.lora
    separate_1 = one.run(max_tokens=9)[1]
    separate_2 = two.run(max_tokens=9)[1]
    layer = one.layer(max_tokens=9, cache_depth=2)
    layer.forward(one.x, one.topk_ids, one.topk_weights, save_for_backward=True)       # F1
    layer.forward(two.x, two.topk_ids, two.topk_weights, save_for_backward=True)       # F2
    layer.forward(one.x[:3], two.topk_ids[:3], one.topk_weights[:3])                   # scratch
    # no array of a saved forward overlaps another's, or the scratch's
    buffers = [a for slot in layer._stack.slots() for a in slot.arrays()] + scratch.SHARED.buffers()
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            assert not np.shares_memory(a, b, max_work=None)
    assert _same(layer.backward(two.grad_y), separate_2)                               # B2
    assert _same(layer.backward(one.grad_y), separate_1)                               # B1


def test_invariant_9_backward_reads_token_order_input_and_post_activation_h():
    # ids chosen so expert order differs from token order, and g differs from h
    problem = Problem(seed=9, E=6, k=2, H=48, I=32, r=4, T=12, duplicates=False)
    problem.topk_ids[:] = np.array([[5, 0], [0, 3], [4, 1], [1, 5], [2, 0], [3, 2]] * 2)
    y, grads = problem.run(max_tokens=12)
    _, ref = problem.reference()
    assert rel(grads.gate_a, ref["gate_a"]) < 0.02 and rel(grads.up_a, ref["up_a"]) < 0.02
    assert rel(grads.down_a, ref["down_a"]) < 0.02
    # the test can tell: dA_down computed from the pre-activation g is far off
    _, saved = reference.forward(problem.x, problem.topk_ids, problem.topk_weights, problem.gate, problem.up,
                                 problem.down, problem.lora)
    for c in saved["experts"]:
        c["h"] = c["g"]
    wrong = reference.backward(saved, problem.grad_y)
    assert rel(wrong["down_a"], ref["down_a"]) > 0.2


def test_tagged_backward_and_discard_take_exactly_their_own_cache():
    one = Problem(seed=12, E=5, k=2, H=48, I=32, r=4, T=9)
    two = Problem(seed=13, E=5, k=2, H=48, I=32, r=4, T=6)
    two.gate, two.up, two.down, two.lora = one.gate, one.up, one.down, one.lora
    separate_1 = one.run(max_tokens=9)[1]
    layer = one.layer(max_tokens=9, cache_depth=2)
    layer.forward(one.x, one.topk_ids, one.topk_weights, save_for_backward=True)
    tag_one = layer.newest_tag
    layer.forward(two.x, two.topk_ids, two.topk_weights, save_for_backward=True)
    tag_two = layer.newest_tag
    assert _same(layer.backward(one.grad_y, tag=tag_one), separate_1)      # not the newest: fine
    layer.discard(tag_two)
    layer.discard(tag_two)                                                  # twice: ignored
    assert layer.saved == 0 and layer.newest_tag is None
    with pytest.raises(nbmoe.CacheEmptyError):
        layer.backward(two.grad_y)
    layer.resize(20)                                                         # nothing saved: allowed
    assert layer.max_tokens == 20 and _same(one.run(layer)[1], separate_1)


def test_invariant_10_bit_identical_across_thread_counts_and_runs():
    problem = Problem(seed=10, E=8, k=4, H=96, I=64, r=4, T=24)
    layer = problem.layer(max_tokens=24)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS, 1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append(problem.run(layer))
    finally:
        numba.set_num_threads(before)
    y0, g0 = results[0]
    for y, g in results[1:]:
        assert np.array_equal(y.view(np.uint16), y0.view(np.uint16)) and _same(g, g0)


def test_invariant_11_in_place_lora_updates_are_seen_without_a_sync():
    problem = Problem(seed=11, E=4, k=2, H=48, I=32, r=4, T=8)
    layer = problem.layer(max_tokens=8)
    y_before = layer.forward(problem.x, problem.topk_ids, problem.topk_weights)
    for name in LORA_FIELDS:
        arr = getattr(problem.lora, name)
        arr *= np.float32(0.5)                  # an optimizer step, in place
        arr += np.float32(0.01)
    y_after, grads = problem.run(layer)
    assert not np.array_equal(y_before.view(np.uint16), y_after.view(np.uint16))
    assert_close(problem, y_after, grads)
