"""MoELayer on every base-weight format (docs/design.md §6): one stored copy, forward and
backward on exactly the weights ``QuantizedWeight.dequantize()`` gives, against the
float64 reference run on those weights, per route."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbmoe
from helpers import GRAD_NAMES, Problem, assert_close, rel

pytestmark = pytest.mark.usefixtures("each_route")     # the whole suite, once per route

BF16 = ml_dtypes.bfloat16
FORMATS = [("bf16", None), ("int8", None), ("int4_awq", 32), ("int4_awq", 64), ("int4_k2", 32), ("int4_k2", 64)]


def quantized(problem, fmt, group_size):
    """The problem's base weights as stored in ``fmt``, and the problem rewired so its
    reference runs on their dequantized values (what both passes multiply by)."""
    if fmt == "bf16":
        return problem.gate, problem.up, problem.down
    weights = [nbmoe.quantize(w, fmt, group_size) for w in (problem.gate, problem.up, problem.down)]
    problem.gate, problem.up, problem.down = (q.dequantize().astype(BF16) for q in weights)
    return weights


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(FORMATS), E=st.integers(1, 6), k=st.integers(1, 3),
       H=st.sampled_from([64, 128]), I=st.sampled_from([64, 192]), r=st.sampled_from([0, 2, 4]),
       T=st.integers(0, 10), online=st.booleans())
def test_every_format_matches_reference_on_its_weights(seed, fmt, E, k, H, I, r, T, online):
    problem = Problem(seed=seed, E=E, k=k, H=H, I=I, r=r, T=T, skip=0.2)
    kind, group = fmt
    bf16 = (problem.gate, problem.up, problem.down)
    weights = quantized(problem, kind, group)
    layer = nbmoe.MoELayer(*(bf16 if online else weights), lora=problem.lora, max_tokens=10,
                           weight_format=kind if online else None, group_size=group if online else None)
    assert layer.weight_format == kind and layer.group_size == group
    y, grads = problem.run(layer)
    assert_close(problem, y, grads)


@pytest.mark.parametrize("fmt, group_size", FORMATS)
def test_backward_multiplies_by_the_forward_weights(fmt, group_size):
    # grad_x through every base weight (invariant 6), no LoRA: at this size the layer is
    # within 0.3% of the reference on the stored weights, while the same reference on a
    # copy re-quantized along the other axis (what the peer's backward uses) is 3x that
    # off or more (measured: int8 1.3%, int4 9-11%): a backward on different weights fails.
    problem = Problem(seed=3, E=4, k=2, H=256, I=128, r=0, T=32)
    weights = quantized(problem, fmt, group_size)
    _, grads = problem.run(nbmoe.MoELayer(*weights, max_tokens=32))
    _, ref = problem.reference()
    assert rel(grads.input, ref["input"]) < 3e-3
    if fmt != "bf16":
        requantized = [nbmoe.quantize(np.ascontiguousarray(w.transpose(0, 2, 1)), fmt, group_size)
                       .dequantize().transpose(0, 2, 1).astype(BF16) for w in (problem.gate, problem.up, problem.down)]
        problem.gate, problem.up, problem.down = requantized
        _, other = problem.reference()
        assert rel(other["input"], ref["input"]) > 9e-3


@pytest.mark.parametrize("fmt, group_size, bound", [
    ("bf16", None, 1.05), ("int8", None, 0.55), ("int4_k2", 32, 0.30), ("int4_awq", 128, 0.30)])
def test_stored_bytes_against_raw_bf16(fmt, group_size, bound):
    # the Qwen3-30B-A3B expert shape; scales and zero points included
    E, H, I = 2, 2048, 768
    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((E, I, H), np.float32) for _ in range(2))
    down = rng.standard_normal((E, H, I), np.float32)
    layer = nbmoe.MoELayer(gate, up, down, weight_format=fmt, group_size=group_size)
    ratio = layer.packed_nbytes / (3 * E * H * I * 2)
    assert ratio <= bound
    assert ratio >= {"bf16": 1.0, "int8": 0.5, "int4_k2": 0.25, "int4_awq": 0.25}[fmt]


@pytest.mark.parametrize("fmt, group_size, bound", [("int8", None, 0.025), ("int4_k2", 32, 0.15),
                                                    ("int4_awq", 128, 0.20), ("int4_k2", 128, 0.20)])
def test_quantization_error_against_bf16(fmt, group_size, bound):
    # The layer's output on quantized weights against the same layer on bf16 weights, on
    # N(0, 1/fan_in) weights. Per weight the error is within the bounds (int8 0.025,
    # int4 g32 0.13, g128 0.20; tests/test_quant.py); the output compounds three
    # projections: measured int8 0.011, int4_k2 g32 0.132, int4_awq g128 0.135,
    # int4_k2 g128 0.151 - hence 0.15 at g32.
    problem = Problem(seed=5, E=4, k=2, H=512, I=256, r=4, T=32)
    y_bf16, _ = problem.run(max_tokens=32)
    y_q, _ = problem.run(max_tokens=32, weight_format=fmt, group_size=group_size)
    assert rel(y_q, y_bf16) <= bound


@pytest.fixture
def problem():
    return Problem(seed=0, E=2, k=2, H=64, I=64, r=2, T=4)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(weight_format="int4_k2", group_size=0), ValueError, r"group_size: expected an int >= 1, got 0"),
    (dict(weight_format="int4_k2", group_size=16), ValueError,
     r"group_size: the int4 kernels need a multiple of 32 that divides every K, .* got 16"),
    (dict(weight_format="int4_awq", group_size=96), ValueError,
     r"group_size: the int4 kernels need a multiple of 32 that divides every K, here H .* = 64; got 96"),
    (dict(weight_format="int3"), ValueError, r"weight_format: expected one of .*, got 'int3'"),
])
def test_online_quantization_errors(problem, overrides, error, message):
    with pytest.raises(error, match=message):
        problem.layer(**overrides)


def test_prequantized_weight_errors(problem):
    k2 = [nbmoe.quantize(w, "int4_k2", 32) for w in (problem.gate, problem.up, problem.down)]
    awq_up = nbmoe.quantize(problem.up, "int4_awq", 32)
    with pytest.raises(ValueError, match=r"expected one format, got \['int4_k2', 'int4_awq', 'int4_k2'\]"):
        nbmoe.MoELayer(k2[0], awq_up, k2[2])
    with pytest.raises(ValueError, match=r"weight_format: 'int8' contradicts the QuantizedWeight objects, which are 'int4_k2'"):
        nbmoe.MoELayer(*k2, weight_format="int8")
    with pytest.raises(ValueError, match=r"group_size: 64 contradicts the QuantizedWeight objects' group_size 32"):
        nbmoe.MoELayer(*k2, group_size=64)
    with pytest.raises(TypeError, match=r"expected three nbmoe.QuantizedWeight or three arrays"):
        nbmoe.MoELayer(k2[0], problem.up, k2[2])
    with pytest.raises(ValueError, match=r"down_proj: expected shape \(E, H, I\) = \(2, 64, 64\) \(from gate_proj\)"):
        nbmoe.MoELayer(k2[0], k2[1], nbmoe.quantize(problem.down[:, :, :32], "int4_k2", 32))
    with pytest.raises(ValueError, match=r"expected one group_size, got \[32, 64, 32\]"):
        nbmoe.MoELayer(k2[0], nbmoe.quantize(problem.up, "int4_k2", 64), k2[2])
