"""localmoe/gguf/qtypes.py is the one table of quant types: the per-type sets of the block decoder,
the ggml backend, the CPU backend policy, the Triton kernels and the benchmarks are read from it,
and its sizes and file types are gguf-py's."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from localmoe.bench import speed, synth
from localmoe.compute import ggml_backend, kernels
from localmoe.compute.ggml_backend import ggml
from localmoe.gguf import blocks, qtypes

Q = GGMLQuantizationType


def test_sizes_and_file_types_are_gguf_pys():
    for q, t in qtypes.TYPES.items():
        assert (t.block, t.type_size) == GGML_QUANT_SIZES[q] == blocks.BLOCK_SIZES[q]
    assert synth.LLAMA_FTYPES["Q4_K_M"] == 15 == int(LlamaFileType.MOSTLY_Q4_K_M)
    assert synth.LLAMA_FTYPES["MXFP4_MOE"] == 38 and synth.LLAMA_FTYPES["F16"] == 1
    assert set(synth.LLAMA_FTYPES) == set(qtypes.FILE_TYPES)


def test_the_sets_are_the_tables():
    affine = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert blocks.BLOCK_TYPES == affine == set(kernels.R16_TYPES) == kernels.VNNI_PREFERRED
    assert blocks.GGML_ONLY_TYPES == blocks.QUANT_TYPES - affine and len(blocks.QUANT_TYPES) == 20
    assert ggml_backend.GGML_COMPUTE_TYPES == tuple(sorted(blocks.QUANT_TYPES, key=int))  # ggml's enum order
    assert kernels.ACT_BLOCK == {Q.Q2_K: 256, Q.Q3_K: 256, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}
    assert qtypes.INT4_TYPES == {Q.Q4_0, Q.Q4_1, Q.Q4_K}
    assert kernels.R16_TYPES[Q.Q6_K] == (6, 16, 32, False) and kernels.R16_TYPES[Q.Q4_1] == (4, 32, 0, True)
    assert set(speed.BLOCK_LAYOUTS) == {q.name for q in affine}
    assert set(speed.RANDOM_LAYOUTS) - set(speed.BLOCK_LAYOUTS) == {"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4"}
    codes = sorted(t.triton for t in qtypes.TYPES.values() if t.triton is not None)
    assert codes == list(range(13))  # one code per Triton type, the branches of its _dequant


@pytest.mark.skipif(ggml() is None or kernels.native_lib() is None, reason="needs both CPU kernels")
def test_a_vnni_type_measured_slower_goes_to_ggml(monkeypatch):
    """The policy reads the table's `cpu` column: a type both kernels take goes to ggml when the
    table says ggml was measured faster."""
    cpu = torch.device("cpu")
    assert kernels.backend_reason(Q.Q4_K, cpu) == ("vnni", "built; measured faster than ggml for this type")
    monkeypatch.setattr(kernels, "VNNI_PREFERRED", kernels.VNNI_PREFERRED - {Q.Q4_K})
    assert kernels.backend_reason(Q.Q4_K, cpu) == ("ggml", "measured faster than vnni for this type")
