"""nbmoe.torch.quantize_experts and nbmoe.torch.from_pretrained: quantized experts stored once,
checkpoints in every layout (per-expert hub keys, fused keys, sharded, compressed-tensors int4,
AWQ), their logits against the source model, LoRA training on them, the errors, and the peak
memory of a load (in a subprocess)."""

import copy
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import nbmoe
import nbmoe.torch as nt
from helpers import rel

E, H, I, G = 8, 64, 32, 32          # experts, hidden, moe intermediate, int4 group of the checkpoints


def qwen3(**extra):
    return Qwen3MoeConfig(vocab_size=128, hidden_size=H, intermediate_size=128, moe_intermediate_size=I,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          num_experts=E, num_experts_per_tok=2, max_position_embeddings=64, **extra)


def build(config=None, seed=0, implementation="eager"):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config or qwen3(), dtype=torch.bfloat16,
                                            experts_implementation=implementation)


def tokens(seed=0, batch=2, length=16):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def experts_bytes(model):
    return sum(p.numel() * p.element_size() for name, m in nt.experts_modules(model)
               for p in (m.gate_up_proj, m.down_proj))


def dequantized_copy(model, stored, linears=None):
    """A copy of ``model`` (eager experts) whose experts hold the dequantized weights of
    ``stored`` {module name: (gate, up, down) QuantizedWeight} and whose linears
    {parameter name: QuantizedWeight of one "expert"} hold theirs: what both passes use."""
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, (gate, up, down) in stored.items():
            m = modules[name]
            m.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate.dequantize(), up.dequantize()], axis=1)))
            m.down_proj.copy_(torch.from_numpy(down.dequantize()))
        params = dict(ref.named_parameters())
        for name, qw in (linears or {}).items():
            params[name].copy_(torch.from_numpy(qw.dequantize(0)))
    return ref


def split(model):
    """{experts module name: (gate, up, down) bf16 numpy [E, I, H], [E, I, H], [E, H, I]}."""
    out = {}
    for name, m in nt.experts_modules(model):
        gate_up = nt.to_numpy(m.gate_up_proj)
        out[name] = (gate_up[:, :I], gate_up[:, I:], nt.to_numpy(m.down_proj))
    return out


def write(folder, tensors, config, quantization_config=None, shards=1):
    """A checkpoint folder: config.json (+ quantization_config) and the tensors in
    ``shards`` files (an index when more than one)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if quantization_config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    keys = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]                 # interleaved: every layer spans every shard
        save_file({k: tensors[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def per_expert(model):
    """The hub layout (Qwen3-30B-A3B): non-expert tensors as they are, experts as
    model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight."""
    experts = split(model)
    out = {k: v for k, v in model.state_dict().items()
           if not k.endswith((".experts.gate_up_proj", ".experts.down_proj"))}
    for name, (gate, up, down) in experts.items():
        for e in range(E):
            for proj, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                out[f"{name}.{e}.{proj}.weight"] = nt.to_torch(np.ascontiguousarray(w[e]))
    return out


K2_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                           "output_activations": None,
                                           "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                       "strategy": "group", "group_size": G, "dynamic": False,
                                                       "actorder": None, "observer": "minmax"}}},
             "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None}
AWQ_CONFIG = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": G, "zero_point": True,
              "modules_to_not_convert": None}
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.o_proj")    # non-expert linears stored quantized


def awq_weight(w):
    """int4_awq of ``w`` [E, N, K] with float16 scales (an AWQ checkpoint's): the codes of
    the online quantizer, its scales rounded to float16."""
    qw = nbmoe.quantize(w, "int4_awq", G)
    return nbmoe.QuantizedWeight("int4_awq", qw.shape, G, np.array(qw.codes),
                                 qw.scales.astype(np.float16).astype(np.float32), np.array(qw.zeros))


def quantized_checkpoint(model, fmt):
    """(tensors, {module: (gate, up, down)}, {linear parameter: QuantizedWeight}): the model's
    experts and QUANTIZED_LINEARS quantized to ``fmt`` and written as compressed-tensors (int4_k2)
    or AWQ GEMM (int4_awq) per-expert tensors."""
    make = (lambda w: nbmoe.quantize(w, "int4_k2", G)) if fmt == "int4_k2" else awq_weight

    def tensors_of(qw, e, base):
        if fmt == "int4_k2":
            packed, scale = qw.to_k2()
            N, K = qw.shape[1:]
            return {f"{base}.weight_packed": torch.from_numpy(packed[e]),
                    f"{base}.weight_scale": nt.to_torch(scale[e]),
                    f"{base}.weight_shape": torch.tensor([N, K], dtype=torch.int64)}
        qweight, qzeros, scales = qw.to_awq()
        return {f"{base}.qweight": torch.from_numpy(qweight[e]), f"{base}.qzeros": torch.from_numpy(qzeros[e]),
                f"{base}.scales": torch.from_numpy(scales[e])}

    out, stored, linears = {}, {}, {}
    for key, t in model.state_dict().items():
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            continue
        if key.endswith(tuple(f"{lin}.weight" for lin in QUANTIZED_LINEARS)):
            qw = make(nt.to_numpy(t)[None])
            linears[key] = qw
            out.update(tensors_of(qw, 0, key[:-len(".weight")]))
        else:
            out[key] = t
    for name, parts in split(model).items():
        stored[name] = tuple(make(w) for w in parts)
        for e in range(E):
            for proj, qw in zip(("gate_proj", "up_proj", "down_proj"), stored[name]):
                out.update(tensors_of(qw, e, f"{name}.{e}.{proj}"))
    return out, stored, linears


def assert_same(a, b):
    assert a.format == b.format and a.shape == b.shape and a.group_size == b.group_size
    for x, y in ((a.codes, b.codes), (a.scales, b.scales), (a.zeros, b.zeros)):
        assert (x is None and y is None) or np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def lora_step(model):
    params = nt.add_lora(model, 4, 8.0)
    with torch.no_grad():
        for p in params:
            if p.shape[-1] == 4:                   # B: nonzero, so every factor gets a gradient
                p.normal_(0.0, 0.1)
    model.train()
    loss = model(tokens(3), labels=tokens(3)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---- quantize_experts --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int4_k2", "int4_awq", "int8"])
def test_quantize_experts_matches_the_dequantized_model_and_frees_bf16(fmt):
    model, ids = build(), tokens()
    source = copy.deepcopy(model)
    bf16_bytes = experts_bytes(model)
    assert nt.quantize_experts(model, fmt, group_size=G) is model
    assert experts_bytes(model) == 0
    stored = {name: nt.stored_experts(m) for name, m in nt.experts_modules(model)}
    assert all(s.format == fmt and s.parts is not None for s in stored.values())
    # the weights MoELayer(weight_format=fmt, group_size=G) would hold, bit for bit
    for name, (gate, up, down) in split(source).items():
        for got, w in zip(stored[name].parts, (gate, up, down)):
            assert_same(got, nbmoe.quantize(w, fmt, G))
    ref = logits(dequantized_copy(source, {n: s.parts for n, s in stored.items()}), ids)
    ours = logits(model, ids)
    assert rel(ours, ref.astype(np.float64)) <= 0.02
    # packed once: the QuantizedWeight are dropped, the layer holds the only copy
    assert all(s.parts is None and s.layer is not None for s in stored.values())
    ratio = sum(s.layer.packed_nbytes for s in stored.values()) / bf16_bytes
    # quant.py: int4_k2 0.25 + 1/g = 0.281; int4_awq 0.25 + 2.5/g = 0.328 at g = 32; int8 0.5 + 2/K
    assert ratio <= {"int4_k2": 0.29, "int4_awq": 0.33, "int8": 0.57}[fmt], ratio
    lora_step(model)                            # after packing: LoRA on the shared packed copy


def test_quantized_experts_refuse_other_implementations_and_merge():
    model = nt.quantize_experts(build(), "int4_k2", group_size=G)
    model.set_experts_implementation("eager")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts: .*int4_k2.*\"nbmoe\""):
        model(tokens())
    model.set_experts_implementation("nbmoe_reference")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts: .*nbmoe_reference"):
        model(tokens())
    model.set_experts_implementation("nbmoe")
    nt.add_lora(model, 2, 4.0)
    with pytest.raises(ValueError, match=r"merge_lora: model\.layers\.0\.mlp\.experts .*int4_k2"):
        nt.merge_lora(model)
    with pytest.raises(ValueError, match="already stored"):
        nt.quantize_experts(model, "int8")
    with pytest.raises(ValueError, match=r"int4_k2 with group_size 48.*multiple of 32"):
        nt.quantize_experts(build(), "int4_k2", group_size=48)
    with pytest.raises(ValueError, match="weight_format"):
        nt.quantize_experts(build(), "bf16")


def test_standalone_module_from_quantized_weights():
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal(s) / 8).astype(np.float32) for s in ((4, I, H), (4, I, H), (4, H, I))]
    parts = [nbmoe.quantize(x, "int4_k2", G) for x in w]
    experts = nt.NbmoeExperts.from_quantized(*parts, rank=2)
    assert sum(p.numel() for p in (experts.gate_up_proj, experts.down_proj)) == 0
    x = torch.from_numpy(rng.standard_normal((6, H)).astype(np.float32)).bfloat16()
    ids = torch.from_numpy(rng.integers(0, 4, (6, 2)))
    wts = torch.from_numpy(rng.random((6, 2), dtype=np.float32))
    with torch.no_grad():
        y = experts(x, ids, wts)
    layer = nbmoe.MoELayer(*parts)
    assert torch.equal(y, nt.to_torch(layer.forward(nt.to_numpy(x), ids.numpy(), wts.numpy())))


# ---- from_pretrained -----------------------------------------------------------------------------

def test_from_pretrained_bf16_layouts(tmp_path):
    model, ids = build(), tokens()
    expected = logits(model, ids)
    folders = {"save_pretrained (hub keys)": tmp_path / "hub", "fused": tmp_path / "fused",
               "per-expert, sharded": tmp_path / "sharded"}
    model.save_pretrained(folders["save_pretrained (hub keys)"])
    write(folders["fused"], model.state_dict(), model.config)
    write(folders["per-expert, sharded"], per_expert(model), model.config, shards=3)
    for layout, folder in folders.items():
        loaded = nt.from_pretrained(folder)
        assert loaded.config._experts_implementation == "nbmoe"
        assert not loaded.training
        for (name, t), (_, u) in zip(loaded.state_dict().items(), model.state_dict().items()):
            assert torch.equal(t, u), (layout, name)
        assert rel(logits(loaded, ids), expected.astype(np.float64)) <= 1e-2, layout
    lora_step(loaded)


def test_from_pretrained_mixtral_hub_names(tmp_path):
    config = MixtralConfig(vocab_size=128, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=True)
    model, ids = build(config), tokens()
    model.save_pretrained(tmp_path)               # block_sparse_moe.experts.{e}.w1/w2/w3, lm_head tied
    loaded = nt.from_pretrained(tmp_path, weight_format="int4_k2", group_size=G)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    stored = {n: nt.stored_experts(m).parts for n, m in nt.experts_modules(loaded)}
    ref = logits(dequantized_copy(model, stored), ids)
    assert rel(logits(loaded, ids), ref.astype(np.float64)) <= 0.02


def test_from_pretrained_quantizes_bf16_online(tmp_path):
    model, ids = build(), tokens()
    model.save_pretrained(tmp_path)
    loaded = nt.from_pretrained(tmp_path, weight_format="int4_awq", group_size=G)
    assert experts_bytes(loaded) == 0
    for name, (gate, up, down) in split(model).items():
        got = nt.stored_experts(loaded.get_submodule(name)).parts
        for q, w in zip(got, (gate, up, down)):
            assert_same(q, nbmoe.quantize(w, "int4_awq", G))
    stored = {n: nt.stored_experts(m).parts for n, m in nt.experts_modules(loaded)}
    ref = logits(dequantized_copy(model, stored), ids)
    assert rel(logits(loaded, ids), ref.astype(np.float64)) <= 0.02


@pytest.mark.parametrize("fmt,qconfig", [("int4_k2", K2_CONFIG), ("int4_awq", AWQ_CONFIG)])
def test_from_pretrained_quantized_checkpoint(tmp_path, fmt, qconfig):
    model, ids = build(), tokens()
    tensors, stored, linears = quantized_checkpoint(model, fmt)
    write(tmp_path, tensors, model.config, qconfig, shards=2)
    loaded = nt.from_pretrained(tmp_path)
    assert experts_bytes(loaded) == 0
    for name, parts in stored.items():
        s = nt.stored_experts(loaded.get_submodule(name))
        assert s.format == fmt and s.group_size == G
        for got, written in zip(s.parts, parts):
            assert_same(got, written)                 # bit for bit
    params = dict(loaded.named_parameters())
    for name, qw in linears.items():                  # dequantized at load
        assert params[name].dtype == torch.bfloat16
        assert torch.equal(params[name].float(), torch.from_numpy(qw.dequantize(0)))
    ref = logits(dequantized_copy(model, stored, linears), ids)
    assert rel(logits(loaded, ids), ref.astype(np.float64)) <= 0.02
    assert "quantization_config" not in loaded.config.to_dict()
    lora_step(loaded)


# ---- errors ----------------------------------------------------------------------------------------

def test_from_pretrained_errors(tmp_path):
    model = build()
    tensors, _, _ = quantized_checkpoint(model, "int4_k2")
    k2 = write(tmp_path / "k2", tensors, model.config, K2_CONFIG)
    with pytest.raises(ValueError, match=r"int4_k2 .*weight_format='int4_awq' contradicts"):
        nt.from_pretrained(k2, weight_format="int4_awq")
    with pytest.raises(ValueError, match=r"weight_format='bf16' contradicts"):
        nt.from_pretrained(k2, weight_format="bf16")
    with pytest.raises(ValueError, match=r"group_size=64 contradicts"):
        nt.from_pretrained(k2, group_size=64)

    for bad, match in [({"quant_method": "gptq", "bits": 4}, "unsupported quant_method 'gptq'"),
                       ({**K2_CONFIG, "format": "float-quantized"}, "format 'float-quantized'"),
                       ({**AWQ_CONFIG, "version": "gemv"}, "version 'gemv'"),
                       ({**AWQ_CONFIG, "bits": 8}, "bits 8")]:
        with pytest.raises(ValueError, match=match):
            nt.from_pretrained(write(tmp_path / "bad", tensors, model.config, bad))
    asym = copy.deepcopy(K2_CONFIG)
    asym["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(ValueError, match="asymmetric"):
        nt.from_pretrained(write(tmp_path / "bad", tensors, model.config, asym))
    with pytest.raises(ValueError, match=r"weight_packed .*config\.json has no quantization_config"):
        nt.from_pretrained(write(tmp_path / "noconfig", tensors, model.config))

    hub = per_expert(model)
    missing = dict(hub)
    del missing["model.layers.1.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        nt.from_pretrained(write(tmp_path / "missing", missing, model.config))
    missing = dict(hub)
    del missing["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks model\.layers\.0\.self_attn\.k_proj\.weight"):
        nt.from_pretrained(write(tmp_path / "missing2", missing, model.config))
    wrong = dict(hub)
    wrong["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(H, I + 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"experts\.2\.down_proj\.weight in .*expected .*\[64, 32\], "
                                         r"got bfloat16 \[64, 40\]"):
        nt.from_pretrained(write(tmp_path / "wrong", wrong, model.config))
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.experts.0.gate_proj.weight_scale"] = torch.zeros(I, H // G)
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight_scale in .*expected bfloat16 "
                                         r"\[32, 2\], got float32"):
        nt.from_pretrained(write(tmp_path / "wrongk2", wrong, model.config, K2_CONFIG))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        (tmp_path / "empty").mkdir()
        model.config.save_pretrained(tmp_path / "empty")
        nt.from_pretrained(tmp_path / "empty")


# ---- peak memory --------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    import nbmoe, nbmoe.torch as nt

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    # imports, transformers and the quantizer warmed up on a tiny model first
    tiny = nt.from_pretrained(sys.argv[2], weight_format="int4_k2", group_size=32)
    del tiny
    base = rss("VmRSS:")
    peak0 = rss("VmHWM:")
    with open("/proc/self/clear_refs", "w") as f:    # reset VmHWM to the current RSS
        f.write("5")
    reset = rss("VmHWM:") <= base + (1 << 20)
    model = nt.from_pretrained(sys.argv[1], weight_format="int4_k2", group_size=32)
    after = rss("VmRSS:")
    peak = rss("VmHWM:") if reset else max(rss("VmHWM:"), peak0)
    stored = sum(nt.stored_experts(m).nbytes for _, m in nt.experts_modules(model))
    other = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(base=base, peak=peak, after=after, stored=stored, other=other, reset=reset)))
""")


@pytest.mark.slow
def test_from_pretrained_peak_memory(tmp_path):
    L, E_, H_, I_ = 4, 64, 512, 256
    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=H_, intermediate_size=1024, moe_intermediate_size=I_,
                            num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            num_experts=E_, num_experts_per_tok=4, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "big",
                                                                                   max_shard_size="60MB")
    build().save_pretrained(tmp_path / "tiny")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    layer_bf16 = E_ * 3 * H_ * I_ * 2
    MiB = 1 << 20
    growth = m["peak"] - m["base"]
    bound = m["stored"] + m["other"] + layer_bf16 + 16 * MiB      # 16 MiB: allocator and interpreter slack
    print(f"\nbf16 experts {L * layer_bf16 / MiB:.1f} MiB, one layer {layer_bf16 / MiB:.1f} MiB; stored int4_k2 "
          f"{m['stored'] / MiB:.1f} MiB; non-expert {m['other'] / MiB:.1f} MiB; load peak growth "
          f"{growth / MiB:.1f} MiB (bound {bound / MiB:.1f}); resident after {(m['after'] - m['base']) / MiB:.1f} MiB; "
          f"VmHWM reset: {m['reset']}")
    assert growth <= bound, m
    assert growth < L * layer_bf16                     # never the whole model in bf16
