"""gpt-oss (OpenAI's gpt-oss-20b / -120b): GQA with biases on q, k, v and the output, NEOX RoPE
with YaRN, a learned attention sink per head, sliding-window attention on alternate layers (the
even ones by default), top-k over the biased router logits then a softmax over the k chosen, and
routed experts with biases and the clamped SwiGLU (compute/experts.py); experts ship in MXFP4.
No shared expert, no dense layers. llama.cpp: src/models/openai-moe.cpp (arch name "gpt-oss").
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import LocalMoEError
from ..gguf import names
from .common import ArchSpec, Getter
from .qwen3moe import build_block  # noqa: F401  (GQA with sinks and windows + MoE, from the declarations)

ARCH = ArchSpec(
    "gpt-oss",
    "gpt-oss-20b, gpt-oss-120b",
    "neox",
    qkv_bias=True,
    routings=("topk_softmax",),
    rope_scalings=("none", "linear", "yarn"),
    ffn_norm=names.ATTN_POST_NORM,
    sinks=True,
    sliding_window=True,
    router_bias=True,
    expert_bias=True,
    expert_act="swiglu_oai",
    checked=(
        "logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M, MXFP4_MOE; sinks, windowed layers and YaRN in every case "
        "(tests/test_oracle.py, tests/test_gpt_oss.py)"
    ),
)


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    n_swa = get(names.SLIDING_WINDOW, None)
    if n_swa is None:
        raise LocalMoEError(f"metadata key 'gpt-oss.{names.SLIDING_WINDOW}' is missing; the file is incomplete")
    n_layer = int(get(names.BLOCK_COUNT, 0))
    pattern = get(names.SLIDING_WINDOW_PATTERN, 2)
    if isinstance(pattern, list):  # one flag per layer
        swa = tuple(bool(v) for v in pattern[:n_layer])
    else:  # llama.cpp's set_swa_pattern: every layer but each n-th is windowed (n = 0: all of them)
        n = int(pattern)
        swa = tuple(n == 0 or il % n < n - 1 for il in range(n_layer))
    base, base_swa = get(names.ROPE_FREQ_BASE, 10000.0), get(names.ROPE_FREQ_BASE_SWA, None)
    if base_swa is not None and float(base_swa) != float(base):
        raise LocalMoEError(
            f"gpt-oss: a separate RoPE base for the windowed layers ({base_swa} vs {base}) is not supported"
        )
    # llama.cpp: top-k of the logits, a softmax over the k chosen, never renormalised
    return {"n_swa": int(n_swa), "swa_layers": swa, "routing": "topk_softmax", "norm_topk": False}


def attn_scale(spec: Any) -> float:
    """llama.cpp's kq_scale for gpt-oss: 1/sqrt(n_rot)."""
    return 1.0 / math.sqrt(spec.n_rot)


def required_tensors(spec: Any, layer: int) -> list[str | tuple[str, str]]:
    """Everything llama.cpp's loader requires of a gpt-oss block (the q/k/v biases are optional there)."""
    return [
        *names.GQA_PARTS,
        (names.ATTN_OUT, "bias"),
        names.ATTN_SINKS,
        names.ATTN_POST_NORM,
        names.FFN_GATE_INP,
        (names.FFN_GATE_INP, "bias"),
        *names.EXPERT_PARTS,
        *((p, "bias") for p in names.EXPERT_BIAS_PARTS),
    ]
