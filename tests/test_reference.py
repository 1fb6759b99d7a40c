"""The oracle itself: exact bf16 rounding, gradients equal to finite differences, and no
dependence on the code it checks."""

import ast
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbmoe import reference
from nbmoe.reference import LORA_FIELDS
from helpers import Problem


with np.errstate(invalid="ignore"):       # the NaN patterns
    _ALL_BF16 = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
_FINITE = np.isfinite(_ALL_BF16) & (np.arange(1 << 16) < 0x8000)        # non-negative, finite
_VALUES = _ALL_BF16[_FINITE]
_BITS = np.arange(1 << 16)[_FINITE]


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=2.0 ** -126, max_value=3.3e38) | st.floats(min_value=1.0, max_value=2.0),
       st.booleans())
def test_round_bf16_is_nearest_even(magnitude, negative):
    # an independent oracle: the two neighbours among all 2^15 non-negative bf16 values
    i = np.searchsorted(_VALUES, magnitude)
    below, above = (i - 1, i) if _VALUES[i] != magnitude else (i, i)
    d_below, d_above = magnitude - _VALUES[below], _VALUES[above] - magnitude
    pick = below if d_below < d_above or (d_below == d_above and _BITS[below] % 2 == 0) else above
    value = -magnitude if negative else magnitude
    expected = -_VALUES[pick] if negative else _VALUES[pick]
    assert reference.round_bf16(np.array([value]))[0] == expected


def test_round_bf16_ties_and_specials():
    one = 1.0
    ulp = 2.0 ** -7
    cases = {one + ulp / 2: one, one + 3 * ulp / 2: one + 2 * ulp,          # ties to even
             one + ulp / 2 + 2.0 ** -40: one + ulp,                         # above the tie: up
             -(one + ulp / 2): -one, 3.5e38: np.inf, -3.5e38: -np.inf, 0.0: 0.0}
    for value, expected in cases.items():
        assert reference.round_bf16(np.array([value]))[0] == expected, value
    special = reference.round_bf16(np.array([np.nan, np.inf, -np.inf]))
    assert np.isnan(special[0]) and special[1] == np.inf and special[2] == -np.inf


def _loss(problem, **arrays):
    args = dict(x=problem.x, topk_ids=problem.topk_ids, topk_weights=problem.topk_weights,
                gate=problem.gate, up=problem.up, down=problem.down, lora=problem.lora)
    args.update(arrays)
    y, _ = reference.forward(rounding=False, **args)
    return float(np.sum(y * problem.grad_y.astype(np.float64)))


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_gradients_match_finite_differences(seed):
    problem = Problem(seed=seed, E=3, k=2, H=6, I=5, r=2, T=4, skip=0.2)
    problem.topk_ids[0, 1] = problem.topk_ids[0, 0]                       # a duplicate
    for name in ("x", "gate", "up", "down"):
        setattr(problem, name, getattr(problem, name).astype(np.float64))
    for name in LORA_FIELDS:
        setattr(problem.lora, name, getattr(problem.lora, name).astype(np.float64))
    problem.topk_weights = problem.topk_weights.astype(np.float64)
    _, saved = reference.forward(problem.x, problem.topk_ids, problem.topk_weights, problem.gate,
                                 problem.up, problem.down, problem.lora, rounding=False)
    grads = reference.backward(saved, problem.grad_y)
    rng = np.random.default_rng(seed)
    targets = {"input": (problem, "x"), "topk_weights": (problem, "topk_weights")}
    targets.update({n: (problem.lora, n) for n in LORA_FIELDS})
    eps = 1e-6
    for grad_name, (owner, attr) in targets.items():
        base = getattr(owner, attr)
        for index in [tuple(rng.integers(0, n) for n in base.shape) for _ in range(6)]:
            plus, minus = base.copy(), base.copy()
            plus[index] += eps
            minus[index] -= eps
            setattr(owner, attr, plus)
            f_plus = _loss(problem)
            setattr(owner, attr, minus)
            f_minus = _loss(problem)
            setattr(owner, attr, base)
            numeric = (f_plus - f_minus) / (2 * eps)
            if grad_name == "topk_weights" and problem.topk_ids[index] < 0:
                numeric = 0.0                       # a skipped slot's weight multiplies nothing
            assert abs(grads[grad_name][index] - numeric) < 1e-6 * max(1.0, abs(numeric)), (grad_name, index)


def test_the_oracle_stands_alone():
    # the file by itself, outside the package: NumPy only, none of the kernels it checks
    script = """import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("oracle", sys.argv[1])
oracle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oracle)
y, _ = oracle.forward(np.ones((2, 4)), np.array([[0], [-1]]), np.ones((2, 1)), np.ones((1, 3, 4)),
                      np.ones((1, 3, 4)), np.ones((1, 4, 3)))
print(sorted(m for m in sys.modules if m.startswith("nbmoe")))
print(y.tolist())"""
    done = subprocess.run([sys.executable, "-c", script, reference.__file__], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    modules, y = done.stdout.splitlines()
    h = reference.round_bf16(4.0 / (1 + np.exp(-4.0)) * 4.0)            # g = u = 4
    assert modules == "[]" and ast.literal_eval(y) == [[float(reference.round_bf16(3 * h))] * 4, [0.0] * 4]
