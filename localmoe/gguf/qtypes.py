"""The one table of GGUF quant types: what each quantized type is and which of localmoe's kernels
take it. Every per-type set elsewhere (gguf/blocks.py, the ggml backend, the VNNI kernel's policy,
the Triton kernels, the benchmarks) is derived from TYPES here; block sizes and llama.cpp's file
types come from the `gguf` package (gguf-py), never retyped.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    qtype: GGMLQuantizationType
    # The exact affine form w = scale · code + zero that gguf/blocks.py `decode` gives, as (code bits,
    # weights per scale, offset (zero = −offset · scale when the block stores no zero), stores a zero);
    # None: no affine form. The VNNI kernel, the int4/bf16 repacks and the C r16 repacker take these.
    affine: tuple[int, int, int, bool] | None = None
    ggml: bool = (
        True  # localmoe hands the type to ggml's CPU kernels (every type llama.cpp's quantizer makes for MoE models)
    )
    # The CPU kernel measured faster where both the VNNI kernel and ggml take the type (AMD EPYC Zen 4,
    # 2 threads, the Qwen3-30B-A3B shape; docs/speed.md): "vnni" or "ggml".
    cpu: str = "ggml"
    triton: int | None = (
        None  # the Triton kernels' type code (their `QT ==` branches, compute/triton_gguf.py); None: none
    )
    group: int | None = None  # weights per scale group as the Triton kernels decode them (the affine types': theirs)
    # Activation values per scale when llama.cpp multiplies a weight of the type: its vec_dot_type,
    # Q8_K (256) for the K-types, Q8_0 or Q8_1 (32) for the others. The VNNI kernel rounds the same way.
    act_block: int = 32
    f16_at: tuple[int, ...] | None = (
        None  # byte offsets of the block's float16 scales (random test blocks); None: not described
    )
    # The VNNI kernel's row-interleaved layout keeps the type's own sub-scales (a byte per group, the
    # block's float16 d and dmin per 256 weights) instead of a float16 scale per group: 1 unsigned
    # (Q4_K, Q5_K, with mins), 2 signed (Q6_K); 0: float16 scales (compute/kernels.py K_SCALES).
    kscale: int = 0

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block(self) -> int:
        """Weights per block (gguf-py's GGML_QUANT_SIZES)."""
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        """Bytes per block (gguf-py's GGML_QUANT_SIZES)."""
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def int4(self) -> bool:
        """4-bit codes in groups of 32: torch's int4 matmul (the CPU fallback) takes the type."""
        return self.affine is not None and self.affine[:2] == (4, 32)


def _affine(qtype: GGMLQuantizationType, bits: int, group: int, offset: int, zero: bool, **kw) -> QuantType:
    """A type with an affine form: the VNNI kernel takes it, and was measured faster than ggml on it."""
    return QuantType(qtype, (bits, group, offset, zero), cpu="vnni", group=group, **kw)


# Every quantized type localmoe reads, in ggml's enum order (the order ggml's tables are checked in).
_TABLE = (
    _affine(Q.Q4_0, 4, 32, 8, False, triton=0, f16_at=(0,)),
    _affine(Q.Q4_1, 4, 32, 0, True, triton=1, f16_at=(0, 2)),
    _affine(Q.Q5_0, 5, 32, 16, False, triton=2, f16_at=(0,)),
    _affine(Q.Q5_1, 5, 32, 0, True, triton=3, f16_at=(0, 2)),
    _affine(Q.Q8_0, 8, 32, 128, False, triton=4, f16_at=(0,)),
    QuantType(Q.Q2_K, triton=8, group=16, act_block=256, f16_at=(80, 82)),
    QuantType(Q.Q3_K, triton=9, group=16, act_block=256, f16_at=(108,)),
    _affine(Q.Q4_K, 4, 32, 0, True, triton=5, act_block=256, f16_at=(0, 2), kscale=1),
    _affine(Q.Q5_K, 5, 32, 0, True, triton=6, act_block=256, f16_at=(0, 2), kscale=1),
    _affine(Q.Q6_K, 6, 16, 32, False, triton=7, act_block=256, f16_at=(208,), kscale=2),
    QuantType(Q.IQ2_XXS),
    QuantType(Q.IQ2_XS),
    QuantType(Q.IQ3_XXS),
    QuantType(Q.IQ1_S),  # grid-coded: ggml only
    QuantType(Q.IQ4_NL, triton=10, group=32, f16_at=(0,)),  # non-linear 16-value code books
    QuantType(Q.IQ3_S),
    QuantType(Q.IQ2_S),
    QuantType(Q.IQ4_XS, triton=11, group=32, f16_at=(0,)),
    QuantType(Q.IQ1_M),
    QuantType(Q.MXFP4, triton=12, group=32, f16_at=()),  # gpt-oss's experts
)
TYPES: dict[GGMLQuantizationType, QuantType] = {t.qtype: t for t in _TABLE}
BY_NAME: dict[str, QuantType] = {t.name: t for t in TYPES.values()}

FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
QUANT_TYPES = frozenset(TYPES)
AFFINE_TYPES = frozenset(q for q, t in TYPES.items() if t.affine is not None)  # blocks.BLOCK_TYPES
GGML_TYPES = tuple(q for q, t in TYPES.items() if t.ggml)  # in ggml's enum order
INT4_TYPES = frozenset(q for q, t in TYPES.items() if t.int4)
TRITON_TYPES = frozenset(q for q, t in TYPES.items() if t.triton is not None)

# The file types llama.cpp's quantizer writes (llama.h's LLAMA_FTYPE_MOSTLY_*, gguf-py's
# LlamaFileType) that localmoe reads: the float ones, the plain block types and the mixes. The
# IQ1/IQ2/IQ3 mixes are left out: they need an importance matrix.
FILE_TYPES: dict[str, LlamaFileType] = {
    name: LlamaFileType[f"MOSTLY_{name}"]
    for name in (
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q8_0",
        "Q5_0",
        "Q5_1",
        "Q4_K_M",
        "Q4_K_S",
        "Q5_K_M",
        "Q6_K",
        "Q2_K",
        "Q3_K_S",
        "Q3_K_M",
        "Q3_K_L",
        "Q5_K_S",
        "IQ4_NL",
        "IQ4_XS",
        "MXFP4_MOE",
    )
}
