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
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quant_shape_to_byte_shape, quantize

from . import names
from .errors import LocalMoEError
from .tokenizer import CHATML_TEMPLATE

Q = GGMLQuantizationType
# What `weight_type` may be for the big matrices; norms and routers stay F32 as llama.cpp keeps them.
WRITE_TYPES = {"F32": (Q.F32, LlamaFileType.ALL_F32), "F16": (Q.F16, LlamaFileType.MOSTLY_F16), "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0), "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0)}
LLAMA_FTYPES = {"F16": 1, "BF16": 32, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18,
                # (llama.h's LLAMA_FTYPE_MOSTLY_*) the low-bit mixes; the IQ1/IQ2/IQ3 ones need an importance matrix
                "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q5_K_S": 16, "IQ4_NL": 25, "IQ4_XS": 30, "MXFP4_MOE": 38}


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


# Presets with the expert shapes of real models (layers and quant type are chosen per use).
PRESETS: dict[str, SynthConfig] = {
    "qwen3-30b-a3b": SynthConfig("qwen3moe", 4, 2048, 32, 4, 128, 128, 8, 768, n_vocab=32768, n_ctx=4096, name="synthetic-qwen3-30b-a3b"),
    "mixtral-8x7b": SynthConfig("llama", 4, 4096, 32, 8, 128, 8, 2, 14336, n_vocab=32000, n_ctx=4096, name="synthetic-mixtral-8x7b"),
    "olmoe-1b-7b": SynthConfig("olmoe", 4, 2048, 16, 16, 128, 64, 8, 1024, n_vocab=50304, n_ctx=4096, name="synthetic-olmoe-1b-7b"),
}

# Attention and FFN outputs are kept small next to the embedding in the residual stream. llama.cpp
# quantizes activations to 8 bits before every quantized matmul (≈0.5% noise each); in a random
# model that noise flips near-tied expert choices, and a flipped expert moves logits far more than
# rounding does. A residual stream led by the (exactly dequantized) embedding keeps those flips rare
# while every block still contributes visibly to the logits.
ATTN_OUT_GAIN = 0.15
FFN_OUT_GAIN = 0.15

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A few merges so that tokenization is real BPE, not bytes only.
_MERGE_WORDS = ("the", "and", "of", "to", "in", "is", "ing", "er", "on", "at", "ex", "pert", "model")


def byte_level_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
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
    for s in SPECIAL_TOKENS:
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
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_model(path: str | os.PathLike[str], cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> str:
    """Write a random-weight MoE model; returns the path. progress(done, total) is called after
    each tensor with counts of weights."""
    path = os.fspath(path)
    if cfg.weight_type not in WRITE_TYPES:
        raise LocalMoEError(f"weight_type must be one of {', '.join(WRITE_TYPES)} (K-quants: write Q8_0, then quantize_with_llama_cpp)")
    qtype, ftype = WRITE_TYPES[cfg.weight_type]
    rng = np.random.default_rng(cfg.seed)
    head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    D, F_exp, E = cfg.n_embd, cfg.n_ff_exp, cfg.n_expert
    arch = cfg.arch

    w = GGUFWriter(path, arch)
    w.add_name(cfg.name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(D)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(F_exp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    if arch == "qwen3moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(F_exp)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.n_ff_shexp)
    w.add_file_type(ftype)

    tokens, types, merges, special = byte_level_vocab(cfg.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(cfg.chat_template)

    def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (gain / np.sqrt(cols))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # The plan: (name, logical shape, stored type, make). Tensors are made one at a time, in plan
    # order, while writing — so peak memory is one tensor, not the model. make() returns a float32
    # array, or for an expert tensor a list of per-expert matrices quantized one by one.
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType, Callable[[], Any]]] = []

    def put(name: str, shape: tuple[int, ...], make: Callable[[], Any], keep_f32: bool = False) -> None:
        plan.append((name, shape, Q.F32 if keep_f32 or len(shape) == 1 else qtype, make))

    put(names.TOKEN_EMBD, (cfg.n_vocab, D), lambda: mat(cfg.n_vocab, D, gain=float(np.sqrt(D))) * 0.5)
    for i in range(cfg.n_layer):
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
        for stem, rows, cols, gain in ((names.FFN_GATE_EXPS, F_exp, D, 1.0), (names.FFN_UP_EXPS, F_exp, D, 1.0), (names.FFN_DOWN_EXPS, D, F_exp, FFN_OUT_GAIN)):
            put(names.blk(i, stem), (E, rows, cols), lambda rows=rows, cols=cols, gain=gain: (mat(rows, cols, gain) for _ in range(E)))
        if arch == "qwen2moe":
            Fs = cfg.n_ff_shexp
            put(names.blk(i, names.FFN_GATE_INP_SHEXP), (D,), lambda: mat(1, D).reshape(D))
            put(names.blk(i, names.FFN_GATE_SHEXP), (Fs, D), lambda: mat(Fs, D))
            put(names.blk(i, names.FFN_UP_SHEXP), (Fs, D), lambda: mat(Fs, D))
            put(names.blk(i, names.FFN_DOWN_SHEXP), (D, Fs), lambda: mat(D, Fs, FFN_OUT_GAIN))
    put(names.OUTPUT_NORM, (D,), lambda: norm(D))

    def output_head() -> np.ndarray:
        # Rows of very different norms give peaked next-token distributions, as trained models
        # have, so that the top-1 token is not a near-tie decided by rounding.
        row_scale = np.exp(1.5 * rng.standard_normal((cfg.n_vocab, 1))).astype(np.float32)
        return mat(cfg.n_vocab, D, gain=3.0) * row_scale

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
        w.write_tensor_data(np.concatenate([_encode(m, qt).reshape(-1) for m in parts]) if len(shape) == 3 else _encode(parts[0], qt))
        done += int(np.prod(shape))
        if progress is not None:
            progress(done, total)
    w.close()
    return path


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


def write_preset(name: str, path: str, n_layer: int = 4, quant: str = "Q4_K_M", seed: int = 0, progress: Callable[[int, int], None] | None = None) -> str:
    """`localmoe synth`: a preset's shapes with `n_layer` blocks in `quant` — written directly
    (WRITE_TYPES) or as Q8_0 (F32 for the float and legacy types) re-quantized by llama.cpp.
    Tensors are made and written one at a time: memory stays around one expert tensor."""
    if n_layer < 1:
        raise LocalMoEError(f"--layers must be at least 1, got {n_layer}")
    if quant not in WRITE_TYPES and quant not in LLAMA_FTYPES:
        raise LocalMoEError(f"unknown quantization '{quant}'; choose one of {', '.join(sorted(set(WRITE_TYPES) | set(LLAMA_FTYPES)))}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LocalMoEError(f"cannot write {path}: folder {folder} does not exist")
    cfg = preset(name, n_layer=n_layer, seed=seed)
    if quant in WRITE_TYPES:
        return write_model(path, replace(cfg, weight_type=quant), progress)
    source = "Q8_0" if quant.startswith(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ", "MXFP4")) else "F32"  # as tests/conftest.py does
    tmp = f"{path}.{source}.tmp"
    try:
        write_model(tmp, replace(cfg, weight_type=source), progress)
        return quantize_with_llama_cpp(tmp, path, quant)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
