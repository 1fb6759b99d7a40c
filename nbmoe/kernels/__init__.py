"""Numba kernels: no torch here. ``moe`` runs the others in order; see its docstring."""
