"""Forward caches: what a forward saves for its backward, sized by its call, LIFO per layer.

A ``ForwardCache`` holds everything backward reads, each array its own region:

- the input ``x`` in token order, zero-padded to ``Hp`` in rows a line longer
  (``gemm.longer``): backward's gate/up LoRA gradients read its rows through each pair's
  token, down 32-column strips,
- the routing: ``topk_ids``, ``topk_weights``, ``rows``, ``offsets``, ``order``,
  ``slot_of_expert``, ``active`` (backward restores this routing,
  never the current one),
- ``gu`` (pre-activation g | u), ``d`` (bf16, expert order), and the LoRA
  down-projections ``xa_gu`` = x [A_gate; A_up]^T and ``xa_d`` = h A_down^T (fp32).

``CacheStack`` bounds a layer's saved forwards to ``depth``: ``reserve(T)`` makes a cache
for T tokens or raises ``CacheOverflowError`` before anything is written; ``push``/``pop``
are LIFO. Each saved forward carries a ``tag`` (a counter), so a caller whose backward
order is not LIFO (torch autograd) can find or drop exactly its own. A saved cache's
arrays are carved from one buffer of the process-wide ``SAVED`` pool, sized by the call
(``SavedForward``: a cache per tensor-parallel part, the parts sharing x, the routing and
``xa_gu``); backward returns it and any layer's next save reuses it: memory
follows the saved tokens, not ``max_tokens``, and stays resident (no page faults) from
step to step. The arrays of a forward that saves nothing live in ``nbmoe.scratch``.
"""

import math
import threading

import numpy as np

from .kernels.gemm import longer, padded
from .scratch import ALIGN, new_array, zeros


class CacheOverflowError(RuntimeError):
    """``forward(save_for_backward=True)`` with every cache slot in use."""


class CacheEmptyError(RuntimeError):
    """``backward`` with no saved forward."""


class ForwardCache:
    """One forward's saved tensors, sized for ``tokens`` tokens of ``k`` slots."""

    def __init__(self, E, H, I, r, tokens, k, alloc=new_array):
        """``alloc(name, shape, dtype)``: where the arrays live (``SavedPool.carve`` for a
        saved forward, ``nbmoe.scratch`` for one that saves nothing, else new arrays)."""
        pairs = tokens * k
        Hp, Ip = padded(H), padded(I)
        self.T = 0
        self.P = 0
        self.n_active = 0
        self.tag = -1
        self.x = alloc("x", (tokens, longer(Hp, np.uint16)), np.uint16)
        self.topk_ids = alloc("topk_ids", (tokens, k), np.int64)
        self.topk_weights = alloc("topk_weights", (tokens, k), np.float32)
        self.rows = alloc("rows", (tokens, k), np.int64)
        self.offsets = alloc("offsets", (E + 1,), np.int64)
        self.order = alloc("order", (pairs,), np.int64)
        self.slot_of_expert = alloc("slot_of_expert", (E,), np.int64)
        self.active = alloc("active", (E,), np.int64)
        self.gu = alloc("gu", (pairs, 2 * Ip), np.uint16)
        self.d = alloc("d", (pairs, Hp), np.uint16)
        self.xa_gu = alloc("xa_gu", (pairs, 2 * r), np.float32)
        self.xa_d = alloc("xa_d", (pairs, r), np.float32)

    def arrays(self):
        """The saved tensors (not the pool ``buffer`` they are carved from)."""
        return [v for name, v in vars(self).items() if isinstance(v, np.ndarray) and name != "buffer"]


class SavedPool:
    """The memory of saved forwards, process-wide: one byte buffer per saved forward, sized
    by its call, returned here by backward and reused by any layer's next save (the
    smallest free buffer that fits; a buffer too small for every request is replaced, so
    the pool holds at most as many buffers as forwards were ever saved at once)."""

    ALIGN = ALIGN

    def __init__(self):
        self._free = []
        self._lock = threading.Lock()

    def take(self, nbytes):
        with self._lock:
            sizes = [b.nbytes for b in self._free]
            fits = [i for i, size in enumerate(sizes) if size >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=sizes.__getitem__))
            if self._free:                                  # none fits: replace the largest
                self._free.pop(max(range(len(sizes)), key=sizes.__getitem__))
        return zeros((max(nbytes, 1),), np.uint8)

    def give(self, buf):
        with self._lock:
            self._free.append(buf)

    @property
    def nbytes(self):
        """Bytes held by free buffers (saved forwards hold the rest)."""
        return sum(b.nbytes for b in self._free)

    def release(self):
        with self._lock:
            self._free.clear()

    @classmethod
    def carve(cls, buf):
        """``(name, shape, dtype) -> view`` handing out consecutive aligned pieces of ``buf``
        (with ``buf=None``: of nothing, to count the bytes, in ``carve.used``)."""
        def alloc(name, shape, dtype):
            dtype = np.dtype(dtype)
            at = -(-alloc.used // cls.ALIGN) * cls.ALIGN
            size = math.prod(shape) * dtype.itemsize
            alloc.used = at + size
            if buf is None:
                return None
            return buf[at:at + size].view(dtype).reshape(shape)
        alloc.used = 0
        return alloc


SAVED = SavedPool()


def bytes_per_token(H, I, r, k):
    """Bytes a saved forward keeps per token (``ForwardCache``'s arrays at T = 1 less those
    at T = 0: x, routing, gu, d, xa_gu, xa_d; docs/design.md §5)."""
    def held(tokens):
        return sum(a.nbytes for a in ForwardCache(1, H, I, r, tokens, k).arrays())
    return held(1) - held(0)


# what every tensor-parallel part of one forward computes alike (routing, x A_gu^T): saved once
SHARED_BY_PARTS = ("x", "topk_ids", "topk_weights", "rows", "offsets", "order", "slot_of_expert",
                   "active", "xa_gu")


class SavedForward:
    """One saved forward: a ``ForwardCache`` per tensor-parallel part (one without TP),
    carved from one ``SAVED`` buffer (``buffer``; given back when backward is done). Parts
    after the first share its ``SHARED_BY_PARTS`` arrays and hold their own gu, d, xa_d."""

    def __init__(self, E, H, sizes, r, tokens, k):
        count = SavedPool.carve(None)
        self._carve(E, H, sizes, r, tokens, k, count)
        self.buffer = SAVED.take(count.used)
        self.parts = self._carve(E, H, sizes, r, tokens, k, SavedPool.carve(self.buffer))
        self.tag = -1

    @staticmethod
    def _carve(E, H, sizes, r, tokens, k, alloc):
        first = ForwardCache(E, H, sizes[0], r, tokens, k, alloc=alloc)

        def part_alloc(name, shape, dtype):
            return getattr(first, name) if name in SHARED_BY_PARTS else alloc(name, shape, dtype)

        return [first] + [ForwardCache(E, H, I, r, tokens, k, alloc=part_alloc) for I in sizes[1:]]

    @property
    def T(self):
        return self.parts[0].T

    def arrays(self):
        """The saved tensors, each once."""
        seen = {}
        for part in self.parts:
            seen.update({id(a): a for a in part.arrays()})
        return list(seen.values())


class CacheStack:
    """At most ``depth`` saved forwards of one layer, last-in first-out; each made by
    ``make_cache(tokens)`` when saved and its memory returned to the pool when popped."""

    def __init__(self, depth, make_cache):
        self.depth = depth
        self._make = make_cache
        self._stack = []
        self._tags = 0

    def __len__(self):
        return len(self._stack)

    def reserve(self, tokens):
        """A slot for ``tokens`` tokens; raises ``CacheOverflowError`` if ``depth`` forwards are
        already saved (before anything is written)."""
        if len(self._stack) >= self.depth:
            raise CacheOverflowError(
                f"forward(save_for_backward=True): all {self.depth} cache slots hold saved "
                f"forwards awaiting backward; run backward first or construct the layer "
                f"with a larger cache_depth")
        return self._make(tokens)

    def push(self, cache):
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
        SAVED.give(cache.buffer)
        return cache

    def drop(self, tag):
        """Free the saved forward ``tag``, if it is still saved."""
        cache = self._tagged(tag)
        if cache is not None:
            self.pop(cache)

    def _tagged(self, tag):
        return next((cache for cache in self._stack if cache.tag == tag), None)

    def slots(self):
        """The saved forwards."""
        return list(self._stack)
