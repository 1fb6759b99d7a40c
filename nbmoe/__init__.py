"""nbmoe: Mixture-of-Experts LoRA fine-tuning kernels for the CPU, in Python compiled by Numba."""

__version__ = "0.1.0"

from .cache import CacheEmptyError, CacheOverflowError
from .layer import LoRAWeights, MoEGrads, MoELayer
from .quant import QuantizedWeight, quantize
from .system import info

__all__ = ["MoELayer", "LoRAWeights", "MoEGrads", "CacheOverflowError", "CacheEmptyError", "info",
           "QuantizedWeight", "quantize", "__version__"]
