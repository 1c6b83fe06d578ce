"""The MoE FFN: router → the routed experts (residency plans where each runs, compute runs the plan)
→ + the shared expert, plain or behind a sigmoid gate; optionally the experts' own input weight and
a per-expert output scale. Shapes: T tokens, D = n_embd, E experts, k experts used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..compute.plan import ExpertPlan, run_plan
from ..gguf import names
from .routers import RouteFn, Router


class Residency(Protocol):
    """Where routed experts run: residency/resident.AllResident (every expert addressable) or
    residency/scheduler.ExpertScheduler (a GPU tier under a budget, modelled or real)."""

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> ExpertPlan:
        """ids [T, k] int64, weights [T, k] float32 → where each routed expert runs (accounted)."""

    def finish(self, plan: ExpertPlan) -> None:
        """After the plan's experts are issued (prefetch, background uploads, the clock)."""

    def wants_prediction(self, layer: int, n_tokens: int) -> bool:
        """Whether `layer`'s predicted experts are wanted now (model.MoEModel.predict_next)."""

    def give_prediction(self, layer: int, ids: torch.Tensor) -> None:
        """ids [k]: the experts `layer`'s router picks on the stream after the previous attention."""


def routed_experts(
    residency: Residency, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """x [T, D] (the experts' input); ids, weights [T, k] → Σ router weight · expert(x) [T, D]:
    residency's plan, executed by compute."""
    plan = residency.plan(layer, ids, weights)
    y = run_plan(plan, x)
    residency.finish(plan)
    return y


@dataclass
class MoE:
    router: Router
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None  # the shared expert: [T, D] → [T, D]
    shared_gate: torch.Tensor | None = None  # [D]: y += sigmoid(h·g) · shared(h) (Qwen2-MoE)
    expert_norm: torch.Tensor | None = (
        None  # [D]: the routed experts see h·expert_norm, the router h (Gemma 4's pre_ffw_norm_2)
    )
    expert_scale: torch.Tensor | None = (
        None  # [E]: expert e's output × expert_scale[e], folded into its routing weight (Gemma 4)
    )

    @classmethod
    def load(
        cls, w: Any, i: int, *, select: RouteFn, shared: str = "none", router_bias: bool = False, c_router: bool = False
    ) -> MoE:
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

    def __call__(self, spec: Any, i: int, h: torch.Tensor, residency: Residency) -> torch.Tensor:
        """h [T, D] (normed) of layer i → [T, D]."""
        ids, weights = self.router(spec, h)  # [T, k], [T, k]
        if self.expert_scale is not None:
            weights = weights * self.expert_scale[ids]
        y = routed_experts(residency, i, self.experts_input(h), ids, weights)
        if self.shared is not None:
            sh = self.shared(h)
            y = y + (sh if self.shared_gate is None else torch.sigmoid(h @ self.shared_gate)[:, None] * sh)
        return y

    def experts_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the routed experts see of h [T, D], the router's input: h · expert_norm where set."""
        return h if self.expert_norm is None else h * self.expert_norm
