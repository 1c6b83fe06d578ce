"""What every architecture shares: the declaration dataclass, the hyperparameters every file has,
YaRN's attention factor, the tensors a file must have, and the fast-path predicates.

One module per architecture (qwen3moe.py, deepseek2.py, ...) declares what it has in an `ArchSpec`,
reads its own GGUF keys in `read_args` and builds its decoder block in `build_block` from the shared
pieces in localmoe/layers/; the forward driver (localmoe/model.py) only runs the blocks, and each C
fast path runs only when the declarations say it fits (`fast_paths`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..gguf import names

RopeStyle = Literal["neox", "norm"]  # neox: rotate halves (i, i+d/2); norm: adjacent pairs (2i, 2i+1)
QKNorm = Literal["none", "per_head", "full"]  # RMS-norm of q and k: none, over each head, over all heads
Routing = Literal["softmax_topk", "topk_softmax", "sigmoid_bias_groups"]
Attention = Literal["gqa", "mla"]  # grouped-query attention, or DeepSeek's multi-head latent attention
SharedExpert = Literal["none", "gated", "plain"]  # gated: sigmoid(h·g) · shexp(h) (Qwen2-MoE); plain: + shexp(h)
RopeScaling = Literal["none", "linear", "yarn"]
ExpertAct = Literal[
    "swiglu", "swiglu_oai", "geglu"
]  # silu(g)·u, gpt-oss's clamped variant, gelu(g)·u (compute/experts.py)

# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values (key `{arch}.expert_gating_func`)
GATING_SOFTMAX, GATING_SIGMOID = 1, 2


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture has. Fast paths and loaders read these declarations, nothing else."""

    name: str
    description: str
    rope_style: RopeStyle
    attention: Attention = "gqa"
    qk_norm: QKNorm = "none"
    qk_norm_optional: bool = False  # the q/k norm runs only in files that carry its weights
    qkv_bias: bool = False  # q/k/v projections carry biases
    routings: tuple[Routing, ...] = ("softmax_topk",)  # the routing kinds files of this arch may choose
    norm_topk: bool = False  # default for renormalising the top-k weights (the file's key wins)
    shared_expert: SharedExpert = "none"
    dense_leading: bool = False  # the first `leading_dense_block_count` blocks have a dense FFN, no experts
    rope_scalings: tuple[RopeScaling, ...] = ("none", "linear")
    ffn_norm: str = names.FFN_NORM  # the stem of the norm in front of the FFN (GLM: post_attention_norm)
    sinks: bool = False  # per-head attention sinks: one extra logit per head in the softmax's denominator
    sliding_window: bool = False  # sliding-window attention on the layers the file marks (ModelSpec.swa_layers)
    router_bias: bool = False  # the router's logits carry a bias (ffn_gate_inp.bias) before selection
    expert_bias: bool = False  # routed experts carry biases on gate, up and down
    expert_act: ExpertAct = "swiglu"
    swa_shapes: bool = False  # windowed layers have their own head size, KV heads and RoPE (read_args reads them)
    checked: str = ""  # how the implementation was checked against llama.cpp (docs/models.md)


@dataclass(frozen=True)
class DeltaNetShape:
    """The sizes of a Gated DeltaNet layer (qwen35moe), from the file's ssm.* keys: Hk key heads and
    Hv value heads (Hv a multiple of Hk), each key head dk wide and each value head dv wide, and a
    causal conv1d of d_conv taps over the q, k, v channels."""

    d_conv: int
    n_k_heads: int  # ssm.group_count
    n_v_heads: int  # ssm.time_step_rank
    d_k: int  # ssm.state_size
    d_v: int  # ssm.inner_size / n_v_heads

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.d_k

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.d_v

    @property
    def conv_dim(self) -> int:  # channels of the conv: q, k and v
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self) -> int:
        """float32 bytes of one layer's recurrent state: the conv's last d_conv − 1 inputs and the
        delta rule's [Hv, dk, dv] matrix."""
        return 4 * (self.conv_dim * (self.d_conv - 1) + self.n_v_heads * self.d_k * self.d_v)


# -- fast paths: each needs what its C kernel assumes, read from the declarations ------------------
FAST_PATHS = ("c_router", "c_decode_attention", "fused_qk_norm_rope", "embedding_gather", "fused_experts")


def fast_paths(spec: Any) -> frozenset[str]:
    """The C fast paths `spec` (a ModelSpec) may take. The C router is softmax → top-k (→ renorm,
    scale) over unbiased logits of all experts; the decode attention takes any GQA layer's [q | k |
    v] row once its biases, norms and RoPE are applied (by torch where the fused step does not
    apply), with the layer's sliding window and sinks; the fused q/k-norm+RoPE (which the one-C-call
    decode layer requires too) assumes GQA heads with no biases, sinks or window and a norm per head
    or none; the fused expert kernels (one C call per decode layer, the GPU's device-routed decode)
    compute silu(g)·u without biases; the embedding gather assumes a plain lookup."""
    arch: ArchSpec = spec.arch
    out = {"embedding_gather"}
    if spec.routing == "softmax_topk" and spec.n_expert_groups <= 1 and not arch.router_bias:
        out.add("c_router")
    if arch.attention == "gqa":
        out.add("c_decode_attention")
        if not arch.sinks and not arch.sliding_window and not arch.qkv_bias and arch.qk_norm != "full":
            out.add("fused_qk_norm_rope")
    if arch.expert_act == "swiglu" and not arch.expert_bias:
        out.add("fused_experts")
    return frozenset(out)


# -- GGUF keys: the reader hands each module a getter -----------------------------------------------
Getter = Callable[[str, Any], Any]  # get(suffix, default) → value of "{arch}.{suffix}" or default


def read_args(get: Getter, tensor_shape: Callable[[str], tuple[int, ...] | None]) -> dict[str, Any]:
    """Default: nothing beyond the fields every architecture reads (gguf/file.py)."""
    return {}


# -- RoPE (the rotation itself: localmoe/layers/rope.py) ---------------------------------------------
def yarn_attn_factor(arch_name: str, freq_scale: float, log_mul: float, file_attn_factor: float) -> float:
    """cparams.yarn_attn_factor as llama.cpp's context sets it for a YaRN file (ext_factor ≠ 0):
    get_mscale(factor, m) / get_mscale(factor, m_all) (DeepSeek-V2's special case m = m_all),
    divided by the 1 + 0.1·ln(factor) that ggml's rope multiplies back in, times the file's factor."""

    def get_mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

    factor = 1.0 / freq_scale
    if log_mul != 0.0:
        m = log_mul if arch_name == "deepseek2" and log_mul != 1.0 else 1.0
        f = get_mscale(factor, m) / get_mscale(factor, log_mul)
    else:
        f = get_mscale(factor, 1.0)
    return f / (1.0 + 0.1 * math.log(factor)) * file_attn_factor


# -- tensors a file must have ------------------------------------------------------------------------
def required_tensors(spec: Any, layer: int) -> list[str]:
    """Per-layer tensor stems (with blk()) a GQA file of `spec.arch` must hold."""
    arch: ArchSpec = spec.arch
    stems = [*names.GQA_PARTS, arch.ffn_norm]
    if arch.qk_norm != "none" and not arch.qk_norm_optional:
        stems += [names.ATTN_Q_NORM, names.ATTN_K_NORM]
    stems += ffn_tensors(spec, layer)
    return stems


def ffn_tensors(spec: Any, layer: int) -> list[str]:
    """The FFN stems of `layer`: a dense SwiGLU in the leading dense layers, else router + experts
    (+ the shared expert, + its gate when gated)."""
    arch: ArchSpec = spec.arch
    if not spec.is_moe(layer):
        return [names.FFN_GATE, names.FFN_UP, names.FFN_DOWN]
    stems = [names.FFN_GATE_INP, *names.EXPERT_PARTS]
    if arch.shared_expert != "none":
        stems += [names.FFN_GATE_SHEXP, names.FFN_UP_SHEXP, names.FFN_DOWN_SHEXP]
    if arch.shared_expert == "gated":
        stems += [names.FFN_GATE_INP_SHEXP]
    return stems
