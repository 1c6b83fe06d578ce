"""Dequantization of GGUF tensors to float32.

This *is* `gguf.quants.dequantize` (llama.cpp's own Python reference, checked bit for bit against
libggml in gguf-py's tests), so results equal it exactly. Fast repacked kernels come later and
are checked against this.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF data (float array or quantized bytes) → float32 array of logical `shape`."""
    if qtype == GGMLQuantizationType.F32:
        out = np.asarray(raw, dtype=np.float32)
    elif qtype == GGMLQuantizationType.F16:
        out = np.asarray(raw).astype(np.float32)
    else:
        out = _gguf_dequantize(np.asarray(raw), qtype)
        if out.dtype != np.float32:
            out = out.astype(np.float32)
    return out.reshape(shape)


def to_torch(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Dequantize into a float32 torch tensor on `device` (a fresh, writable copy)."""
    arr = dequantize(raw, qtype, shape)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    return torch.from_numpy(arr).to(device)
