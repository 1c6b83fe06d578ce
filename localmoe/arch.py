"""Architectures: one small description each, read by the one shared forward pass (model.py).

Each field mirrors what llama.cpp's graph for that architecture does, so that our logits match its
logits on the same file. Adding an architecture means adding one entry here (and, if it needs a
new kind of step, one branch in model.py) — nothing in the expert cache code changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RopeStyle = Literal["neox", "norm"]  # neox: rotate halves (i, i+d/2); norm: adjacent pairs (2i, 2i+1)
QKNorm = Literal["none", "per_head", "full"]  # RMS-norm of q and k: none, over each head, over all heads


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_style: RopeStyle
    qk_norm: QKNorm
    norm_topk: bool  # renormalise the top-k router probabilities to sum to 1 (unless the file says otherwise)
    shared_expert: bool  # a dense shared expert with a sigmoid gate runs beside the routed ones
    description: str


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("qwen3moe", "neox", "per_head", True, False, "Qwen3-MoE (e.g. Qwen3-30B-A3B)"),
        ArchSpec("qwen2moe", "neox", "none", False, True, "Qwen1.5/Qwen2-MoE, with shared expert"),
        ArchSpec("olmoe", "neox", "full", False, False, "OLMoE"),
        ArchSpec("llama", "norm", "none", True, False, "Mixtral-style llama files with expert_count > 0"),
    )
}


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)
