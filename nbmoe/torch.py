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
  ``down_lora_a [E, r, I]``, ``down_lora_b [E, H, r]``, attribute ``lora_alpha``), saved
  as nbmoe's file or as a PEFT adapter folder (``format="peft"``, ``nbmoe.peft``).
- PEFT's own LoRA on the experts' parameters (``target_parameters``): where peft is
  installed, ``register`` routes PEFT's ``ParamWrapper.forward`` to ``_peft_forward`` for
  experts running on nbmoe, which reads PEFT's factors in place (never ``W + dW``).
- ``quantize_experts(model, weight_format, group_size)``: quantize a loaded model's experts
  in place and free their bf16 tensors; ``from_pretrained(path, weight_format,
  group_size)``: build a model from a local checkpoint folder with its experts streamed,
  one module at a time, into their stored format (``nbmoe.checkpoint`` reads the files;
  compressed-tensors int4 -> int4_k2 and AWQ GEMM -> int4_awq as stored, bf16 quantized
  online or kept). A module whose experts are quantized holds them only as a
  ``StoredExperts`` (``stored_experts(module)``): the three ``QuantizedWeight`` until its
  first forward packs them, then the packed ``MoELayer``; its ``gate_up_proj`` /
  ``down_proj`` are empty tensors. It runs on "nbmoe" only (any other experts
  implementation raises, naming the module), takes LoRA (``add_lora``: shapes from the
  stored weights), and refuses ``merge_lora``. ``NbmoeExperts.from_quantized`` builds the
  standalone module on QuantizedWeight.

Tensors cross into NumPy without copies (bf16 through ``view(torch.int16)``). Base
weights are packed once per experts module and re-packed only when their storage or
version changes; LoRA parameters are viewed on every call, so an optimizer step is seen
by the next forward.

Autograd: a forward saves a cache only when grad is enabled and something needs a
gradient, so ``torch.no_grad()`` inference and the first pass of reentrant
``torch.utils.checkpoint`` push nothing; the recomputation's cache is the one its
backward pops (by tag, whatever order autograd runs backward in); a graph freed without
backward releases its cache. Non-reentrant checkpointing (transformers' default) runs its
first pass with grad enabled and recomputes what saved tensors need: the experts save
only a tag there, so their forward is recomputed too and keeps nothing in between
(``ExpertsFunction``); ``use_reentrant=True`` recomputes them likewise. Base expert
weights must be frozen when training: nbmoe computes no gradient for them, and says so
rather than return none silently.

transformers' expert-parallel sentinel (an id equal to ``num_experts``) is a skipped
slot (nbmoe's ``-1``).

A module sharded by ``nbmoe.tp.dist.shard_model`` (``module._nbmoe_tp``) runs its part of
the experts with fp32 outputs (``ExpertsFunction``'s ``partial``) and reduces over ranks.
"""

import contextlib
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import numbers
import os
import sys
import types
import warnings

import ml_dtypes
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import peft as peft_format
from .layer import DEFAULT_GROUP_SIZE, WEIGHT_FORMATS, LoRAWeights, MoELayer, base_weights, int4_group_problem
from .quant import FORMATS, QuantizedWeight, quantize
from .reference import LORA_FIELDS

LORA_NAMES = tuple(f"{n[:-2]}_lora{n[-2:]}" for n in LORA_FIELDS)     # gate_a -> gate_lora_a, ...
CACHE_DEPTH = 4        # forwards of one experts module that may await backward at once
MIN_TOKENS = 4096      # initial token capacity; grows (while nothing is saved) as calls need
FINGERPRINT_SAMPLES = 16384   # elements of a base weight summed to see PEFT merges (_fingerprint)


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
    if _stored(module) is not None:       # shapes come from the stored weights, checked when stored
        return ", ".join(bad) or None
    gate_up, down = _weight(module, "gate_up_proj"), _weight(module, "down_proj")
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        if w is None or w.dim() != 3:
            bad.append(f"no 3-D {name}")
    if not bad:
        E, I2, H = gate_up.shape
        if I2 % 2 or tuple(down.shape) != (E, H, I2 // 2):
            bad.append(f"gate_up_proj {tuple(gate_up.shape)} and down_proj "
                       f"{tuple(down.shape)} are not [E, 2I, H] and [E, H, I]")
    return ", ".join(bad) or None


def _check(module):
    reason = _unsupported(module)
    if reason:
        raise ValueError(f"{type(module).__name__}: nbmoe runs experts with fused gate_up_proj [E, 2I, H] "
                         f"(gate first), down_proj [E, H, I], no bias, SiLU; this one has {reason}")


def has_lora(module):
    """Whether ``module`` holds nbmoe's own adapters (``add_lora``)."""
    return all(isinstance(getattr(module, n, None), nn.Parameter) for n in LORA_NAMES)


def _weight(module, name):
    """The base weight ``name`` of an experts module (None if missing): under a
    parametrization (PEFT's LoRA) its original, so ``W + dW`` is never computed."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name, None)


def _lora(module):
    """(six LoRA factor tensors in LORA_FIELDS order, alpha) of nbmoe's own adapters on an
    experts module, or None. A parametrized base weight is an error: nbmoe would run the
    base weight and silently drop what the parametrization adds."""
    for name in ("gate_up_proj", "down_proj"):
        if parametrize.is_parametrized(module, name):
            kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
            raise NotImplementedError(
                f"{type(module).__name__}.{name} is parametrized ({kinds}), which the nbmoe experts cannot run: "
                f"they run the base weight and would drop what it adds (PEFT's LoRA on experts reaches nbmoe "
                f"through PEFT's ParamWrapper, not as a parametrization); use experts_implementation=\"eager\"")
    if not has_lora(module):
        return None
    return [getattr(module, n) for n in LORA_NAMES], float(module.lora_alpha)


class StoredExperts:
    """The base weights of an experts module stored quantized by nbmoe, the module's only
    copy of them (its ``gate_up_proj`` / ``down_proj`` are freed, see ``quantize_experts``).

    It holds the three ``QuantizedWeight`` (gate [E, I, H], up [E, I, H], down [E, H, I],
    one format and group) until the module's first nbmoe forward packs them into an
    ``MoELayer`` (the kernel layout); from then on it holds that layer alone (``parts``
    None) - the quantized weights are never kept twice. Every forward's layer shares the
    packed copy (``layer_for``): LoRA of another rank, added later, needs no re-pack.

    ``name``: the module's name in the model (for messages); ``format``, ``group_size``;
    ``shape`` (E, I, H); ``nbytes``: bytes of the stored copy (the QuantizedWeight's,
    then the packed layer's ``packed_nbytes``).
    """

    def __init__(self, name, gate, up, down):
        parts = (gate, up, down)
        kinds = [type(w).__qualname__ for w in parts if not isinstance(w, QuantizedWeight)]
        if kinds:
            raise TypeError(f"{name}: expected three nbmoe.QuantizedWeight (gate, up, down), got {kinds[0]}")
        try:                              # MoELayer's own checks: one format, group, consistent shapes
            fmt, g, _ = base_weights(gate, up, down, None, None)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
        self.name, self.format, self.group_size, self.shape = name, fmt, g, gate.shape
        self._parts, self._layer = parts, None

    @property
    def parts(self):
        """(gate, up, down) QuantizedWeight until the first forward packs them; then None."""
        return self._parts

    @property
    def layer(self):
        """The packed layer (no LoRA) once built, else None."""
        return self._layer

    @property
    def nbytes(self):
        return sum(w.nbytes for w in self._parts) if self._layer is None else self._layer.packed_nbytes

    def __repr__(self):
        E, I, H = self.shape
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"StoredExperts({self.name!r}, E={E}, I={I}, H={H}, format={self.format!r}{group}, "
                f"nbytes={self.nbytes}, packed={self._layer is not None})")

    def layer_for(self, lora, max_tokens, cache_depth):
        """An ``MoELayer`` over the stored copy with ``lora`` (LoRAWeights or None): packs the
        weights on the first call (and drops the QuantizedWeight), then each call returns a
        shallow copy of that layer with its own LoRA and buffers, sharing the packed weights.
        The copy is given its LoRA as ``MoELayer.__init__`` does (rank read from the arrays);
        ``resize`` drops the buffers sized for none, so they are made for this rank."""
        if self._layer is None:
            self._layer = MoELayer(*self._parts, max_tokens=max_tokens, cache_depth=cache_depth)
            self._parts = None
        layer = copy.copy(self._layer)
        layer.resize(max_tokens)
        layer.cache_depth = cache_depth
        layer._lora, layer.rank = lora, None
        layer.rank = 0 if lora is None else layer._lora_view().rank
        return layer


def stored_experts(module):
    """The ``StoredExperts`` of an experts module whose experts nbmoe stores quantized, else None."""
    return module.__dict__.get("_nbmoe_stored")


_stored = stored_experts


def _stored_message(module, what):
    stored = _stored(module)
    return (f"{stored.name}: its experts are stored quantized by nbmoe ({stored.format}; the bf16 "
            f"gate_up_proj / down_proj were freed), which {what} cannot run; use "
            f"experts_implementation=\"nbmoe\" (model.set_experts_implementation(\"nbmoe\")), or load "
            f"the model unquantized")


def _stored_forward(module, hidden_states, top_k_index, top_k_weights):
    """The forward of a transformers experts module whose experts are stored: nbmoe, or an
    error naming the module when the model asks for another experts implementation."""
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl not in (None, "nbmoe"):
        raise RuntimeError(_stored_message(module, f"the {impl!r} experts implementation"))
    return experts_forward(module, hidden_states, top_k_index, top_k_weights)


def _freed():
    """What stands for a freed base weight: an empty bf16 tensor (no bytes; state_dict shows
    it empty, so loading it into an unquantized model fails on the shape rather than silently)."""
    p = nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    p._is_hf_initialized = True           # transformers' initialize_weights leaves it alone
    return p


def _store(module, stored):
    """Make ``stored`` the only base weights of ``module``: free its bf16 tensors and any
    nbmoe state packed from them; transformers experts modules get a forward that runs
    nbmoe or says why not."""
    module.__dict__.pop("_nbmoe_state", None)
    module.gate_up_proj = _freed()
    module.down_proj = _freed()
    module.__dict__["_nbmoe_stored"] = stored
    if not isinstance(module, NbmoeExperts):
        module.forward = types.MethodType(_stored_forward, module)


class _State:
    """What an experts module keeps for nbmoe: its layer, and the key of the packed weights.
    A module with stored (quantized) experts gets a layer sharing the stored packed copy."""

    def __init__(self, module, lora, tokens):
        self.lora = None if lora is None else LoRAWeights(*_lora_arrays(lora[0]), alpha=lora[1])
        max_tokens = max(MIN_TOKENS, tokens)
        depth = getattr(module, "nbmoe_cache_depth", CACHE_DEPTH)
        stored = _stored(module)
        if stored is not None:
            self.layer = stored.layer_for(self.lora, max_tokens, depth)
        else:
            gate_up = to_numpy(_weight(module, "gate_up_proj"), "gate_up_proj")
            I = gate_up.shape[1] // 2
            down = to_numpy(_weight(module, "down_proj"), "down_proj")
            self.layer = MoELayer(gate_up[:, :I], gate_up[:, I:], down, lora=self.lora, max_tokens=max_tokens,
                                  cache_depth=depth)
        self.key = _key(module, lora)


def _lora_arrays(tensors):
    return [to_numpy(t, f"lora.{n}") for t, n in zip(tensors, LORA_FIELDS)]


def _key(module, lora):
    shapes = None if lora is None else tuple(tuple(t.shape) for t in lora[0])
    stored = _stored(module)
    if stored is not None:                # never changes: no tensor to look at
        return ("stored", id(stored), shapes)
    weights = (_weight(module, "gate_up_proj"), _weight(module, "down_proj"))
    key = tuple((w.data_ptr(), w._version, tuple(w.shape), w.dtype) for w in weights) + (shapes,)
    if module.__dict__.get("_nbmoe_peft"):
        key += tuple(_fingerprint(w) for w in weights)
    return key


def _fingerprint(w, samples=FINGERPRINT_SAMPLES):
    """A float64 sum of ``samples`` evenly strided elements of ``w``. PEFT merges and
    unmerges adapters with ``param.data += delta``, which torch's version counter does not
    see; for modules seen under PEFT this sees it (a merge moves nearly every element of
    an adapted expert; one that moves none left the bf16 weights as they were)."""
    flat = w.detach().reshape(-1)
    return flat[::max(1, flat.numel() // samples)].double().sum().item()


def _state(module, lora, tokens, k):
    """The module's nbmoe state, (re)built when its base weights or LoRA shapes changed;
    its buffers regrown when a call brings more tokens or another k (while none is saved)."""
    state = module.__dict__.get("_nbmoe_state")
    if state is None or state.key != _key(module, lora):
        _check(module)
        state = _State(module, lora, tokens)
        module.__dict__["_nbmoe_state"] = state
    if state.lora is not None:            # fresh views each call: the parameters may be new tensors
        for name, arr in zip(LORA_FIELDS, _lora_arrays(lora[0])):
            setattr(state.lora, name, arr)
        state.lora.alpha = lora[1]
    layer = state.layer
    if tokens > layer.max_tokens or layer.top_k not in (None, k):
        layer.resize(max(layer.max_tokens, 1 << (tokens - 1).bit_length()))
    return state


class _Saved:
    """One saved forward: its backward pops exactly it; freed unused, it is discarded."""

    def __init__(self, layer):
        self.layer, self.tag = layer, layer.newest_tag

    def backward(self, grad_y, partial):
        if self.tag is None:
            raise RuntimeError("nbmoe experts: backward through the same forward twice (retain_graph) "
                               "is not supported; run the forward again")
        grads = self.layer.backward(grad_y, tag=self.tag, partial=partial)
        self.tag = None
        return grads

    def __del__(self):
        if self.tag is not None:
            self.layer.discard(self.tag)


def _checkpoint_pass():
    """"first" inside the first pass of non-reentrant ``torch.utils.checkpoint``, "recompute"
    inside its recomputation, else None: read from the saved-tensor hooks it installs
    (a private torch API; where it is missing, None: the experts keep their first cache)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    name = getattr(hooks[0], "__qualname__", "") if hooks else ""
    return {"_checkpoint_hook": "first", "_recomputation_hook": "recompute"}.get(name.split(".")[0])


class ExpertsFunction(torch.autograd.Function):
    """y = MoELayer(x, ids, w) with gradients for x, w and the LoRA parameters.

    Under non-reentrant checkpointing the first pass saves no cache, only the tensor of
    a tag: unpacking it at backward makes torch recompute the region, whose forward saves
    a cache and a tensor with its tag, which is what backward reads and pops. So
    checkpointed experts hold nothing between forward and backward.

    ``partial``: y and the gradient of the hidden states in float32, unrounded - one
    tensor-parallel rank's share of a sum (``nbmoe.tp.dist``)."""

    @staticmethod
    def forward(ctx, state, save, partial, hidden_states, top_k_index, top_k_weights, *lora):
        E = state.layer.num_experts
        ids = top_k_index.detach()
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"top_k_index: expected dtype torch.int64 or torch.int32, got {ids.dtype}")
        ids = torch.where(ids == E, -1, ids).numpy()           # transformers' skipped-slot sentinel
        weights = top_k_weights.detach().float().contiguous()
        checkpointed = _checkpoint_pass() if save else None
        save = save and checkpointed != "first"
        y = state.layer.forward(to_numpy(hidden_states.contiguous(), "hidden_states"), ids,
                                to_numpy(weights, "top_k_weights"), save_for_backward=save, partial=partial)
        # a recomputation's cache belongs to the first pass's backward, which pops it by tag
        ctx.saved = _Saved(state.layer) if save and checkpointed is None else None
        ctx.layer, ctx.partial = state.layer, partial
        ctx.save_for_backward(torch.tensor([state.layer.newest_tag if save else -1]))
        ctx.dtypes = (hidden_states.dtype, top_k_weights.dtype) + tuple(p.dtype for p in lora)
        return to_torch(y, hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        (tag,) = ctx.saved_tensors
        grad = to_numpy(grad_y.to(torch.bfloat16).contiguous(), "grad_y")
        grads = ctx.saved.backward(grad, ctx.partial) if ctx.saved is not None else \
            ctx.layer.backward(grad, tag=int(tag), partial=ctx.partial)
        out = [None, None, None, to_torch(grads.input, ctx.dtypes[0]), None,
               to_torch(grads.topk_weights, ctx.dtypes[1])]
        lora = [getattr(grads, n) for n in LORA_FIELDS] if len(ctx.dtypes) > 2 else []
        out += [to_torch(g, dtype) for g, dtype in zip(lora, ctx.dtypes[2:])]
        return tuple(g if need else None for g, need in zip(out, (False,) * 3 + ctx.needs_input_grad[3:]))


def experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The ``"nbmoe"`` experts implementation: ``module`` is a transformers experts module
    (or ``NbmoeExperts``); hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]."""
    return _experts_apply(module, _lora(module), hidden_states, top_k_index, top_k_weights)


def _experts_apply(module, lora, hidden_states, top_k_index, top_k_weights):
    """``module``'s experts on nbmoe with ``lora``: None or (six factor tensors, alpha); a
    module sharded by ``nbmoe.tp.dist.shard_model`` runs its part and reduces over ranks."""
    tp = module.__dict__.get("_nbmoe_tp")
    if tp is not None:
        return tp.experts(module, lora, hidden_states, top_k_index, top_k_weights)
    return _experts_local(module, lora, hidden_states, top_k_index, top_k_weights)


def _experts_local(module, lora, hidden_states, top_k_index, top_k_weights, partial=False):
    """The experts this process holds (all of them, or one tensor-parallel part: then
    ``partial`` gives y in float32, see ``ExpertsFunction``)."""
    factors = [] if lora is None else lora[0]
    state = _state(module, lora, hidden_states.shape[0], top_k_index.shape[-1])
    save = torch.is_grad_enabled() and any(t.requires_grad for t in [hidden_states, top_k_weights, *factors])
    base = () if _stored(module) is not None else (_weight(module, "gate_up_proj"), _weight(module, "down_proj"))
    if save and any(w.requires_grad for w in base):
        raise RuntimeError(f"{type(module).__name__}: nbmoe trains LoRA adapters and computes no gradient for "
                           f"base expert weights; freeze them (requires_grad_(False)) or call "
                           f"nbmoe.torch.add_lora(model, rank, alpha), which does")
    return ExpertsFunction.apply(state, save, partial, hidden_states, top_k_index, top_k_weights, *factors)


def _runs_nbmoe(module):
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return isinstance(module, NbmoeExperts) or _stored(module) is not None or impl == "nbmoe"


def _peft_forward(wrapper, x, *args, **kwargs):
    """PEFT's ``ParamWrapper.forward``, for experts that run on nbmoe: their LoRA read from
    PEFT's own parameters, never folded into the base weights.

    PEFT nests one wrapper per adapted parameter around the experts module; the outermost
    one's forward handles the chain. Each wrapper contributes as PEFT's forward decides:
    nothing when disabled (unmerging first if merged) or merged, else its active adapters.
    ``nbmoe.peft.factors`` turns them into nbmoe's six factors, views of PEFT's
    ``lora_A`` / ``lora_B`` (autograd returns gradients into them). Anything else - experts
    on another implementation, per-call ``adapter_names`` - is PEFT's own forward."""
    chain, experts = [wrapper], wrapper.base_layer
    while isinstance(experts, type(wrapper)):
        chain.append(experts)
        experts = experts.base_layer
    if kwargs.get("adapter_names") is not None or not _runs_nbmoe(experts):
        return _PEFT_FORWARD(wrapper, x, *args, **kwargs)
    adapters = {}
    for w in chain:
        if w.disable_adapters and w.merged:
            w.unmerge()
        if w.disable_adapters or w.merged:
            continue
        E = w.num_experts
        active = [(*peft_format.from_peft(w.lora_A[a].weight, w.lora_B[a].weight, E), w.scaling[a])
                  for a in w.active_adapters if a in w.lora_A]
        if active:
            adapters[w.parameter_name] = active
    lora = None
    if adapters:
        experts.__dict__["_nbmoe_peft"] = True     # its weights may change under PEFT merges: see _key
        lora = peft_format.factors(adapters.get("gate_up_proj"), adapters.get("down_proj"), _experts_shape(experts))
    return _experts_apply(experts, lora, x, *args, **kwargs)


def _experts_shape(module):
    """(E, I, H) of an experts module: from its stored weights, or its gate_up_proj."""
    stored = _stored(module)
    if stored is not None:
        return stored.shape
    E, I2, H = _weight(module, "gate_up_proj").shape
    return E, I2 // 2, H


def _add_lora(module, rank, alpha, dtype):
    E, I, H = _experts_shape(module)
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
    """(name, module) for every module of ``model`` with 3-D ``gate_up_proj`` and ``down_proj``,
    or with experts stored quantized by nbmoe (``stored_experts``)."""
    found = [(n, m) for n, m in model.named_modules() if _stored(m) is not None or (
             isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and
             isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no experts module (3-D gate_up_proj and down_proj) found")
    return found


def experts_nbytes(model):
    """Bytes of the experts' base weights this process stores (bf16 tensors, or nbmoe's
    stored copy; a sharded model's: this rank's part)."""
    return sum(_stored(m).nbytes if _stored(m) is not None else _weight(m, "gate_up_proj").nbytes +
               _weight(m, "down_proj").nbytes for _, m in experts_modules(model))


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
    for name, module in experts_modules(model):
        if module.__dict__.get("_nbmoe_tp") is not None:
            raise ValueError(f"add_lora: {name} is sharded (nbmoe.tp.dist.shard_model); add or load the "
                             f"adapters first, then shard, so every rank starts from the same shared factors")
        _check(module)
        _add_lora(module, rank, alpha, dtype)
        params += [getattr(module, n) for n in LORA_NAMES]
    _use_nbmoe(model)
    return params


def lora_parameters(model):
    """Every nbmoe LoRA parameter of ``model`` (what ``add_lora`` returned; after
    ``nbmoe.tp.dist.shard_model`` the sliced ones are new tensors: ask again)."""
    return [getattr(m, n) for _, m in experts_modules(model) if has_lora(m) for n in LORA_NAMES]


def lora_state_dict(model):
    """{module name.parameter name: tensor} of every LoRA parameter of ``model``."""
    return {f"{name}.{p}": getattr(m, p).detach() for name, m in experts_modules(model) if has_lora(m)
            for p in LORA_NAMES}


def save_lora(model, path, format="nbmoe"):
    """Write every experts module's adapters (a sharded model's gathered to their full
    shapes and written by rank 0; every rank calls it). ``format="nbmoe"``: one safetensors file,
    each module's alpha in its metadata (``load_lora`` reads it). ``format="peft"``: a
    PEFT adapter folder that stock ``PeftModel.from_pretrained(base_model, path)`` loads
    (gate and up as one rank-2r adapter on ``gate_up_proj``, see ``nbmoe.peft``; needs
    the peft package)."""
    from safetensors.torch import save_file

    if format not in ("nbmoe", "peft"):
        raise ValueError(f"format: expected 'nbmoe' or 'peft', got {format!r}")
    modules = [(name, m) for name, m in experts_modules(model) if has_lora(m)]
    if not modules:
        raise ValueError(f"save_lora: {type(model).__name__} has no LoRA adapters; call add_lora first")
    if getattr(model, "_nbmoe_tp", None) is not None:      # sharded: the full adapter, from rank 0
        from .tp.dist import gather_lora

        state = gather_lora(model)
        if state is None:
            return
    else:
        state = lora_state_dict(model)
    if format == "peft":
        base = getattr(getattr(model, "config", None), "name_or_path", None) or None
        peft_format.write(path, {name: (m, {f: state[f"{name}.{n}"] for f, n in zip(LORA_FIELDS, LORA_NAMES)},
                                        m.lora_alpha) for name, m in modules}, base)
        return
    alphas = {name: m.lora_alpha for name, m in modules}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "nbmoe-lora", "lora_alpha": json.dumps(alphas)})


def _read_lora(path, modules):
    """{module name: ({LORA field: tensor}, alpha)} from a ``save_lora`` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        alphas = json.loads(f.metadata().get("lora_alpha", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unknown = sorted({k.rsplit(".", 1)[0] for k in tensors} - set(modules))
    if unknown:
        raise ValueError(f"load_lora: {path} holds adapters for modules this model lacks: {unknown[:3]}")
    found = {}
    for name in modules:
        missing = [f"{name}.{p}" for p in LORA_NAMES if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"load_lora: {path} lacks {missing[:3]}")
        factors = {f: tensors[f"{name}.{p}"] for f, p in zip(LORA_FIELDS, LORA_NAMES)}
        found[name] = factors, float(alphas.get(name, factors["gate_a"].shape[1]))
    return found


def load_lora(model, path):
    """Load adapters (adding them where missing) and switch the model to nbmoe: a file
    written by ``save_lora``, or a PEFT adapter folder (written by ``save_lora(...,
    format="peft")`` or trained with PEFT on the experts' ``gate_up_proj`` / ``down_proj``,
    see ``nbmoe.peft``). Every experts module must find its adapters, of matching shapes;
    a sharded model takes each rank's slice of the full adapter."""
    modules = dict(experts_modules(model))
    read = peft_format.read if peft_format.is_folder(path) else _read_lora
    for name, (factors, alpha) in read(path, modules).items():
        module = modules[name]
        part = module.__dict__.get("_nbmoe_tp")
        if part is not None:                       # sharded: this rank's slice of the full adapter
            factors = {f: part.slice_lora(f, t) for f, t in factors.items()}
        if not has_lora(module):
            _check(module)
            _add_lora(module, factors["gate_a"].shape[1], alpha, factors["gate_a"].dtype)
        for field, p in zip(LORA_FIELDS, LORA_NAMES):
            target, source = getattr(module, p), factors[field]
            if target.shape != source.shape:
                raise ValueError(f"load_lora: {name}.{p}: expected shape {tuple(target.shape)}, "
                                 f"got {tuple(source.shape)} in {path}")
            with torch.no_grad():
                target.copy_(source)
        module.lora_alpha = alpha
    _use_nbmoe(model)


def merge_lora(model):
    """Fold every adapter into its base weights (``W += alpha / r * B A``, computed in fp32,
    rounded once to the base dtype) and remove the adapters: a plain model for export.

    Experts stored quantized refuse (ValueError, before anything changes): a merged
    weight is no longer on the quantization grid, and re-quantizing it would change the
    function the adapter was trained with. Save the adapter (``save_lora``) and merge it
    into a bf16 copy of the model instead."""
    modules = [(n, m) for n, m in experts_modules(model) if has_lora(m)]
    for name, module in modules:
        stored = _stored(module)
        if stored is not None:
            raise ValueError(f"merge_lora: {name} holds its base weights quantized by nbmoe ({stored.format}); "
                             f"a merged adapter would have to be re-quantized, changing the trained function. "
                             f"Save the adapter with save_lora and merge it into the bf16 model instead")
    for _, module in modules:
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
    if _stored(module) is not None:
        raise RuntimeError(_stored_message(module, "the \"nbmoe_reference\" experts implementation"))
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

    @classmethod
    def from_quantized(cls, gate, up, down, rank=0, alpha=None, lora_dtype=torch.float32):
        """The same module over stored quantized experts: gate [E, I, H], up [E, I, H],
        down [E, H, I] ``nbmoe.QuantizedWeight`` of one format (``StoredExperts``); its
        ``gate_up_proj`` / ``down_proj`` are empty."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.act_fn = nn.SiLU()
        _store(self, StoredExperts(cls.__name__, gate, up, down))
        if rank:
            _add_lora(self, rank, float(rank if alpha is None else alpha), lora_dtype)
        return self

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _group_problem(fmt, group_size, H, I):
    """Why ``fmt`` with ``group_size`` cannot hold experts of hidden size H and intermediate
    size I on the int4 kernels, or None."""
    g = group_size
    if not fmt.startswith("int4"):
        return None
    if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g <= 0:
        return f"{fmt} with group_size {g!r}: expected a positive int"
    problem = int4_group_problem(g, H, I)
    return problem and f"{fmt} with group_size {g}: {problem}"


def quantize_experts(model, weight_format, group_size=None):
    """Quantize every experts module of ``model`` in place and free its bf16 experts.

    Each module's ``gate_up_proj [E, 2I, H]`` (gate first) and ``down_proj [E, H, I]`` are
    quantized (``nbmoe.quantize``: gate, up and down, ``weight_format`` "int8" | "int4_awq" |
    "int4_k2", int4 groups of ``group_size``, 128 if None, ignored for int8) - the weights
    ``MoELayer(gate, up, down, weight_format=..., group_size=...)`` would hold - into a
    ``StoredExperts``; the module's two tensors are then replaced by empty ones, so their
    memory is released - unless something else still refers to them (an optimizer over
    them, a tensor kept by the caller) - before the next module is quantized. Everything
    is checked before anything changes.
    The model is switched to the "nbmoe" experts implementation; a quantized module run
    by any other one raises, naming it. LoRA already on the modules stays.

    Returns ``model``."""
    if weight_format not in FORMATS:
        raise ValueError(f"quantize_experts: weight_format: expected one of {', '.join(FORMATS)}, "
                         f"got {weight_format!r}")
    group_size = None if weight_format == "int8" else (DEFAULT_GROUP_SIZE if group_size is None else group_size)
    modules = experts_modules(model)
    for name, module in modules:
        stored = _stored(module)
        if stored is not None:
            raise ValueError(f"quantize_experts: {name} is already stored quantized ({stored.format})")
        _check(module)
        E, I, H = _experts_shape(module)
        problem = _group_problem(weight_format, group_size, H, I)
        if problem:
            raise ValueError(f"quantize_experts: {name}: {problem}")
    for name, module in modules:
        gate_up = to_numpy(module.gate_up_proj, f"{name}.gate_up_proj")
        down = to_numpy(module.down_proj, f"{name}.down_proj")
        I = gate_up.shape[1] // 2
        parts = [quantize(w, weight_format, group_size) for w in (gate_up[:, :I], gate_up[:, I:], down)]
        del gate_up, down
        _store(module, StoredExperts(name, *parts))
    _use_nbmoe(model)
    return model


def _as_tensor(a, dtype):
    """A checkpoint array as a tensor of ``dtype`` (bf16 without a copy)."""
    t = to_torch(a) if a.dtype == ml_dtypes.bfloat16 else torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def _put(model, key, tensor):
    """Set parameter or buffer ``key`` of ``model`` (replacing its meta placeholder)."""
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        old = module._parameters[attr]
        tensor = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor
    tensor._is_hf_initialized = True      # loaded: transformers' initialize_weights skips it


def from_pretrained(path, weight_format=None, group_size=None, model_class=None, **kw):
    """A transformers MoE model from the local checkpoint folder ``path``, on the "nbmoe"
    experts implementation, its experts read straight into their stored format.

    ``path``: ``config.json`` and ``model.safetensors``, or shards and
    ``model.safetensors.index.json`` (nothing is downloaded). ``model_class``: the
    transformers class to build (default ``AutoModelForCausalLM``); ``**kw`` go to its
    ``from_config`` (e.g. ``attn_implementation``; ``dtype``, bfloat16 by default, is the
    dtype of the non-expert weights and of bf16 experts).

    How it loads (``nbmoe.checkpoint`` reads the files):

    1. The model is built from ``config.json`` on the meta device (no weight is
       materialised); its ``quantization_config``, if any, is parsed and then removed
       from the config (transformers must not quantize it again).
    2. Every tensor the model needs is checked from the file headers alone - present,
       dtype, shape - before anything is read: a missing or malformed one is a
       ValueError naming it.
    3. Non-expert tensors are read one at a time into the model. A quantized linear
       (compressed-tensors ``X.weight_packed`` / ``weight_scale`` / ``weight_shape``, or
       AWQ ``X.qweight`` / ``qzeros`` / ``scales``, where the model has ``X.weight``) is
       dequantized to bf16 (``QuantizedWeight.dequantize``).
    4. Experts, one module at a time: per-expert keys
       ``P.{e}.{gate,up,down}_proj.weight`` (Mixtral's ``w1`` / ``w3`` / ``w2`` too), fused
       ``P.gate_up_proj`` / ``P.down_proj``, or per-expert int4 tensors as in 3. int4
       experts become ``QuantizedWeight`` directly (``from_k2`` -> "int4_k2", ``from_awq``
       -> "int4_awq"), never through bf16; bf16 experts are gathered for one module and
       then kept as the module's bf16 ``gate_up_proj`` / ``down_proj`` (``weight_format``
       None or "bf16") or quantized online (``weight_format`` "int8" | "int4_awq" |
       "int4_k2", int4 groups of ``group_size``, 128 if None). Quantized experts are
       held as ``StoredExperts`` (see ``quantize_experts``), their tensors empty.
    5. Tied weights are tied, non-persistent buffers (rotary tables) computed by
       transformers' ``initialize_weights`` (which skips everything loaded); the model
       is returned in eval mode. Checkpoint tensors the model does not use are named in
       a warning.

    A quantized checkpoint fixes the experts' format and group: ``weight_format`` or
    ``group_size`` that contradict it are a ValueError (pass None). An unsupported
    ``quantization_config`` is a ValueError.

    Memory: nothing is memory-mapped, and the model is never whole in bf16. Beside the
    model being built, quantizing bf16 experts holds one projection of one module's
    experts in bf16 (a third of a layer; fused keys: the stored gate_up_proj, two thirds)
    and int4 checkpoints one projection's checkpoint tensors, so the peak stays under the
    stored experts + the non-expert weights + one layer of bf16 experts (measured by
    tests/test_checkpoint.py in a subprocess). With ``weight_format`` bf16 the experts are
    the model's bf16 tensors, read straight into place."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers import initialization as hf_init
    except ImportError:                   # older transformers: plain meta-device construction
        hf_init = None

    from . import checkpoint as ck

    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"from_pretrained: weight_format: expected None or one of {', '.join(WEIGHT_FORMATS)}, "
                         f"got {weight_format!r}")
    if kw.pop("experts_implementation", "nbmoe") != "nbmoe":
        raise ValueError("from_pretrained: builds models on experts_implementation=\"nbmoe\"; "
                         "load with transformers' own from_pretrained for another one")
    ckpt = ck.Checkpoint(path)
    scheme = ck.quantization(ckpt.config)
    config = AutoConfig.from_pretrained(os.fspath(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    kw.setdefault("dtype", torch.bfloat16)
    safe_ops = getattr(hf_init, "meta_device_safe_creation_ops", contextlib.nullcontext)
    with torch.device("meta"), safe_ops():  # weights on meta: nothing materialised
        model = (model_class or AutoModelForCausalLM).from_config(config, experts_implementation="nbmoe", **kw)

    # 2. plan and check everything from the headers
    experts = []
    for name, module in experts_modules(model):
        _check(module)
        E, I, H = _experts_shape(module)
        layout = ck.plan_experts(ckpt, name, E, I, H, scheme)
        if layout in ("int4_k2", "int4_awq"):
            where = f"from_pretrained: {path} stores {name}'s experts as {layout} ({scheme.method})"
            if weight_format not in (None, layout):
                raise ValueError(f"{where}; weight_format={weight_format!r} contradicts it: pass None or {layout!r}")
            if group_size not in (None, scheme.group_size):
                raise ValueError(f"{where} with group_size {scheme.group_size}; group_size={group_size!r} "
                                 f"contradicts it: pass None or {scheme.group_size}")
            fmt, g = layout, scheme.group_size
        else:
            fmt = weight_format or "bf16"
            g = (DEFAULT_GROUP_SIZE if group_size is None else group_size) if fmt.startswith("int4") else None
        problem = _group_problem(fmt, g, H, I)
        if problem:
            raise ValueError(f"from_pretrained: {name}: {problem}")
        experts.append((name, module, (E, I, H), layout, fmt, g))
    state = model.state_dict(keep_vars=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    skip = {f"{name}.{p}" for name, *_ in experts for p in ("gate_up_proj", "down_proj")} | tied
    linears = []
    for key, t in state.items():
        if key in skip:
            continue
        if t.is_floating_point():
            fmt = ck.plan_linear(ckpt, key, tuple(t.shape), scheme)
        else:
            ckpt.expect(key, (torch.empty(0, dtype=t.dtype).numpy().dtype,), tuple(t.shape))
            fmt = "bf16"
        linears.append((key, fmt))
    for key in tied & set(ckpt.names()):
        ckpt.skip(key)

    # 3. non-expert tensors, in file order
    for key, fmt in sorted(linears, key=lambda kf: ckpt.position(ck.source_name(ckpt, *kf))):
        _put(model, key, _as_tensor(ck.load_linear(ckpt, key, tuple(state[key].shape), fmt, scheme),
                                    state[key].dtype))
    del state
    # 4. experts, one module at a time
    for name, module, (E, I, H), layout, fmt, g in experts:
        got = ck.load_experts(ckpt, name, E, I, H, layout, fmt, g, scheme)
        if got[0] == "bf16":
            _put(model, f"{name}.gate_up_proj", _as_tensor(got[1], module.gate_up_proj.dtype))
            _put(model, f"{name}.down_proj", _as_tensor(got[2], module.down_proj.dtype))
        else:
            _store(module, StoredExperts(name, *got[1]))
        del got
    # 5. tie, compute the non-persistent buffers, check that nothing is left on meta
    if tied:
        model.tie_weights()
    for module in model.modules():
        for b in module._non_persistent_buffers_set:
            buf = module._buffers.get(b)
            if buf is not None and buf.is_meta:
                module._buffers[b] = torch.empty_like(buf, device="cpu")
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"from_pretrained: {path} left {len(left)} tensors unloaded, e.g. {left[:3]}")
    unread = ckpt.unread()
    if unread:
        warnings.warn(f"from_pretrained: {len(unread)} tensors of {path} are not used by "
                      f"{type(model).__name__}, e.g. {unread[:3]}", stacklevel=2)
    model.eval()
    _use_nbmoe(model)
    return model


def _route_peft(layer_module):
    """Make PEFT's ``ParamWrapper.forward`` (in ``peft.tuners.lora.layer``) ``_peft_forward``."""
    global _PEFT_FORWARD
    wrapper = layer_module.ParamWrapper
    if wrapper.forward is not _peft_forward:
        _PEFT_FORWARD, wrapper.forward = wrapper.forward, _peft_forward


class _PeftOnImport(importlib.abc.MetaPathFinder):
    """Routes PEFT's ParamWrapper when peft's LoRA layers are first imported, so importing
    nbmoe.torch does not import peft (about a second) for those who never use it."""

    def find_spec(self, name, path, target=None):
        if name != PEFT_LAYERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _route_peft(module)
            spec.loader.exec_module = exec_module
        return spec


def register():
    """Register ``"nbmoe"`` (and ``"nbmoe_reference"``) in transformers' ExpertsInterface,
    and, where peft is installed, route PEFT's LoRA on nbmoe experts to nbmoe (its
    ``ParamWrapper.forward`` becomes ``_peft_forward``, which hands every other case back
    to PEFT): now if peft's LoRA layers are imported, else when they are. False without
    transformers."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register("nbmoe", experts_forward)
    ExpertsInterface.register("nbmoe_reference", reference_experts_forward)
    if PEFT_LAYERS in sys.modules:
        _route_peft(sys.modules[PEFT_LAYERS])
    elif importlib.util.find_spec("peft") is not None and not any(isinstance(f, _PeftOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftOnImport())
    return True


PEFT_LAYERS = "peft.tuners.lora.layer"
_PEFT_FORWARD = None
REGISTERED = register()
