"""The MoE FFN: router → the expert function (routed experts: residency and compute live behind it,
compute/experts.ExpertExecutor or the residency scheduler) → + the shared expert, plain or behind a
sigmoid gate; optionally the experts' own input weight and a per-expert output scale. Shapes: T
tokens, D = n_embd, E experts, k experts used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..gguf import names
from .routers import RouteFn, Router

ExpertCall = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, h, ids, weights)


@dataclass
class MoE:
    router: Router
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None  # the shared expert: [T, D] → [T, D]
    shared_gate: torch.Tensor | None = None  # [D]: y += sigmoid(h·g) · shared(h) (Qwen2-MoE)
    expert_norm: torch.Tensor | None = None  # [D]: the routed experts see h·expert_norm, the router h (Gemma 4's pre_ffw_norm_2)
    expert_scale: torch.Tensor | None = None  # [E]: expert e's output × expert_scale[e], folded into its routing weight (Gemma 4)

    @classmethod
    def load(cls, w: Any, i: int, *, select: RouteFn, shared: str = "none", router_bias: bool = False,
             c_router: bool = False) -> MoE:
        """Layer i's MoE block (w: layers.block.Weights). shared: archs.common.SharedExpert ("none",
        "plain", "gated"); router_bias: the logits carry ffn_gate_inp.bias; c_router: the C router
        may run. A selection bias (exp_probs_b) is read wherever the file has one."""
        s = w.spec
        blk = lambda stem, kind="weight": names.blk(i, stem, kind)  # noqa: E731
        router = Router(
            weight=w.load(blk(names.FFN_GATE_INP)).reshape(s.n_expert, s.n_embd),
            select=select,
            bias=w.maybe(blk(names.FFN_GATE_INP, "bias")) if router_bias else None,
            probs_bias=w.maybe(blk(names.FFN_EXP_PROBS_B, "bias")),
            c_router=c_router,
        )
        shexp = (names.FFN_GATE_SHEXP, names.FFN_UP_SHEXP, names.FFN_DOWN_SHEXP)
        return cls(
            router=router,
            shared=None if shared == "none" else w.ffn(i, shexp),
            shared_gate=w.load(blk(names.FFN_GATE_INP_SHEXP)).reshape(-1) if shared == "gated" else None,
        )

    def __call__(self, spec: Any, i: int, h: torch.Tensor, experts: ExpertCall) -> torch.Tensor:
        """h [T, D] (normed) of layer i → [T, D]."""
        ids, weights = self.router(spec, h)  # [T, k], [T, k]
        if self.expert_scale is not None:
            weights = weights * self.expert_scale[ids]
        y = experts(i, h if self.expert_norm is None else h * self.expert_norm, ids, weights)
        if self.shared is not None:
            sh = self.shared(h)
            y = y + (sh if self.shared_gate is None else torch.sigmoid(h @ self.shared_gate)[:, None] * sh)
        return y
