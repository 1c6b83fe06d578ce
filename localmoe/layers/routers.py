"""Routers: router logits [T, E] → (expert ids [T, k] int64, weights [T, k] float32), as llama.cpp's
build_moe_ffn computes them. Each kind is one function `(logits, spec, probs_bias) → (ids, weights)`:

    softmax_topk:        p = softmax(l); top-k of p (+ bias, within the best groups); w = p[ids]
    sigmoid_bias_groups: p = sigmoid(l); the same selection; w = p[ids] (the bias only selects)
    topk_softmax:        top-k of l; w = softmax(l[ids])

the first two then (spec.norm_topk) w /= Σw and (spec.expert_weights_scale) w *= scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..compute.kernels import route

RouteFn = Callable[[torch.Tensor, Any, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def _select(probs: torch.Tensor, spec: Any, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [T, E] → the top-k of probs (+ bias) within the n_group_used best expert groups (a
    group's score: the sum of its best two), weighed by probs (renormalised, scaled)."""
    k = spec.n_expert_used
    select = probs if bias is None else probs + bias
    if spec.n_expert_groups > 1:
        T, E = select.shape
        groups = select.view(T, spec.n_expert_groups, E // spec.n_expert_groups)  # [T, G, E/G]
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]: the sum of each group's best two
        keep = group_score.topk(spec.n_group_used, dim=-1).indices  # [T, n_group_used]
        mask = torch.full_like(group_score, float("-inf")).scatter_(1, keep, 0.0)
        select = (groups + mask[..., None]).view(T, E)
    ids = select.topk(k, dim=-1).indices
    weights = probs.gather(1, ids)
    if spec.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    if spec.expert_weights_scale not in (0.0, 1.0):
        weights = weights * spec.expert_weights_scale
    return ids, weights


def softmax_topk(logits: torch.Tensor, spec: Any, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _select(logits.softmax(-1), spec, bias)


def sigmoid_bias_groups(
    logits: torch.Tensor, spec: Any, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _select(torch.sigmoid(logits), spec, bias)


def topk_softmax(logits: torch.Tensor, spec: Any, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    top, ids = logits.topk(spec.n_expert_used, dim=-1)  # [T, k]
    return ids, top.softmax(-1)


# archs.common.Routing → (the router, the per-expert probabilities its weights are read from)
ROUTERS: dict[str, tuple[RouteFn, Callable[[torch.Tensor], torch.Tensor]]] = {
    "softmax_topk": (softmax_topk, lambda logits: logits.softmax(-1)),
    "sigmoid_bias_groups": (sigmoid_bias_groups, torch.sigmoid),
    "topk_softmax": (topk_softmax, lambda logits: logits.softmax(-1)),
}


def routing_probs(logits: torch.Tensor, spec: Any) -> torch.Tensor:
    """The router's per-expert probabilities [T, E] for the routing kind the file chose."""
    return ROUTERS[spec.routing][1](logits)


@dataclass
class Router:
    weight: torch.Tensor  # [E, D]
    select: RouteFn  # one of the kinds above
    bias: torch.Tensor | None = None  # [E]: added to the logits before selection (gpt-oss)
    probs_bias: torch.Tensor | None = None  # [E]: added to the scores to select, not to weigh
    c_router: bool = False  # the C router computes `select` here (softmax → top-k over unbiased logits)
    input_scale: torch.Tensor | None = (
        None  # [D]: the router reads (h·input_gain)·input_scale (Gemma 4: 1/√D, ffn_gate_inp.scale)
    )
    input_gain: float = 1.0

    def _input(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.input_scale is None else (h * self.input_gain) * self.input_scale

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] → logits [T, E] (+ the router's bias, where it has one)."""
        logits = self._input(h) @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def __call__(self, spec: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] → (ids [T, k] int64, weights [T, k] float32)."""
        if self.c_router and self.probs_bias is None:  # the same steps in one C call (decode's per-op overhead)
            fast = route(self._input(h), self.weight, spec.n_expert_used, spec.norm_topk, spec.expert_weights_scale)
            if fast is not None:
                return fast
        return self.select(self.logits(h), spec, self.probs_bias)
