"""The vocabulary split over tensor-parallel parts: embedding, LM head and cross-entropy
in NumPy, each equal to its unsharded form (docs/design.md §7).

A vocabulary of V rows is padded to ``padded_size = ceil(V / (m * tp)) * m * tp`` (m =
``multiple_of``, default 64: every part a multiple of 64 rows, like Megatron's
``make_vocab_size_divisible_by``), so any ``tp`` splits it (65535 over 2 -> 2 x 32768);
part ``r`` owns padded rows ``[r * part_size, (r + 1) * part_size)``, the pad rows zero.

Dataflow, per part then reduced over parts (what ``nbmoe.tp.dist`` does with collectives)::

    embedding:     ids --mask to the part's range, local lookup (0 elsewhere)--> sum over parts
    lm_head:       h [T, D] @ shard^T -> local logits --gather, concatenate--> drop the pad -> [T, V]
    cross_entropy: local logits, pad masked to -inf -> max (max over parts) -> sum exp (sum
                   over parts) -> the target's logit (from the part that owns it: sum over
                   parts) -> log(sum exp) + max - target

The pad is dropped only after gathering (``gather_unpad``): un-padding each shard first
loses which rows are real. Megatron's vocab-parallel cross-entropy leaves pad logits in
its sum (they are 0, so exp(0 - max) is added once per pad row); here they are masked,
so the loss equals the unsharded one. ``check_weights`` catches a shard loaded where the
full vocabulary belongs (16032 rows of Llama 3's 128256 at tp = 8) and says how to merge.
"""

import numpy as np

from .. import checks

MAX_TP = 64          # shard sizes check_weights recognises: V / tp or padded / tp, tp in 2..MAX_TP


class VocabPartition:
    """``vocab_size`` V split over ``tp`` parts, padded to a multiple of ``multiple_of * tp``.

    ``padded_size``, ``part_size``; ``range(rank)`` the padded rows [start, stop) part
    ``rank`` owns; ``valid(rank)`` how many of them are real (the rest is pad)."""

    def __init__(self, vocab_size, tp, multiple_of=64):
        self.vocab_size = checks.integer("vocab_size", vocab_size, 1)
        self.tp = checks.integer("tp", tp, 1)
        self.multiple_of = checks.integer("multiple_of", multiple_of, 1)
        unit = self.multiple_of * self.tp
        self.padded_size = -(-self.vocab_size // unit) * unit
        self.part_size = self.padded_size // self.tp

    def __repr__(self):
        return (f"VocabPartition(vocab_size={self.vocab_size}, tp={self.tp}, multiple_of={self.multiple_of}: "
                f"padded_size={self.padded_size}, part_size={self.part_size})")

    def range(self, rank):
        rank = checks.integer("rank", rank, 0, self.tp - 1)
        return rank * self.part_size, (rank + 1) * self.part_size

    def valid(self, rank):
        start, stop = self.range(rank)
        return max(0, min(stop, self.vocab_size) - start)


def _partition(part):
    if not isinstance(part, VocabPartition):
        raise TypeError(f"part: expected nbmoe.tp.vocab.VocabPartition, got {type(part).__qualname__}")
    return part


def _shards(shards, part, width=None):
    """The ``tp`` shards, each [part_size, D] of one D; returns D."""
    if not isinstance(shards, (list, tuple)) or len(shards) != part.tp:
        got = f"{len(shards)} shards" if isinstance(shards, (list, tuple)) else type(shards).__qualname__
        raise ValueError(f"shards: expected a list of tp = {part.tp} arrays, got {got}")
    D = width
    for r, s in enumerate(shards):
        s = checks.ndarray(f"shards[{r}]", s)
        if s.ndim != 2 or s.shape[0] != part.part_size or (D is not None and s.shape[1] != D):
            raise ValueError(f"shards[{r}]: expected shape (part_size, D) = ({part.part_size}, "
                             f"{'any' if D is None else D}), got {s.shape}")
        D = s.shape[1]
    return D


def shard(weight, part):
    """weight [V, D] -> ``tp`` arrays [part_size, D] (copies, one per part), pad rows zero."""
    part = _partition(part)
    weight = checks.ndarray("weight", weight)
    if weight.ndim != 2 or weight.shape[0] != part.vocab_size:
        raise ValueError(f"weight: expected shape (V, D) = ({part.vocab_size}, any), got {weight.shape}")
    out = []
    for r in range(part.tp):
        start, _ = part.range(r)
        s = np.zeros((part.part_size, weight.shape[1]), weight.dtype)
        n = part.valid(r)
        s[:n] = weight[start:start + n]
        out.append(s)
    return out


def gather_unpad(shards, part):
    """The ``tp`` shards [part_size, D] -> [V, D]: gathered first, then the pad dropped."""
    part = _partition(part)
    _shards(shards, part)
    return np.concatenate(shards, axis=0)[:part.vocab_size]


def _ids(name, ids, V):
    ids = checks.ndarray(name, ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer dtype, got {ids.dtype}")
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(where)} = {ids[where]}: expected a token id in [0, {V})")
    return ids


def embedding(ids, shards, part):
    """weight[ids] from the shards: each part looks up the ids in its range (0 elsewhere),
    the parts' results summed (exactly one is nonzero). ids [...] int -> [..., D]."""
    part = _partition(part)
    D = _shards(shards, part)
    ids = _ids("ids", ids, part.vocab_size)
    out = np.zeros(ids.shape + (D,), shards[0].dtype)
    for r, s in enumerate(shards):
        start, stop = part.range(r)
        mine = (ids >= start) & (ids < stop)
        out += np.where(mine[..., None], s[np.where(mine, ids - start, 0)], 0).astype(out.dtype)
    return out


def _hidden(h, D):
    h = checks.ndarray("h", h)
    if h.ndim != 2 or h.shape[1] != D:
        raise ValueError(f"h: expected shape (T, D) = (any, {D}), got {h.shape}")
    return h


def _last_tokens(cu_seqlens, T):
    """Rows of each sequence's last token: cu_seqlens[1:] - 1, from a valid cu_seqlens."""
    cu = checks.ndarray("cu_seqlens", cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or cu.dtype.kind not in "iu":
        raise ValueError(f"cu_seqlens: expected a 1-D integer array [n_seq + 1], got {cu.dtype} {cu.shape}")
    if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 1):
        raise ValueError(f"cu_seqlens: expected 0 = c0 < c1 < ... < c_n = T = {T}, got {cu.tolist()[:8]}")
    return cu[1:] - 1


def lm_head(h, shards, part, cu_seqlens=None):
    """Logits [T, V] float32 (or [n_seq, V] of each sequence's last token, ``cu_seqlens``
    [n_seq + 1] the sequences' boundaries in h's rows): each part's h @ shard^T (fp32),
    gathered and concatenated, then the pad dropped. h [T, D]."""
    part = _partition(part)
    D = _shards(shards, part)
    h = _hidden(h, D)
    if cu_seqlens is not None:
        h = h[_last_tokens(cu_seqlens, h.shape[0])]
    h32 = h.astype(np.float32)
    return np.concatenate([h32 @ s.astype(np.float32).T for s in shards], axis=1)[:, :part.vocab_size]


def cross_entropy(h, shards, part, labels, ignore_index=-100):
    """Softmax cross-entropy of the logits h @ W^T against ``labels`` [T], per token, float64
    [T] (0 where labels == ``ignore_index``), by Megatron's vocab-parallel algorithm with
    the pad masked: equal to the unsharded loss up to float64 rounding. h [T, D]; every
    part computes in float64 (this is the algorithm's NumPy form; ``nbmoe.tp.dist`` runs
    it over torch.distributed)."""
    part = _partition(part)
    D = _shards(shards, part)
    h = _hidden(h, D)
    labels = checks.ndarray("labels", labels)
    if labels.shape != (h.shape[0],):
        raise ValueError(f"labels: expected shape (T,) = ({h.shape[0]},), got {labels.shape}")
    ignored = labels == ignore_index
    labels = _ids("labels", np.where(ignored, 0, labels), part.vocab_size)
    h64 = h.astype(np.float64)
    local = []
    for r, s in enumerate(shards):
        logits = h64 @ s.astype(np.float64).T
        logits[:, part.valid(r):] = -np.inf              # the pad is no word
        local.append(logits)
    top = np.max([lg.max(axis=1) for lg in local], axis=0)                # max over parts
    sum_exp = np.sum([np.exp(lg - top[:, None]).sum(axis=1) for lg in local], axis=0)
    target = np.zeros(h.shape[0])
    for r, lg in enumerate(local):                                       # the owner's logit
        start, stop = part.range(r)
        mine = (labels >= start) & (labels < stop)
        target += np.where(mine, lg[np.arange(h.shape[0]), np.where(mine, labels - start, 0)], 0.0)
    return np.where(ignored, 0.0, np.log(sum_exp) + top - target)


def _shard_hint(rows, vocab_size, multiple_of):
    """'a shard of ... tp = N' when ``rows`` is V / tp or padded / tp for some tp, else None."""
    for tp in range(2, MAX_TP + 1):
        padded = VocabPartition(vocab_size, tp, multiple_of)
        if rows * tp == vocab_size or rows == padded.part_size:
            kind = "V / tp" if rows * tp == vocab_size else f"padded_size / tp ({padded.padded_size} / {tp})"
            return (f"{rows} rows look like one shard of a vocabulary of {vocab_size} split over tp = {tp} "
                    f"({kind}); merge the tp shards first: nbmoe.tp.vocab.gather_unpad(shards, "
                    f"VocabPartition({vocab_size}, {tp}, multiple_of={multiple_of}))")
    return None


def check_weights(embed, lm_head, vocab_size, hidden, tp=1, multiple_of=64):
    """``ValueError`` naming the tensor unless ``embed`` and ``lm_head`` (either None: tied,
    or not given) are [V, hidden] or [padded_size, hidden] of ``VocabPartition(vocab_size,
    tp, multiple_of)``;
    a tensor of a shard's rows (V / tp or padded_size / tp for a tp in 2..64) is named as
    such, with the likely tp and how to merge."""
    vocab_size = checks.integer("vocab_size", vocab_size, 1)
    hidden = checks.integer("hidden", hidden, 1)
    padded = VocabPartition(vocab_size, tp, multiple_of).padded_size
    for name, w in (("embed", embed), ("lm_head", lm_head)):
        if w is None:
            continue
        shape = tuple(getattr(w, "shape", ()))
        if len(shape) != 2:
            raise ValueError(f"{name}: expected a 2-D weight (V, hidden) = ({vocab_size}, {hidden}), "
                             f"got shape {shape}")
        rows, cols = shape
        if rows not in (vocab_size, padded):
            hint = _shard_hint(rows, vocab_size, multiple_of)
            expected = f"{vocab_size}" + (f" (or padded {padded})" if padded != vocab_size else "")
            raise ValueError(f"{name}: expected {expected} rows (the vocabulary), got {rows}" +
                             (f": {hint}" if hint else ""))
        if cols != hidden:
            raise ValueError(f"{name}: expected {hidden} columns (the hidden size), got {cols}")
