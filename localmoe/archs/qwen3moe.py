"""Qwen3-MoE (e.g. Qwen3-30B-A3B): GQA with a per-head RMS norm of q and k, NEOX RoPE, softmax →
top-k → renormalised routing, no shared expert. llama.cpp: src/models/qwen3moe.cpp.

Its `build_block` reads the declarations, so the GQA architectures that differ from it only in
what they declare (biases, q/k norm kind, shared expert, sinks, routing, dense leading layers)
build their blocks with it: qwen2moe, olmoe, llama, glm4moe, gpt-oss.
"""

from __future__ import annotations

from typing import Any

from ..gguf import names
from ..layers.attention import GQA
from ..layers.block import Block, Weights
from ..layers.moe import MoE
from ..layers.routers import ROUTERS
from .common import ArchSpec, fast_paths, read_args  # noqa: F401  (read_args: nothing beyond the common keys)

ARCH = ArchSpec(
    "qwen3moe",
    "Qwen3-MoE (e.g. Qwen3-30B-A3B)",
    "neox",
    qk_norm="per_head",
    norm_topk=True,
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M, F16, BF16, Q4_1, Q5_0, Q5_1 (tests/test_oracle.py)",
)


def feed_forward(w: Weights, spec: Any, i: int) -> tuple[Any, MoE | None]:
    """Layer i's FFN as (the dense FFN, None) in a layer without experts, else (None, the MoE block):
    the router the file chose (layers/routers.py), its bias and the shared expert as declared."""
    arch = spec.arch
    if not spec.is_moe(i):
        return w.ffn(i, (names.FFN_GATE, names.FFN_UP, names.FFN_DOWN)), None
    moe = MoE.load(
        w,
        i,
        select=ROUTERS[spec.routing][0],
        shared=arch.shared_expert,
        router_bias=arch.router_bias,
        c_router="c_router" in fast_paths(spec),
    )
    return None, moe


def build_block(w: Weights, spec: Any, i: int) -> Block:
    """Layer i: GQA (with the declared biases, q/k norm kind and sinks; windowed where the file says)
    and the FFN (feed_forward)."""
    arch = spec.arch
    attn = GQA.load(w, i, qk_norm=arch.qk_norm, biases=arch.qkv_bias, sinks=arch.sinks, fast=fast_paths(spec))
    ffn, moe = feed_forward(w, spec, i)
    return Block(w.load(names.blk(i, names.ATTN_NORM)), attn, w.load(names.blk(i, arch.ffn_norm)), ffn=ffn, moe=moe)
