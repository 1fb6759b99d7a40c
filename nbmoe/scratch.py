"""Scratch memory shared by every ``MoELayer`` of the process (docs/design.md §5).

What a call needs only while it runs - the ``Workspace`` of ``kernels/moe.py`` and the
cache a forward without ``save_for_backward`` fills - lives in one process-wide pool of
named flat buffers. Each buffer grows to the largest call any layer has made and is
reused by every later call, whatever the layer's shape: a model of 48 layers holds one
call's scratch, not 48. Calls take turns through ``lock`` (two threads running layers at
once run one after the other). Saved forwards never live here. Every buffer starts on a
cache line (``zeros``).
"""

import math
import threading

import numpy as np


ALIGN = 64   # bytes: a cache line, and what a 16-lane fp32 store past the caches needs


def zeros(shape, dtype):
    """A zeroed C array whose data starts on an ``ALIGN``-byte boundary (NumPy's own
    arrays start on 16: the GEMMs store large outputs past the caches only when aligned)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    at = -raw.ctypes.data % ALIGN
    return raw[at:at + nbytes].view(dtype).reshape(shape)


def new_array(name, shape, dtype):
    """The allocator of arrays that are their own memory: a new zeroed array (``name`` unused)."""
    return zeros(shape, dtype)


class Scratch:
    """Named flat buffers, grown on demand; ``array`` hands out views of them."""

    def __init__(self):
        self._buffers = {}
        self.lock = threading.RLock()

    def array(self, name, shape, dtype):
        """A C-contiguous ``shape`` view of buffer ``name`` (``dtype``), grown to fit: its
        contents are whatever the last call left (callers write before they read)."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._buffers[name] = zeros((size,), dtype)
        return buf[:size].reshape(shape)

    def allocator(self, prefix):
        """``(name, shape, dtype) -> view``: the ``array`` of this scratch under ``prefix``."""
        return lambda name, shape, dtype: self.array(prefix + name, shape, dtype)

    def buffers(self):
        return list(self._buffers.values())

    @property
    def nbytes(self):
        """Bytes the scratch holds now (the largest call so far)."""
        return sum(buf.nbytes for buf in self._buffers.values())

    def release(self):
        """Drop every buffer (the next call allocates again): memory back between phases."""
        with self.lock:
            self._buffers.clear()


SHARED = Scratch()
