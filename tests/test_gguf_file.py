"""The GGUF reader: big metadata arrays (the vocabulary) are measured, not parsed, and everything
else reads exactly as gguf-py's own reader reads it."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader

from localmoe.bench.synth import SynthConfig, write_model
from localmoe.gguf.file import GGUFModel, _Reader


def test_big_arrays_are_skipped_and_the_rest_reads_as_gguf_py_reads_it(tmp_path):
    n_vocab = _Reader.LAZY_ARRAY + 1000  # tokens, their types and the scores' lengths pass the limit
    path = write_model(
        tmp_path / "m.gguf",
        SynthConfig(n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_expert=4, n_ff_exp=64, n_vocab=n_vocab),
    )
    ours, ref = GGUFModel(path), GGUFReader(path)
    assert len(ref.fields["tokenizer.ggml.tokens"].data) == n_vocab
    assert ours.meta("tokenizer.ggml.tokens") == [] and ours.meta("tokenizer.ggml.token_type") == []
    small = [
        k
        for k, f in ref.fields.items()
        if not (f.types and f.types[0].name == "ARRAY" and len(f.data) > _Reader.LAZY_ARRAY)
    ]
    assert "tokenizer.ggml.merges" in small and "tokenizer.chat_template" in small
    for key in small:
        assert ours.meta(key) == _value(ref.fields[key]), key
    assert [(t.name, int(t.data_offset), int(t.n_bytes)) for t in ours.reader.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in ref.tensors
    ]
    for t, r in zip(ours.reader.tensors, ref.tensors):
        np.testing.assert_array_equal(t.data, r.data)


def _value(field):
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def test_experts_are_repacked_at_load_within_host_mem_and_never_while_generating(make_model, monkeypatch):
    import localmoe
    import localmoe.compute.experts as experts_mod
    from localmoe.compute.kernels import native_lib

    path = make_model("qwen3moe", "Q4_0")
    ids = list(range(100, 140))
    with localmoe.load(path, device="cpu") as rt:
        ref = rt.logits(ids)
        n = rt.spec.n_expert * len(rt.spec.moe_layers)
        assert len(rt.store._cache) == (
            n if native_lib() is not None else 0
        )  # no VNNI kernel: every expert on ggml in place
    one = GGUFModel(path).expert_bytes(1)
    calls = []
    with localmoe.load(path, device="cpu", host_mem=int(3.5 * one)) as rt:
        assert rt.store._cached_bytes <= 3.5 * one and len(rt.store._cache) <= 3
        real = experts_mod.pack_ffn
        monkeypatch.setattr(experts_mod, "pack_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = rt.logits(ids)  # ggml's experts beside VNNI ones: the same model up to activation rounding (≈ 1e-2)
        assert (
            np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2 and (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
        )
        list(rt.stream("the model", max_tokens=8))
    assert calls == []  # nothing was repacked after load
