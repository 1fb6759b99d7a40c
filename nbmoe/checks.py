"""Argument checks. Every public argument passes through here before any work is done;
every error names the argument, what was expected and what came. Nothing is
reinterpreted: float32 where bf16 is expected is rounded (nearest-even, a copy),
anything else is refused."""

import numbers

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def ndarray(name, value):
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__module__}."
                        f"{type(value).__qualname__}")
    return value


def shape(name, arr, expected, labels):
    """``expected``: ints, or None where any size goes; ``labels`` names them, e.g. "(E, I, H)"."""
    if arr.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, arr.shape)):
        shown = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {labels} = {shown}, got {arr.shape}")


def bf16_bits(name, value, expected, labels):
    """bfloat16 (or float32, rounded) array -> C-contiguous uint16 bits, shape checked."""
    arr = ndarray(name, value)
    if arr.dtype not in (BF16, np.float32):
        raise TypeError(f"{name}: expected dtype bfloat16 or float32, got {arr.dtype}")
    shape(name, arr, expected, labels)
    if arr.dtype == np.float32:
        arr = arr.astype(BF16)
    return np.ascontiguousarray(arr).view(np.uint16)


def lora_array(name, value, expected, labels):
    """A LoRA factor, never copied: float32 as is, bfloat16 as a uint16 view (any strides)."""
    arr = ndarray(name, value)
    if arr.dtype not in (BF16, np.float32):
        raise TypeError(f"{name}: expected dtype float32 or bfloat16, got {arr.dtype}")
    shape(name, arr, expected, labels)
    return arr.view(np.uint16) if arr.dtype == BF16 else arr


def topk_ids(value, tokens, num_experts):
    """int32/int64 [T, k] with ids in [0, E) or -1 -> int64 C array."""
    arr = ndarray("topk_ids", value)
    if arr.dtype not in (np.int32, np.int64):
        raise TypeError(f"topk_ids: expected dtype int32 or int64, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != tokens:
        raise ValueError(f"topk_ids: expected shape (T, k) = ({tokens}, any) with T the rows "
                         f"of x, got {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"topk_ids: expected at least one slot per token, got shape {arr.shape}")
    bad = (arr < -1) | (arr >= num_experts)
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise ValueError(f"topk_ids[{t}, {j}] = {arr[t, j]}: expected an expert id in "
                         f"[0, {num_experts}) or -1 for a skipped slot")
    return np.ascontiguousarray(arr, dtype=np.int64)


def topk_weights(value, expected):
    arr = ndarray("topk_weights", value)
    if arr.dtype != np.float32:
        raise TypeError(f"topk_weights: expected dtype float32, got {arr.dtype}")
    shape("topk_weights", arr, expected, "(T, k)")
    return np.ascontiguousarray(arr)


def integer(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__qualname__}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bounds}, got {value}")
    return int(value)


def finite_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__qualname__}")
    if not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value
