"""A dense gated FFN — the FFN of a layer without experts, or a shared expert — on the layout and
activation function the routed experts use (compute/experts.py): x [T, D] → down(act(gate·x, up·x))."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compute.experts import ExpertWeights, swiglu_expert


@dataclass
class FFN:
    w: ExpertWeights  # gate|up [2·n_ff, D], down [D, n_ff], the activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_expert(self.w, x)  # [T, D]
