"""OLMoE: GQA with an RMS norm of q and k over all heads at once, NEOX RoPE, softmax → top-k
routing (not renormalised). llama.cpp: src/models/olmoe.cpp."""

from .common import ArchSpec, read_args  # noqa: F401
from .qwen3moe import build_block  # noqa: F401  (GQA + MoE, from the declarations)

ARCH = ArchSpec(
    "olmoe",
    "OLMoE",
    "neox",
    qk_norm="full",
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M (tests/test_oracle.py)",
)
