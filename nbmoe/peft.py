"""PEFT's adapter folder for nbmoe's expert LoRA: written so stock PEFT loads it, read back.

PEFT puts LoRA on a 3-D experts parameter ``P [E, N, K]`` (``target_parameters``, its
``ParamWrapper``) as one adapter per parameter: ``lora_A.weight [E*R, K]`` (expert e's
rows ``e*R .. e*R+R``) and ``lora_B.weight [N, R*E]`` (column ``q*E + e``: experts
fastest), ``dP[e] = scaling * B_e @ A_e`` with ``scaling = lora_alpha / R``
(``/ sqrt(R)`` with rslora). Both parameters of one module are wrapped, nested: the
parameter registered first (``gate_up_proj``) is the inner one, whose keys carry one
``base_layer.`` more. The folder is ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.[base_layer.]lora_X.weight``.

nbmoe keeps gate and up as separate adapters of rank r. They map exactly onto one
gate|up adapter of rank 2r: ``A = [A_g; A_u]``, ``B = [[B_g, 0], [0, B_u]]``, so
``B A = [B_g A_g; B_u A_u]``; down stays rank r. The config gives gate_up_proj rank 2r
and ``lora_alpha`` 2 alpha (the same scaling alpha / r), down_proj rank r and alpha
through ``rank_pattern`` / ``alpha_pattern``, keyed by each parameter's full name.

Read back, a folder nbmoe wrote (its safetensors metadata says so) splits into the same
six factors; any other PEFT adapter becomes gate and up adapters sharing A (two copies of
it, trained apart from then on), ranks zero-padded to the larger and down B rescaled
where the two parameters' scalings differ: the same function either way.
"""

import json
import math
import os
import re

import torch

from .reference import LORA_FIELDS

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PARAMETERS = ("gate_up_proj", "down_proj")
SPLIT = "nbmoe: gate|up block-diagonal"       # metadata mark of a folder nbmoe wrote


def is_folder(path):
    """Whether ``path`` is a PEFT adapter folder."""
    return os.path.isfile(os.path.join(str(path), CONFIG))


def _nesting(module):
    """{parameter: key infix}: the parameter registered first is PEFT's inner wrapper."""
    order = [n for n, _ in module.named_parameters(recurse=False) if n in PARAMETERS]
    if sorted(order) != sorted(PARAMETERS):
        raise ValueError(f"{type(module).__name__}: expected parameters {PARAMETERS}, got {order}")
    return {order[0]: "base_layer.", order[1]: ""}


def _keys(name, module):
    return {p: (f"{PREFIX}{name}.{infix}lora_A.weight", f"{PREFIX}{name}.{infix}lora_B.weight")
            for p, infix in _nesting(module).items()}


def _to_peft(a, b):
    """A [E, R, K], B [E, N, R] -> PEFT's lora_A.weight [E*R, K], lora_B.weight [N, R*E]."""
    E, R, K = a.shape
    return a.reshape(E * R, K).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], R * E).contiguous()


def from_peft(lora_a, lora_b, E):
    """The inverse of ``_to_peft``: A [E, R, K], B [E, N, R]."""
    R = lora_a.shape[0] // E
    return lora_a.reshape(E, R, -1), lora_b.reshape(lora_b.shape[0], R, E).permute(2, 0, 1)


def write(path, modules, base_model=None):
    """Write the folder ``path`` from ``modules``: {experts module name: (module, {LORA
    field: tensor}, alpha)}; ``base_model``: the config's ``base_model_name_or_path``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, ranks, alphas, targets = {}, {}, {}, []
    for name, (module, f, alpha) in modules.items():
        r = f["gate_a"].shape[1]
        E, I = f["gate_b"].shape[:2]
        b = f["gate_b"].new_zeros((E, 2 * I, 2 * r))
        b[:, :I, :r], b[:, I:, r:] = f["gate_b"], f["up_b"]
        factors = {"gate_up_proj": (torch.cat([f["gate_a"], f["up_a"]], dim=1), b, 2 * r, 2 * alpha),
                   "down_proj": (f["down_a"], f["down_b"], r, alpha)}
        keys = _keys(name, module)
        for p, (a, b, rank, p_alpha) in factors.items():
            tensors[keys[p][0]], tensors[keys[p][1]] = _to_peft(a.detach(), b.detach())
            full = f"{name}.{p}"
            targets.append(full)
            ranks[re.escape(full)], alphas[re.escape(full)] = rank, p_alpha
    first = next(iter(ranks))
    config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=[], target_parameters=targets,
                        rank_pattern={k: v for k, v in ranks.items() if v != ranks[first]},
                        alpha_pattern={k: v for k, v in alphas.items() if v != alphas[first]},
                        base_model_name_or_path=base_model)
    os.makedirs(str(path), exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, os.path.join(str(path), WEIGHTS), metadata={"format": "pt", "nbmoe": SPLIT})


def _pattern(patterns, key, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read(path, modules):
    """{module name: ({LORA field: tensor}, alpha)} from the folder ``path`` for ``modules``
    ({name: experts module}); every module must find both adapters."""
    from safetensors import safe_open

    with open(os.path.join(str(path), CONFIG)) as fh:
        config = json.load(fh)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_lora: {path}: expected a LoRA adapter, got peft_type {config.get('peft_type')!r}")
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise ValueError(f"load_lora: {path}: {option}=True adapters do not run on nbmoe experts")
    with safe_open(os.path.join(str(path), WEIGHTS), framework="pt") as fh:
        split = (fh.metadata() or {}).get("nbmoe") == SPLIT
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    from .torch import _experts_shape

    found = {}
    for name, module in modules.items():
        E, parts = _experts_shape(module)[0], {}
        for p, (key_a, key_b) in _keys(name, module).items():
            if key_a not in tensors or key_b not in tensors:
                raise ValueError(f"load_lora: {path} lacks {key_a if key_a not in tensors else key_b}")
            full = f"{name}.{p}"
            r = tensors[key_a].shape[0] // E
            alpha = _pattern(config.get("alpha_pattern") or {}, full, config.get("lora_alpha", 8))
            rank = _pattern(config.get("rank_pattern") or {}, full, config.get("r", 8))
            if r != rank or tensors[key_a].shape[0] != E * r:
                raise ValueError(f"load_lora: {path}: {key_a} has shape {tuple(tensors[key_a].shape)}, "
                                 f"expected [E * r, K] with E = {E}, r = {rank}")
            scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            parts[p] = (*from_peft(tensors[key_a], tensors[key_b], E), scaling)
        found[name] = _six(parts, split)
    return found


def _six(parts, split):
    """nbmoe's six factors (separate tensors) and alpha from a folder's adapters, at the
    adapters' own (full) sizes: a sharded model slices them afterwards."""
    (a, b, s), (a_d, b_d, s_d) = parts["gate_up_proj"], parts["down_proj"]
    if split:
        I, r = b.shape[1] // 2, a.shape[1] // 2
        f = dict(gate_a=a[:, :r], gate_b=b[:, :I, :r], up_a=a[:, r:], up_b=b[:, I:, r:], down_a=a_d,
                 down_b=b_d if s_d == s else b_d * (s_d / s))
        alpha = s * r
    else:
        shape = (a.shape[0], b.shape[1] // 2, a.shape[2])            # E, I, H of the adapter
        six, alpha = factors([parts["gate_up_proj"]], [parts["down_proj"]], shape)
        f = dict(zip(LORA_FIELDS, six))
        f["up_a"] = f["up_a"].clone()              # its own parameter from now on
    return {k: v.contiguous() for k, v in f.items()}, alpha


def factors(gate_up, down, shape):
    """nbmoe's six LoRA factors (LORA_FIELDS order) and alpha (scale * rank) from the PEFT
    adapters active on gate_up_proj and on down_proj of experts of shape (E, I, H): each a
    list of (A [E, R, K], B [E, N, R], scaling), or None where PEFT runs none (zero
    factors there).

    One adapter covers gate and up: ``gate_a`` and ``up_a`` are the same A and ``gate_b`` /
    ``up_b`` the halves of B, views of PEFT's tensors. nbmoe runs one rank and one scale
    per module, so several adapters on a parameter stand side by side along the rank, the
    smaller-rank parameter is zero-padded, and a B whose scaling differs from the first
    adapter's is rescaled: small copies, made only then, with torch ops so autograd carries
    gradients back through them."""
    E, I, H = shape
    gate_up, down = _side_by_side(gate_up), _side_by_side(down)
    given = gate_up or down
    r = max(f[0].shape[1] for f in (gate_up, down) if f is not None)
    scaling = given[2]

    def fit(f, N, K):
        if f is None:
            return given[0].new_zeros((E, r, K)), given[0].new_zeros((E, N, r))
        a, b, s = f
        pad = r - a.shape[1]
        if pad:
            a, b = torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))
        return a, (b if s == scaling else b * (s / scaling))

    a_gu, b_gu = fit(gate_up, 2 * I, H)
    a_d, b_d = fit(down, H, I)
    return [a_gu, b_gu[:, :I], a_gu, b_gu[:, I:], a_d, b_d], scaling * r


def _side_by_side(adapters):
    """Several adapters on one parameter as one (A, B, scaling): ranks concatenated, each B
    scaled by its scaling over the first's; None for none."""
    if not adapters:
        return None
    if len(adapters) == 1:
        return adapters[0]
    s = adapters[0][2]
    return (torch.cat([a for a, _, _ in adapters], 1),
            torch.cat([b if t == s else b * (t / s) for _, b, t in adapters], 2), s)
