"""The measurement helpers: the eager baseline computes the same function as the
reference (a comparison with a different function would mean nothing), the counts, and
the routing both sides get."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nbmoe import bench
from nbmoe.kernels import isa, peak
from nbmoe.kernels.gemm import PackedMatrix
from nbmoe.reference import LORA_FIELDS
from nbmoe.torch import to_numpy, to_torch
from conftest import ROUTE_PARAMS
from helpers import Problem, assert_close, rel


def _eager_step(eager, x, ids, weights, grad_y):
    """(y, x) after one forward and backward of ``eager``; x (a leaf) holds its gradient."""
    x = to_torch(x).requires_grad_(True)
    y = eager.forward(x, to_torch(ids), to_torch(weights, torch.bfloat16).requires_grad_(True))
    y.backward(to_torch(grad_y))
    return y, x


def test_eager_baseline_matches_reference():
    problem = Problem(seed=0, E=6, k=3, H=64, I=48, r=4, T=12, skip=0.2)
    eager = bench.EagerExperts(problem.gate, problem.up, problem.down, problem.lora)
    y, x = _eager_step(eager, problem.x, problem.topk_ids, problem.topk_weights, problem.grad_y)
    y_ref, grads_ref = problem.reference()
    # the baseline is bf16 end to end (LoRA weights too): over 20 seeds at most
    # 0.009 (y), 0.008 (input), 0.010 (down_b)
    assert rel(to_numpy(y), y_ref) < 0.02
    assert rel(to_numpy(x.grad), grads_ref["input"]) < 0.03
    down_b = [t.grad if t.grad is not None else torch.zeros_like(t) for t in eager.lora["down_b"]]
    assert rel(to_numpy(torch.stack(down_b)), grads_ref["down_b"]) < 0.03


def test_eager_baseline_makes_lora_gradients_only_for_experts_reached():
    # PEFT's per-expert Linear: an expert no token reaches costs its LoRA nothing in backward
    problem = Problem(seed=1, E=6, k=2, H=32, I=16, r=2, T=4)
    problem.topk_ids[:] = [1, 4]
    eager = bench.EagerExperts(problem.gate, problem.up, problem.down, problem.lora)
    _eager_step(eager, problem.x, problem.topk_ids, problem.topk_weights, problem.grad_y)
    for name, tensors in eager.lora.items():
        assert [e for e, t in enumerate(tensors) if t.grad is not None] == [1, 4], name


def test_flops_count_what_the_eager_baseline_multiplies():
    # an independent count: torch's FLOP counter on the baseline's matmuls, forward and backward
    T, E, k, H, I, r = 5, 6, 3, 40, 24, 4
    eager = bench.EagerExperts(*bench.layer_weights(E, H, I, r))
    ids, weights = bench.routing(T, E, k)
    x, grad_y = bench.activations(T, H)
    x, weights = to_torch(x).requires_grad_(True), to_torch(weights, torch.bfloat16).requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        y = eager.forward(x, to_torch(ids), weights)
    with FlopCounterMode(display=False) as backward:
        y.backward(to_torch(grad_y))
    assert bench.flops(T, k, H, I, r) == (forward.get_total_flops(), backward.get_total_flops())


def test_weight_bytes_are_the_experts_touched():
    gate, up, down, _ = bench.layer_weights(E=5, H=10, I=20, r=0)
    ids = np.array([[0, 3], [3, -1]])
    touched = sum(w[e].nbytes for w in (gate, up, down) for e in (0, 3))
    assert bench.weight_bytes(ids, E=5, H=10, I=20) == touched
    lora = bench.layer_weights(E=5, H=10, I=20, r=3)[3]
    factors = sum(getattr(lora, name)[e].nbytes for name in LORA_FIELDS for e in (0, 3))
    assert bench.weight_bytes(ids, E=5, H=10, I=20, lora=lora) == touched + factors


@pytest.mark.parametrize("skew", [None, 1.0])
def test_routing_draws_k_distinct_experts(skew):
    ids, weights = bench.routing(T=500, E=16, k=6, seed=3, skew=skew)
    assert ids.shape == weights.shape == (500, 6) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 6 for row in ids.tolist())
    assert np.allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


def test_zipf_routing_is_skewed():
    T, E, k = 4000, 64, 4

    def shares(**kwargs):
        ids = bench.routing(T, E, k, **kwargs)[0]
        return np.bincount(ids.ravel(), minlength=E) / ids.size

    for flat in (shares(), shares(skew=0.0)):
        assert flat.max() < 1.5 / E
    zipf = [shares(seed=seed, skew=1.0) for seed in range(3)]
    # popularity 1 / i over 64 experts, 4 per token: the top expert gets ~0.16 of the
    # pairs (10 / E), the top four ~0.38 (uniform: 4 / E = 0.06)
    assert all(z.max() > 8 / E and np.sort(z)[-4:].sum() > 0.3 for z in zipf)
    assert len({int(z.argmax()) for z in zipf}) > 1          # which expert leads: a random permutation


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(k=0), ValueError, r"k: expected an int in \[1, 8\], got 0"),
    (dict(k=9), ValueError, r"k: expected an int in \[1, 8\], got 9"),
    (dict(skew=-1.0), ValueError, r"skew: expected a number >= 0, got -1.0"),
    (dict(skew=float("nan")), ValueError, r"skew: expected a finite number, got nan"),
    (dict(skew="1"), TypeError, r"skew: expected a real number, got str"),
])
def test_routing_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench.routing(**dict(dict(T=4, E=8, k=2), **kwargs))


def test_layer_weights_are_at_realistic_scale():
    gate, up, down, lora = bench.layer_weights(E=4, H=256, I=128, r=8)
    assert abs(gate.astype(np.float64).std() * 16 - 1) < 0.05
    assert abs(down.astype(np.float64).std() * 128 ** 0.5 - 1) < 0.05
    problem = Problem(seed=0, E=4, k=2, H=256, I=128, r=0, T=4)
    problem.gate, problem.up, problem.down, problem.lora = gate, up, down, lora
    assert_close(problem, *problem.run(max_tokens=4))


@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_peak_spins_do_the_arithmetic_they_count(route):
    out = np.zeros(2, np.float32)
    spin, flop, _, _ = bench._SPINS[route]
    spin(3, out)
    if route == "amx":              # 4 tiles of 16 x 16, each element 3 steps x 32 products of 1 x 1
        assert np.all(out == 4 * 256 * 3 * 32)
    elif route == "avx512_bf16":    # item i: 12 chains x 16 lanes x 3 x (1 * y + 1 * 0), y = bf16 bits 0x3F80 + i
        y = np.array([0x3F80, 0x3F81], np.uint16).view(bench.ml_dtypes.bfloat16).astype(np.float64)
        assert out[0] == 12 * 16 * 3 * y[0] and out[1] == 12 * 16 * 3 * y[1]
    else:                           # item i: 16 lanes x 12 chains a <- 0.999 a + 0.001 from (i + 1) f_j
        f = np.float32([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1]).astype(np.float64)
        expected = [16 * np.sum(1 + ((i + 1) * f - 1) * 0.999 ** 3) for i in range(2)]
        assert np.allclose(out, expected, rtol=1e-5, atol=0) and flop == 2 * 16 * len(f)


def test_read_stream_reads_everything():
    data = np.arange(16 * 64 * 4, dtype=np.float32)
    assert peak.read_stream(data, 64) == data.sum()


def test_ceilings_best_takes_each_ceiling_at_its_highest():
    a, b = bench.Ceilings(400.0, "vdpbf16ps", 60.0), bench.Ceilings(470.0, "vdpbf16ps", 35.0)
    best = bench.Ceilings.best(a, b)
    assert (best.peak_gflops, best.read_gbs, best.peak_of) == (470.0, 60.0, "vdpbf16ps")
    assert best.roofline_s(470e9, 120e9) == 2.0                 # max(1 s of compute, 2 s of reading)


@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_single_gemm_times_each_contender_and_refuses_a_wrong_product(route, monkeypatch):
    routes = [isa.Route(route, "")]
    times, flop = bench.single_gemm(routes, M=20, K=64, N=48, repeat=2)
    assert sorted(times) == sorted([route, "torch.matmul"]) and all(t > 0 for t in times.values())
    assert flop == 2 * 20 * 64 * 48
    off = lambda self, route, a, out=None: np.zeros((a.shape[0], self.shape[0]), np.float32)
    monkeypatch.setattr(PackedMatrix, "matmul", off)
    with pytest.raises(RuntimeError, match=rf"single_gemm: route '{route}' is off the float64 product by"):
        bench.single_gemm(routes, M=20, K=64, N=48, repeat=1)
