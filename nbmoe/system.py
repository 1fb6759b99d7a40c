"""``nbmoe.info()``: what this machine offers and what nbmoe will run on it."""

import llvmlite
import numba
import numpy as np

from . import __version__
from .kernels import isa


def info():
    """A dict: versions, the CPU and its route-deciding features, the kernel route
    chosen (and why, or the error if ``NBMOE_ISA`` asks for one it cannot run), the
    routes this host can run, and Numba's threading layer and thread count."""
    features = isa.host_features()
    try:
        route = isa.choose_route(features=features)
        route_name, reason = route.name, route.reason
    except RuntimeError as err:
        route_name, reason = None, str(err)
    layer, threads = isa.threading_layer()
    return {
        "nbmoe": __version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "cpu": isa.host_cpu_name(),
        "features": features,
        "route": route_name,
        "route_reason": reason,
        "routes_runnable": isa.runnable(features),
        "threading_layer": layer,
        "threads": threads,
    }
