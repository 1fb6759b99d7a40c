"""Bad input: a clear exception naming the argument, the expected and the received value,
raised before any work, leaving the layer's caches as they were."""

import numpy as np
import pytest

import nbmoe
from helpers import BF16, Problem, assert_close

pytestmark = pytest.mark.usefixtures("each_route")     # the whole suite, once per route

E, K, H, I, R, T = 4, 2, 32, 24, 2, 6


@pytest.fixture
def problem():
    return Problem(seed=0, E=E, k=K, H=H, I=I, r=R, T=T)


@pytest.fixture
def layer(problem):
    return problem.layer(max_tokens=8, cache_depth=1)


def _construct(problem, **overrides):
    args = dict(gate_proj=problem.gate, up_proj=problem.up, down_proj=problem.down, lora=problem.lora)
    args.update(overrides)
    return nbmoe.MoELayer(**args)


@pytest.mark.parametrize("name, value, error, message", [
    ("gate_proj", [[1.0]], TypeError, r"gate_proj: expected a numpy.ndarray, got builtins.list"),
    ("gate_proj", np.zeros((E, I, H), np.float64), TypeError,
     r"gate_proj: expected dtype bfloat16 or float32, got float64"),
    ("gate_proj", np.zeros((I, H), BF16), ValueError,
     r"gate_proj: expected shape \(E, I, H\) = \(any, any, any\), got \(24, 32\)"),
    ("gate_proj", np.zeros((E, 0, H), BF16), ValueError, r"gate_proj: expected E, I, H >= 1"),
    ("up_proj", np.zeros((E, I, H + 1), BF16), ValueError,
     r"up_proj: expected shape \(E, I, H\) = \(4, 24, 32\), got \(4, 24, 33\)"),
    ("down_proj", np.zeros((E, I, H), BF16), ValueError,
     r"down_proj: expected shape \(E, H, I\) = \(4, 32, 24\), got \(4, 24, 32\)"),
    ("down_proj", np.zeros((E, H, I), np.int8), TypeError, r"down_proj: expected dtype bfloat16 or float32, got int8"),
    ("lora", {"gate_a": 1}, TypeError, r"lora: expected nbmoe.LoRAWeights or None, got dict"),
    ("weight_format", "fp8", ValueError, r"weight_format: expected one of .*'int4_k2'\), got 'fp8'"),
    ("tp", I + 1, ValueError, r"tp: cannot split I = 24 into 25 non-empty parts on multiples of align = 1"),
    ("tp", 0, ValueError, r"tp: expected an int >= 1, got 0"),
    ("max_tokens", 0, ValueError, r"max_tokens: expected an int >= 1, got 0"),
    ("max_tokens", 8.0, TypeError, r"max_tokens: expected an int, got float"),
    ("cache_depth", -1, ValueError, r"cache_depth: expected an int >= 0, got -1"),
    ("cache_depth", True, TypeError, r"cache_depth: expected an int, got bool"),
    ("group_size", 0, ValueError, r"group_size: expected an int >= 1, got 0"),
])
def test_construction_errors(problem, name, value, error, message):
    with pytest.raises(error, match=message):
        _construct(problem, **{name: value})


@pytest.mark.parametrize("name, make, error, message", [
    ("gate_a", lambda a: a.astype(np.float64), TypeError, r"lora.gate_a: expected dtype float32 or bfloat16, got float64"),
    ("gate_a", lambda a: a[:, :, :-1], ValueError, r"lora.gate_a: expected shape \(E, r, H\) = \(4, any, 32\), got \(4, 2, 31\)"),
    ("gate_a", lambda a: a[:, :0], ValueError, r"lora.gate_a: expected rank r >= 1"),
    ("gate_b", lambda b: b[:, :, :1], ValueError, r"lora.gate_b: expected shape \(E, I, r\) = \(4, 24, 2\), got \(4, 24, 1\)"),
    ("up_a", lambda a: a[:2], ValueError, r"lora.up_a: expected shape \(E, r, H\) = \(4, 2, 32\), got \(2, 2, 32\)"),
    ("up_b", lambda b: b.astype(np.float16), TypeError, r"lora.up_b: expected dtype float32 or bfloat16, got float16"),
    ("down_a", lambda a: a.transpose(0, 2, 1), ValueError, r"lora.down_a: expected shape \(E, r, I\) = \(4, 2, 24\), got \(4, 24, 2\)"),
    ("down_b", lambda b: b.tolist(), TypeError, r"lora.down_b: expected a numpy.ndarray, got builtins.list"),
])
def test_lora_errors(problem, name, make, error, message):
    setattr(problem.lora, name, make(getattr(problem.lora, name)))
    with pytest.raises(error, match=message):
        _construct(problem)


@pytest.mark.parametrize("alpha, error, message", [
    (float("nan"), ValueError, r"lora.alpha: expected a finite number, got nan"),
    ("32", TypeError, r"lora.alpha: expected a real number, got str"),
])
def test_lora_alpha_errors(problem, alpha, error, message):
    problem.lora.alpha = alpha
    with pytest.raises(error, match=message):
        _construct(problem)


def _saved_forward(layer, problem):
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights, save_for_backward=True)


@pytest.mark.parametrize("argument, value, error, message", [
    ("x", np.zeros((T, H), np.float64), TypeError, r"x: expected dtype bfloat16 or float32, got float64"),
    ("x", np.zeros((T, H + 1), BF16), ValueError, r"x: expected shape \(T, H\) = \(any, 32\), got \(6, 33\)"),
    ("x", np.zeros(H, BF16), ValueError, r"x: expected shape \(T, H\) = \(any, 32\), got \(32,\)"),
    ("x", np.zeros((9, H), BF16), ValueError, r"x: 9 tokens exceed max_tokens = 8"),
    ("topk_ids", np.zeros((T, K), np.float32), TypeError, r"topk_ids: expected dtype int32 or int64, got float32"),
    ("topk_ids", np.zeros((T, K), np.uint32), TypeError, r"topk_ids: expected dtype int32 or int64, got uint32"),
    ("topk_ids", np.zeros((T - 1, K), np.int64), ValueError, r"topk_ids: expected shape \(T, k\) = \(6, any\)"),
    ("topk_ids", np.zeros((T, 0), np.int64), ValueError, r"topk_ids: expected at least one slot"),
    ("topk_ids", np.full((T, K), E, np.int64), ValueError,
     r"topk_ids\[0, 0\] = 4: expected an expert id in \[0, 4\) or -1 for a skipped slot"),
    ("topk_weights", np.zeros((T, K), np.float64), TypeError, r"topk_weights: expected dtype float32, got float64"),
    ("topk_weights", np.zeros((T, K + 1), np.float32), ValueError,
     r"topk_weights: expected shape \(T, k\) = \(6, 2\), got \(6, 3\)"),
    ("save_for_backward", "yes", TypeError, r"save_for_backward: expected a bool, got str"),
])
def test_forward_errors_leave_caches_intact(problem, layer, argument, value, error, message):
    _saved_forward(layer, problem)
    args = dict(x=problem.x, topk_ids=problem.topk_ids, topk_weights=problem.topk_weights,
                save_for_backward=True)
    args[argument] = value
    with pytest.raises(error, match=message):
        layer.forward(**args)
    assert layer.saved == 1
    y = problem.layer(max_tokens=8).forward(problem.x, problem.topk_ids, problem.topk_weights)
    assert_close(problem, y, layer.backward(problem.grad_y))


def test_bad_expert_id_names_token_and_slot(problem, layer):
    ids = problem.topk_ids.copy()
    ids[4, 1] = -2
    with pytest.raises(ValueError, match=r"topk_ids\[4, 1\] = -2: expected an expert id in \[0, 4\)"):
        layer.forward(problem.x, ids, problem.topk_weights)


def test_k_is_fixed_by_the_first_forward(problem, layer):
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights)
    with pytest.raises(ValueError, match=r"topk_ids: expected k = 2 slots per token .* got 3"):
        layer.forward(problem.x, np.zeros((T, 3), np.int64), np.zeros((T, 3), np.float32))


def test_lora_rank_is_fixed_at_construction(problem, layer):
    lo = problem.lora
    lo.gate_a, lo.gate_b = lo.gate_a[:, :1], lo.gate_b[:, :, :1]
    with pytest.raises(ValueError, match=r"lora.gate_a: expected shape \(E, r, H\) = \(4, 2, 32\), got \(4, 1, 32\)"):
        layer.forward(problem.x, problem.topk_ids, problem.topk_weights)


@pytest.mark.parametrize("value, error, message", [
    (np.zeros((T + 1, H), BF16), ValueError, r"grad_y: expected shape \(T, H\) = \(6, 32\), got \(7, 32\)"),
    (np.zeros((T, H), np.int16), TypeError, r"grad_y: expected dtype bfloat16 or float32, got int16"),
])
def test_backward_errors_leave_caches_intact(problem, layer, value, error, message):
    _saved_forward(layer, problem)
    with pytest.raises(error, match=message):
        layer.backward(value)
    assert layer.saved == 1
    y = problem.layer(max_tokens=8).forward(problem.x, problem.topk_ids, problem.topk_weights)
    assert_close(problem, y, layer.backward(problem.grad_y))


def test_backward_without_saved_forward(problem, layer):
    with pytest.raises(nbmoe.CacheEmptyError, match="no saved forward"):
        layer.backward(problem.grad_y)
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights)       # not saved
    with pytest.raises(nbmoe.CacheEmptyError):
        layer.backward(problem.grad_y)
    assert issubclass(nbmoe.CacheEmptyError, RuntimeError)
    assert issubclass(nbmoe.CacheOverflowError, RuntimeError)


def test_cache_depth_zero_refuses_to_save(problem):
    layer = problem.layer(max_tokens=8, cache_depth=0)
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights)
    with pytest.raises(nbmoe.CacheOverflowError, match="all 0 cache slots"):
        _saved_forward(layer, problem)


def test_unavailable_route_is_a_clear_error(problem, monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"NBMOE_ISA='sse9': expected one of"):
        _construct(problem)


def test_accumulate_into_errors_leave_caches_intact(problem, layer):
    _saved_forward(layer, problem)
    held = layer.backward(problem.grad_y)
    _saved_forward(layer, problem)
    for bad, error, message in [
            ({"gate_a": 1}, TypeError, r"accumulate_into: expected nbmoe.MoEGrads, got dict"),
            (nbmoe.MoEGrads(held.input, held.topk_weights, held.gate_a.astype(np.float64), held.gate_b,
                            held.up_a, held.up_b, held.down_a, held.down_b),
             TypeError, r"accumulate_into.gate_a: expected dtype float32, got float64"),
            (nbmoe.MoEGrads(held.input, held.topk_weights, held.gate_a, held.gate_b[:, :3],
                            held.up_a, held.up_b, held.down_a, held.down_b),
             ValueError, r"accumulate_into.gate_b: expected shape .* = \(4, 24, 2\), got \(4, 3, 2\)")]:
        with pytest.raises(error, match=message):
            layer.backward(problem.grad_y, accumulate_into=bad)
        assert layer.saved == 1
    no_lora = Problem(seed=0, E=E, k=K, H=H, I=I, r=0, T=T).layer(max_tokens=8)
    _saved_forward(no_lora, problem)
    with pytest.raises(ValueError, match="accumulate_into: this layer has no LoRA"):
        no_lora.backward(problem.grad_y, accumulate_into=held)


def test_resize_refuses_while_forwards_are_saved(problem, layer):
    _saved_forward(layer, problem)
    with pytest.raises(RuntimeError, match=r"resize: 1 saved forwards still hold buffers of max_tokens=8"):
        layer.resize(64)
    with pytest.raises(nbmoe.CacheEmptyError, match=r"no saved forward with tag 99"):
        layer.backward(problem.grad_y, tag=99)
    assert layer.saved == 1
