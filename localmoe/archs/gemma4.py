"""Gemma 4 26B-A4B (`gemma4`): interleaved sliding-window and global attention whose layers differ
in head size, KV heads and RoPE (base, rotated dims; "proportional" RoPE on the global layers via
rope_freqs), q and k RMS-normed with weights and v without, attention scale 1, V = K where a layer
has no V projection; norms after attention and after the FFN as well as before (layers/postnorm.py);
an FFN that sums a dense GeGLU MLP and the routed experts, each with its own norms; a router that
reads rms(x)/√D · ffn_gate_inp.scale; GELU experts with gate and up fused in one tensor (split into
views at load: gguf/file.py), softmax → top-k → renormalised, each expert's output × its
ffn_down_exps.scale; embeddings × √n_embd and the final logit soft-cap. llama.cpp: src/models/gemma4.cpp.

Not here: per-layer embeddings (the small dense Gemma 4 E2B/E4B have them; 26B-A4B does not) and
layers sharing an earlier layer's KV cache (attention.shared_kv_layers, also the small ones'):
files with either are refused with a message.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch

from ..errors import LocalMoEError
from ..gguf import names
from ..layers.attention import GQA
from ..layers.block import Block, Weights
from ..layers.moe import MoE
from ..layers.postnorm import PostNormBlock
from ..layers.rope import Rope
from ..layers.routers import ROUTERS, Router
from .common import ArchSpec, Getter, fast_paths

ARCH = ArchSpec(
    "gemma4",
    "Gemma 4 26B-A4B",
    "neox",
    qk_norm="per_head",
    norm_topk=True,
    sliding_window=True,
    expert_act="geglu",
    swa_shapes=True,
    checked=(
        "logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M over 200 positions (window 32), prefill and token by token "
        "(tests/test_gemma4.py)"
    ),
)


def _per_layer(value: Any, n_layer: int, what: str) -> list:
    if isinstance(value, list):
        if len(value) < n_layer:
            raise LocalMoEError(
                f"gemma4: {what} lists {len(value)} values for {n_layer} layers; the file is inconsistent"
            )
        return value[:n_layer]
    return [value] * n_layer


def _one_per_kind(values: list, swa: tuple[bool, ...], kind: bool, what: str) -> Any:
    """The one value `values` holds for the layers whose window flag is `kind` (None: no such layer)."""
    got = {v for v, w in zip(values, swa) if w == kind}
    if len(got) > 1:
        raise LocalMoEError(
            f"gemma4: {what} differs among the {'windowed' if kind else 'global'} layers ({sorted(got)}); "
            "localmoe reads one value per kind of layer"
        )
    return got.pop() if got else None


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    n_layer = int(get(names.BLOCK_COUNT, 0))
    n_embd = int(get(names.EMBEDDING_LENGTH, 0))
    n_swa = get(names.SLIDING_WINDOW, None)
    if n_swa is None:
        raise LocalMoEError(f"metadata key 'gemma4.{names.SLIDING_WINDOW}' is missing; the file is incomplete")
    swa = tuple(
        bool(v) for v in _per_layer(get(names.SLIDING_WINDOW_PATTERN, True), n_layer, "the sliding-window pattern")
    )
    if int(get(names.SHARED_KV_LAYERS, 0) or 0) > 0:
        raise LocalMoEError(
            f"gemma4: layers that share an earlier layer's KV cache ({names.SHARED_KV_LAYERS} = "
            f"{get(names.SHARED_KV_LAYERS, 0)}, the small dense Gemma 4s) are not supported; localmoe runs "
            "Gemma 4 26B-A4B"
        )
    if int(get(names.EMBEDDING_LENGTH_PER_LAYER, 0) or 0) > 0 or tensor_shape(names.PER_LAYER_TOKEN_EMBD) is not None:
        raise LocalMoEError(
            "gemma4: per-layer embeddings (the small dense Gemma 4 E2B/E4B) are not supported; localmoe runs "
            "Gemma 4 26B-A4B"
        )
    kv = _per_layer(get(names.HEAD_COUNT_KV, get(names.HEAD_COUNT, 0)), n_layer, names.HEAD_COUNT_KV)
    n_head_kv, n_head_kv_swa = (
        _one_per_kind(kv, swa, False, names.HEAD_COUNT_KV),
        _one_per_kind(kv, swa, True, names.HEAD_COUNT_KV),
    )
    n_ff = _per_layer(get(names.FEED_FORWARD_LENGTH, 0), n_layer, names.FEED_FORWARD_LENGTH)
    if len(set(n_ff)) != 1:
        raise LocalMoEError(
            f"gemma4: the dense MLP's length differs between layers ({sorted(set(n_ff))}); localmoe reads one"
        )
    head_dim = int(get(names.KEY_LENGTH, 0))
    head_dim_swa = get(names.KEY_LENGTH_SWA, None)
    if head_dim_swa is None:
        raise LocalMoEError(f"metadata key 'gemma4.{names.KEY_LENGTH_SWA}' is missing; the file is incomplete")
    if int(get(names.VALUE_LENGTH, head_dim)) != head_dim or int(get(names.VALUE_LENGTH_SWA, head_dim_swa)) != int(
        head_dim_swa
    ):
        raise LocalMoEError("gemma4: key and value head sizes differ; Gemma 4 (and llama.cpp) needs them equal")
    base = float(get(names.ROPE_FREQ_BASE, 10000.0))
    n_rot = int(get(names.ROPE_DIMENSION_COUNT, head_dim))
    if not all(swa):
        shape = tensor_shape(names.ROPE_FREQS)
        if shape is None or tuple(shape) != (n_rot // 2,):
            raise LocalMoEError(
                f"gemma4: tensor '{names.ROPE_FREQS}' is "
                f"{'missing' if shape is None else f'of shape {shape}'}; the global layers need {n_rot // 2} "
                "RoPE frequency factors"
            )
    return {
        "n_swa": int(n_swa),
        "swa_layers": swa,
        "n_head_kv": int(n_head_kv if n_head_kv is not None else n_head_kv_swa),
        "n_head_kv_swa": int(n_head_kv_swa or 0),
        "head_dim_swa": int(head_dim_swa),
        "n_rot_swa": int(get(names.ROPE_DIMENSION_COUNT_SWA, head_dim_swa)),
        "rope_base_swa": float(get(names.ROPE_FREQ_BASE_SWA, base)),
        "n_ff_dense": int(n_ff[0]),
        "embd_scale": float(np.sqrt(np.float32(n_embd))),  # llama.cpp: ggml_scale by sqrtf(n_embd)
        "final_logit_softcap": float(
            get(names.FINAL_LOGIT_SOFTCAPPING, 30.0)
        ),  # llama.cpp's default when the key is absent
        "routing": "softmax_topk",
        "norm_topk": True,  # build_moe_ffn(..., norm_w = true, scale 1)
    }


def attn_scale(spec: Any) -> float:
    """llama.cpp's f_attention_scale for Gemma 4: 1 (q and k are RMS-normed instead)."""
    return 1.0


def layer_spec(spec: Any, i: int) -> Any:
    """The ModelSpec of layer i's attention: the file's (global) fields, or the windowed layers' own."""
    if not spec.is_swa(i):
        return spec
    return dataclasses.replace(
        spec,
        n_head_kv=spec.n_head_kv_swa,
        head_dim=spec.head_dim_swa,
        head_dim_v=spec.head_dim_swa,
        n_rot=spec.n_rot_swa,
        rope_base=spec.rope_base_swa,
    )


@functools.lru_cache(maxsize=8)
def _rope(spec: Any, freq_factors: tuple[float, ...] | None) -> Rope:
    """One rotation per kind of layer (its tables are shared by every layer of that kind)."""
    return Rope(spec, None if freq_factors is None else torch.tensor(freq_factors, dtype=torch.float32))


def required_tensors(spec: Any, layer: int) -> list[str | tuple[str, str]]:
    """What llama.cpp's loader requires of a Gemma 4 MoE block (attn_v is optional: V = K without it)."""
    return [
        names.ATTN_NORM,
        names.ATTN_Q,
        names.ATTN_K,
        names.ATTN_OUT,
        names.ATTN_Q_NORM,
        names.ATTN_K_NORM,
        names.ATTN_POST_NORM,
        names.FFN_NORM,
        names.FFN_GATE,
        names.FFN_UP,
        names.FFN_DOWN,
        names.FFN_POST_NORM,
        names.FFN_GATE_INP,
        (names.FFN_GATE_INP, names.SCALE),
        names.FFN_PRE_NORM_2,
        names.FFN_POST_NORM_1,
        names.FFN_POST_NORM_2,
        *names.EXPERT_PARTS,
    ]


def build_block(w: Weights, spec: Any, i: int) -> Block:
    """Layer i: GQA of its kind (windowed: its own shape and RoPE; global: proportional RoPE), then
    the dense GeGLU MLP beside the routed experts, in layers/postnorm.py's order."""
    blk = lambda stem, kind="weight": names.blk(i, stem, kind)  # noqa: E731
    fast = fast_paths(spec)
    ls = layer_spec(spec, i)
    factors = None if spec.is_swa(i) else tuple(w.load(names.ROPE_FREQS).reshape(-1).tolist())
    attn = GQA.load(
        w, i, qk_norm="per_head", fast=fast, v_norm=True, spec=ls if ls is not spec else None, rope=_rope(ls, factors)
    )
    D = spec.n_embd
    router = Router(
        weight=w.load(blk(names.FFN_GATE_INP)).reshape(spec.n_expert, D),
        select=ROUTERS[spec.routing][0],
        c_router="c_router" in fast,
        input_scale=w.load(blk(names.FFN_GATE_INP, names.SCALE)).reshape(D),
        input_gain=float(np.float32(1.0) / np.sqrt(np.float32(D))),  # ggml_scale(1/sqrtf(n_embd)) in float32
    )
    scale = w.maybe(blk(names.FFN_DOWN_EXPS, names.SCALE))
    moe = MoE(
        router=router,
        expert_norm=w.load(blk(names.FFN_PRE_NORM_2)),
        expert_scale=None if scale is None else scale.reshape(spec.n_expert),
    )
    return PostNormBlock(
        attn_norm=w.load(blk(names.ATTN_NORM)),
        attn=attn,
        ffn_norm=torch.ones(D, device=w.device),
        moe=moe,
        attn_post_norm=w.load(blk(names.ATTN_POST_NORM)),
        dense=w.ffn(i, (names.FFN_GATE, names.FFN_UP, names.FFN_DOWN), act="geglu"),
        dense_norm=w.load(blk(names.FFN_NORM)),
        dense_post_norm=w.load(blk(names.FFN_POST_NORM_1)),
        moe_post_norm=w.load(blk(names.FFN_POST_NORM_2)),
        ffn_post_norm=w.load(blk(names.FFN_POST_NORM)),
        out_scale=w.maybe(blk(names.LAYER_OUT_SCALE)),
    )
