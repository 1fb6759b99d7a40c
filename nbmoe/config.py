"""Numba flags for every kernel, and a cache stamp that covers the whole kernel package.

Every ``@njit`` in ``nbmoe.kernels`` takes its flags from here:

- ``JIT``: serial kernels; ``JIT_PARALLEL``: kernels with a ``prange`` over work items.
- ``fastmath`` allows only ``contract`` (FMA fusion) and ``reassoc`` (vectorised
  reductions). Never ``nnan``/``ninf``: NaN must survive into the outputs, and the
  bf16 rounding tests for NaN bit patterns.
- ``cache=True``: compiled kernels persist in ``__pycache__`` next to the source.

Numba stamps a cached kernel with the hash of its own source file only, but our
kernels inline intrinsics and helpers from sibling files (``simd.py``, ...). A
kernel cached before ``simd.py`` changed would silently run the old code. The
locator below stamps every file under ``nbmoe/kernels`` with one hash of all of
them, so any change there recompiles every kernel. It applies to files of this
package only; other Numba users are untouched.
"""

import hashlib
import os

from numba.core import caching

FASTMATH = {"contract", "reassoc"}
JIT = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
JIT_PARALLEL = dict(JIT, parallel=True)

_KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def _kernel_sources_hash():
    digest = hashlib.sha256()
    for name in sorted(os.listdir(_KERNEL_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(_KERNEL_DIR, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    with open(__file__, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


_STAMP = _kernel_sources_hash()


class _PackageStamp:
    """Mixin: applies to files under nbmoe/kernels only, stamped with ``_STAMP``."""

    def get_source_stamp(self):
        return _STAMP

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != _KERNEL_DIR:
            return None
        return super().from_function(py_func, py_file)


def _numba_name(name):
    """Numba 0.68 dropped the leading underscore of these names; accept either."""
    return getattr(caching, name, None) or getattr(caching, "_" + name)


# NUMBA_CACHE_DIR if the user set one, else __pycache__ beside the source, else the
# user-wide cache directory: Numba's own order, each with the package-wide stamp.
_LOCATORS = [type("_Stamped" + base, (_PackageStamp, _numba_name(base)), {})
             for base in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
_REGISTERED = _numba_name("CacheImpl")._locator_classes
if not any(cls.__name__ == _LOCATORS[0].__name__ for cls in _REGISTERED):
    _REGISTERED[0:0] = _LOCATORS
