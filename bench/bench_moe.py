"""pytest-benchmark: nbmoe against PyTorch eager at the Qwen3-30B-A3B layer shape.

    python -m pytest bench/bench_moe.py --benchmark-only -n 0 --benchmark-group-by=param:T

The same comparison as ``python -m nbmoe bench`` (which adds the roofline column), on the
route NBMOE_ISA names or the best this CPU runs.
"""

import numba
import numpy as np
import pytest
import torch

from nbmoe import MoELayer, bench
from nbmoe.kernels import isa
from nbmoe.kernels.gemm import PackedMatrix
from nbmoe.torch import to_torch

SHAPE = bench.QWEN3_30B_A3B
TOKENS = [1, 16, 128, 1024, 4096]


@pytest.fixture(scope="module")
def weights():
    return bench.layer_weights(SHAPE["experts"], SHAPE["hidden"], SHAPE["intermediate"], SHAPE["rank"])


@pytest.fixture(scope="module")
def layer(weights):
    return MoELayer(*weights[:3], lora=weights[3], max_tokens=max(TOKENS))


@pytest.fixture(scope="module")
def eager(weights):
    torch.set_num_threads(numba.get_num_threads())
    return bench.EagerExperts(*weights)


def _inputs(T):
    ids, w = bench.routing(T, SHAPE["experts"], SHAPE["topk"])
    x, grad_y = bench.activations(T, SHAPE["hidden"])
    return x, ids, w, grad_y


def _torch(x, ids, w, grad_y):
    return to_torch(x), to_torch(ids), to_torch(w, torch.bfloat16), to_torch(grad_y)


@pytest.mark.parametrize("T", TOKENS)
def test_nbmoe_forward(benchmark, layer, T):
    x, ids, w, _ = _inputs(T)
    benchmark(layer.forward, x, ids, w)


@pytest.mark.parametrize("T", TOKENS)
def test_nbmoe_forward_backward(benchmark, layer, T):
    x, ids, w, grad_y = _inputs(T)
    layer.forward(x, ids, w, save_for_backward=True)
    held = layer.backward(grad_y)          # LoRA gradients accumulate here, as torch's .grad

    def step():
        layer.forward(x, ids, w, save_for_backward=True)
        layer.backward(grad_y, accumulate_into=held)
    benchmark(step)


@pytest.mark.parametrize("T", TOKENS)
def test_eager_forward(benchmark, eager, T):
    x, ids, w, _ = _torch(*_inputs(T))

    def forward():
        with torch.no_grad():
            eager.forward(x, ids, w)
    benchmark(forward)


@pytest.mark.parametrize("T", TOKENS)
def test_eager_forward_backward(benchmark, eager, T):
    x, ids, w, grad_y = _torch(*_inputs(T))

    def step():
        eager.forward(x.detach().requires_grad_(True), ids, w.detach().requires_grad_(True)).backward(grad_y)
    benchmark(step)


@pytest.fixture(scope="module")
def single():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 2048), dtype=np.float32).astype(np.float32)
    w = rng.standard_normal((1536, 2048), dtype=np.float32) * np.float32(2048 ** -0.5)
    return a.astype(bench.ml_dtypes.bfloat16), w.astype(bench.ml_dtypes.bfloat16)


def test_single_gemm_nbmoe(benchmark, single):
    a, w = single
    packed, route = PackedMatrix(w.view(np.uint16)), isa.choose_route()
    out = np.empty((512, 1536), np.float32)
    benchmark(packed.matmul, route, a.view(np.uint16), out)


def test_single_gemm_torch(benchmark, single):
    torch.set_num_threads(numba.get_num_threads())
    a, w = (to_torch(x) for x in single)
    benchmark(torch.matmul, a, w.T)
