"""The oracle: MoE LoRA forward and backward in float64 NumPy, obvious rather than fast.

Inputs are the same bf16 (or float32) arrays the layer gets, read exactly as float64.
It rounds to bf16 exactly where the contract stores bf16 (docs/design.md §3):
``g``, ``u`` and ``h`` (cached), ``y``, the ``d`` the router gradient reads, and
``grad_x``. Everything else is float64: the kernels' own internal bf16 operands
(``G = w * grad_y``, ``dg``, ``du``) are approximations the tests measure.
"""

import numpy as np

# the six LoRA factors in their one order (LoRAWeights, MoEGrads, every list of them);
# defined here so that the oracle needs nothing but NumPy
LORA_FIELDS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def round_bf16(a):
    """float64 -> the nearest bfloat16 value (ties to even), as float64; NaN/inf kept.

    Rounds the float64 mantissa directly to bf16's 8 bits (no float32 step, which
    would round twice). Values below bf16's normal range round as if normal.
    """
    a = np.asarray(a, np.float64)
    bits = a.view(np.uint64)
    drop = np.uint64(52 - 7)
    lsb = (bits >> drop) & np.uint64(1)
    rounded = (bits + (np.uint64(1) << (drop - np.uint64(1))) - np.uint64(1) + lsb) >> drop << drop
    out = rounded.view(np.float64)
    out = np.where(np.abs(out) > 3.3895313892515355e38, np.copysign(np.inf, a), out)
    return np.where(np.isfinite(a), out, a)


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _identity(a):
    return a


def _silu(g):
    return g / (1.0 + np.exp(-g))


def forward(x, topk_ids, topk_weights, gate, up, down, lora=None, rounding=True):
    """y [T, H] (float64 holding bf16 values) and the tensors ``backward`` needs.

    x [T, H]; topk_ids [T, k] (-1 skipped); topk_weights [T, k]; gate, up [E, I, H];
    down [E, H, I]; lora: None or an object with gate_a ... down_b and alpha.
    ``rounding=False`` skips every bf16 rounding: the plain float64 function, whose
    gradients the tests check against finite differences.
    """
    rnd = round_bf16 if rounding else _identity
    x, w = _f64(x), _f64(topk_weights)
    Wg, Wu, Wd = _f64(gate), _f64(up), _f64(down)
    E = Wg.shape[0]
    T, H = x.shape
    L = None
    if lora is not None:
        L = {n: _f64(getattr(lora, n)) for n in LORA_FIELDS}
        L["s"] = lora.alpha / L["gate_a"].shape[1]
    ids = np.asarray(topk_ids)
    y = np.zeros((T, H))
    experts = []
    for e in range(E):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        X = x[tok]
        g = X @ Wg[e].T
        u = X @ Wu[e].T
        if L:
            g = g + L["s"] * (X @ L["gate_a"][e].T) @ L["gate_b"][e].T
            u = u + L["s"] * (X @ L["up_a"][e].T) @ L["up_b"][e].T
        g, u = rnd(g), rnd(u)
        h = rnd(_silu(g) * u)
        d = h @ Wd[e].T
        if L:
            d = d + L["s"] * (h @ L["down_a"][e].T) @ L["down_b"][e].T
        np.add.at(y, tok, w[tok, slot][:, None] * d)
        experts.append(dict(e=e, tok=tok, slot=slot, X=X, g=g, u=u, h=h, d=d))
    saved = dict(experts=experts, w=w, Wg=Wg, Wu=Wu, Wd=Wd, L=L, T=T, k=ids.shape[1], E=E, rnd=rnd)
    return rnd(y), saved


def backward(saved, grad_y):
    """Gradients (float64) of ``forward``'s output: a dict with input [T, H] (bf16 values),
    topk_weights [T, k] and, with LoRA, gate_a ... down_b in LoRA shapes."""
    gy = _f64(grad_y)
    w, Wg, Wu, Wd, L = saved["w"], saved["Wg"], saved["Wu"], saved["Wd"], saved["L"]
    T, k, E, rnd = saved["T"], saved["k"], saved["E"], saved["rnd"]
    grads = dict(input=np.zeros((T, gy.shape[1])), topk_weights=np.zeros((T, k)))
    if L:
        for n in LORA_FIELDS:
            grads[n] = np.zeros((E,) + L[n].shape[1:])
    for c in saved["experts"]:
        e, tok, slot, X, g, u, h = c["e"], c["tok"], c["slot"], c["X"], c["g"], c["u"], c["h"]
        grads["topk_weights"][tok, slot] = np.sum(gy[tok] * rnd(c["d"]), axis=1)
        G = w[tok, slot][:, None] * gy[tok]
        grad_h = G @ Wd[e]
        if L:
            s = L["s"]
            grad_h = grad_h + s * (G @ L["down_b"][e]) @ L["down_a"][e]
            grads["down_b"][e] += s * G.T @ (h @ L["down_a"][e].T)
            grads["down_a"][e] += s * (G @ L["down_b"][e]).T @ h
        sg = 1.0 / (1.0 + np.exp(-g))
        dg = grad_h * u * sg * (1.0 + g * (1.0 - sg))
        du = grad_h * g * sg
        grad_x = dg @ Wg[e] + du @ Wu[e]
        if L:
            grad_x = grad_x + s * ((dg @ L["gate_b"][e]) @ L["gate_a"][e] + (du @ L["up_b"][e]) @ L["up_a"][e])
            grads["gate_a"][e] += s * (dg @ L["gate_b"][e]).T @ X
            grads["up_a"][e] += s * (du @ L["up_b"][e]).T @ X
            grads["gate_b"][e] += s * dg.T @ (X @ L["gate_a"][e].T)
            grads["up_b"][e] += s * du.T @ (X @ L["up_a"][e].T)
        np.add.at(grads["input"], tok, grad_x)
    grads["input"] = rnd(grads["input"])
    return grads
