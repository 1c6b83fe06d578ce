"""GLM-4.5 / GLM-4.5-Air: GQA with q/k/v biases (and a per-head q/k norm in the files that carry
one), partial NEOX RoPE, the FFN input normed by `post_attention_norm`, leading dense layers,
sigmoid routing with the score-correction bias (`exp_probs_b`), a plain shared expert; the
next-token-prediction block (`nextn_predict_layers`) is skipped as llama.cpp skips it.
llama.cpp: src/models/glm4-moe.cpp."""

from __future__ import annotations

from typing import Any

from ..gguf import names
from .common import GATING_SOFTMAX, ArchSpec, Getter, ffn_tensors
from .qwen3moe import build_block  # noqa: F401  (GQA + MoE, from the declarations)

ARCH = ArchSpec(
    "glm4moe",
    "GLM-4.5, GLM-4.5-Air",
    "neox",
    qk_norm="per_head",
    qk_norm_optional=True,
    qkv_bias=True,
    routings=("sigmoid_bias_groups", "softmax_topk"),
    shared_expert="plain",
    dense_leading=True,
    ffn_norm=names.ATTN_POST_NORM,
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M; decode = one pass (tests/test_oracle.py)",
)


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    n_dense_lead = int(get(names.LEADING_DENSE_BLOCK_COUNT, 0) or 0)
    shexp = tensor_shape(names.blk(n_dense_lead, names.FFN_GATE_SHEXP))
    return {
        "n_dense_lead": n_dense_lead,
        "n_ff_dense": int(get(names.FEED_FORWARD_LENGTH, 0) or 0),
        "n_expert_shared": int(get(names.EXPERT_SHARED_COUNT, 0) or 0),
        "n_ff_shexp": shexp[0] if shexp else 0,
        # llama.cpp's default for this architecture is sigmoid
        "routing": "softmax_topk"
        if int(get(names.EXPERT_GATING_FUNC, 0) or 0) == GATING_SOFTMAX
        else "sigmoid_bias_groups",
    }


def required_tensors(spec: Any, layer: int) -> list[str]:
    return [
        *names.GQA_PARTS,
        ARCH.ffn_norm,
        *ffn_tensors(spec, layer),
    ]
