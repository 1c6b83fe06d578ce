"""DeepSeek-V2 / V2-Lite (and V3-style routing read from the same architecture): multi-head latent
attention, YaRN with its attention factor, leading dense layers, shared experts, softmax (V2) or
sigmoid + score-correction bias + expert groups (V3) routing. llama.cpp: src/models/deepseek2.cpp.

MLA runs as llama.cpp runs it for files with split attn_k_b / attn_v_b (key_length_mla set): the
cache holds kv_lora_rank + n_rot floats per position, queries are absorbed through k_b, values
decompressed through v_b. Older files with one attn_kv_b are split at load.
"""

from __future__ import annotations

import math
from typing import Any

from ..gguf import names
from ..layers.block import Block, Weights
from ..layers.mla import MLA
from .common import GATING_SIGMOID, ArchSpec, Getter, ffn_tensors
from .qwen3moe import feed_forward

ARCH = ArchSpec(
    "deepseek2",
    "DeepSeek-V2, V2-Lite (V3-style sigmoid/group routing when the file says so)",
    "norm",
    attention="mla",
    routings=("softmax_topk", "sigmoid_bias_groups"),
    shared_expert="plain",
    dense_leading=True,
    rope_scalings=("none", "linear", "yarn"),
    checked=(
        "logits vs llama.cpp: F32 and Q8_0, q_lora_rank 0 and > 0, softmax and sigmoid+bias+groups routing, YaRN "
        "(tests/test_deepseek2.py)"
    ),
)


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    def need(suffix: str) -> Any:
        value = get(suffix, None)
        if value is None:
            from ..errors import LocalMoEError

            raise LocalMoEError(f"metadata key 'deepseek2.{suffix}' is missing; the file is incomplete")
        return value

    out: dict[str, Any] = {
        "kv_lora_rank": int(need(names.KV_LORA_RANK)),
        "q_lora_rank": int(get(names.Q_LORA_RANK, 0) or 0),
        "n_dense_lead": int(get(names.LEADING_DENSE_BLOCK_COUNT, 0) or 0),
        "n_ff_dense": int(get(names.FEED_FORWARD_LENGTH, 0) or 0),
        "n_expert_shared": int(need(names.EXPERT_SHARED_COUNT)),
        "routing": "sigmoid_bias_groups"
        if int(get(names.EXPERT_GATING_FUNC, 0) or 0) == GATING_SIGMOID
        else "softmax_topk",
        # llama.cpp stores 0.1·mscale_all_dim in the file and divides it back out for this architecture
        "yarn_log_mul": float(get(names.ROPE_YARN_LOG_MUL, 0.0) or 0.0) / 0.1,
    }
    k_mla, v_mla = get(names.KEY_LENGTH_MLA, 0), get(names.VALUE_LENGTH_MLA, 0)
    if k_mla and v_mla:  # split k_b / v_b files: key_length is the latent's (r + rope)
        out["head_dim"], out["head_dim_v"] = int(k_mla), int(v_mla)
    shexp = tensor_shape(names.blk(out["n_dense_lead"], names.FFN_GATE_SHEXP))
    out["n_ff_shexp"] = shexp[0] if shexp else 0
    return out


def attn_scale(spec: Any) -> float:
    """llama.cpp's kq_scale: mscale² / sqrt(head_dim), mscale = the YaRN attention factor before
    the rope's own adjustment, × (1 + 0.1 · yarn_log_mul · ln(1/freq_scale))."""
    ln = math.log(1.0 / spec.rope_freq_scale)
    org = spec.rope_attn_factor * (1.0 + 0.1 * ln) if spec.yarn_ext_factor != 0.0 else spec.rope_attn_factor
    mscale = org * (1.0 + 0.1 * spec.yarn_log_mul * ln)
    return mscale * mscale / math.sqrt(spec.head_dim)


def required_tensors(spec: Any, layer: int) -> list[str]:
    q = [names.ATTN_Q_A, names.ATTN_Q_A_NORM, names.ATTN_Q_B] if spec.q_lora_rank else [names.ATTN_Q]
    return [
        names.ATTN_NORM,
        *q,
        names.ATTN_KV_A_MQA,
        names.ATTN_KV_A_NORM,
        names.ATTN_OUT,
        names.FFN_NORM,
        *ffn_tensors(spec, layer),
    ]


def build_block(w: Weights, spec: Any, i: int) -> Block:
    """Layer i: MLA (layers/mla.py), then a dense FFN (the leading layers) or the MoE block with the
    plain shared experts and the router the file chose (softmax, or sigmoid + selection bias + groups)."""
    ffn, moe = feed_forward(w, spec, i)
    attn_norm, ffn_norm = w.load(names.blk(i, names.ATTN_NORM)), w.load(names.blk(i, spec.arch.ffn_norm))
    return Block(attn_norm, MLA.load(w, i), ffn_norm, ffn=ffn, moe=moe)
