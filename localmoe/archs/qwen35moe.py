"""Qwen3.5 / Qwen3.6 MoE (e.g. Qwen3.6-35B-A3B, Qwen3.5-122B-A10B): a hybrid of Gated DeltaNet
layers (three of every four by default; layers/deltanet.py, state in the KVCache's recurrent part)
and full-attention layers whose queries carry a sigmoid output gate, with a per-head q/k RMS norm
and interleaved M-RoPE on text positions (layers/rope.py). Every layer's FFN is softmax → top-k →
renormalised routing over small experts plus a shared expert behind a sigmoid gate; the norm in
front of it is `post_attention_norm`. The next-token-prediction block (`nextn_predict_layers`) is
skipped as llama.cpp skips it. llama.cpp: src/models/qwen35moe.cpp, delta-net-base.cpp.
"""

from __future__ import annotations

from typing import Any

from ..errors import LocalMoEError
from ..gguf import names
from ..layers.attention import GQA
from ..layers.block import Block, Weights
from ..layers.deltanet import GatedDeltaNet
from .common import ArchSpec, DeltaNetShape, Getter, fast_paths
from .qwen3moe import feed_forward

ARCH = ArchSpec(
    "qwen35moe",
    "Qwen3.5 / Qwen3.6 MoE (e.g. Qwen3.6-35B-A3B)",
    "neox",
    qk_norm="per_head",
    norm_topk=True,
    shared_expert="gated",
    ffn_norm=names.ATTN_POST_NORM,
    checked="logits vs llama.cpp: F32, Q8_0, Q4_K_M, 200 positions through prompt and decode (tests/test_qwen35moe.py)",
)


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    """The DeltaNet sizes (ssm.*), which layers are DeltaNet (every layer but each
    full_attention_interval-th), the M-RoPE sections and the shared expert's width."""

    def need(key: str) -> int:
        value = get(key, None)
        if value is None:
            raise LocalMoEError(f"metadata key 'qwen35moe.{key}' is missing; the file is incomplete")
        return int(value)

    n_v, n_k, inner = need(names.SSM_TIME_STEP_RANK), need(names.SSM_GROUP_COUNT), need(names.SSM_INNER_SIZE)
    if n_k <= 0 or n_v % n_k or inner % n_v:
        raise LocalMoEError(
            f"qwen35moe: {n_v} value heads of {inner} values in all do not fit {n_k} key heads; the file is "
            "inconsistent"
        )
    shape = DeltaNetShape(
        d_conv=need(names.SSM_CONV_KERNEL),
        n_k_heads=n_k,
        n_v_heads=n_v,
        d_k=need(names.SSM_STATE_SIZE),
        d_v=inner // n_v,
    )
    if shape.d_k != shape.d_v:
        raise LocalMoEError(
            f"qwen35moe: DeltaNet key heads of {shape.d_k} and value heads of {shape.d_v} differ, which "
            "llama.cpp does not run either"
        )
    n_layer = int(get(names.BLOCK_COUNT, 0)) - int(get(names.NEXTN_PREDICT_LAYERS, 0) or 0)
    interval = int(get(names.FULL_ATTENTION_INTERVAL, 4) or 4)
    recurrent = tuple((il + 1) % interval != 0 for il in range(n_layer))
    sections = get(names.ROPE_DIMENSION_SECTIONS, None)
    sections = tuple(int(x) for x in sections) if isinstance(sections, list) and sections else ()
    return {
        "deltanet": shape,
        "recurrent_layers": recurrent,
        "rope_sections": sections,
        "n_ff_shexp": int(get(names.EXPERT_SHARED_FFN_LENGTH, 0) or 0),
        "norm_topk": True,  # llama.cpp's graph renormalises whatever expert_weights_norm says
    }


def required_tensors(spec: Any, layer: int) -> list[str | tuple[str, str]]:
    """What llama.cpp's loader requires of a qwen35moe block (the experts' gate and up may be one
    ffn_gate_up_exps tensor: GGUFModel splits it into the two names checked here)."""
    if spec.is_recurrent(layer):
        mixer: list[str | tuple[str, str]] = [
            names.ATTN_QKV,
            names.ATTN_GATE,
            names.SSM_CONV1D,
            (names.SSM_DT, "bias"),
            names.SSM_BETA,
            names.SSM_ALPHA,
            names.SSM_NORM,
            names.SSM_OUT,
        ]
    else:
        mixer = [names.ATTN_Q, names.ATTN_K, names.ATTN_V, names.ATTN_OUT, names.ATTN_Q_NORM, names.ATTN_K_NORM]
    return [
        names.ATTN_NORM,
        names.ATTN_POST_NORM,
        *mixer,
        names.FFN_GATE_INP,
        *names.EXPERT_PARTS,
        names.FFN_GATE_INP_SHEXP,
        names.FFN_GATE_SHEXP,
        names.FFN_UP_SHEXP,
        names.FFN_DOWN_SHEXP,
    ]


def gated_attention(w: Weights, spec: Any, i: int) -> GQA:
    """A full-attention layer: attn_q holds, per head, its d query rows then its d gate rows; they are
    reordered to [q (all heads) | k | v | gate] so one matmul gives what GQA splits."""
    q_data, q_type, (rows, cols) = w.raw(names.blk(i, names.ATTN_Q))
    H, d = spec.n_head, spec.head_dim
    if rows != 2 * H * d:
        raise LocalMoEError(
            f"qwen35moe: attn_q of layer {i} has {rows} rows, not the {2 * H * d} of {H} heads × (query + gate) of {d}"
        )
    per_head = q_data.reshape(H, 2, d, -1)  # (F32/F16: values; quantized: row bytes) of each row
    q = (per_head[:, 0].reshape(H * d, -1), q_type, (H * d, cols))
    gate = (per_head[:, 1].reshape(H * d, -1), q_type, (H * d, cols))
    k, v = (w.raw(names.blk(i, p)) for p in (names.ATTN_K, names.ATTN_V))
    return GQA(
        wqkv=w.fuse([q, k, v, gate], sources=[(q_data, q_type, (rows, cols)), k, v]),
        wo=w.linear(names.blk(i, names.ATTN_OUT)),
        qk_norm="per_head",
        q_norm=w.load(names.blk(i, names.ATTN_Q_NORM)),
        k_norm=w.load(names.blk(i, names.ATTN_K_NORM)),
        fused_qk_norm_rope="fused_qk_norm_rope" in fast_paths(spec),
        c_decode="c_decode_attention" in fast_paths(spec),
        out_gate=True,
    )


def build_block(w: Weights, spec: Any, i: int) -> Block:
    """Layer i: a Gated DeltaNet or the gated full attention, then the MoE with its gated shared expert."""
    mixer = GatedDeltaNet.load(w, i) if spec.is_recurrent(i) else gated_attention(w, spec, i)
    ffn, moe = feed_forward(w, spec, i)
    return Block(
        w.load(names.blk(i, names.ATTN_NORM)), mixer, w.load(names.blk(i, names.ATTN_POST_NORM)), ffn=ffn, moe=moe
    )
