"""The one place that knows GGUF key and tensor names.

Every name is taken from llama.cpp's gguf-py `constants.py` (the `gguf` package: `Keys` and
`TENSOR_NAMES`), the source of truth for the format; only the tensor kinds (weight, bias, scale)
are spelled here. Everything else in localmoe asks this module for a name instead of spelling one
out (tests/test_names.py keeps it so).
"""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys

_ARCH = "{arch}."  # gguf's per-architecture keys are "{arch}.<suffix>"
_LAYER = "blk.{bid}."  # gguf's per-layer tensors are "blk.{bid}.<stem>"
_LAYER_PREFIX = _LAYER.split("{")[0]  # "blk."


def _suffix(key: str) -> str:
    """gguf's "{arch}.block_count" -> "block_count" (prefix it again with arch_key)."""
    assert key.startswith(_ARCH), key
    return key[len(_ARCH) :]


def _stem(tensor: MODEL_TENSOR) -> str:
    """The per-layer stem of a gguf tensor: ATTN_Q ("blk.{bid}.attn_q") -> "attn_q"."""
    name = TENSOR_NAMES[tensor]
    assert name.startswith(_LAYER), name
    return name[len(_LAYER) :]


# --- tensor kinds: the last part of a tensor's name (blk(3, ATTN_Q, BIAS) -> "blk.3.attn_q.bias") --
WEIGHT = "weight"
BIAS = "bias"
SCALE = "scale"  # a per-row scale: blk(i, FFN_GATE_INP, SCALE) [n_embd], blk(i, FFN_DOWN_EXPS, SCALE) [n_expert]
KINDS = (WEIGHT, BIAS, SCALE)

# --- general / tokenizer keys ------------------------------------------------------------------
ARCHITECTURE = Keys.General.ARCHITECTURE
MODEL_NAME = Keys.General.NAME
CHAT_TEMPLATE = Keys.Tokenizer.CHAT_TEMPLATE


def arch_key(arch: str, suffix: str) -> str:
    """A per-architecture hyperparameter key, e.g. arch_key("qwen3moe", "block_count")."""
    return f"{arch}.{suffix}"


# Per-architecture hyperparameter suffixes (prefix them with arch_key).
BLOCK_COUNT = _suffix(Keys.LLM.BLOCK_COUNT)
CONTEXT_LENGTH = _suffix(Keys.LLM.CONTEXT_LENGTH)
EMBEDDING_LENGTH = _suffix(Keys.LLM.EMBEDDING_LENGTH)
FEED_FORWARD_LENGTH = _suffix(Keys.LLM.FEED_FORWARD_LENGTH)
HEAD_COUNT = _suffix(Keys.Attention.HEAD_COUNT)
HEAD_COUNT_KV = _suffix(Keys.Attention.HEAD_COUNT_KV)
KEY_LENGTH = _suffix(Keys.Attention.KEY_LENGTH)
VALUE_LENGTH = _suffix(Keys.Attention.VALUE_LENGTH)
RMS_EPS = _suffix(Keys.Attention.LAYERNORM_RMS_EPS)
ROPE_FREQ_BASE = _suffix(Keys.Rope.FREQ_BASE)
ROPE_DIMENSION_COUNT = _suffix(Keys.Rope.DIMENSION_COUNT)
ROPE_SCALING_TYPE = _suffix(Keys.Rope.SCALING_TYPE)
ROPE_SCALING_FACTOR = _suffix(Keys.Rope.SCALING_FACTOR)
EXPERT_COUNT = _suffix(Keys.LLM.EXPERT_COUNT)
EXPERT_USED_COUNT = _suffix(Keys.LLM.EXPERT_USED_COUNT)
EXPERT_FFN_LENGTH = _suffix(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
EXPERT_SHARED_FFN_LENGTH = _suffix(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)
EXPERT_WEIGHTS_SCALE = _suffix(Keys.LLM.EXPERT_WEIGHTS_SCALE)
EXPERT_WEIGHTS_NORM = _suffix(Keys.LLM.EXPERT_WEIGHTS_NORM)

# --- tensors -----------------------------------------------------------------------------------
TOKEN_EMBD = f"{TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]}.{WEIGHT}"
OUTPUT_NORM = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM]}.{WEIGHT}"
OUTPUT = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}.{WEIGHT}"


def blk(layer: int, name: str, kind: str = WEIGHT) -> str:
    """Name of a per-layer tensor: blk(3, "attn_q") -> "blk.3.attn_q.weight"."""
    return f"{blk_bare(layer, name)}.{kind}"


def blk_bare(layer: int, name: str) -> str:
    """A per-layer tensor stored without a kind suffix: blk_bare(0, "ssm_a") -> "blk.0.ssm_a"."""
    return _LAYER.format(bid=layer) + name


def split(name: str) -> tuple[int | None, str, str]:
    """A tensor name's parts, the inverse of blk / blk_bare: "blk.3.attn_q.weight" -> (3, "attn_q",
    "weight"); "token_embd.weight" -> (None, "token_embd", "weight"); "blk.0.ssm_a" -> (0, "ssm_a", "")."""
    layer = None
    if name.startswith(_LAYER_PREFIX):
        _, number, name = name.split(".", 2)
        layer = int(number)
    stem, _, kind = name.rpartition(".")
    return (layer, stem, kind) if kind in KINDS and stem else (layer, name, "")


def layer_of(name: str) -> int | None:
    """The layer a tensor belongs to; None for the model-wide ones (embedding, output)."""
    return split(name)[0]


# Per-layer tensor stems used with blk().
ATTN_NORM = _stem(MODEL_TENSOR.ATTN_NORM)
ATTN_Q = _stem(MODEL_TENSOR.ATTN_Q)
ATTN_K = _stem(MODEL_TENSOR.ATTN_K)
ATTN_V = _stem(MODEL_TENSOR.ATTN_V)
ATTN_OUT = _stem(MODEL_TENSOR.ATTN_OUT)
ATTN_Q_NORM = _stem(MODEL_TENSOR.ATTN_Q_NORM)
ATTN_K_NORM = _stem(MODEL_TENSOR.ATTN_K_NORM)
FFN_NORM = _stem(MODEL_TENSOR.FFN_NORM)
FFN_GATE_INP = _stem(MODEL_TENSOR.FFN_GATE_INP)  # the router, [n_expert, n_embd]
FFN_GATE_EXPS = _stem(MODEL_TENSOR.FFN_GATE_EXP)  # [n_expert, n_ff_exp, n_embd]
FFN_UP_EXPS = _stem(MODEL_TENSOR.FFN_UP_EXP)  # [n_expert, n_ff_exp, n_embd]
FFN_DOWN_EXPS = _stem(MODEL_TENSOR.FFN_DOWN_EXP)  # [n_expert, n_embd, n_ff_exp]
FFN_GATE_INP_SHEXP = _stem(MODEL_TENSOR.FFN_GATE_INP_SHEXP)  # shared-expert gate, [n_embd]
FFN_GATE_SHEXP = _stem(MODEL_TENSOR.FFN_GATE_SHEXP)
FFN_UP_SHEXP = _stem(MODEL_TENSOR.FFN_UP_SHEXP)
FFN_DOWN_SHEXP = _stem(MODEL_TENSOR.FFN_DOWN_SHEXP)

# The three matrices of one routed expert, in the order an expert's buffer packs them.
EXPERT_PARTS = (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)

# A grouped-query attention block's tensors: its input norm, the q, k, v and output projections.
GQA_PARTS = (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)


def is_expert_tensor(name: str) -> bool:
    """True for routed-expert weight tensors (the ones that live in the expert tiers; their biases,
    a few KiB per expert, are dense weights)."""
    _, stem, kind = split(name)
    return kind == WEIGHT and stem in EXPERT_PARTS


def is_expert_bias(name: str) -> bool:
    """True for routed-expert bias tensors (gpt-oss), float32 beside the experts' bytes."""
    _, stem, kind = split(name)
    return kind == BIAS and stem in EXPERT_BIAS_PARTS


# --- keys and tensors of the architectures beyond the plain GQA MoE
EXPERT_SHARED_COUNT = _suffix(Keys.LLM.EXPERT_SHARED_COUNT)
EXPERT_GATING_FUNC = _suffix(Keys.LLM.EXPERT_GATING_FUNC)
EXPERT_GROUP_COUNT = _suffix(Keys.LLM.EXPERT_GROUP_COUNT)
EXPERT_GROUP_USED_COUNT = _suffix(Keys.LLM.EXPERT_GROUP_USED_COUNT)
LEADING_DENSE_BLOCK_COUNT = _suffix(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)
NEXTN_PREDICT_LAYERS = _suffix(Keys.LLM.NEXTN_PREDICT_LAYERS)
Q_LORA_RANK = _suffix(Keys.Attention.Q_LORA_RANK)
KV_LORA_RANK = _suffix(Keys.Attention.KV_LORA_RANK)
KEY_LENGTH_MLA = _suffix(Keys.Attention.KEY_LENGTH_MLA)
VALUE_LENGTH_MLA = _suffix(Keys.Attention.VALUE_LENGTH_MLA)
ROPE_ATTN_FACTOR = _suffix(Keys.Rope.SCALING_ATTN_FACTOR)
ROPE_ORIG_CTX = _suffix(Keys.Rope.SCALING_ORIG_CTX_LEN)
ROPE_YARN_LOG_MUL = _suffix(Keys.Rope.SCALING_YARN_LOG_MUL)
ROPE_YARN_EXT_FACTOR = _suffix(Keys.Rope.SCALING_YARN_EXT_FACTOR)
ROPE_YARN_BETA_FAST = _suffix(Keys.Rope.SCALING_YARN_BETA_FAST)
ROPE_YARN_BETA_SLOW = _suffix(Keys.Rope.SCALING_YARN_BETA_SLOW)

FFN_GATE = _stem(MODEL_TENSOR.FFN_GATE)  # a dense layer's FFN, [n_ff, n_embd]
FFN_UP = _stem(MODEL_TENSOR.FFN_UP)
FFN_DOWN = _stem(MODEL_TENSOR.FFN_DOWN)
FFN_EXP_PROBS_B = _stem(
    MODEL_TENSOR.FFN_EXP_PROBS_B
)  # the expert-selection bias (DeepSeek-V3's e_score_correction), blk(i, …, BIAS)
ATTN_Q_A = _stem(MODEL_TENSOR.ATTN_Q_A)  # MLA: [q_lora_rank, n_embd]
ATTN_Q_A_NORM = _stem(MODEL_TENSOR.ATTN_Q_A_NORM)
ATTN_Q_B = _stem(MODEL_TENSOR.ATTN_Q_B)  # [n_head · (nope + rope), q_lora_rank]
ATTN_KV_A_MQA = _stem(MODEL_TENSOR.ATTN_KV_A_MQA)  # [kv_lora_rank + rope, n_embd]
ATTN_KV_A_NORM = _stem(MODEL_TENSOR.ATTN_KV_A_NORM)
ATTN_KV_B = _stem(MODEL_TENSOR.ATTN_KV_B)  # older files: [n_head · (nope + v), kv_lora_rank]
ATTN_K_B = _stem(MODEL_TENSOR.ATTN_K_B)  # [n_head, kv_lora_rank, nope]
ATTN_V_B = _stem(MODEL_TENSOR.ATTN_V_B)  # [n_head, v, kv_lora_rank]
# the next-token-prediction (MTP) block past the trunk (GLM-4.5; skipped, as llama.cpp skips it)
NEXTN_EH_PROJ = _stem(MODEL_TENSOR.NEXTN_EH_PROJ)  # [n_embd, 2·n_embd]
NEXTN_ENORM = _stem(MODEL_TENSOR.NEXTN_ENORM)
NEXTN_HNORM = _stem(MODEL_TENSOR.NEXTN_HNORM)

# gpt-oss: attention sinks, sliding-window attention, the FFN's input norm, routed-expert biases
SLIDING_WINDOW = _suffix(Keys.Attention.SLIDING_WINDOW)  # keys a query sees in a sliding-window layer (itself included)
SLIDING_WINDOW_PATTERN = _suffix(
    Keys.Attention.SLIDING_WINDOW_PATTERN
)  # n (every layer but each n-th is SWA) or a per-layer bool array
ROPE_FREQ_BASE_SWA = _suffix(Keys.Rope.FREQ_BASE_SWA)
ATTN_SINKS = _stem(MODEL_TENSOR.ATTN_SINKS)  # [n_head]: one extra softmax logit per head, blk(i, ATTN_SINKS)
ATTN_POST_NORM = _stem(MODEL_TENSOR.ATTN_POST_NORM)  # the norm in front of the FFN (GLM, gpt-oss)
# routed-expert biases, blk(i, stem, BIAS): [n_expert, n_ff_exp] for gate and up, [n_expert, n_embd] for down
EXPERT_BIAS_PARTS = EXPERT_PARTS

# qwen35moe (Qwen3.5 / Qwen3.6 MoE): Gated DeltaNet layers, gated attention, M-RoPE sections
SSM_CONV_KERNEL = _suffix(Keys.SSM.CONV_KERNEL)  # taps of the causal conv1d over q, k, v
SSM_INNER_SIZE = _suffix(Keys.SSM.INNER_SIZE)  # value width of a DeltaNet layer: value heads × value head size
SSM_STATE_SIZE = _suffix(Keys.SSM.STATE_SIZE)  # key (and value) head size of a DeltaNet layer
SSM_TIME_STEP_RANK = _suffix(Keys.SSM.TIME_STEP_RANK)  # value heads of a DeltaNet layer
SSM_GROUP_COUNT = _suffix(Keys.SSM.GROUP_COUNT)  # key heads of a DeltaNet layer
FULL_ATTENTION_INTERVAL = _suffix(
    Keys.LLM.FULL_ATTENTION_INTERVAL
)  # every n-th layer is full attention, the others DeltaNet
ROPE_DIMENSION_SECTIONS = _suffix(Keys.Rope.DIMENSION_SECTIONS)  # M-RoPE: rotated pairs per position axis (t, h, w, e)
ATTN_QKV = _stem(MODEL_TENSOR.ATTN_QKV)  # DeltaNet: q, k, v fused [2·Hk·dk + Hv·dv, D] (the conv's channels)
ATTN_GATE = _stem(MODEL_TENSOR.ATTN_GATE)  # DeltaNet: the output gate z [Hv·dv, D]
SSM_CONV1D = _stem(MODEL_TENSOR.SSM_CONV1D)  # [conv channels, taps]
SSM_DT = _stem(MODEL_TENSOR.SSM_DT)  # blk(i, SSM_DT, BIAS): the decay's bias [Hv]
SSM_A = _stem(MODEL_TENSOR.SSM_A)  # −exp(A_log) [Hv]; stored without a kind suffix: blk_bare(i, SSM_A)
SSM_BETA = _stem(MODEL_TENSOR.SSM_BETA)  # [Hv, D]
SSM_ALPHA = _stem(MODEL_TENSOR.SSM_ALPHA)  # [Hv, D]
SSM_NORM = _stem(MODEL_TENSOR.SSM_NORM)  # the gated RMS norm's weight [dv]
SSM_OUT = _stem(MODEL_TENSOR.SSM_OUT)  # [D, Hv·dv]
FFN_GATE_UP_EXPS = _stem(
    MODEL_TENSOR.FFN_GATE_UP_EXP
)  # gate and up of every expert in one tensor [n_expert, 2·n_ff_exp, n_embd]: gate rows first

# gemma4 (Gemma 4 26B-A4B): windowed and global layers of different shapes, norms around every
# sub-block, a dense GeGLU MLP beside the routed experts, fused gate|up experts
KEY_LENGTH_SWA = _suffix(
    Keys.Attention.KEY_LENGTH_SWA
)  # head size of the windowed layers (key_length: the global ones)
VALUE_LENGTH_SWA = _suffix(Keys.Attention.VALUE_LENGTH_SWA)
ROPE_DIMENSION_COUNT_SWA = _suffix(Keys.Rope.DIMENSION_COUNT_SWA)  # rotated dims of a windowed layer's head
SHARED_KV_LAYERS = _suffix(Keys.Attention.SHARED_KV_LAYERS)  # the last n layers reuse an earlier layer's KV cache
EMBEDDING_LENGTH_PER_LAYER = _suffix(
    Keys.LLM.EMBD_LENGTH_PER_LAYER_INP
)  # per-layer embeddings (the small dense Gemma 4s)
FINAL_LOGIT_SOFTCAPPING = _suffix(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)  # logits = c · tanh(logits / c)
# [n_rot/2]: RoPE's θ_i divided by each factor (llama.cpp's freq_factors)
ROPE_FREQS = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.{WEIGHT}"
PER_LAYER_TOKEN_EMBD = f"{TENSOR_NAMES[MODEL_TENSOR.PER_LAYER_TOKEN_EMBD]}.{WEIGHT}"
FFN_POST_NORM = _stem(MODEL_TENSOR.FFN_POST_NORM)  # the norm of the whole FFN's output, before the residual add
FFN_PRE_NORM_2 = _stem(MODEL_TENSOR.FFN_PRE_NORM_2)  # the routed experts' input norm (the dense MLP's is ffn_norm)
FFN_POST_NORM_1 = _stem(MODEL_TENSOR.FFN_POST_NORM_1)  # the dense MLP's output norm
FFN_POST_NORM_2 = _stem(MODEL_TENSOR.FFN_POST_NORM_2)  # the routed experts' output norm
LAYER_OUT_SCALE = _stem(MODEL_TENSOR.LAYER_OUT_SCALE)  # [1]: the layer's output × this
