"""nbmoe.tp: tensor parallelism at NumPy level (docs/design.md §7).

- ``partition(I, tp, align)``: the ranges of the intermediate dimension each part owns.
  ``MoELayer(..., tp=N)`` runs its experts as N parts on them (``nbmoe.layer``): each
  part stores only its slice of the base weights, reads LoRA slices as views, and the
  parts' partial sums are added in fp32, in part order, then rounded once.
- ``nbmoe.tp.vocab``: the vocabulary split over parts (embedding, LM head, cross-entropy).
- ``nbmoe.tp.dist``: the same over ``torch.distributed``, one part per process (torch).
"""

from .. import checks


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
