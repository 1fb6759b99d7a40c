"""nbmoe.tp.dist: tensor parallelism over torch.distributed, in spawned gloo processes on
this machine (a file store, one thread per rank, explicit timeouts), against the same
training in one process."""

import datetime
import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nbmoe.torch as nt
from nbmoe.tp import dist as tpd
from helpers import rel
from test_torch import adamw_losses, build, qwen3, tokens, with_lora

TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 3                # AdamW steps (lr 1e-2) on the batch of test_torch.adamw_losses


def _model(quantized=None, group_size=None):
    model = build(qwen3())
    nt.add_lora(model, 4, 8.0)           # as a fine-tune starts: A random, B zero
    if quantized:
        nt.quantize_experts(model, quantized, group_size)
    return model


def _train(model):
    return adamw_losses(model, nt.lora_parameters(model), steps=STEPS)


def _train_sharded(rank, world, out, quantized=None):
    model = tpd.shard_model(_model(quantized))
    stored = nt.experts_nbytes(model)
    ids = tokens(3)
    losses = _train(model)
    with torch.no_grad():
        logits = tpd.gather_logits(model(ids).logits, model._nbmoe_tp.vocab)
    adapter = tpd.gather_lora(model)
    nt.save_lora(model, os.path.join(out, "adapter.safetensors"))
    return dict(losses=losses, logits=logits, adapter=adapter, stored=stored)


def _unsplittable(rank, world, out):
    model = _model("int4_k2", 32)        # I = 32 is one int4 group of 32: no second part
    try:
        tpd.shard_model(model)
    except ValueError as err:
        return str(err)
    return None


def _one_rank_fails(rank, world, out):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()                       # rank 0 waits on a peer that is gone


def _load_full_weights(rank, world, out):
    model = tpd.shard_model(_model())
    full = build(qwen3(), seed=5)                 # other base weights, unsharded
    with_lora(full)
    state = full.state_dict()
    model.load_state_dict(tpd.shard_state_dict(model, state))
    ids = tokens(4)
    with torch.no_grad():
        logits = tpd.gather_logits(model(ids).logits, model._nbmoe_tp.vocab)
    mixed = dict(state)
    mixed["model.embed_tokens.weight"] = model.get_input_embeddings().weight.detach()   # a shard
    try:
        tpd.shard_state_dict(model, mixed)
        error = None
    except ValueError as err:
        error = str(err)
    return dict(logits=logits, error=error)


def _load_peft_folder(rank, world, out):
    model = tpd.shard_model(build(qwen3()))                     # no adapters yet: load_lora adds them
    nt.load_lora(model, os.path.join(out, "peft"))
    with torch.no_grad():
        return tpd.gather_logits(model(tokens(4)).logits, model._nbmoe_tp.vocab)


SCENARIOS = {"train": _train_sharded, "train_int8": lambda r, w, o: _train_sharded(r, w, o, "int8"),
             "unsplittable": _unsplittable, "one_rank_fails": _one_rank_fails, "load_full": _load_full_weights,
             "load_peft": _load_peft_folder}


def _rank(rank, world, store, out, scenario, timeout):
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timeout)
    result = SCENARIOS[scenario](rank, world, out)      # an error ends this process, and spawn the others
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()                  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()
    # Leave without interpreter finalization: a gloo worker thread still holding a tensor can
    # abort the process there ("terminate called without an active exception", SIGABRT: once
    # in four CI runs of this suite, tp2-int8, after every result was saved; the known race
    # of pytorch/pytorch#179291). The result file is closed; exit code 0 is what spawn checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(tmp_path, scenario, world, timeout=TIMEOUT):
    """Run ``scenario`` on ``world`` spawned ranks; their results, by rank."""
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path), scenario, timeout), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _single(quantized=None):
    model = _model(quantized)
    ids = tokens(3)
    losses = _train(model)
    with torch.no_grad():
        logits = model(ids).logits
    return losses, logits, nt.lora_state_dict(model), model


@pytest.mark.slow
@pytest.mark.parametrize("world, quantized", [(2, None), (3, None), (2, "int8")], ids=["tp2", "tp3", "tp2-int8"])
def test_tensor_parallel_training_equals_one_process(tmp_path, world, quantized):
    # tp=3: I = 32 splits 11, 11, 10; the vocabulary of 128 pads to 192: rank 2 holds only pad
    losses, logits, adapter, single = _single(quantized)
    results = spawn(tmp_path, "train_int8" if quantized else "train", world)
    ours = results[0]
    assert np.allclose(ours["losses"], losses, rtol=0, atol=1e-3), (ours["losses"], losses)
    assert all(np.allclose(r["losses"], ours["losses"], rtol=0, atol=0) for r in results)   # one loss, every rank
    # Losses: measured within 7e-5 of one process. The adapter: the one difference beyond
    # fp32 summation order is the routing weights' gradient, which each rank dots with its
    # own bf16-rounded partial expert output where one process rounds the summed output
    # (bf16 noise, reaching the earlier layer's gradients through its router; the last
    # layer's LoRA gradients match to 0 in bf16). AdamW's normalised steps (~lr whatever a
    # gradient's size) turn that noise on near-zero gradients into whole steps: measured
    # 0.0014-0.0020 mean relative after 3 steps.
    assert ours["adapter"].keys() == adapter.keys()
    for name, full in adapter.items():
        assert ours["adapter"][name].shape == full.shape, name
        assert rel(ours["adapter"][name].numpy(), full.numpy()) <= 0.005, name
    # each rank stores its share of I of the experts (int8: plus down's per-row scales, whole)
    total, share = nt.experts_nbytes(_model(quantized)), -(-32 // world) / 32
    assert all(r["stored"] <= 1.05 * share * total for r in results), (total, [r["stored"] for r in results])
    # save from the sharded model (gathered, full shapes), load into one process: same logits
    fresh = _model(quantized)
    nt.load_lora(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        again = fresh(tokens(3)).logits
    assert rel(again.float().numpy(), ours["logits"].float().numpy()) <= 0.02


@pytest.mark.slow
def test_an_unsplittable_world_is_a_value_error_before_any_collective(tmp_path):
    errors = spawn(tmp_path, "unsplittable", 2)
    assert all(e is not None and "model.layers.0.mlp.experts: tp: cannot split I = 32 into 2 non-empty parts" in e
               and "int4 parts align to group_size = 32" in e for e in errors), errors


@pytest.mark.slow
def test_a_failing_rank_ends_the_others_with_an_error_naming_it(tmp_path):
    # rank 1 raises while rank 0 waits in a collective: the job ends (rank 0's gloo wait is
    # bounded by the timeout, and spawn terminates it) with rank 1's error, not a hang
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=r"Process 1 terminated with the following error(.|\n)*"
                                                        r"rank 1 fails on purpose"):
        spawn(tmp_path, "one_rank_fails", 2, timeout=datetime.timedelta(seconds=10))
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_full_weights_load_into_a_sharded_model_and_shards_are_caught(tmp_path):
    full = build(qwen3(), seed=5)
    with_lora(full)
    full.set_experts_implementation("nbmoe")
    with torch.no_grad():
        want = full(tokens(4)).logits
    results = spawn(tmp_path, "load_full", 2)
    for r in results:
        assert rel(r["logits"].float().numpy(), want.float().numpy()) <= 0.02
        # 128 rows padded to 128 at tp=2 (m=64): a rank's shard is 64 = V / 2
        assert r["error"] is not None and r["error"].startswith("embed: expected 128 rows (the vocabulary), got 64: "
                                                                "64 rows look like one shard"), r["error"]


@pytest.mark.slow
def test_a_peft_folder_loads_into_a_sharded_model(tmp_path):
    model = build(qwen3())
    with_lora(model)
    nt.save_lora(model, tmp_path / "peft", format="peft")
    with torch.no_grad():
        want = model(tokens(4)).logits
    for logits in spawn(tmp_path, "load_peft", 2):
        assert rel(logits.float().numpy(), want.float().numpy()) <= 0.02
