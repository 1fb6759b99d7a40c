"""nbmoe.tp: the partition of I, and MoELayer(tp=N) against tp=1 and the float64 reference
for every weight format (docs/design.md §7)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbmoe
from nbmoe.reference import LORA_FIELDS
from nbmoe.tp import partition, vocab
from helpers import GRAD_NAMES, Problem, assert_close, rel
from test_formats import FORMATS, quantized


@settings(max_examples=200, deadline=None)
@given(I=st.integers(1, 3000), tp=st.integers(1, 64), align=st.sampled_from([1, 2, 16, 32, 64, 128]))
def test_partition_is_contiguous_covering_aligned_and_even(I, tp, align):
    units = -(-I // align)
    if units < tp:
        with pytest.raises(ValueError, match=rf"tp: cannot split I = {I} into {tp} non-empty parts"):
            partition(I, tp, align)
        return
    parts = partition(I, tp, align)
    assert len(parts) == tp and parts[0][0] == 0 and parts[-1][1] == I
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert all(i1 > i0 for i0, i1 in parts)
    assert all(i0 % align == 0 for i0, _ in parts)
    sizes = [-(-(i1 - i0) // align) for i0, i1 in parts]        # in align units
    assert max(sizes) - min(sizes) <= 1


def test_partition_examples_and_errors():
    assert partition(100, 3) == [(0, 34), (34, 67), (67, 100)]
    assert partition(768, 4, 128) == [(0, 256), (256, 512), (512, 640), (640, 768)]
    with pytest.raises(TypeError, match="tp: expected an int, got float"):
        partition(100, 2.0)
    with pytest.raises(ValueError, match="align: expected an int >= 1, got 0"):
        partition(100, 2, 0)


def _compare(a, b):
    """rel error of every output of run a against run b."""
    (ya, ga), (yb, gb) = a, b
    out = {"y": rel(ya, yb)}
    for name in GRAD_NAMES:
        if getattr(gb, name, None) is not None:
            out[name] = rel(getattr(ga, name), getattr(gb, name))
    return out


# tp = N against tp = 1: the parts' fp32 partial sums added in another order, y and grad_x
# rounded once either way (bf16: an ulp here and there); LoRA gradients fp32 (sums in
# another order). Measured over 60 cases (every format, tp 2-4): y 7e-6, input 0, shared
# LoRA 1.6e-7, sliced LoRA 0. grad_w is left to the reference (assert_close): each part dots grad_y
# with its own bf16-rounded partial d where tp = 1 rounds the summed d, bf16 noise that
# a few-token batch shows as up to 0.9% mean relative difference.
TP_BOUNDS = {"y": 1e-3, "input": 1e-3, "topk_weights": np.inf}
LORA_BOUND = 1e-5


@pytest.mark.usefixtures("each_route")
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(FORMATS), tp=st.integers(2, 4), E=st.integers(1, 5),
       k=st.integers(1, 3), H=st.sampled_from([64, 128]), I=st.sampled_from([128, 192]),
       r=st.sampled_from([0, 2, 4]), T=st.integers(0, 10))
def test_tp_equals_tp1_and_the_reference(seed, fmt, tp, E, k, H, I, r, T):
    kind, group = fmt
    problem = Problem(seed=seed, E=E, k=k, H=H, I=I, r=r, T=T, skip=0.2)
    weights = quantized(problem, kind, group)
    if kind.startswith("int4") and I // group < tp:
        with pytest.raises(ValueError, match=rf"tp: cannot split I = {I} into {tp} non-empty parts on "
                                             rf"multiples of align = {group} .*int4 parts align to group_size"):
            nbmoe.MoELayer(*weights, lora=problem.lora, tp=tp)
        return
    layers = [nbmoe.MoELayer(*weights, lora=problem.lora, max_tokens=10, tp=n) for n in (1, tp)]
    one, many = (problem.run(layer) for layer in layers)
    assert_close(problem, *many)
    errs = _compare(many, one)
    for name, err in errs.items():
        assert err <= TP_BOUNDS.get(name, LORA_BOUND), (name, errs)
    parts = layers[1].parts
    assert len(parts) == tp and parts[-1][1] == I
    assert all(i0 % (group or 1) == 0 for i0, _ in parts)


@pytest.mark.parametrize("fmt, group_size", [("bf16", None), ("int8", None), ("int4_awq", 128), ("int4_k2", 32)])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_tp_at_a_realistic_size(fmt, group_size, tp):
    # Qwen3-30B-A3B's H and I at a few experts; int4 g128: I = 768 is 6 groups
    problem = Problem(seed=tp, E=4, k=2, H=2048, I=768, r=8, T=16)
    weights = quantized(problem, fmt, group_size)
    one = problem.run(nbmoe.MoELayer(*weights, lora=problem.lora, max_tokens=16))
    layer = nbmoe.MoELayer(*weights, lora=problem.lora, max_tokens=16, tp=tp)
    many = problem.run(layer)
    ref = problem.reference()
    assert_close(problem, *many, ref=ref)
    errs = _compare(many, one)
    assert all(err <= TP_BOUNDS.get(name, LORA_BOUND) for name, err in errs.items()), errs
    # each part stores its own slice: separate arrays, about 1/tp of the bytes each
    packed = layer._packed
    codes = [p.gu.codes for p in packed] + [p.d.codes for p in packed]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(codes) for b in codes[i + 1:])
    total = nbmoe.MoELayer(*weights, max_tokens=16).packed_nbytes
    assert total <= layer.packed_nbytes <= 1.03 * total        # padding each part to 32 columns


def test_lora_views_of_larger_buffers_and_in_place_updates_reach_every_part():
    problem = Problem(seed=5, E=3, k=2, H=64, I=96, r=4, T=10)
    lo = problem.lora
    # LoRA arrays as strided views: every other slot of a bigger buffer, B through a transpose
    big = {n: np.zeros((2 * a.shape[0],) + a.shape[1:], np.float32) for n, a in
           ((n, getattr(lo, n)) for n in LORA_FIELDS)}
    views = {}
    for name in LORA_FIELDS:
        big[name][::2] = getattr(lo, name)
        views[name] = big[name][::2]
    views["gate_b"] = np.ascontiguousarray(lo.gate_b.transpose(0, 2, 1)).transpose(0, 2, 1)
    strided = nbmoe.LoRAWeights(**views, alpha=lo.alpha)
    layer = nbmoe.MoELayer(problem.gate, problem.up, problem.down, lora=strided, max_tokens=10, tp=3)
    y, grads = problem.run(layer)
    assert_close(problem, y, grads)
    # an optimizer step in place, on the caller's arrays: the next call of every part sees it
    for name in LORA_FIELDS:
        getattr(strided, name)[...] *= 1.5
        setattr(lo, name, np.ascontiguousarray(getattr(strided, name)))
    y2, grads2 = problem.run(layer)
    assert rel(y2, y) > 0.01
    assert_close(problem, y2, grads2)


def test_accumulated_gradients_sum_over_parts():
    problem = Problem(seed=6, E=4, k=2, H=64, I=128, r=2, T=8)
    layer = nbmoe.MoELayer(problem.gate, problem.up, problem.down, lora=problem.lora, max_tokens=8, tp=3)
    first = problem.run(layer)[1]
    acc = nbmoe.MoEGrads(None, None, **{n: getattr(first, n).copy() for n in LORA_FIELDS})
    layer.forward(problem.x, problem.topk_ids, problem.topk_weights, save_for_backward=True)
    second = layer.backward(problem.grad_y, accumulate_into=acc)
    for name in LORA_FIELDS:
        assert getattr(second, name) is getattr(acc, name)
        assert rel(getattr(second, name), 2 * getattr(first, name)) <= 1e-6, name


# --- the vocabulary ----------------------------------------------------------------------

def _unsharded_cross_entropy(h, weight, labels):
    logits = h.astype(np.float64) @ weight.astype(np.float64).T
    top = logits.max(axis=1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    return lse - logits[np.arange(len(labels)), labels]


@settings(max_examples=60, deadline=None)
@given(V=st.integers(1, 300), tp=st.integers(1, 8), m=st.sampled_from([1, 4, 64]), D=st.integers(1, 6),
       T=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_vocab_parts_equal_the_unsharded_vocabulary(V, tp, m, D, T, seed):
    rng = np.random.default_rng(seed)
    part = vocab.VocabPartition(V, tp, m)
    assert part.padded_size % (m * tp) == 0 and V <= part.padded_size < V + m * tp
    assert part.part_size * tp == part.padded_size
    assert sum(part.valid(r) for r in range(tp)) == V
    weight = rng.standard_normal((V, D)).astype(np.float32)
    shards = vocab.shard(weight, part)
    assert all(s.shape == (part.part_size, D) for s in shards)
    assert np.array_equal(vocab.gather_unpad(shards, part), weight)
    ids = rng.integers(0, V, (2, T))
    assert np.array_equal(vocab.embedding(ids, shards, part), weight[ids])
    h = rng.standard_normal((T, D)).astype(np.float32)
    full = h @ weight.T
    assert np.allclose(vocab.lm_head(h, shards, part), full, rtol=1e-5, atol=1e-5)
    cuts = np.unique(np.concatenate([[0, T], rng.integers(1, T + 1, 3)]))
    assert np.allclose(vocab.lm_head(h, shards, part, cu_seqlens=cuts), full[cuts[1:] - 1], rtol=1e-5, atol=1e-5)
    labels = rng.integers(0, V, T)
    # pad masked: the unsharded loss up to float64 rounding (Megatron's unmasked pad would add
    # exp(0 - max) per pad row: off by far more whenever padded_size > V)
    assert np.allclose(vocab.cross_entropy(h, shards, part, labels), _unsharded_cross_entropy(h, weight, labels),
                       rtol=1e-12, atol=1e-12)
    ignored = labels.copy()
    ignored[0] = -100
    loss = vocab.cross_entropy(h, shards, part, ignored)
    assert loss[0] == 0 and np.array_equal(loss[1:], vocab.cross_entropy(h, shards, part, labels)[1:])


def test_seed_65535_over_2_pads_to_two_parts_of_32768():
    # ColossalAI's Llama with vocab_size 65535 at tp = 2: no even split without padding
    part = vocab.VocabPartition(65535, 2)
    assert (part.padded_size, part.part_size, part.valid(0), part.valid(1)) == (65536, 32768, 32768, 32767)
    weight = np.arange(65535 * 2, dtype=np.float32).reshape(65535, 2)
    shards = vocab.shard(weight, part)
    assert np.array_equal(vocab.gather_unpad(shards, part), weight)     # gathered, then unpadded
    # its checkpoint held one shard where the model expects the vocabulary
    with pytest.raises(ValueError, match=r"embed: expected 65535 \(or padded 65536\) rows.*got 32768: 32768 rows look "
                                         r"like one shard of a vocabulary of 65535 split over tp = 2 \(padded_size / tp"):
        vocab.check_weights(shards[0], None, 65535, 2, tp=2)


@pytest.mark.parametrize("multiple_of, part_size", [(1, 16032), (64, 16064)])
def test_seed_128256_over_8_with_and_without_padding(multiple_of, part_size):
    # Llama 3's vocabulary at tp = 8: 16032 rows each unpadded, 16064 padded to 64
    part = vocab.VocabPartition(128256, 8, multiple_of)
    assert part.part_size == part_size and part.padded_size == 8 * part_size
    shard_rows = np.zeros((part_size, 8), np.float32)
    with pytest.raises(ValueError, match=rf"lm_head: expected 128256 rows.*got {part_size}: {part_size} rows look "
                                         rf"like one shard of a vocabulary of 128256 split over tp = 8"):
        vocab.check_weights(np.zeros((128256, 8), np.float32), shard_rows, 128256, 8, multiple_of=multiple_of)
    vocab.check_weights(np.zeros((part.padded_size, 8)), None, 128256, 8, tp=8, multiple_of=multiple_of)


def test_vocab_errors_name_the_argument():
    part = vocab.VocabPartition(10, 2, 1)
    shards = vocab.shard(np.zeros((10, 3), np.float32), part)
    with pytest.raises(ValueError, match=r"ids\[1\] = 10: expected a token id in \[0, 10\)"):
        vocab.embedding(np.array([1, 10]), shards, part)
    with pytest.raises(ValueError, match=r"shards: expected a list of tp = 2 arrays, got 1 shards"):
        vocab.gather_unpad(shards[:1], part)
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, D\) = \(10, any\), got \(9, 3\)"):
        vocab.shard(np.zeros((9, 3)), part)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected 0 = c0 < c1"):
        vocab.lm_head(np.zeros((4, 3)), shards, part, cu_seqlens=np.array([0, 2, 2, 4]))
    with pytest.raises(ValueError, match=r"embed: expected 3 columns \(the hidden size\), got 4"):
        vocab.check_weights(np.zeros((10, 4)), None, 10, 3)
    with pytest.raises(TypeError, match=r"part: expected nbmoe.tp.vocab.VocabPartition, got int"):
        vocab.shard(np.zeros((10, 3)), 2)


@pytest.mark.parametrize("tp", [1, 3])
def test_partial_outputs_are_the_fp32_sums_before_rounding(tp):
    problem = Problem(seed=7, E=4, k=2, H=64, I=96, r=2, T=8)
    layer = nbmoe.MoELayer(problem.gate, problem.up, problem.down, lora=problem.lora, max_tokens=8, tp=tp)
    y, grads = problem.run(layer)
    y32 = layer.forward(problem.x, problem.topk_ids, problem.topk_weights, save_for_backward=True, partial=True)
    g32 = layer.backward(problem.grad_y, partial=True)
    assert y32.dtype == np.float32 and g32.input.dtype == np.float32
    assert np.array_equal(y32.astype(y.dtype), y) and np.array_equal(g32.input.astype(grads.input.dtype), grads.input)
    for name in ("topk_weights",) + LORA_FIELDS:
        assert np.array_equal(getattr(g32, name), getattr(grads, name)), name
