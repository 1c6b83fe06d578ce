"""The one place that knows GGUF key and tensor names.

Names follow llama.cpp's gguf-py `constants.py` (the source of truth for the format). Everything
else in localmoe asks this module for a name instead of spelling one out.
"""

from __future__ import annotations

# --- general / tokenizer keys ------------------------------------------------------------------
ARCHITECTURE = "general.architecture"
MODEL_NAME = "general.name"
FILE_TYPE = "general.file_type"
CHAT_TEMPLATE = "tokenizer.chat_template"
TOKENIZER_MODEL = "tokenizer.ggml.model"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"


def arch_key(arch: str, suffix: str) -> str:
    """A per-architecture hyperparameter key, e.g. arch_key("qwen3moe", "block_count")."""
    return f"{arch}.{suffix}"


# Per-architecture hyperparameter suffixes (prefix them with arch_key).
BLOCK_COUNT = "block_count"
CONTEXT_LENGTH = "context_length"
EMBEDDING_LENGTH = "embedding_length"
FEED_FORWARD_LENGTH = "feed_forward_length"
HEAD_COUNT = "attention.head_count"
HEAD_COUNT_KV = "attention.head_count_kv"
KEY_LENGTH = "attention.key_length"
VALUE_LENGTH = "attention.value_length"
RMS_EPS = "attention.layer_norm_rms_epsilon"
ROPE_FREQ_BASE = "rope.freq_base"
ROPE_DIMENSION_COUNT = "rope.dimension_count"
ROPE_SCALING_TYPE = "rope.scaling.type"
ROPE_SCALING_FACTOR = "rope.scaling.factor"
EXPERT_COUNT = "expert_count"
EXPERT_USED_COUNT = "expert_used_count"
EXPERT_FFN_LENGTH = "expert_feed_forward_length"
EXPERT_SHARED_FFN_LENGTH = "expert_shared_feed_forward_length"
EXPERT_WEIGHTS_SCALE = "expert_weights_scale"
EXPERT_WEIGHTS_NORM = "expert_weights_norm"

# --- tensors -----------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"


def blk(layer: int, name: str, kind: str = "weight") -> str:
    """Name of a per-layer tensor: blk(3, "attn_q") -> "blk.3.attn_q.weight"."""
    return f"blk.{layer}.{name}.{kind}"


# Per-layer tensor stems used with blk().
ATTN_NORM = "attn_norm"
ATTN_Q = "attn_q"
ATTN_K = "attn_k"
ATTN_V = "attn_v"
ATTN_OUT = "attn_output"
ATTN_Q_NORM = "attn_q_norm"
ATTN_K_NORM = "attn_k_norm"
FFN_NORM = "ffn_norm"
FFN_GATE_INP = "ffn_gate_inp"  # the router, [n_expert, n_embd]
FFN_GATE_EXPS = "ffn_gate_exps"  # [n_expert, n_ff_exp, n_embd]
FFN_UP_EXPS = "ffn_up_exps"  # [n_expert, n_ff_exp, n_embd]
FFN_DOWN_EXPS = "ffn_down_exps"  # [n_expert, n_embd, n_ff_exp]
FFN_GATE_INP_SHEXP = "ffn_gate_inp_shexp"  # shared-expert gate, [n_embd]
FFN_GATE_SHEXP = "ffn_gate_shexp"
FFN_UP_SHEXP = "ffn_up_shexp"
FFN_DOWN_SHEXP = "ffn_down_shexp"

# The three matrices of one routed expert, in the order an expert's buffer packs them.
EXPERT_PARTS = (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)


def is_expert_tensor(name: str) -> bool:
    """True for routed-expert weight tensors (the ones that live in the expert tiers; their biases,
    a few KiB per expert, are dense weights)."""
    return any(f".{part}.weight" in name for part in EXPERT_PARTS)

# --- keys and tensors of the architectures beyond the plain GQA MoE (llama.cpp's gguf-py constants)
EXPERT_SHARED_COUNT = "expert_shared_count"
EXPERT_GATING_FUNC = "expert_gating_func"
EXPERT_GROUP_COUNT = "expert_group_count"
EXPERT_GROUP_USED_COUNT = "expert_group_used_count"
LEADING_DENSE_BLOCK_COUNT = "leading_dense_block_count"
NEXTN_PREDICT_LAYERS = "nextn_predict_layers"
Q_LORA_RANK = "attention.q_lora_rank"
KV_LORA_RANK = "attention.kv_lora_rank"
KEY_LENGTH_MLA = "attention.key_length_mla"
VALUE_LENGTH_MLA = "attention.value_length_mla"
ROPE_ATTN_FACTOR = "rope.scaling.attn_factor"
ROPE_ORIG_CTX = "rope.scaling.original_context_length"
ROPE_YARN_LOG_MUL = "rope.scaling.yarn_log_multiplier"
ROPE_YARN_EXT_FACTOR = "rope.scaling.yarn_ext_factor"
ROPE_YARN_BETA_FAST = "rope.scaling.yarn_beta_fast"
ROPE_YARN_BETA_SLOW = "rope.scaling.yarn_beta_slow"

FFN_GATE = "ffn_gate"  # a dense layer's FFN, [n_ff, n_embd]
FFN_UP = "ffn_up"
FFN_DOWN = "ffn_down"
FFN_EXP_PROBS_B = "exp_probs_b"  # the expert-selection bias (DeepSeek-V3's e_score_correction), blk(i, …, "bias")
ATTN_Q_A = "attn_q_a"  # MLA: [q_lora_rank, n_embd]
ATTN_Q_A_NORM = "attn_q_a_norm"
ATTN_Q_B = "attn_q_b"  # [n_head · (nope + rope), q_lora_rank]
ATTN_KV_A_MQA = "attn_kv_a_mqa"  # [kv_lora_rank + rope, n_embd]
ATTN_KV_A_NORM = "attn_kv_a_norm"
ATTN_KV_B = "attn_kv_b"  # older files: [n_head · (nope + v), kv_lora_rank]
ATTN_K_B = "attn_k_b"  # [n_head, kv_lora_rank, nope]
ATTN_V_B = "attn_v_b"  # [n_head, v, kv_lora_rank]

# gpt-oss: attention sinks, sliding-window attention, the FFN's input norm, routed-expert biases
SLIDING_WINDOW = "attention.sliding_window"  # keys a query sees in a sliding-window layer (itself included)
SLIDING_WINDOW_PATTERN = "attention.sliding_window_pattern"  # n (every layer but each n-th is SWA) or a per-layer bool array
ROPE_FREQ_BASE_SWA = "rope.freq_base_swa"
ATTN_SINKS = "attn_sinks"  # [n_head]: one extra softmax logit per head, blk(i, ATTN_SINKS)
ATTN_POST_NORM = "post_attention_norm"  # the norm in front of the FFN (GLM, gpt-oss)
# routed-expert biases, blk(i, stem, "bias"): [n_expert, n_ff_exp] for gate and up, [n_expert, n_embd] for down
EXPERT_BIAS_PARTS = EXPERT_PARTS

# qwen35moe (Qwen3.5 / Qwen3.6 MoE): Gated DeltaNet layers, gated attention, M-RoPE sections
SSM_CONV_KERNEL = "ssm.conv_kernel"  # taps of the causal conv1d over q, k, v
SSM_INNER_SIZE = "ssm.inner_size"  # value width of a DeltaNet layer: value heads × value head size
SSM_STATE_SIZE = "ssm.state_size"  # key (and value) head size of a DeltaNet layer
SSM_TIME_STEP_RANK = "ssm.time_step_rank"  # value heads of a DeltaNet layer
SSM_GROUP_COUNT = "ssm.group_count"  # key heads of a DeltaNet layer
FULL_ATTENTION_INTERVAL = "full_attention_interval"  # every n-th layer is full attention, the others DeltaNet
ROPE_DIMENSION_SECTIONS = "rope.dimension_sections"  # M-RoPE: rotated pairs per position axis (t, h, w, e)
ATTN_QKV = "attn_qkv"  # DeltaNet: q, k, v fused [2·Hk·dk + Hv·dv, D] (the conv's channels)
ATTN_GATE = "attn_gate"  # DeltaNet: the output gate z [Hv·dv, D]
SSM_CONV1D = "ssm_conv1d"  # [conv channels, taps]
SSM_DT = "ssm_dt"  # blk(i, SSM_DT, "bias"): the decay's bias [Hv]
SSM_A = "ssm_a"  # −exp(A_log) [Hv]; stored without a ".weight" suffix: blk_bare(i, SSM_A)
SSM_BETA = "ssm_beta"  # [Hv, D]
SSM_ALPHA = "ssm_alpha"  # [Hv, D]
SSM_NORM = "ssm_norm"  # the gated RMS norm's weight [dv]
SSM_OUT = "ssm_out"  # [D, Hv·dv]
FFN_GATE_UP_EXPS = "ffn_gate_up_exps"  # gate and up of every expert in one tensor [n_expert, 2·n_ff_exp, n_embd]: gate rows first


def blk_bare(layer: int, name: str) -> str:
    """A per-layer tensor stored without a kind suffix: blk_bare(0, "ssm_a") -> "blk.0.ssm_a"."""
    return f"blk.{layer}.{name}"
# gemma4 (Gemma 4 26B-A4B): windowed and global layers of different shapes, norms around every
# sub-block, a dense GeGLU MLP beside the routed experts, fused gate|up experts
KEY_LENGTH_SWA = "attention.key_length_swa"  # head size of the windowed layers (key_length: the global ones)
VALUE_LENGTH_SWA = "attention.value_length_swa"
ROPE_DIMENSION_COUNT_SWA = "rope.dimension_count_swa"  # rotated dims of a windowed layer's head
SHARED_KV_LAYERS = "attention.shared_kv_layers"  # the last n layers reuse an earlier layer's KV cache
EMBEDDING_LENGTH_PER_LAYER = "embedding_length_per_layer_input"  # per-layer embeddings (the small dense Gemma 4s)
FINAL_LOGIT_SOFTCAPPING = "final_logit_softcapping"  # logits = c · tanh(logits / c)
ROPE_FREQS = "rope_freqs.weight"  # [n_rot/2]: RoPE's θ_i divided by each factor (llama.cpp's freq_factors)
PER_LAYER_TOKEN_EMBD = "per_layer_token_embd.weight"
FFN_POST_NORM = "post_ffw_norm"  # the norm of the whole FFN's output, before the residual add
FFN_PRE_NORM_2 = "pre_ffw_norm_2"  # the routed experts' input norm (the dense MLP's is ffn_norm)
FFN_POST_NORM_1 = "post_ffw_norm_1"  # the dense MLP's output norm
FFN_POST_NORM_2 = "post_ffw_norm_2"  # the routed experts' output norm
LAYER_OUT_SCALE = "layer_output_scale"  # [1]: the layer's output × this
SCALE = "scale"  # the kind of a per-row scale tensor: blk(i, FFN_GATE_INP, SCALE) [n_embd], blk(i, FFN_DOWN_EXPS, SCALE) [n_expert]
