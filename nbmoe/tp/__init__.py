"""nbmoe.tp: tensor parallelism at NumPy level (docs/design.md §7).

- ``partition(I, tp, align)``: the ranges of the intermediate dimension each part owns.
  ``MoELayer(..., tp=N)`` runs its experts as N parts on them (``nbmoe.layer``): each
  part stores only its slice of the base weights, reads LoRA slices as views, and the
  parts' partial sums are added in fp32, in part order, then rounded once.
- ``nbmoe.tp.vocab``: the vocabulary split over parts (embedding, LM head, cross-entropy).
- ``nbmoe.tp.dist``: the same over ``torch.distributed``, one part per process (torch).
"""

from .. import checks

# the LoRA factors a part slices, and the axis of I in each (B rows of gate/up, A columns of
# down); gate_a, up_a and down_b are shared by every part
SLICED = {"gate_b": 1, "up_b": 1, "down_a": 2}


def lora_part(name, factor, i0, i1):
    """Part [i0, i1) of I of the LoRA factor ``name`` (an array or tensor in LoRA shape, or
    its gradient) as a view; a shared factor as it is."""
    axis = SLICED.get(name)
    if axis is None:
        return factor
    return factor[:, i0:i1] if axis == 1 else factor[:, :, i0:i1]


def partition(I, tp, align=1):
    """[(i0, i1), ...]: ``tp`` contiguous, non-empty ranges covering [0, I), every boundary
    inside (0, I) a multiple of ``align``; as even as ``align`` allows (the first parts take
    one ``align`` unit more), so sizes may differ (I=100, tp=3: 34, 33, 33).

    ``ValueError`` when I has fewer than ``tp`` units of ``align`` (the last may be short)."""
    I = checks.integer("I", I, 1)
    tp = checks.integer("tp", tp, 1)
    align = checks.integer("align", align, 1)
    units = -(-I // align)
    if units < tp:
        raise ValueError(f"tp: cannot split I = {I} into {tp} non-empty parts on multiples of align = "
                         f"{align} (only {units} unit{'s' if units != 1 else ''}); use tp <= {units}")
    base, extra = divmod(units, tp)
    bounds, at = [0], 0
    for p in range(tp):
        at += base + (p < extra)
        bounds.append(min(I, at * align))
    return list(zip(bounds[:-1], bounds[1:]))
