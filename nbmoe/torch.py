"""PyTorch and transformers on nbmoe.

- ``ExpertsFunction``: a ``torch.autograd.Function`` over ``MoELayer``; gradients for the
  hidden states, the routing weights and every LoRA parameter.
- ``experts_forward``: the ``"nbmoe"`` experts implementation. Importing this module
  registers it in transformers' ``ExpertsInterface``, so a model whose experts class uses
  ``@use_experts_implementation`` (fused ``gate_up_proj [E, 2I, H]`` gate first,
  ``down_proj [E, H, I]``, SiLU) runs on nbmoe with ``experts_implementation="nbmoe"`` or
  ``model.set_experts_implementation("nbmoe")``.
- ``NbmoeExperts``: the same as a standalone ``nn.Module``.
- ``eager_experts``: the eager baseline, the one that ``python -m nbmoe bench``,
  ``python -m nbmoe finetune`` and the tests measure nbmoe against: transformers' expert
  loop (``Qwen3MoeExperts.forward``: a Python loop over the experts hit, ``F.linear`` on
  the fused ``gate_up_proj``, SiLU, ``down_proj``, ``index_add_`` of the weighted
  outputs, in the weights' dtype) with PEFT-style LoRA: one small tensor per expert and
  factor, as PEFT wraps each expert's ``Linear`` (autograd then makes gradients only for
  the experts a batch reaches), the input cast to the factors' dtype and the sum cast
  back. ``reference_experts_forward`` (``"nbmoe_reference"``) runs an experts module on it.
- ``to_numpy`` / ``to_torch``: the one bf16-aware bridge between tensors and arrays.
- ``add_lora`` / ``save_lora`` / ``load_lora`` / ``merge_lora``: LoRA adapters on every
  experts module (``gate_lora_a [E, r, H]``, ``gate_lora_b [E, I, r]``, ``up_lora_*``,
  ``down_lora_a [E, r, I]``, ``down_lora_b [E, H, r]``, attribute ``lora_alpha``).

Tensors cross into NumPy without copies (bf16 through ``view(torch.int16)``). Base
weights are packed once per experts module and re-packed only when their storage or
version changes; LoRA parameters are viewed on every call, so an optimizer step is seen
by the next forward.

Autograd: a forward saves a cache only when grad is enabled and something needs a
gradient, so ``torch.no_grad()`` inference and the first pass of reentrant
``torch.utils.checkpoint`` push nothing; the recomputation's cache is the one its
backward pops (by tag, whatever order autograd runs backward in); a graph freed without
backward releases its cache. Non-reentrant checkpointing (transformers' default) runs its
first pass with grad enabled and recomputes only what saved tensors need: the experts
keep that first cache (checkpointing then saves the rest of the layer's activations,
not the experts'); ``use_reentrant=True`` recomputes the experts too. Base expert weights must be frozen when training: nbmoe
computes no gradient for them, and says so rather than return none silently.

transformers' expert-parallel sentinel (an id equal to ``num_experts``) is a skipped
slot (nbmoe's ``-1``).
"""

import json
import math

import ml_dtypes
import numpy as np
import torch
from torch import nn

from .layer import LoRAWeights, MoELayer
from .reference import LORA_FIELDS

LORA_NAMES = tuple(f"{n[:-2]}_lora{n[-2:]}" for n in LORA_FIELDS)     # gate_a -> gate_lora_a, ...
CACHE_DEPTH = 4        # forwards of one experts module that may await backward at once
MIN_TOKENS = 4096      # initial token capacity; grows (while nothing is saved) as calls need


def to_numpy(t, name="tensor"):
    """A CPU tensor's memory as a NumPy array, no copy: bf16 via int16 (as ml_dtypes.bfloat16),
    float32 as is; ``name`` is what an error calls the tensor."""
    if t.device.type != "cpu":
        raise ValueError(f"{name}: nbmoe runs on the CPU, got a tensor on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float32:
        return t.numpy()
    raise TypeError(f"{name}: expected dtype torch.bfloat16 or torch.float32, got {t.dtype}")


def to_torch(a, dtype=None):
    """A NumPy array as a torch tensor of ``dtype`` (default: its own; bf16 without a copy)."""
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == ml_dtypes.bfloat16 \
        else torch.from_numpy(a)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:                   # no transformers: no experts class can bring its own gate
        return None
    return _default_apply_gate


def _unsupported(module):
    """Why nbmoe cannot run this experts module, or None."""
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    bad = [f"{k}={getattr(module, k)}" for k, v in flags.items() if getattr(module, k, v) != v]
    default_gate = _default_gate()
    if getattr(type(module), "_apply_gate", default_gate) is not default_gate:
        bad.append("a custom _apply_gate")
    act = getattr(module, "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        bad.append(f"activation {type(act).__name__} (nbmoe computes SiLU)")
    for name in ("gate_up_proj", "down_proj"):
        if getattr(module, name, None) is None or getattr(module, name).dim() != 3:
            bad.append(f"no 3-D {name}")
    if not bad:
        E, I2, H = module.gate_up_proj.shape
        if I2 % 2 or tuple(module.down_proj.shape) != (E, H, I2 // 2):
            bad.append(f"gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj "
                       f"{tuple(module.down_proj.shape)} are not [E, 2I, H] and [E, H, I]")
    return ", ".join(bad) or None


def _check(module):
    reason = _unsupported(module)
    if reason:
        raise ValueError(f"{type(module).__name__}: nbmoe runs experts with fused gate_up_proj [E, 2I, H] "
                         f"(gate first), down_proj [E, H, I], no bias, SiLU; this one has {reason}")


def has_lora(module):
    return all(isinstance(getattr(module, n, None), nn.Parameter) for n in LORA_NAMES)


class _State:
    """What an experts module keeps for nbmoe: its layer, and the key of the packed weights."""

    def __init__(self, module, tokens):
        gate_up = to_numpy(module.gate_up_proj, "gate_up_proj")
        I = gate_up.shape[1] // 2
        self.lora = None
        if has_lora(module):
            self.lora = LoRAWeights(*[to_numpy(getattr(module, n), n) for n in LORA_NAMES],
                                    alpha=float(module.lora_alpha))
        self.layer = MoELayer(gate_up[:, :I], gate_up[:, I:], to_numpy(module.down_proj, "down_proj"),
                              lora=self.lora, max_tokens=max(MIN_TOKENS, tokens),
                              cache_depth=getattr(module, "nbmoe_cache_depth", CACHE_DEPTH))
        self.key = _key(module)


def _key(module):
    weights = (module.gate_up_proj, module.down_proj)
    lora = tuple(tuple(getattr(module, n).shape) for n in LORA_NAMES) if has_lora(module) else None
    return tuple((w.data_ptr(), w._version, tuple(w.shape), w.dtype) for w in weights) + (lora,)


def _state(module, tokens, k):
    """The module's nbmoe state, (re)built when its base weights or LoRA shapes changed;
    its buffers regrown when a call brings more tokens or another k (while none is saved)."""
    state = module.__dict__.get("_nbmoe_state")
    if state is None or state.key != _key(module):
        _check(module)
        state = _State(module, tokens)
        module.__dict__["_nbmoe_state"] = state
    if state.lora is not None:            # fresh views each call: the parameters may be new tensors
        for name, layer_name in zip(LORA_NAMES, LORA_FIELDS):
            setattr(state.lora, layer_name, to_numpy(getattr(module, name), name))
        state.lora.alpha = float(module.lora_alpha)
    layer = state.layer
    if tokens > layer.max_tokens or layer.top_k not in (None, k):
        layer.resize(max(layer.max_tokens, 1 << (tokens - 1).bit_length()))
    return state


class _Saved:
    """One saved forward: its backward pops exactly it; freed unused, it is discarded."""

    def __init__(self, layer):
        self.layer, self.tag = layer, layer.newest_tag

    def backward(self, grad_y):
        if self.tag is None:
            raise RuntimeError("nbmoe experts: backward through the same forward twice (retain_graph) "
                               "is not supported; run the forward again")
        grads = self.layer.backward(grad_y, tag=self.tag)
        self.tag = None
        return grads

    def __del__(self):
        if self.tag is not None:
            self.layer.discard(self.tag)


class ExpertsFunction(torch.autograd.Function):
    """y = MoELayer(x, ids, w) with gradients for x, w and the LoRA parameters."""

    @staticmethod
    def forward(ctx, state, save, hidden_states, top_k_index, top_k_weights, *lora):
        E = state.layer.num_experts
        ids = top_k_index.detach()
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"top_k_index: expected dtype torch.int64 or torch.int32, got {ids.dtype}")
        ids = torch.where(ids == E, -1, ids).numpy()           # transformers' skipped-slot sentinel
        weights = top_k_weights.detach().float().contiguous()
        y = state.layer.forward(to_numpy(hidden_states.contiguous(), "hidden_states"), ids,
                                to_numpy(weights, "top_k_weights"), save_for_backward=save)
        ctx.saved = _Saved(state.layer) if save else None
        ctx.dtypes = (hidden_states.dtype, top_k_weights.dtype) + tuple(p.dtype for p in lora)
        return to_torch(y, hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        grads = ctx.saved.backward(to_numpy(grad_y.to(torch.bfloat16).contiguous(), "grad_y"))
        out = [None, None, to_torch(grads.input, ctx.dtypes[0]), None, to_torch(grads.topk_weights, ctx.dtypes[1])]
        lora = [getattr(grads, n) for n in LORA_FIELDS] if len(ctx.dtypes) > 2 else []
        out += [to_torch(g, dtype) for g, dtype in zip(lora, ctx.dtypes[2:])]
        return tuple(g if need else None for g, need in zip(out, (False, False) + ctx.needs_input_grad[2:]))


def experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The ``"nbmoe"`` experts implementation: ``module`` is a transformers experts module
    (or ``NbmoeExperts``); hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]."""
    lora = [getattr(module, n) for n in LORA_NAMES] if has_lora(module) else []
    state = _state(module, hidden_states.shape[0], top_k_index.shape[-1])
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [hidden_states, top_k_weights, *lora])
    if save and (module.gate_up_proj.requires_grad or module.down_proj.requires_grad):
        raise RuntimeError(f"{type(module).__name__}: nbmoe trains LoRA adapters and computes no gradient for "
                           f"base expert weights; freeze them (requires_grad_(False)) or call "
                           f"nbmoe.torch.add_lora(model, rank, alpha), which does")
    return ExpertsFunction.apply(state, save, hidden_states, top_k_index, top_k_weights, *lora)


def _add_lora(module, rank, alpha, dtype):
    E, I2, H = module.gate_up_proj.shape
    I = I2 // 2
    shapes = dict(gate_lora_a=(E, rank, H), gate_lora_b=(E, I, rank), up_lora_a=(E, rank, H),
                  up_lora_b=(E, I, rank), down_lora_a=(E, rank, I), down_lora_b=(E, H, rank))
    for name, shape in shapes.items():
        p = torch.zeros(shape, dtype=dtype)
        if name.endswith("_a"):          # A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT; B = 0
            bound = 1.0 / math.sqrt(shape[2])
            with torch.no_grad():
                p.uniform_(-bound, bound)
        module.register_parameter(name, nn.Parameter(p))
    module.lora_alpha = float(alpha)
    module.gate_up_proj.requires_grad_(False)
    module.down_proj.requires_grad_(False)


def experts_modules(model):
    """(name, module) for every module of ``model`` with 3-D ``gate_up_proj`` and ``down_proj``."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and
             isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3]
    if not found:
        raise ValueError(f"{type(model).__name__}: no experts module (3-D gate_up_proj and down_proj) found")
    return found


def _use_nbmoe(model):
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("nbmoe")


def add_lora(model, rank, alpha, dtype=torch.float32):
    """Add LoRA adapters of ``rank`` to every experts module of ``model`` (A random, B zero:
    the model starts unchanged), freeze their base weights, and switch the model's experts
    implementation to nbmoe. Returns the LoRA parameters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
    params = []
    for _, module in experts_modules(model):
        _check(module)
        _add_lora(module, rank, alpha, dtype)
        params += [getattr(module, n) for n in LORA_NAMES]
    _use_nbmoe(model)
    return params


def lora_state_dict(model):
    """{module name.parameter name: tensor} of every LoRA parameter of ``model``."""
    return {f"{name}.{p}": getattr(m, p).detach() for name, m in experts_modules(model) if has_lora(m)
            for p in LORA_NAMES}


def save_lora(model, path):
    """Write the LoRA parameters (safetensors), with each module's alpha in the metadata."""
    from safetensors.torch import save_file

    alphas = {name: m.lora_alpha for name, m in experts_modules(model) if has_lora(m)}
    if not alphas:
        raise ValueError(f"save_lora: {type(model).__name__} has no LoRA adapters; call add_lora first")
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path),
              metadata={"format": "nbmoe-lora", "lora_alpha": json.dumps(alphas)})


def load_lora(model, path):
    """Load adapters written by ``save_lora`` (adding them where missing) and switch the
    model to nbmoe. Every experts module must find its six tensors, of matching shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        alphas = json.loads(f.metadata().get("lora_alpha", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = dict(experts_modules(model))
    unknown = sorted({k.rsplit(".", 1)[0] for k in tensors} - set(modules))
    if unknown:
        raise ValueError(f"load_lora: {path} holds adapters for modules this model lacks: {unknown[:3]}")
    for name, module in modules.items():
        missing = [f"{name}.{p}" for p in LORA_NAMES if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"load_lora: {path} lacks {missing[:3]}")
        a = tensors[f"{name}.gate_lora_a"]
        if not has_lora(module):
            _check(module)
            _add_lora(module, a.shape[1], alphas.get(name, a.shape[1]), a.dtype)
        for p in LORA_NAMES:
            target, source = getattr(module, p), tensors[f"{name}.{p}"]
            if target.shape != source.shape:
                raise ValueError(f"load_lora: {name}.{p}: expected shape {tuple(target.shape)}, "
                                 f"got {tuple(source.shape)} in {path}")
            with torch.no_grad():
                target.copy_(source)
        module.lora_alpha = float(alphas.get(name, module.lora_alpha))
    _use_nbmoe(model)


def merge_lora(model):
    """Fold every adapter into its base weights (``W += alpha / r * B A``, computed in fp32,
    rounded once to the base dtype) and remove the adapters: a plain model for export."""
    for _, module in experts_modules(model):
        if not has_lora(module):
            continue
        s = module.lora_alpha / module.gate_lora_a.shape[1]
        delta = {n: s * torch.bmm(getattr(module, f"{n}_lora_b").float(), getattr(module, f"{n}_lora_a").float())
                 for n in ("gate", "up", "down")}
        I = module.gate_up_proj.shape[1] // 2
        with torch.no_grad():
            gate_up = module.gate_up_proj.float()
            gate_up[:, :I] += delta["gate"]
            gate_up[:, I:] += delta["up"]
            module.gate_up_proj.copy_(gate_up.to(module.gate_up_proj.dtype))
            module.down_proj.copy_((module.down_proj.float() + delta["down"]).to(module.down_proj.dtype))
        for p in LORA_NAMES:
            delattr(module, p)
        del module.lora_alpha
    return model


def eager_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, lora=None, scaling=1.0):
    """The eager baseline (see the module docstring), autograd for everything that requires grad.

    hidden_states [T, H]; top_k_index [T, k] (-1 and ``E`` are skipped slots); top_k_weights
    [T, k]; gate_up_proj [E, 2I, H] (gate first); down_proj [E, H, I]; lora: None or
    {field of LORA_FIELDS: E per-expert tensors}; ``scaling``: alpha / r."""
    E = gate_up_proj.shape[0]
    F = nn.functional
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(torch.where(top_k_index < 0, E, top_k_index), E + 1)[..., :E].permute(2, 1, 0)
        hit = torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist()
    for e in hit:
        slot, token = torch.where(mask[e])
        xs = hidden_states[token]
        gate, up = F.linear(xs, gate_up_proj[e]).chunk(2, dim=-1)
        if lora is not None:
            gate = _peft(gate, xs, lora["gate_a"][e], lora["gate_b"][e], scaling)
            up = _peft(up, xs, lora["up_a"][e], lora["up_b"][e], scaling)
        h = F.silu(gate) * up
        d = F.linear(h, down_proj[e])
        if lora is not None:
            d = _peft(d, h, lora["down_a"][e], lora["down_b"][e], scaling)
        out.index_add_(0, token, (d * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _peft(base, x, a, b, scaling):
    """A PEFT LoRA ``Linear``: ``base + scaling * B (A x)`` in the factors' dtype, back in the base's."""
    return (base + (x.to(a.dtype) @ a.T) @ b.T * scaling).to(base.dtype)


def reference_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The ``"nbmoe_reference"`` experts implementation: ``module`` on ``eager_experts``, its
    [E, ...] LoRA parameters unbound into per-expert views (one gradient per parameter, filled
    where experts were reached, rather than one full-size gradient per expert hit)."""
    lora, scaling = None, 1.0
    if has_lora(module):
        lora = {f: getattr(module, n).unbind(0) for f, n in zip(LORA_FIELDS, LORA_NAMES)}
        scaling = module.lora_alpha / module.gate_lora_a.shape[1]
    return eager_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                         lora, scaling)


class NbmoeExperts(nn.Module):
    """An experts block on nbmoe: gate_up_proj [E, 2I, H] (gate first), down_proj [E, H, I],
    frozen; ``rank > 0`` adds LoRA parameters as ``add_lora`` does.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
    """

    def __init__(self, gate_up_proj, down_proj, rank=0, alpha=None, lora_dtype=torch.float32):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.act_fn = nn.SiLU()
        _check(self)
        if rank:
            _add_lora(self, rank, float(rank if alpha is None else alpha), lora_dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register():
    """Register ``"nbmoe"`` (and ``"nbmoe_reference"``) in transformers' ExpertsInterface;
    False without transformers."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register("nbmoe", experts_forward)
    ExpertsInterface.register("nbmoe_reference", reference_experts_forward)
    return True


REGISTERED = register()
