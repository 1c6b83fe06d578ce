"""Qwen1.5/Qwen2-MoE: GQA with q/k/v biases, NEOX RoPE, softmax → top-k routing (not
renormalised), and a shared expert behind a sigmoid gate. llama.cpp: src/models/qwen2moe.cpp."""

from typing import Any

from ..gguf import names
from .common import ArchSpec, Getter
from .qwen3moe import build_block  # noqa: F401  (GQA + MoE, from the declarations)

ARCH = ArchSpec(
    "qwen2moe",
    "Qwen1.5/Qwen2-MoE, with shared expert",
    "neox",
    qkv_bias=True,
    shared_expert="gated",
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M (tests/test_oracle.py)",
)


def read_args(get: Getter, tensor_shape) -> dict[str, Any]:
    n_ff_shexp = int(get(names.EXPERT_SHARED_FFN_LENGTH, 0) or 0)
    if not n_ff_shexp:
        shape = tensor_shape(names.blk(0, names.FFN_GATE_SHEXP))
        n_ff_shexp = shape[0] if shape else 0
    return {"n_ff_shexp": n_ff_shexp}
