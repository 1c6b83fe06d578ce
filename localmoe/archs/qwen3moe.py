"""Qwen3-MoE (e.g. Qwen3-30B-A3B): GQA with a per-head RMS norm of q and k, NEOX RoPE, softmax →
top-k → renormalised routing, no shared expert. llama.cpp: src/models/qwen3moe.cpp."""

from .common import ArchSpec, read_args  # noqa: F401  (read_args: nothing beyond the common keys)

ARCH = ArchSpec(
    "qwen3moe", "Qwen3-MoE (e.g. Qwen3-30B-A3B)", "neox", qk_norm="per_head", norm_topk=True,
    checked="logits vs llama.cpp: F32, Q8_0, Q4_0, Q4_K_M, F16, BF16, Q4_1, Q5_0, Q5_1 (tests/test_oracle.py)",
)
