"""Forward caches: what a forward saves for its backward, in a LIFO pool of fixed slots.

A ``ForwardCache`` holds everything backward reads, each in its own allocation:

- the input ``x`` in token order (backward regathers it for the gate/up LoRA gradients),
- the routing: ``topk_ids``, ``topk_weights``, ``rows``, ``offsets``, ``order``,
  ``row_slot``, ``slot_of_expert``, ``active`` (backward restores this routing,
  never the current one),
- ``gu`` (pre-activation g | u), ``h``, ``d`` (bf16, expert order), and the LoRA
  down-projections ``xa_gu`` = x [A_gate; A_up]^T and ``xa_d`` = h A_down^T (fp32).

``CacheStack`` allocates ``depth`` slots once; ``reserve`` hands out a free slot or
raises ``CacheOverflowError`` before anything is written; ``push``/``pop`` are LIFO. Each
saved forward carries a ``tag`` (a counter), so a caller whose backward order is not
LIFO (torch autograd) can find or drop exactly its own.
Arrays are ``np.zeros``: the OS commits their pages only when a forward touches
them, so capacity for ``max_tokens`` costs memory only as far as it is used.
"""

import numpy as np

from .kernels.gemm import ROW_SLACK, padded


class CacheOverflowError(RuntimeError):
    """``forward(save_for_backward=True)`` with every cache slot in use."""


class CacheEmptyError(RuntimeError):
    """``backward`` with no saved forward."""


class ForwardCache:
    """One forward's saved tensors, sized for ``tokens`` tokens of ``k`` slots."""

    def __init__(self, E, H, I, r, tokens, k, alloc=None):
        """``alloc(name, shape, dtype)``: where the arrays live (default: new zeroed arrays,
        a saved slot's own; ``nbmoe.scratch`` for a forward that saves nothing)."""
        alloc = alloc or (lambda name, shape, dtype: np.zeros(shape, dtype))
        pairs = tokens * k
        Hp, Ip = padded(H), padded(I)
        self.T = 0
        self.P = 0
        self.n_active = 0
        self.tag = -1
        self.x = alloc("x", (tokens, H), np.uint16)
        self.topk_ids = alloc("topk_ids", (tokens, k), np.int64)
        self.topk_weights = alloc("topk_weights", (tokens, k), np.float32)
        self.rows = alloc("rows", (tokens, k), np.int64)
        self.offsets = alloc("offsets", (E + 1,), np.int64)
        self.order = alloc("order", (pairs,), np.int64)
        self.row_slot = alloc("row_slot", (pairs,), np.int64)
        self.slot_of_expert = alloc("slot_of_expert", (E,), np.int64)
        self.active = alloc("active", (E,), np.int64)
        self.gu = alloc("gu", (pairs, 2 * Ip), np.uint16)
        self.h = alloc("h", (pairs + ROW_SLACK, Ip), np.uint16)     # an A operand: whole tiles are read
        self.d = alloc("d", (pairs, Hp), np.uint16)
        self.xa_gu = alloc("xa_gu", (pairs, 2 * r), np.float32)
        self.xa_d = alloc("xa_d", (pairs, r), np.float32)

    def arrays(self):
        return [v for v in vars(self).values() if isinstance(v, np.ndarray)]


class CacheStack:
    """``depth`` forward caches, allocated once, used last-in first-out."""

    def __init__(self, depth, make_cache):
        self.depth = depth
        self._free = [make_cache() for _ in range(depth)]
        self._stack = []
        self._tags = 0

    def __len__(self):
        return len(self._stack)

    def reserve(self):
        """A free slot to fill; raises ``CacheOverflowError`` if all ``depth`` are saved."""
        if not self._free:
            raise CacheOverflowError(
                f"forward(save_for_backward=True): all {self.depth} cache slots hold saved "
                f"forwards awaiting backward; run backward first or construct the layer "
                f"with a larger cache_depth")
        return self._free[-1]

    def push(self, cache):
        self._free.remove(cache)
        self._tags += 1
        cache.tag = self._tags
        self._stack.append(cache)

    def peek(self, tag=None):
        """The newest saved forward, or the one tagged ``tag``; raises ``CacheEmptyError``."""
        if not self._stack:
            raise CacheEmptyError("backward: no saved forward; call forward(..., "
                                  "save_for_backward=True) first")
        if tag is None:
            return self._stack[-1]
        cache = self._tagged(tag)
        if cache is not None:
            return cache
        raise CacheEmptyError(f"backward: no saved forward with tag {tag} (saved: "
                              f"{[c.tag for c in self._stack]}); it was consumed or discarded")

    def pop(self, cache):
        self._stack.remove(cache)
        self._free.append(cache)
        return cache

    def drop(self, tag):
        """Free the saved forward ``tag``, if it is still saved."""
        cache = self._tagged(tag)
        if cache is not None:
            self.pop(cache)

    def _tagged(self, tag):
        return next((cache for cache in self._stack if cache.tag == tag), None)

    def slots(self):
        return self._free + self._stack
