"""Mixtral-style llama files (expert_count > 0): GQA, adjacent-pair ("norm") RoPE, softmax → top-k →
renormalised routing. llama.cpp: src/models/llama.cpp."""

from .common import ArchSpec, read_args  # noqa: F401
from .qwen3moe import build_block  # noqa: F401  (GQA + MoE, from the declarations)

ARCH = ArchSpec(
    "llama",
    "Mixtral-style llama files with expert_count > 0",
    "norm",
    norm_topk=True,
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M (tests/test_oracle.py)",
)
