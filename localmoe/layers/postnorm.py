"""A decoder layer with norms after its sub-blocks as well as before them ("sandwich" norms, as the
Gemma family has them), a dense FFN beside the routed experts, an output scale; and the final
logit soft-cap. As llama.cpp's gemma4 graph orders it (src/models/gemma4.cpp):

    x = x + rms(attn(rms(x)·attn_norm))·attn_post_norm
    r = rms(x)                                    the FFN input, unweighted: each branch weighs it
    f = rms(dense(r·dense_norm))·dense_post_norm + rms(moe(r))·moe_post_norm
    x = (x + rms(f)·ffn_post_norm) · out_scale

where moe(r) routes on r (the router scales its input itself: layers/routers.Router) and feeds the
experts r·expert_norm (layers/moe.MoE). Shapes: T tokens, D = n_embd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..compute.kernels import rms_norm
from .block import Block


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap), as ggml computes it (a scale by the float32 1/cap, tanh, a scale by cap)."""
    return torch.tanh(x * float(torch.tensor(1.0 / cap, dtype=torch.float32))) * cap


@dataclass
class PostNormBlock(Block):
    """Block's fields, with ffn_norm all ones (model.ffn_input then gives the unweighted r that the
    router reads, e.g. for the prediction model.predict_next hands residency) and moe the routed experts; and:"""

    attn_post_norm: torch.Tensor | None = None  # [D]
    dense: Callable[[torch.Tensor], torch.Tensor] | None = None  # the dense FFN beside the experts
    dense_norm: torch.Tensor | None = None  # [D]: the dense FFN's input weight
    dense_post_norm: torch.Tensor | None = None  # [D]
    moe_post_norm: torch.Tensor | None = None  # [D]
    ffn_post_norm: torch.Tensor | None = None  # [D]
    out_scale: torch.Tensor | None = None  # [1]: the layer's output × this, where the file has one

    def run(self, m: Any, i: int, x: torch.Tensor, cache: Any, pos0: int) -> torch.Tensor:
        """x [T, D] → x after layer i (m: the model.MoEModel running it, for its attention call,
        expert function and spec)."""
        eps = m.spec.rms_eps
        x = x + rms_norm(m.attention(i, rms_norm(x, self.attn_norm, eps), cache, pos0), self.attn_post_norm, eps)
        m.predict_next(i, x)
        f = rms_norm(self.dense(rms_norm(x, self.dense_norm, eps)), self.dense_post_norm, eps)
        f = f + rms_norm(self.moe(m.spec, i, rms_norm(x, self.ffn_norm, eps), m.experts), self.moe_post_norm, eps)
        x = x + rms_norm(f, self.ffn_post_norm, eps)
        return x if self.out_scale is None else x * self.out_scale
