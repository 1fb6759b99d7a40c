"""PEFT on nbmoe experts: PEFT's own LoRA (``target_parameters`` on the experts'
``gate_up_proj`` / ``down_proj``) run by the "nbmoe" experts implementation, and nbmoe's
adapters written as a PEFT folder that stock PEFT loads."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from peft import LoraConfig, PeftModel, get_peft_model

import nbmoe.torch as nt
from nbmoe import peft as peft_format
from nbmoe.reference import LORA_FIELDS
from helpers import rel
from test_torch import adamw_losses, build, mixtral, qwen3, tokens, with_lora

# PEFT warns that pattern keys match no module name; they match the parameters' (checked below)
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_model(config, implementation, dtype=torch.bfloat16, seed=1, **lora):
    """A tiny model with PEFT LoRA on its experts, B random (every gradient path carries signal)."""
    model = build(config())
    if dtype != torch.bfloat16:           # (.to casts buffers too: the rotary frequencies)
        model.to(dtype)
    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    pm = get_peft_model(model, LoraConfig(**{**options, **lora}))
    pm.set_experts_implementation(implementation)
    return pm


def loss_and_grads(pm, ids):
    pm.zero_grad(set_to_none=True)
    loss = pm(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in pm.named_parameters() if p.requires_grad}


def logits(model, ids, implementation=None):
    if implementation is not None:
        model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(ids).logits.double().numpy()


@pytest.mark.usefixtures("each_route")
@pytest.mark.parametrize("config", [qwen3, mixtral])
@pytest.mark.parametrize("lora", [{}, dict(rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}),
                                  dict(target_parameters=["mlp.experts.down_proj"], use_rslora=True)],
                         ids=["default", "ranks-differ", "down-only"])
def test_loss_and_gradients_as_close_as_eager(config, lora):
    # nbmoe and PEFT's eager experts (bf16), each against PEFT's eager experts in float32;
    # measured (qwen3, mixtral): nbmoe 0.008-0.011 from it, eager 0.010-0.012 (qwen3) and
    # 0.06-0.13 (mixtral, whose bf16 routing differs a little from the float32 run's); the
    # 0.02 floor covers a layer where eager happens to land closer (qwen3: 0.0103 vs 0.0098)
    ids = tokens(1)
    (loss, grads), (_, eager), (ref_loss, ref) = [
        loss_and_grads(peft_model(config, impl, dtype, **lora), ids)
        for impl, dtype in (("nbmoe", torch.bfloat16), ("eager", torch.bfloat16), ("eager", torch.float32))]
    assert abs(loss - ref_loss) <= 0.005 * abs(ref_loss)
    assert set(grads) == set(eager) == set(ref) and len(grads) == 4 * len(lora.get("target_parameters", EXPERTS))
    if "rank_pattern" in lora:
        rows = {g.shape[0] for n, g in grads.items() if n.endswith("lora_A.default.weight")}   # E * r
        assert len(rows) == 2 and max(rows) == 2 * min(rows)
    for name in grads:
        assert rel(grads[name], ref[name]) <= max(0.02, 1.25 * rel(eager[name], ref[name])), name


def test_training_through_peft_lowers_the_loss():
    pm = peft_model(qwen3, "nbmoe", init_lora_weights=True, r=8, lora_alpha=16)
    losses = adamw_losses(pm, [p for p in pm.parameters() if p.requires_grad])
    assert losses[-1] <= 0.8 * losses[0], losses


def test_disabled_adapter_runs_the_base_model():
    pm, ids = peft_model(qwen3, "nbmoe"), tokens(3)
    base = logits(build(qwen3()), ids, "nbmoe")
    with pm.disable_adapter():
        assert np.array_equal(logits(pm, ids), base)
    assert rel(logits(pm, ids), base) >= 0.05            # the adapter is back, and matters


def test_adapters_switch_and_several_run_at_once():
    pm, ids = peft_model(qwen3, "nbmoe"), tokens(4)
    torch.manual_seed(5)
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERTS,
                                       init_lora_weights=False))
    seen = []
    for name in ("other", "default", ["default", "other"]):
        pm.base_model.set_adapter(name)
        ours, eager = logits(pm, ids, "nbmoe"), logits(pm, ids, "eager")
        assert rel(ours, eager) <= 0.02, name             # bf16 eager is about 0.005 from fp32
        seen.append(ours)
    assert min(rel(a, b) for i, a in enumerate(seen) for b in seen[:i]) >= 0.05


def test_peft_never_folds_the_adapter_into_the_weights(monkeypatch):
    # PEFT's own forward registers a parametrization computing W + dW (torch evaluates it
    # on registering); on nbmoe experts nothing is registered, forward or backward
    pm, ids = peft_model(qwen3, "nbmoe"), tokens(4)

    def refuse(*args, **kwargs):
        raise AssertionError("W + dW registered")

    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization", refuse)
    loss = pm(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


def test_a_parametrized_base_weight_is_a_clear_error():
    model = build(qwen3(), implementation="nbmoe")
    torch.nn.utils.parametrize.register_parametrization(model.model.layers[0].mlp.experts, "down_proj",
                                                        torch.nn.Identity())
    with pytest.raises(NotImplementedError, match=r"Qwen3MoeExperts\.down_proj is parametrized \(Identity\)"):
        logits(model, tokens())


def test_merge_and_unload_repacks_the_merged_weights():
    pm, ids = peft_model(qwen3, "nbmoe"), tokens(5)
    adapted = logits(pm, ids)                             # nbmoe packs the base weights here
    merged = pm.merge_and_unload()
    ours, eager = logits(merged, ids, "nbmoe"), logits(merged, ids, "eager")
    # the merged model on nbmoe is the merged weights' function (not the stale packed base),
    # and the adapted one up to rounding the merged weights to bf16 (measured 0.006)
    assert rel(ours, eager) <= 0.02
    assert rel(ours, adapted) <= 0.02


def test_merge_unmerge_and_disable_are_each_seen():
    # PEFT merges with param.data += delta, which torch's version counter does not see
    pm, ids = peft_model(qwen3, "nbmoe"), tokens(5)
    base = logits(build(qwen3()), ids, "nbmoe")
    adapted = logits(pm, ids)
    pm.merge_adapter()
    assert rel(logits(pm, ids), adapted) <= 0.02        # merged into bf16 weights: measured 0.006
    pm.unmerge_adapter()
    with pm.disable_adapter():
        # unmerged: bf16 (W + d) - d, measured 0.0026; the stale merged weights would be 0.05+ away
        assert rel(logits(pm, ids), base) <= 0.01
    assert rel(base, adapted) >= 0.05


def test_peft_options_it_cannot_take_are_peft_errors():
    for option in (dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)):
        with pytest.raises(ValueError, match="ParamWrapper does not work with"):
            peft_model(qwen3, "nbmoe", **option)


@pytest.mark.parametrize("config", [qwen3, mixtral])
def test_save_peft_then_stock_load_gives_the_same_logits(config, tmp_path):
    model, ids = build(config()), tokens(6)
    with_lora(model)
    ours = logits(model, ids)
    nt.save_lora(model, tmp_path / "adapter", format="peft")
    stock = PeftModel.from_pretrained(build(config()), tmp_path / "adapter")
    # the stock-loaded adapter on nbmoe experts against nbmoe's own: the rank-2r gate|up
    # adapter's zero blocks add exact zeros, measured 0.0 (stock PEFT on eager bf16 experts
    # rounds W + dW to bf16: 0.011-0.041 from either, near-tied top-k choices flip)
    assert rel(logits(stock, ids, "nbmoe"), ours) <= 1e-6
    # float32, one eager function on both sides: the map itself, measured ~1e-7
    stock.float()
    model.float()
    assert rel(logits(stock, ids, "eager"), logits(model, ids, "nbmoe_reference")) <= 1e-5


def test_peft_folders_load_back_into_nbmoe(tmp_path):
    model, ids = build(qwen3()), tokens(7)
    with_lora(model)
    nt.save_lora(model, tmp_path / "ours", format="peft")
    back = build(qwen3())
    nt.load_lora(back, tmp_path / "ours")                 # nbmoe's own folder: the same six factors
    want, got = nt.lora_state_dict(model), nt.lora_state_dict(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert np.array_equal(logits(back, ids), logits(model, ids))

    pm = peft_model(qwen3, "eager", dtype=torch.float32, rank_pattern={"down_proj": 2})
    pm.save_pretrained(tmp_path / "trained")              # a folder PEFT wrote: shared A, ranks differ
    plain = build(qwen3()).float()
    nt.load_lora(plain, tmp_path / "trained")
    assert nt.lora_state_dict(plain)["model.layers.0.mlp.experts.down_lora_a"].shape[1] == 4
    assert rel(logits(plain, ids, "nbmoe_reference"), logits(pm, ids)) <= 1e-5


def test_export_errors_name_the_problem(tmp_path):
    model = build(qwen3())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        nt.save_lora(model, tmp_path / "a", format="peft")
    with_lora(model)
    with pytest.raises(ValueError, match=r"format: expected 'nbmoe' or 'peft', got 'gguf'"):
        nt.save_lora(model, tmp_path / "a", format="gguf")
    config = qwen3()
    config.num_hidden_layers = 3
    other = build(config)
    with_lora(other)
    nt.save_lora(model, tmp_path / "two", format="peft")
    with pytest.raises(ValueError, match=r"lacks base_model\.model\.model\.layers\.2\.mlp\.experts\."):
        nt.load_lora(other, tmp_path / "two")


@settings(max_examples=30, deadline=None)
@given(E=st.integers(1, 5), r=st.integers(1, 4), I=st.integers(1, 6), H=st.integers(1, 6), seed=st.integers(0, 99))
def test_peft_layout_is_the_same_delta(E, r, I, H, seed):
    # PEFT's own delta of its stored tensors (ParamWrapper.get_delta_weight: "o r e, e r i -> e o i")
    # equals nbmoe's [B_g A_g; B_u A_u] and B_d A_d, in float64
    g = torch.Generator().manual_seed(seed)
    shapes = dict(gate_a=(E, r, H), gate_b=(E, I, r), up_a=(E, r, H), up_b=(E, I, r), down_a=(E, r, I),
                  down_b=(E, H, r))
    f = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    blocks = {"gate_up_proj": (torch.cat([f["gate_a"], f["up_a"]], 1), None), "down_proj": (f["down_a"], None)}
    b = f["gate_b"].new_zeros((E, 2 * I, 2 * r))
    b[:, :I, :r], b[:, I:, r:] = f["gate_b"], f["up_b"]
    want = {"gate_up_proj": torch.cat([f["gate_b"] @ f["gate_a"], f["up_b"] @ f["up_a"]], 1),
            "down_proj": f["down_b"] @ f["down_a"]}
    for p, B in (("gate_up_proj", b), ("down_proj", f["down_b"])):
        lora_a, lora_b = peft_format._to_peft(blocks[p][0], B)
        R = lora_a.shape[0] // E
        delta = torch.einsum("ore,eri->eoi", lora_b.reshape(lora_b.shape[0], R, E), lora_a.reshape(E, R, -1))
        assert torch.allclose(delta, want[p], rtol=0, atol=1e-12)
        a_back, b_back = peft_format.from_peft(lora_a, lora_b, E)
        assert torch.equal(a_back, blocks[p][0]) and torch.equal(b_back, B)
    six, alpha = peft_format.factors([(torch.cat([f["gate_a"], f["up_a"]], 1), b, 0.5)],
                                     [(f["down_a"], f["down_b"], 0.25)], (E, I, H))
    got = dict(zip(LORA_FIELDS, six))
    assert alpha == 0.5 * 2 * r and got["gate_a"] is got["up_a"]
    # the smaller-rank down adapter is zero-padded and its B rescaled by 0.25 / 0.5
    assert torch.equal(got["down_b"][..., :r] @ got["down_a"][:, :r], 0.5 * want["down_proj"])
    assert not got["down_a"][:, r:].any() and not got["down_b"][..., r:].any()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = tokens(1)
    plain = loss_and_grads(peft_model(qwen3, "nbmoe"), ids)
    pm = peft_model(qwen3, "nbmoe")
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        pm.enable_input_require_grads()
    loss, grads = loss_and_grads(pm, ids)
    assert loss == plain[0] and grads.keys() == plain[1].keys()
    assert all(np.array_equal(grads[n], plain[1][n]) for n in grads)      # recomputed: the same bits


def test_importing_nbmoe_torch_leaves_peft_unimported_and_routes_it_when_imported():
    code = ("import sys, nbmoe.torch as nt; assert 'peft' not in sys.modules; "
            "from peft.tuners.lora.layer import ParamWrapper; print(ParamWrapper.forward is nt._peft_forward)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
