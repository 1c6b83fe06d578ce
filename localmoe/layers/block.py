"""One decoder layer as an architecture module assembles it, and the loader its builder reads:

    x = x + attn(rms(x)·attn_norm)          attn: attention.GQA, mla.MLA, ...
    x = x + ffn(rms(x)·ffn_norm)            a dense FFN (ffn.FFN), or the MoE block (moe.MoE)

The driver (localmoe/model.py) runs these two lines per layer; which attention, router and
activation a block has is decided here, by the architecture's `build_block`. A block whose order
of operations differs (norms after the sub-blocks too, two FFNs side by side: layers/postnorm.py)
says so with a `run` method, which the driver calls instead of the two lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..compute.kernels import QLinear
from .moe import MoE


class Weights(Protocol):
    """What a block builder reads the file through (model.FileWeights): tensors by GGUF name."""

    spec: Any  # the ModelSpec
    device: torch.device

    def has(self, name: str) -> bool: ...

    def load(self, name: str) -> torch.Tensor:
        """A small tensor (norm, bias, router, sinks) as float32 on the device."""

    def maybe(self, name: str) -> torch.Tensor | None:
        """load(name), or None when the file has no such tensor."""

    def linear(self, name: str) -> QLinear:
        """A weight matrix in a fast kernel's layout."""

    def raw(self, name: str) -> tuple:
        """A weight matrix as the file stores it: (data, quant type, [rows, cols])."""

    def fuse(self, mats: list[tuple], sources: list[tuple] | None = None) -> list[QLinear]:
        """Raw matrices with the same columns as one matrix (outputs concatenated) when they share a
        type, else one each; `sources`: the file's matrices they were cut from, if rows were reordered."""

    def qkv(self, layer: int, with_v: bool = True) -> list[QLinear]:
        """q, k and v of `layer` as one matrix [H·d + 2·Hkv·d, D] when they share a type, else three
        (with_v False: q and k only, for a layer whose values are its keys)."""

    def ffn(
        self, layer: int, stems: tuple[str, str, str], act: str | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The gated FFN of `layer` whose gate, up and down matrices are named by `stems`, with the
        activation `act` (archs.common.ExpertAct; None: SwiGLU)."""


class Attention(Protocol):
    def __call__(self, s: Any, i: int, h: torch.Tensor, cache: Any, pos0: int, rope: Any) -> torch.Tensor:
        """h [T, D] (normed) of layer i at positions pos0.. → [T, D]; appends this call's K/V to the cache."""

    def cache_rows(self, s: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        """((heads, width) of a key row, (heads, width) of a value row) of this layer's KV cache."""

    cache_dtype: torch.dtype | None  # the element type of those rows; None: the KV cache's own (LoadOptions.kv_type)


@dataclass
class Block:
    attn_norm: torch.Tensor  # [D]
    attn: Attention
    ffn_norm: torch.Tensor  # [D]
    ffn: Callable[[torch.Tensor], torch.Tensor] | None = None  # the dense FFN of a layer without experts
    moe: MoE | None = None  # else the MoE block
    # a block with its own order of operations defines run(model, i, x, cache, pos0) → x (the
    # residual stream [T, D] after the layer); None: the driver's two lines
    run: ClassVar[Callable[..., torch.Tensor] | None] = None

    # what other code reads on model.layers[i] (backends of the q/k/v matrices, biases, sinks)
    @property
    def wqkv(self) -> list[QLinear]:
        return getattr(self.attn, "wqkv", [])

    @property
    def bo(self) -> torch.Tensor | None:
        return getattr(self.attn, "bo", None)

    @property
    def sinks(self) -> torch.Tensor | None:
        return getattr(self.attn, "sinks", None)

    @sinks.setter
    def sinks(self, value: torch.Tensor | None) -> None:
        self.attn.sinks = value

    @property
    def router_bias(self) -> torch.Tensor | None:
        return None if self.moe is None else self.moe.router.bias


def weight_bytes(obj: Any) -> int:
    """Bytes of the tensors and weight matrices a piece holds (its dataclass fields, recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, QLinear):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(weight_bytes(o) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(weight_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0
