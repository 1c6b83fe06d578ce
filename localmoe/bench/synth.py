"""Random-weight MoE GGUF files, for tests and for benchmarks without downloads.

`write_model(path, SynthConfig(...))` writes a file of any supported architecture that both
llama.cpp and localmoe load, with a small byte-level BPE vocabulary (llama.cpp's `gpt2` tokenizer)
and a ChatML template. `quantize_with_llama_cpp` re-quantizes it with llama.cpp's own quantizer,
which is how K-quant (`Q4_K_M`) files are made: real mixed files, as users have them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quant_shape_to_byte_shape, quantize

from ..gguf import names
from ..gguf.qtypes import FILE_TYPES
from ..errors import LocalMoEError
from ..tokenizer import CHATML_TEMPLATE

Q = GGMLQuantizationType
# What `weight_type` may be for the big matrices; norms and routers stay F32 as llama.cpp keeps them.
WRITE_TYPES = {
    "F32": (Q.F32, LlamaFileType.ALL_F32),
    "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# What llama.cpp's quantizer may make of a Q8_0 file here: its file types (llama.h's LLAMA_FTYPE_MOSTLY_*) that
# localmoe reads
LLAMA_FTYPES = {name: int(ftype) for name, ftype in FILE_TYPES.items()}


@dataclass(frozen=True)
class SynthConfig:
    arch: str = "qwen3moe"
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # None → n_embd // n_head
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_ff_shexp: int = 256  # qwen2moe only
    n_vocab: int = 384  # padded with unused tokens past the real byte-level vocabulary
    n_ctx: int = 512
    weight_type: str = "F32"
    seed: int = 0
    name: str = "localmoe-synthetic"
    chat_template: str = CHATML_TEMPLATE
    # deepseek2 (MLA, dense leading layers, shared experts, V2/V3 routing, YaRN)
    kv_lora_rank: int = 64
    q_lora_rank: int = 0  # 0: q = wq·h (V2-Lite); else q = wq_b·rms(wq_a·h)
    qk_rope: int = 16  # rotated dims of each head (rope.dimension_count)
    v_head_dim: int = 32
    n_dense_lead: int = 0  # leading dense blocks
    n_ff_dense: int = 512
    n_expert_shared: int = 1
    gating: str = "softmax"  # softmax (V2) | sigmoid (V3: + exp_probs_b selection bias)
    n_expert_groups: int = 0
    n_group_used: int = 0
    expert_weights_norm: bool | None = None  # None: the architecture's default (key not written)
    expert_weights_scale: float = 0.0  # 0: key not written
    yarn_factor: float = 0.0  # > 0: YaRN rope scaling with this factor
    yarn_orig_ctx: int = 0
    yarn_log_mul: float = 0.0  # mscale_all_dim (written as 0.1·value, as llama.cpp's converter does)
    n_nextn: int = 0  # glm4moe: next-token-prediction blocks after the trunk (llama.cpp and localmoe skip them)
    # gpt-oss (attention sinks, sliding window on alternate layers, biases everywhere, clamped SwiGLU)
    n_swa: int = 128  # the window of the sliding-window layers (the even ones: llama.cpp's default pattern 2)
    # qwen35moe (Gated DeltaNet layers + gated full attention, qk_rope rotated dims with M-RoPE sections)
    ssm_k_heads: int = 2  # DeltaNet key heads (ssm.group_count)
    ssm_v_heads: int = 4  # DeltaNet value heads (ssm.time_step_rank)
    ssm_head_dim: int = 32  # DeltaNet key and value head size (ssm.state_size)
    ssm_conv: int = 4  # conv taps (ssm.conv_kernel)
    full_attn_interval: int = 4  # every n-th layer is full attention
    rope_sections: tuple[int, ...] = (11, 11, 10, 0)
    gate_up_fused: bool = False  # experts' gate and up in one ffn_gate_up_exps tensor
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    # gemma4 (windowed layers of n_head_kv × head_dim, every swa_period-th layer global with its own
    # shape and proportional RoPE; a dense GeGLU MLP of n_ff_dense beside the experts; soft-capped logits)
    swa_period: int = (
        6  # layer i is global when i % swa_period == swa_period − 1, and the last (Gemma 4: 5 windowed, 1 global)
    )
    n_head_kv_global: int = 2
    head_dim_global: int = 512
    global_rotary: float = 0.25  # share of a global head's dims RoPE rotates ("proportional": rope_freqs)
    rope_base_swa: float = 10000.0
    final_softcap: float = 30.0
    tied_output: bool = False  # no output.weight: the head is the embedding (as Gemma's files are)


# Presets with the expert shapes of real models (layers and quant type are chosen per use).
PRESETS: dict[str, SynthConfig] = {
    "tiny-moe": SynthConfig("qwen3moe", 2, 256, 4, 2, 64, 8, 2, 256, name="synthetic-tiny-moe"),
    "qwen3-30b-a3b": SynthConfig(
        "qwen3moe", 4, 2048, 32, 4, 128, 128, 8, 768, n_vocab=32768, n_ctx=4096, name="synthetic-qwen3-30b-a3b"
    ),
    "mixtral-8x7b": SynthConfig(
        "llama", 4, 4096, 32, 8, 128, 8, 2, 14336, n_vocab=32000, n_ctx=4096, name="synthetic-mixtral-8x7b"
    ),
    "olmoe-1b-7b": SynthConfig(
        "olmoe", 4, 2048, 16, 16, 128, 64, 8, 1024, n_vocab=50304, n_ctx=4096, name="synthetic-olmoe-1b-7b"
    ),
    # DeepSeek-V2-Lite's config.json: q_lora_rank null, kv_lora_rank 512, qk_rope 64 + qk_nope 128,
    # v_head_dim 128, 64 routed experts (top-6, softmax, not renormalised) + 2 shared of 1408,
    # first_k_dense_replace 1 (intermediate 10944), YaRN factor 40 over 4096, mscale_all_dim 0.707
    "deepseek-v2-lite": SynthConfig(
        "deepseek2",
        4,
        2048,
        16,
        16,
        192,
        64,
        6,
        1408,
        n_vocab=102400,
        n_ctx=163840,
        name="synthetic-deepseek-v2-lite",
        kv_lora_rank=512,
        q_lora_rank=0,
        qk_rope=64,
        v_head_dim=128,
        n_dense_lead=1,
        n_ff_dense=10944,
        n_expert_shared=2,
        gating="softmax",
        expert_weights_norm=False,
        expert_weights_scale=1.0,
        yarn_factor=40.0,
        yarn_orig_ctx=4096,
        yarn_log_mul=0.707,
    ),
    # gpt-oss-20b's config.json: 24 layers of 2880, 64 heads (8 KV) of 64, 32 experts (top-4) of
    # 2880, sliding_window 128 on every other layer, rope_theta 150000 with YaRN factor 32 over
    # 4096, rms_norm_eps 1e-5, vocabulary 201088 (o200k_harmony)
    "gpt-oss-20b": SynthConfig(
        "gpt-oss",
        4,
        2880,
        64,
        8,
        64,
        32,
        4,
        2880,
        n_vocab=201088,
        n_ctx=131072,
        name="synthetic-gpt-oss-20b",
        n_swa=128,
        rope_base=150000.0,
        rms_eps=1e-5,
        yarn_factor=32.0,
        yarn_orig_ctx=4096,
    ),
    # gpt-oss-120b's config.json: gpt-oss-20b's layer shape, 36 layers, 128 experts (top-4)
    "gpt-oss-120b": SynthConfig(
        "gpt-oss",
        4,
        2880,
        64,
        8,
        64,
        128,
        4,
        2880,
        n_vocab=201088,
        n_ctx=131072,
        name="synthetic-gpt-oss-120b",
        n_swa=128,
        rope_base=150000.0,
        rms_eps=1e-5,
        yarn_factor=32.0,
        yarn_orig_ctx=4096,
    ),
    # Qwen3.6-35B-A3B's config.json: 40 layers of 2048 (every 4th full attention: 16 heads, 2 KV, of
    # 256 with an output gate, partial_rotary_factor 0.25, mrope_section [11, 11, 10], rope_theta
    # 1e7; the others Gated DeltaNet: 16 key heads and 32 value heads of 128, conv kernel 4), 256
    # experts (top-8) of 512 + a gated shared expert of 512, vocabulary 248320
    "qwen3.6-35b-a3b": SynthConfig(
        "qwen35moe",
        4,
        2048,
        16,
        2,
        256,
        256,
        8,
        512,
        n_ff_shexp=512,
        n_vocab=248320,
        n_ctx=262144,
        name="synthetic-qwen3.6-35b-a3b",
        qk_rope=64,
        rope_base=10000000.0,
        ssm_k_heads=16,
        ssm_v_heads=32,
        ssm_head_dim=128,
    ),
    # Qwen3.5-122B-A10B's config.json: 48 layers of 3072 (32 heads, 2 KV, of 256 in the full-attention
    # layers; DeltaNet 16 key heads and 64 value heads of 128), 256 experts (top-8) of 1024 + a
    # gated shared expert of 1024
    "qwen3.5-122b-a10b": SynthConfig(
        "qwen35moe",
        4,
        3072,
        32,
        2,
        256,
        256,
        8,
        1024,
        n_ff_shexp=1024,
        n_vocab=248320,
        n_ctx=262144,
        name="synthetic-qwen3.5-122b-a10b",
        qk_rope=64,
        rope_base=10000000.0,
        ssm_k_heads=16,
        ssm_v_heads=64,
        ssm_head_dim=128,
    ),
    # Gemma 4 26B-A4B's config.json (text_config): 30 layers of 2816; 16 heads; sliding layers: 8 KV
    # heads of 256, window 1024, rope_theta 10000; every 6th layer global: 2 KV heads of 512, no
    # v_proj (attention_k_eq_v), rope_theta 1e6 with partial_rotary_factor 0.25 ("proportional");
    # dense MLP 2112 beside 128 experts (top-8) of 704; final_logit_softcapping 30; vocabulary
    # 262144, tied embeddings; no per-layer embeddings, no shared-KV layers
    "gemma-4-26b-a4b": SynthConfig(
        "gemma4",
        4,
        2816,
        16,
        8,
        256,
        128,
        8,
        704,
        n_vocab=262144,
        n_ctx=262144,
        name="synthetic-gemma-4-26b-a4b",
        n_ff_dense=2112,
        n_swa=1024,
        swa_period=6,
        n_head_kv_global=2,
        head_dim_global=512,
        global_rotary=0.25,
        rope_base=1000000.0,
        rope_base_swa=10000.0,
        final_softcap=30.0,
        tied_output=True,
    ),
    # GLM-4.7-Flash's config.json (llama.cpp converts it as deepseek2): 47 layers of 2048, MLA with
    # 20 heads, q_lora_rank 768, kv_lora_rank 512, qk_nope 192 + qk_rope 64, v_head_dim 256; 64
    # routed experts (top-4, sigmoid + correction bias, renormalised, × 1.8) of 1536 + 1 shared,
    # first_k_dense_replace 1 (intermediate 10240), rope_theta 1e6, vocabulary 154880
    "glm-4.7-flash": SynthConfig(
        "deepseek2",
        4,
        2048,
        20,
        20,
        256,
        64,
        4,
        1536,
        n_vocab=154880,
        n_ctx=202752,
        name="synthetic-glm-4.7-flash",
        kv_lora_rank=512,
        q_lora_rank=768,
        qk_rope=64,
        v_head_dim=256,
        n_dense_lead=1,
        n_ff_dense=10240,
        n_expert_shared=1,
        gating="sigmoid",
        expert_weights_norm=True,
        expert_weights_scale=1.8,
        rope_base=1000000.0,
        rms_eps=1e-5,
    ),
    # GLM-4.5-Air's config.json: 96 heads (8 KV) of 128, partial_rotary_factor 0.5, 128 routed
    # experts (top-8, sigmoid + correction bias, renormalised, scale 1.0) of 1408 + 1 shared,
    # first_k_dense_replace 1 (intermediate 10944), one MTP block; attention biases, no q/k norm
    "glm-4.5-air": SynthConfig(
        "glm4moe",
        4,
        4096,
        96,
        8,
        128,
        128,
        8,
        1408,
        n_vocab=151552,
        n_ctx=131072,
        name="synthetic-glm-4.5-air",
        qk_rope=64,
        n_dense_lead=1,
        n_ff_dense=10944,
        n_expert_shared=1,
        gating="sigmoid",
        expert_weights_norm=True,
        expert_weights_scale=1.0,
        n_nextn=1,
    ),
}

# Attention and FFN outputs are kept small next to the embedding in the residual stream. llama.cpp
# quantizes activations to 8 bits before every quantized matmul (≈0.5% noise each); in a random
# model that noise flips near-tied expert choices, and a flipped expert moves logits far more than
# rounding does. A residual stream led by the (exactly dequantized) embedding keeps those flips rare
# while every block still contributes visibly to the logits.
ATTN_OUT_GAIN = 0.15
FFN_OUT_GAIN = 0.15

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# gpt-oss's harmony format: its control tokens, and a template in its shape (gpt-oss's own is a
# long tool-calling template; this one renders system, user and assistant turns the same way)
HARMONY_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start|>",
    "<|message|>",
    "<|end|>",
    "<|return|>",
    "<|channel|>",
    "<|constrain|>",
    "<|call|>",
)
HARMONY_TEMPLATE = (
    "{%- set sys = messages[0].content if messages and messages[0].role in ('system', 'developer') else '' -%}"
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: {{ strftime_now('%Y-%m-%d') }}\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{%- if sys %}<|start|>developer<|message|># Instructions\n\n{{ sys }}<|end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role in ('system', 'developer') and loop.first -%}"
    "{%- elif m.role == 'user' -%}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{%- else -%}{{ raise_exception('harmony: unexpected role ' ~ m.role) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)
# A few merges so that tokenization is real BPE, not bytes only.
_MERGE_WORDS = ("the", "and", "of", "to", "in", "is", "ing", "er", "on", "at", "ex", "pert", "model")


def byte_level_vocab(
    n_vocab: int, specials: tuple[str, ...] = SPECIAL_TOKENS
) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """GPT-2 style byte-level vocab: 256 byte tokens, some merges, the chat specials, padding.
    Returns tokens, token types, merges ("a b" strings) and the ids of the special tokens."""
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    merges: list[str] = []
    for word in _MERGE_WORDS:
        for w in (word, "Ġ" + word):
            cur = w[0]
            for ch in w[1:]:
                if cur + ch not in tokens:
                    merges.append(f"{cur} {ch}")
                    tokens.append(cur + ch)
                cur += ch
    types = [TokenType.NORMAL] * len(tokens)
    special = {}
    for s in specials:
        special[s] = len(tokens)
        tokens.append(s)
        types.append(TokenType.CONTROL)
    if n_vocab < len(tokens):
        raise LocalMoEError(f"n_vocab must be at least {len(tokens)}")
    while len(tokens) < n_vocab:
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges, special


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_model(
    path: str | os.PathLike[str],
    cfg: SynthConfig,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = False,
) -> str:
    """Write a random-weight MoE model; returns the path. progress(done, total) is called after
    each tensor with counts of weights. fast: the big matrices are random block bytes of a FAST_TYPES
    mix (no quantizing: a 48-layer Qwen3-30B-A3B shape in seconds, not ~11 minutes) — right for
    speed and memory runs, noise for anything numerical."""
    path = os.fspath(path)
    if fast:
        if cfg.weight_type not in FAST_TYPES:
            raise LocalMoEError(f"--fast writes one of {', '.join(FAST_TYPES)}, not {cfg.weight_type}")
        qtype, ftype = Q[FAST_TYPES[cfg.weight_type][0]], FAST_TYPES[cfg.weight_type][2]
    elif cfg.weight_type not in WRITE_TYPES:
        raise LocalMoEError(
            f"weight_type must be one of {', '.join(WRITE_TYPES)} (K-quants: write Q8_0, then quantize_with_llama_cpp)"
        )
    else:
        qtype, ftype = WRITE_TYPES[cfg.weight_type]
    rng = np.random.default_rng(cfg.seed)
    head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    D, F_exp, E = cfg.n_embd, cfg.n_ff_exp, cfg.n_expert
    arch = cfg.arch

    w = GGUFWriter(path, arch)
    w.add_name(cfg.name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(D)
    w.add_block_count(cfg.n_layer + (cfg.n_nextn if arch == "glm4moe" else 0))
    w.add_feed_forward_length(cfg.n_ff_dense if arch in ("deepseek2", "glm4moe", "gemma4") else F_exp)
    w.add_head_count(cfg.n_head)
    if arch == "gemma4":  # one KV head count per layer
        w.add_head_count_kv([cfg.n_head_kv if swa else cfg.n_head_kv_global for swa in _gemma4_swa(cfg)])
    else:
        w.add_head_count_kv(1 if arch == "deepseek2" else cfg.n_head_kv)  # MLA runs as MQA over the latent
    if arch in ("qwen3moe", "gpt-oss", "qwen35moe"):  # heads not n_embd / n_head wide (gpt-oss: 64 × 64 ≠ 2880)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gpt-oss":
        _gpt_oss_keys(w, cfg)
    if arch == "deepseek2":
        _deepseek2_keys(w, cfg, head_dim)
    elif arch == "glm4moe":
        _glm4moe_keys(w, cfg, head_dim)
    elif arch == "qwen35moe":
        _qwen35moe_keys(w, cfg)
    elif arch == "gemma4":
        _gemma4_keys(w, cfg, head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_expert_count(E)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(F_exp)
    if arch in ("qwen2moe", "qwen35moe"):
        w.add_expert_shared_feed_forward_length(cfg.n_ff_shexp)
    w.add_file_type(ftype)

    harmony = arch == "gpt-oss"
    tokens, types, merges, special = byte_level_vocab(cfg.n_vocab, HARMONY_TOKENS if harmony else SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|startoftext|>" if harmony else "<|endoftext|>"])
    w.add_eos_token_id(special["<|return|>" if harmony else "<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(HARMONY_TEMPLATE if harmony and cfg.chat_template == CHATML_TEMPLATE else cfg.chat_template)

    def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (gain / np.sqrt(cols))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # The plan: (name, logical shape, stored type, make). Tensors are made one at a time, in plan
    # order, while writing — so peak memory is one tensor, not the model. make() returns a float32
    # array, or for an expert tensor a list of per-expert matrices quantized one by one.
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType, Callable[[], Any]]] = []

    def put(name: str, shape: tuple[int, ...], make: Callable[[], Any], keep_f32: bool = False) -> None:
        qt = Q.F32 if keep_f32 or len(shape) == 1 else qtype
        if fast and qt != Q.F32:  # random blocks of the mix's type for this tensor, about make()'s spread
            qt = _fast_type(cfg.weight_type, name, shape[-1])
            make = _fast_maker(name, shape, qt, rng)
        plan.append((name, shape, qt, make))

    # rows of std 0.5 (gemma4: after its × √D)
    embd_gain = 1.0 / np.sqrt(D) if arch == "gemma4" else 1.0
    put(names.TOKEN_EMBD, (cfg.n_vocab, D), lambda: mat(cfg.n_vocab, D, gain=float(np.sqrt(D) * embd_gain)) * 0.5)
    if arch == "gemma4" and not all(_gemma4_swa(cfg)):
        # the global layers' (llama.cpp refuses a tensor it does not load)
        put(names.ROPE_FREQS, (cfg.head_dim_global // 2,), lambda: _gemma4_rope_freqs(cfg))
    own_layer = _OWN_LAYERS.get(arch)  # architectures whose layers differ from the llama-style block below
    for i in range(cfg.n_layer):
        if own_layer is not None:
            own_layer(put, mat, norm, rng, cfg, i, head_dim)
            continue
        qdim, kvdim = cfg.n_head * head_dim, cfg.n_head_kv * head_dim
        put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
        put(names.blk(i, names.ATTN_Q), (qdim, D), lambda qdim=qdim: mat(qdim, D))
        put(names.blk(i, names.ATTN_K), (kvdim, D), lambda kvdim=kvdim: mat(kvdim, D))
        put(names.blk(i, names.ATTN_V), (kvdim, D), lambda kvdim=kvdim: mat(kvdim, D))
        put(names.blk(i, names.ATTN_OUT), (D, qdim), lambda qdim=qdim: mat(D, qdim, gain=ATTN_OUT_GAIN))
        if arch == "qwen2moe":
            for stem, n in ((names.ATTN_Q, qdim), (names.ATTN_K, kvdim), (names.ATTN_V, kvdim)):
                put(names.blk(i, stem, "bias"), (n,), lambda n=n: 0.1 * rng.standard_normal(n).astype(np.float32))
        if arch == "qwen3moe":
            put(names.blk(i, names.ATTN_Q_NORM), (head_dim,), lambda: norm(head_dim))
            put(names.blk(i, names.ATTN_K_NORM), (head_dim,), lambda: norm(head_dim))
        elif arch == "olmoe":
            put(names.blk(i, names.ATTN_Q_NORM), (qdim,), lambda qdim=qdim: norm(qdim))
            put(names.blk(i, names.ATTN_K_NORM), (kvdim,), lambda kvdim=kvdim: norm(kvdim))
        put(names.blk(i, names.FFN_NORM), (D,), lambda: norm(D))
        # A decisive router (large logits) keeps expert choices away from near-ties.
        put(names.blk(i, names.FFN_GATE_INP), (E, D), lambda: mat(E, D, gain=4.0), keep_f32=True)
        for stem, rows, cols, gain in (
            (names.FFN_GATE_EXPS, F_exp, D, 1.0),
            (names.FFN_UP_EXPS, F_exp, D, 1.0),
            (names.FFN_DOWN_EXPS, D, F_exp, FFN_OUT_GAIN),
        ):
            put(
                names.blk(i, stem),
                (E, rows, cols),
                lambda rows=rows, cols=cols, gain=gain: (mat(rows, cols, gain) for _ in range(E)),
            )
        if arch == "qwen2moe":
            Fs = cfg.n_ff_shexp
            put(names.blk(i, names.FFN_GATE_INP_SHEXP), (D,), lambda: mat(1, D).reshape(D))
            put(names.blk(i, names.FFN_GATE_SHEXP), (Fs, D), lambda: mat(Fs, D))
            put(names.blk(i, names.FFN_UP_SHEXP), (Fs, D), lambda: mat(Fs, D))
            put(names.blk(i, names.FFN_DOWN_SHEXP), (D, Fs), lambda: mat(D, Fs, FFN_OUT_GAIN))
    if arch == "glm4moe":  # the MTP block llama.cpp loads (and skips): a whole layer plus its projections
        for i in range(cfg.n_layer, cfg.n_layer + cfg.n_nextn):
            _glm4moe_layer(put, mat, norm, rng, cfg, i, head_dim)
            put(names.blk(i, names.NEXTN_EH_PROJ), (D, 2 * D), lambda: mat(D, 2 * D))
            put(names.blk(i, names.NEXTN_ENORM), (D,), lambda: norm(D))
            put(names.blk(i, names.NEXTN_HNORM), (D,), lambda: norm(D))
    put(names.OUTPUT_NORM, (D,), lambda: norm(D))

    def output_head() -> np.ndarray:
        # Rows of very different norms give peaked next-token distributions, as trained models
        # have, so that the top-1 token is not a near-tie decided by rounding.
        row_scale = np.exp(1.5 * rng.standard_normal((cfg.n_vocab, 1))).astype(np.float32)
        return mat(cfg.n_vocab, D, gain=3.0) * row_scale

    if not cfg.tied_output:
        put(names.OUTPUT, (cfg.n_vocab, D), output_head)

    for name, shape, qt, _ in plan:
        if qt in (Q.F32, Q.F16):
            dtype = np.float32 if qt == Q.F32 else np.float16
            w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(shape)) for _, shape, _, _ in plan)
    done = 0
    for name, shape, qt, make in plan:
        made = make()
        parts = [made] if isinstance(made, np.ndarray) else made
        if fast and qt != Q.F32:  # already the stored bytes
            w.write_tensor_data(made)
        else:
            w.write_tensor_data(
                np.concatenate([_encode(m, qt).reshape(-1) for m in parts])
                if len(shape) == 3
                else _encode(parts[0], qt)
            )
        done += int(np.prod(shape))
        if progress is not None:
            progress(done, total)
    w.close()
    return path


# --fast: weight type → (type of most matrices, type of FAST_HIGH_TENSORS, file type). "Q4_K_M" is
# llama.cpp's mix in spirit: Q4_K, with Q6_K for the expert down projections, attn_v and the head.
# "MXFP4_MOE" is gpt-oss's as shipped: MXFP4 experts, Q8_0 for the rest.
FAST_TYPES = {
    "Q4_K_M": ("Q4_K", "Q6_K", LlamaFileType.MOSTLY_Q4_K_M),
    "Q4_0": ("Q4_0", "Q4_0", LlamaFileType.MOSTLY_Q4_0),
    "Q8_0": ("Q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "Q6_K": ("Q6_K", "Q6_K", LlamaFileType.MOSTLY_Q6_K),
    "MXFP4_MOE": ("Q8_0", "Q8_0", LlamaFileType.MOSTLY_MXFP4_MOE),
}
# matched as ends of names: names.OUTPUT ("output.weight") also ends attn_output's, which so gets the high type too
FAST_HIGH_TENSORS = (f"{names.FFN_DOWN_EXPS}.{names.WEIGHT}", f"{names.ATTN_V}.{names.WEIGHT}", names.OUTPUT)
# llama.cpp's quantizer (tensor_type_fallback) for rows that are not a whole number of 256-blocks
# (gpt-oss's 2880, DeepSeek-V2-Lite's 1408): the 32-block type it stores instead
FAST_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def _fast_type(weight_type: str, name: str, cols: int) -> GGMLQuantizationType:
    """The stored type of a big matrix in a --fast file of `weight_type`."""
    low, high, _ = FAST_TYPES[weight_type]
    if weight_type == "MXFP4_MOE" and names.is_expert_tensor(name):
        return Q.MXFP4
    t = high if name.endswith(FAST_HIGH_TENSORS) else low
    if cols % GGML_QUANT_SIZES[Q[t]][0]:
        t = FAST_FALLBACK[t]
    return Q[t]


FAST_DISTINCT_EXPERTS = 8  # --fast: expert k holds the bytes of expert k mod 8 (the file's and RAM's sizes are real)
_UNIT_SPREAD: dict[str, float] = {}  # block type → std of its random blocks' weights at scale 1


def _fast_maker(
    name: str, shape: tuple[int, ...], qt: GGMLQuantizationType, rng: np.random.Generator
) -> Callable[[], np.ndarray]:
    """make() for --fast: random blocks whose weights spread like a 1/√cols Gaussian init."""
    from gguf.quants import dequantize

    from .speed import random_blocks

    cols, rows = shape[-1], int(np.prod(shape[:-1]))
    if qt.name not in _UNIT_SPREAD:
        sample = random_blocks(qt.name, 16, 256, np.random.default_rng(0), scale=1.0)
        _UNIT_SPREAD[qt.name] = float(dequantize(sample, qt).std())
    gain = float(np.sqrt(cols)) * 0.5 if name == names.TOKEN_EMBD else 1.0
    scale = gain / np.sqrt(cols) / _UNIT_SPREAD[qt.name]
    if len(shape) == 3 and shape[0] > FAST_DISTINCT_EXPERTS:  # experts: a few distinct ones, repeated
        per = rows // shape[0]
        return lambda: np.tile(
            random_blocks(qt.name, per * FAST_DISTINCT_EXPERTS, cols, rng, scale=scale).reshape(-1),
            -(-shape[0] // FAST_DISTINCT_EXPERTS),
        )[: rows * _row_bytes(qt, cols)]
    return lambda: random_blocks(qt.name, rows, cols, rng, scale=scale).reshape(-1)


def _row_bytes(qt: GGMLQuantizationType, cols: int) -> int:
    per, size = GGML_QUANT_SIZES[qt]
    return cols // per * size


def _deepseek2_keys(w: GGUFWriter, cfg: SynthConfig, head_dim: int) -> None:
    """deepseek2's keys as llama.cpp's convert_hf_to_gguf.py writes them for a split k_b/v_b file."""
    from gguf import ExpertGatingFuncType, RopeScalingType

    r, rope = cfg.kv_lora_rank, cfg.qk_rope
    w.add_rope_dimension_count(rope)
    w.add_key_length(r + rope)  # the MQA view of the latent
    w.add_value_length(r)
    w.add_key_length_mla(head_dim)  # qk_nope + qk_rope
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_kv_lora_rank(r)
    w.add_q_lora_rank(cfg.q_lora_rank)  # written even when 0: llama.cpp reads it unless the layer count says "lite"
    _moe_keys(w, cfg, ExpertGatingFuncType.SIGMOID if cfg.gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    if cfg.n_expert_groups:
        w.add_expert_group_count(cfg.n_expert_groups)
        w.add_expert_group_used_count(cfg.n_group_used)
    if cfg.yarn_factor:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.yarn_orig_ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.yarn_log_mul)


def _deepseek2_layer(put, mat, norm, rng, cfg: SynthConfig, i: int, head_dim: int) -> None:
    """One deepseek2 block: MLA attention, then a dense FFN (leading layers) or router + routed
    experts + shared experts (+ the V3 selection bias)."""
    D, H, r, rope, v = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope, cfg.v_head_dim
    nope = head_dim - rope
    put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
    if cfg.q_lora_rank:
        ql = cfg.q_lora_rank
        put(names.blk(i, names.ATTN_Q_A), (ql, D), lambda: mat(ql, D))
        put(names.blk(i, names.ATTN_Q_A_NORM), (ql,), lambda: norm(ql))
        put(names.blk(i, names.ATTN_Q_B), (H * head_dim, ql), lambda: mat(H * head_dim, ql))
    else:
        put(names.blk(i, names.ATTN_Q), (H * head_dim, D), lambda: mat(H * head_dim, D))
    put(names.blk(i, names.ATTN_KV_A_MQA), (r + rope, D), lambda: mat(r + rope, D))
    put(names.blk(i, names.ATTN_KV_A_NORM), (r,), lambda: norm(r))
    put(names.blk(i, names.ATTN_K_B), (H, r, nope), lambda: (mat(r, nope) for _ in range(H)))
    put(names.blk(i, names.ATTN_V_B), (H, v, r), lambda: (mat(v, r) for _ in range(H)))
    put(names.blk(i, names.ATTN_OUT), (D, H * v), lambda: mat(D, H * v, gain=ATTN_OUT_GAIN))
    put(names.blk(i, names.FFN_NORM), (D,), lambda: norm(D))
    _ffn_block(put, mat, rng, cfg, i, selection_bias=cfg.gating == "sigmoid")


def _moe_keys(w: GGUFWriter, cfg: SynthConfig, gating) -> None:
    """The routing keys deepseek2 and glm4moe share: dense leading layers, shared experts, the
    gating function, the weights' norm and scale."""
    w.add_leading_dense_block_count(cfg.n_dense_lead)
    w.add_expert_shared_count(cfg.n_expert_shared)
    w.add_expert_gating_func(gating)
    if cfg.expert_weights_norm is not None:
        w.add_expert_weights_norm(cfg.expert_weights_norm)
    if cfg.expert_weights_scale:
        w.add_expert_weights_scale(cfg.expert_weights_scale)


def _ffn_block(put, mat, rng, cfg: SynthConfig, i: int, selection_bias: bool) -> None:
    """Block i's FFN after its attention and norm (deepseek2, glm4moe): a dense FFN in the leading
    layers, else the router (+ its selection bias), the routed experts and the shared experts."""
    D, E, F_exp = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
    if i < cfg.n_dense_lead:
        Fd = cfg.n_ff_dense
        put(names.blk(i, names.FFN_GATE), (Fd, D), lambda: mat(Fd, D))
        put(names.blk(i, names.FFN_UP), (Fd, D), lambda: mat(Fd, D))
        put(names.blk(i, names.FFN_DOWN), (D, Fd), lambda: mat(D, Fd, FFN_OUT_GAIN))
        return
    put(names.blk(i, names.FFN_GATE_INP), (E, D), lambda: mat(E, D, gain=4.0), keep_f32=True)
    if selection_bias:
        put(
            names.blk(i, names.FFN_EXP_PROBS_B, "bias"),
            (E,),
            lambda: (0.05 * rng.standard_normal(E)).astype(np.float32),
        )
    for stem, rows, cols, gain in (
        (names.FFN_GATE_EXPS, F_exp, D, 1.0),
        (names.FFN_UP_EXPS, F_exp, D, 1.0),
        (names.FFN_DOWN_EXPS, D, F_exp, FFN_OUT_GAIN),
    ):
        put(
            names.blk(i, stem),
            (E, rows, cols),
            lambda rows=rows, cols=cols, gain=gain: (mat(rows, cols, gain) for _ in range(E)),
        )
    Fs = F_exp * cfg.n_expert_shared
    put(names.blk(i, names.FFN_GATE_SHEXP), (Fs, D), lambda: mat(Fs, D))
    put(names.blk(i, names.FFN_UP_SHEXP), (Fs, D), lambda: mat(Fs, D))
    put(names.blk(i, names.FFN_DOWN_SHEXP), (D, Fs), lambda: mat(D, Fs, FFN_OUT_GAIN))


def _glm4moe_keys(w: GGUFWriter, cfg: SynthConfig, head_dim: int) -> None:
    """glm4moe's keys as llama.cpp's converter writes them (partial rotary: rope.dimension_count)."""
    from gguf import ExpertGatingFuncType

    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(cfg.qk_rope)
    _moe_keys(w, cfg, ExpertGatingFuncType.SOFTMAX if cfg.gating == "softmax" else ExpertGatingFuncType.SIGMOID)
    if cfg.n_nextn:
        w.add_nextn_predict_layers(cfg.n_nextn)


def _glm4moe_layer(put, mat, norm, rng, cfg: SynthConfig, i: int, head_dim: int) -> None:
    """One glm4moe block: GQA with q/k/v biases, post_attention_norm, then a dense FFN (leading
    layers) or router + selection bias + routed experts + shared expert."""
    D = cfg.n_embd
    qdim, kvdim = cfg.n_head * head_dim, cfg.n_head_kv * head_dim
    put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
    put(names.blk(i, names.ATTN_Q), (qdim, D), lambda: mat(qdim, D))
    put(names.blk(i, names.ATTN_K), (kvdim, D), lambda: mat(kvdim, D))
    put(names.blk(i, names.ATTN_V), (kvdim, D), lambda: mat(kvdim, D))
    for stem, n in ((names.ATTN_Q, qdim), (names.ATTN_K, kvdim), (names.ATTN_V, kvdim)):
        put(names.blk(i, stem, "bias"), (n,), lambda n=n: 0.1 * rng.standard_normal(n).astype(np.float32))
    put(names.blk(i, names.ATTN_OUT), (D, qdim), lambda: mat(D, qdim, gain=ATTN_OUT_GAIN))
    put(names.blk(i, names.ATTN_POST_NORM), (D,), lambda: norm(D))
    _ffn_block(put, mat, rng, cfg, i, selection_bias=True)


def _gpt_oss_keys(w: GGUFWriter, cfg: SynthConfig) -> None:
    """gpt-oss's keys as llama.cpp's converter writes them (the window pattern is llama.cpp's default)."""
    from gguf import RopeScalingType

    w.add_sliding_window(cfg.n_swa)
    if cfg.yarn_factor:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.yarn_orig_ctx)


GPT_OSS_GATE_UP_GAIN = 2.5  # the experts' gate and up spread (std of their outputs): the clamped SwiGLU's ±7 is reached
# the down projection scaled by 1/gain³: experts move the logits (14% relative) without dominating the residual stream
GPT_OSS_DOWN_POWER = 3.0


def _gpt_oss_layer(put, mat, norm, rng, cfg: SynthConfig, i: int, head_dim: int) -> None:
    """One gpt-oss block: GQA with biases on q/k/v/o and a sink per head, post_attention_norm,
    a router with a bias, experts with biases. The experts' gate and up spread wide enough that
    the clamped SwiGLU's ±7 limits are reached."""
    D, E, F_exp, H = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp, cfg.n_head
    qdim, kvdim = H * head_dim, cfg.n_head_kv * head_dim
    small = lambda *shape, s=0.1: lambda: (s * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
    for stem, n in ((names.ATTN_Q, qdim), (names.ATTN_K, kvdim), (names.ATTN_V, kvdim)):
        put(names.blk(i, stem), (n, D), lambda n=n: mat(n, D))
        put(names.blk(i, stem, "bias"), (n,), small(n))
    put(names.blk(i, names.ATTN_OUT), (D, qdim), lambda: mat(D, qdim, gain=ATTN_OUT_GAIN))
    put(names.blk(i, names.ATTN_OUT, "bias"), (D,), small(D, s=0.02))
    put(names.blk(i, names.ATTN_SINKS), (H,), small(H, s=1.5))
    put(names.blk(i, names.ATTN_POST_NORM), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_GATE_INP), (E, D), lambda: mat(E, D, gain=4.0), keep_f32=True)
    put(names.blk(i, names.FFN_GATE_INP, "bias"), (E,), small(E, s=0.5))
    for stem, rows, cols, gain in (
        (names.FFN_GATE_EXPS, F_exp, D, GPT_OSS_GATE_UP_GAIN),
        (names.FFN_UP_EXPS, F_exp, D, GPT_OSS_GATE_UP_GAIN),
        (names.FFN_DOWN_EXPS, D, F_exp, FFN_OUT_GAIN / GPT_OSS_GATE_UP_GAIN**GPT_OSS_DOWN_POWER),
    ):
        put(
            names.blk(i, stem),
            (E, rows, cols),
            lambda rows=rows, cols=cols, gain=gain: (mat(rows, cols, gain) for _ in range(E)),
        )
    put(names.blk(i, names.FFN_GATE_EXPS, "bias"), (E, F_exp), small(E, F_exp), keep_f32=True)
    put(names.blk(i, names.FFN_UP_EXPS, "bias"), (E, F_exp), small(E, F_exp), keep_f32=True)
    put(names.blk(i, names.FFN_DOWN_EXPS, "bias"), (E, D), small(E, D, s=0.02), keep_f32=True)


def _qwen35moe_keys(w: GGUFWriter, cfg: SynthConfig) -> None:
    """qwen35moe's keys as llama.cpp's converter writes them: partial rotary with M-RoPE sections,
    the DeltaNet sizes, the full-attention interval."""
    w.add_rope_dimension_count(cfg.qk_rope)
    w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_ssm_conv_kernel(cfg.ssm_conv)
    w.add_ssm_inner_size(cfg.ssm_v_heads * cfg.ssm_head_dim)
    w.add_ssm_state_size(cfg.ssm_head_dim)
    w.add_ssm_time_step_rank(cfg.ssm_v_heads)
    w.add_ssm_group_count(cfg.ssm_k_heads)
    w.add_full_attention_interval(cfg.full_attn_interval)


# The mixers' output projections of the qwen35moe file: smaller than ATTN_OUT_GAIN. Three DeltaNet
# layers in four carry llama.cpp's 8-bit activation rounding through a state and an RMS norm of
# their output; at ATTN_OUT_GAIN they moved the logits of the Q8_0 file 1.0e-2 (relative) away from
# llama.cpp on a path that rounds activations differently (localmoe's VNNI or torch kernels), twice
# what the same rounding does to the Qwen3-MoE file (5.6e-3). At 0.08: 7.9e-3.
QWEN35_MIXER_GAIN = 0.08


def _qwen35moe_layer(put, mat, norm, rng, cfg: SynthConfig, i: int, head_dim: int) -> None:
    """One qwen35moe block: a Gated DeltaNet (all layers but each full_attn_interval-th) or a full
    attention whose attn_q holds per head its query rows then its gate rows; post_attention_norm;
    router, experts (gate and up apart or fused) and the sigmoid-gated shared expert. The decays
    exp(softplus(α + dt_bias)·A) sit mostly in 0.8–0.99, so the state reaches back many tokens."""
    D, E, F_exp, Fs = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
    put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
    if (i + 1) % cfg.full_attn_interval:
        Hk, Hv, d = cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_head_dim
        C = 2 * Hk * d + Hv * d
        put(names.blk(i, names.ATTN_QKV), (C, D), lambda: mat(C, D))
        put(names.blk(i, names.ATTN_GATE), (Hv * d, D), lambda: mat(Hv * d, D))
        put(names.blk(i, names.SSM_CONV1D), (C, cfg.ssm_conv), lambda: mat(C, cfg.ssm_conv, gain=1.5), keep_f32=True)
        put(names.blk(i, names.SSM_DT, "bias"), (Hv,), lambda: (0.5 * rng.standard_normal(Hv)).astype(np.float32))
        put(names.blk_bare(i, names.SSM_A), (Hv,), lambda: (-np.exp(rng.uniform(-4.0, -1.0, Hv))).astype(np.float32))
        put(names.blk(i, names.SSM_BETA), (Hv, D), lambda: mat(Hv, D))
        put(names.blk(i, names.SSM_ALPHA), (Hv, D), lambda: mat(Hv, D))
        put(names.blk(i, names.SSM_NORM), (d,), lambda: norm(d))
        put(names.blk(i, names.SSM_OUT), (D, Hv * d), lambda: mat(D, Hv * d, gain=QWEN35_MIXER_GAIN))
    else:
        qdim, kvdim = cfg.n_head * head_dim, cfg.n_head_kv * head_dim
        put(names.blk(i, names.ATTN_Q), (2 * qdim, D), lambda: mat(2 * qdim, D))
        put(names.blk(i, names.ATTN_K), (kvdim, D), lambda: mat(kvdim, D))
        put(names.blk(i, names.ATTN_V), (kvdim, D), lambda: mat(kvdim, D))
        put(names.blk(i, names.ATTN_OUT), (D, qdim), lambda: mat(D, qdim, gain=QWEN35_MIXER_GAIN))
        put(names.blk(i, names.ATTN_Q_NORM), (head_dim,), lambda: norm(head_dim))
        put(names.blk(i, names.ATTN_K_NORM), (head_dim,), lambda: norm(head_dim))
    put(names.blk(i, names.ATTN_POST_NORM), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_GATE_INP), (E, D), lambda: mat(E, D, gain=4.0), keep_f32=True)
    experts = lambda rows, cols, gain=1.0: lambda: (mat(rows, cols, gain) for _ in range(E))  # noqa: E731
    if cfg.gate_up_fused:
        put(names.blk(i, names.FFN_GATE_UP_EXPS), (E, 2 * F_exp, D), experts(2 * F_exp, D))
    else:
        put(names.blk(i, names.FFN_GATE_EXPS), (E, F_exp, D), experts(F_exp, D))
        put(names.blk(i, names.FFN_UP_EXPS), (E, F_exp, D), experts(F_exp, D))
    put(names.blk(i, names.FFN_DOWN_EXPS), (E, D, F_exp), experts(D, F_exp, FFN_OUT_GAIN))
    put(names.blk(i, names.FFN_GATE_INP_SHEXP), (D,), lambda: mat(1, D).reshape(D))
    put(names.blk(i, names.FFN_GATE_SHEXP), (Fs, D), lambda: mat(Fs, D))
    put(names.blk(i, names.FFN_UP_SHEXP), (Fs, D), lambda: mat(Fs, D))
    put(names.blk(i, names.FFN_DOWN_SHEXP), (D, Fs), lambda: mat(D, Fs, FFN_OUT_GAIN))


# gemma4's post-attention and post-FFN norm weights: its norms rescale every sub-block's output to a
# fixed size (where the others' outputs scale with their inputs), and two near-equal sub-blocks a
# layer make the file more sensitive to rounding; at 0.15 (ATTN_OUT_GAIN) llama.cpp's own F16-cache
# floor on the Q4_K_M test file was 4.3e-2 (top-1 98.5%), at 0.08 it is 2.2e-2 (97.7%).
GEMMA4_OUT_GAIN = 0.08


def _gemma4_swa(cfg: SynthConfig) -> list[bool]:
    """Per layer: windowed, but for each swa_period-th and the last (Gemma 4 26B-A4B's 30 layers with
    period 6: 5, 11, ..., 29 global, its own pattern; a shorter file still has a global layer)."""
    return [i % cfg.swa_period != cfg.swa_period - 1 and i != cfg.n_layer - 1 for i in range(cfg.n_layer)]


def _gemma4_keys(w: GGUFWriter, cfg: SynthConfig, head_dim: int) -> None:
    """gemma4's keys as llama.cpp's converter writes them: key_length and rope.dimension_count are
    the global layers' (the whole head: proportional RoPE leaves the rest to rope_freqs), the _swa
    keys the windowed layers'."""
    w.add_key_length(cfg.head_dim_global)
    w.add_value_length(cfg.head_dim_global)
    w.add_key_length_swa(head_dim)
    w.add_value_length_swa(head_dim)
    w.add_rope_dimension_count(cfg.head_dim_global)
    w.add_rope_dimension_count_swa(head_dim)
    w.add_rope_freq_base_swa(cfg.rope_base_swa)
    w.add_sliding_window(cfg.n_swa)
    w.add_sliding_window_pattern(_gemma4_swa(cfg))
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)


def _gemma4_rope_freqs(cfg: SynthConfig) -> np.ndarray:
    """rope_freqs of the global layers as the converter makes it: 1 for the rotated pairs, 1e30
    (θ ≈ 0: unrotated) for the rest."""
    half = cfg.head_dim_global // 2
    n_rot = int(cfg.head_dim_global * cfg.global_rotary / 2)
    return np.array([1.0] * n_rot + [1e30] * (half - n_rot), dtype=np.float32)


def _gemma4_layer(put, mat, norm, rng, cfg: SynthConfig, i: int, head_dim: int) -> None:
    """One gemma4 block: GQA of its kind (a windowed layer with attn_v; a global one of its own
    head size and KV heads, without: V = K), q/k norms, the norms around attention and the FFN, the
    dense GeGLU MLP, the router with its input scale, fused gate|up experts, each expert's output
    scale, the layer's output scale. The output norms are small (GEMMA4_OUT_GAIN) so that the
    embedding leads the residual stream; the router's input scale √D undoes its 1/√D."""
    D, E, F_exp, H = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp, cfg.n_head
    swa = _gemma4_swa(cfg)[i]
    hd, hkv = (head_dim, cfg.n_head_kv) if swa else (cfg.head_dim_global, cfg.n_head_kv_global)
    qdim, kvdim = H * hd, hkv * hd
    small_norm = lambda gain: lambda: gain * norm(D)  # noqa: E731
    put(names.blk(i, names.ATTN_NORM), (D,), lambda: norm(D))
    put(names.blk(i, names.ATTN_Q), (qdim, D), lambda: mat(qdim, D))
    put(names.blk(i, names.ATTN_K), (kvdim, D), lambda: mat(kvdim, D))
    if swa:
        put(names.blk(i, names.ATTN_V), (kvdim, D), lambda: mat(kvdim, D))
    # attention scale 1: q and k norms of hd^(-1/4) each give q·k the spread 1/√hd gives elsewhere
    # (with unit norms the scores spread ±√hd, the softmax picks near-argmax and rounding flips it)
    put(names.blk(i, names.ATTN_Q_NORM), (hd,), lambda: hd**-0.25 * norm(hd))
    put(names.blk(i, names.ATTN_K_NORM), (hd,), lambda: hd**-0.25 * norm(hd))
    put(names.blk(i, names.ATTN_OUT), (D, qdim), lambda: mat(D, qdim))
    put(names.blk(i, names.ATTN_POST_NORM), (D,), small_norm(GEMMA4_OUT_GAIN))
    put(names.blk(i, names.LAYER_OUT_SCALE), (1,), lambda: rng.uniform(0.85, 1.0, 1).astype(np.float32))
    Fd = cfg.n_ff_dense
    put(names.blk(i, names.FFN_NORM), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_GATE), (Fd, D), lambda: mat(Fd, D))
    put(names.blk(i, names.FFN_UP), (Fd, D), lambda: mat(Fd, D))
    put(names.blk(i, names.FFN_DOWN), (D, Fd), lambda: mat(D, Fd))
    put(names.blk(i, names.FFN_POST_NORM_1), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_PRE_NORM_2), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_GATE_INP), (E, D), lambda: mat(E, D, gain=4.0), keep_f32=True)
    put(names.blk(i, names.FFN_GATE_INP, names.SCALE), (D,), lambda: np.sqrt(D) * norm(D))
    put(names.blk(i, names.FFN_GATE_UP_EXPS), (E, 2 * F_exp, D), lambda: (mat(2 * F_exp, D) for _ in range(E)))
    put(names.blk(i, names.FFN_DOWN_EXPS), (E, D, F_exp), lambda: (mat(D, F_exp) for _ in range(E)))
    put(names.blk(i, names.FFN_DOWN_EXPS, names.SCALE), (E,), lambda: rng.uniform(0.5, 1.5, E).astype(np.float32))
    put(names.blk(i, names.FFN_POST_NORM_2), (D,), lambda: norm(D))
    put(names.blk(i, names.FFN_POST_NORM), (D,), small_norm(GEMMA4_OUT_GAIN))


# The layer writer of each architecture whose layers are not the llama-style block write_model writes.
_OWN_LAYERS = {
    "gemma4": _gemma4_layer,
    "deepseek2": _deepseek2_layer,
    "glm4moe": _glm4moe_layer,
    "gpt-oss": _gpt_oss_layer,
    "qwen35moe": _qwen35moe_layer,
}


def _encode(arr: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float32 array as stored in the file: float32, float16, or quantized bytes."""
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return quantize(arr, qtype)


def quantize_with_llama_cpp(src: str, dst: str, ftype: str = "Q4_K_M", threads: int = 0) -> str:
    """Re-quantize `src` into `dst` with llama.cpp's own quantizer (llama_model_quantize)."""
    import llama_cpp

    if ftype not in LLAMA_FTYPES:
        raise LocalMoEError(f"unknown quantization '{ftype}'; choose one of {', '.join(LLAMA_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise LocalMoEError(f"llama.cpp failed to quantize {src} to {ftype} (code {rc})")
    return dst


def preset(name: str, **overrides: object) -> SynthConfig:
    try:
        return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
    except KeyError:
        raise LocalMoEError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None


def write_preset(
    name: str,
    path: str,
    n_layer: int = 4,
    quant: str = "Q4_K_M",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = False,
) -> str:
    """`localmoe synth`: a preset's shapes with `n_layer` blocks in `quant` — written directly
    (WRITE_TYPES) or as Q8_0 (F32 for the float and legacy types) re-quantized by llama.cpp; with
    `fast`, random blocks of a FAST_TYPES mix (write_model). Tensors are made and written one at a
    time: memory stays around one expert tensor."""
    if n_layer < 1:
        raise LocalMoEError(f"--layers must be at least 1, got {n_layer}")
    if fast:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LocalMoEError(f"cannot write {path}: folder {folder} does not exist")
        return write_model(path, preset(name, n_layer=n_layer, seed=seed, weight_type=quant), progress, fast=True)
    if quant not in WRITE_TYPES and quant not in LLAMA_FTYPES:
        raise LocalMoEError(
            f"unknown quantization '{quant}'; choose one of {', '.join(sorted(set(WRITE_TYPES) | set(LLAMA_FTYPES)))}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LocalMoEError(f"cannot write {path}: folder {folder} does not exist")
    cfg = preset(name, n_layer=n_layer, seed=seed)
    if quant in WRITE_TYPES:
        return write_model(path, replace(cfg, weight_type=quant), progress)
    source = (
        "Q8_0" if quant.startswith(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ", "MXFP4")) else "F32"
    )  # as tests/conftest.py does
    tmp = f"{path}.{source}.tmp"
    try:
        write_model(tmp, replace(cfg, weight_type=source), progress)
        return quantize_with_llama_cpp(tmp, path, quant)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
