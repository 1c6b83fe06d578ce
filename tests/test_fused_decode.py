"""compute/fused_decode.py: a decode token through a whole plain layer in one C call gives the
Python path's logits and routing counts to the bit, covers exactly the layers it can, and leaves
every other layer to the Python path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import localmoe
import localmoe.compute.fused_decode as FD
import localmoe.model as M
from conftest import arch_config
from localmoe.bench.synth import write_model
from localmoe.compute.kernels import native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no AVX-512 VNNI C kernel: nothing to fuse")


def _uses(rt) -> np.ndarray:
    """Routed uses so far [L, E], from the public stats."""
    return np.array([layer.expert_uses for layer in rt.stats().layers])


def _decode(rt, ids: list[int], fused: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A prompt of 8 tokens, then the rest one by one: (the logits of each step [n, V], the routed
    uses [L, E] counted in this run)."""
    m = rt.model
    m.fused_decode = fused
    before = _uses(rt)
    cache = M.KVCache(rt.spec, 128, torch.device("cpu"))
    out = [m.forward(torch.tensor(ids[:8]), cache, all_logits=False)]
    for t in ids[8:]:
        out.append(m.forward(torch.tensor([t]), cache, all_logits=False))
    return torch.cat(out), _uses(rt) - before


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_fused_layers_equal_the_python_path(make_model, qtype, monkeypatch):
    path = make_model("qwen3moe", qtype)
    ids = np.random.default_rng(1).integers(0, 200, 40).tolist()
    runs = []  # per C call: the run of layers (lm_decode_layers) or the whole token (lm_decode_token)
    real_run, real_token = FD.FusedDecode.run, FD.FusedDecode.token
    monkeypatch.setattr(FD.FusedDecode, "run", lambda self, *a: runs.append("run") or real_run(self, *a))
    monkeypatch.setattr(FD.FusedDecode, "token", lambda self, *a: runs.append("token") or real_token(self, *a))
    with localmoe.load(path, device="cpu") as rt:
        planned = rt.model._fused  # planned at load, so that the first decode step does not
        assert planned is not None and sorted(planned.layers) == list(range(rt.spec.n_layer))
        assert planned.whole  # every layer, and a head the C matvec takes: the token in one call
        ref, ref_uses = _decode(rt, ids, fused=False)
        assert runs == []  # the Python path
        got, uses = _decode(rt, ids, fused=True)
        assert runs == ["token"] * (len(ids) - 8) and rt.model._fused is planned  # one call a token, the plan kept
    assert torch.equal(got, ref)
    np.testing.assert_array_equal(uses, ref_uses)
    assert uses.sum() == (len(ids) * rt.spec.n_expert_used) * rt.spec.n_layer


def test_layers_that_differ_run_the_python_path(make_model):
    """Qwen2-MoE's attention biases and shared expert are not what the C layer computes: no layer
    is fused, and decoding still works."""
    path = make_model("qwen2moe", "Q8_0")
    ids = np.random.default_rng(2).integers(0, 200, 20).tolist()
    with localmoe.load(path, device="cpu") as rt:
        ref, _ = _decode(rt, ids, fused=False)
        got, _ = _decode(rt, ids, fused=True)
        assert rt.model._fused is None
    assert torch.equal(got, ref)


def test_windowed_and_sink_layers_run_the_python_path(make_model):
    """The C decode attention takes windows and sinks (c_decode is set on gpt-oss's and Gemma 4's
    layers), lm_decode_layer's does not: none of their layers is fused, nor a windowed or sink
    layer of a file otherwise plain, while its other layers still are."""
    for arch in ("gpt-oss", "gemma4"):
        with localmoe.load(make_model(arch, "Q8_0"), device="cpu") as rt:
            assert all(lw.attn.c_decode for lw in rt.model.layers)
            assert rt.model._fused is None and FD.FusedDecode.build(rt.model) is None
    with localmoe.load(make_model("qwen3moe", "Q8_0"), device="cpu") as rt:
        m, s = rt.model, rt.spec
        assert sorted(FD.FusedDecode.build(m).layers) == list(range(s.n_layer))
        m.spec = dataclasses.replace(s, n_swa=8, swa_layers=(True,) + (False,) * (s.n_layer - 1))  # layer 0 windowed
        assert sorted(FD.FusedDecode.build(m).layers) == list(range(1, s.n_layer))
        m.spec = s
        m.layers[0].attn.sinks = torch.zeros(s.n_head)  # layer 0 with sinks
        assert sorted(FD.FusedDecode.build(m).layers) == list(range(1, s.n_layer))
        m.layers[0].attn.sinks = None


def test_experts_in_place_keep_their_layer_on_the_python_path(make_model):
    """Under a host-RAM budget some experts run in place on ggml: a layer with any of them is not
    fused (its descriptors would point at experts that are not repacked), the others are."""
    path = make_model("qwen3moe", "Q4_0")
    ids = np.random.default_rng(3).integers(0, 200, 30).tolist()
    with localmoe.load(path, device="cpu") as rt:
        per_layer = rt.gguf.expert_bytes(0) * rt.spec.n_expert
    with localmoe.load(path, device="cpu", host_mem=int(per_layer * 1.5)) as rt:
        ref, _ = _decode(rt, ids, fused=False)
        got, _ = _decode(rt, ids, fused=True)
        s = rt.store.summary()
        fused = rt.model._fused
        assert s["in_place"] > 0 and s["repacked"] > 0
        assert fused is not None and 0 < len(fused.layers) < rt.spec.n_layer
        for layer in fused.layers:
            assert all(rt.store.repacked(layer, e) is not None for e in range(rt.spec.n_expert))
    assert torch.equal(got, ref)


def test_fused_layers_in_separate_runs_equal_the_python_path(tmp_path, monkeypatch):
    """Fused layers between Python-path ones: each run of consecutive fused layers is one C call
    (lm_decode_layers) and the logits and routing counts are still the Python path's."""
    plain = FD._layer
    monkeypatch.setattr(FD, "_layer", lambda model, i, lw: None if i == 1 else plain(model, i, lw))
    path = str(tmp_path / "five-layers.gguf")
    write_model(path, arch_config("qwen3moe", weight_type="Q4_0", n_layer=5))
    ids = np.random.default_rng(4).integers(0, 200, 30).tolist()
    with localmoe.load(path, device="cpu") as rt:
        ref, ref_uses = _decode(rt, ids, fused=False)
        got, uses = _decode(rt, ids, fused=True)
        spans = {first: run for first, (run, _) in rt.model._fused.spans.items()}
    assert spans == {0: [0], 2: list(range(2, rt.spec.n_layer))}
    assert torch.equal(got, ref)
    np.testing.assert_array_equal(uses, ref_uses)


@pytest.mark.parametrize("tied", [False, True])
def test_whole_token_reads_its_embedding_row_in_c(tmp_path, tied):
    """The whole-token call reads the token's embedding row with one C call: from the repacked
    table where the head is tied to it (lm_r16_rows), else from the file's table in place (ggml's
    lg_rows). The logits equal the Python path's to the bit; an id past the table is an IndexError
    before anything runs, and the cache is left as it was."""
    path = str(tmp_path / f"tied-{tied}.gguf")
    write_model(path, dataclasses.replace(arch_config("qwen3moe", weight_type="Q8_0"), tied_output=tied))
    ids = np.random.default_rng(5).integers(0, 200, 20).tolist()
    with localmoe.load(path, device="cpu") as rt:
        fused = rt.model._fused
        assert fused.whole and fused._embed_row is not None
        assert (rt.model.embd_packed is not None) == tied and (rt.model.embd_mapped is not None) != tied
        ref, _ = _decode(rt, ids, fused=False)
        got, _ = _decode(rt, ids, fused=True)
        cache = rt.new_cache()
        rt.model.forward(torch.tensor(ids[:8]), cache)
        with pytest.raises(IndexError, match="row id out of range"):
            rt.model.forward(torch.tensor([rt.spec.n_vocab]), cache)
        assert cache.n == 8
    assert torch.equal(got, ref)


def test_phase_timers_count_each_step_of_a_fused_decode(make_model):
    """vnni.c's per-step timers (scripts/token-profile) advance in every step while fused layers
    decode, and together stay within the wall time of those tokens."""
    import time

    path = make_model("qwen3moe", "Q4_0")
    with localmoe.load(path, device="cpu") as rt:
        cache = M.KVCache(rt.spec, 64, torch.device("cpu"))
        rt.model.forward(torch.tensor([1, 2, 3]), cache, all_logits=False)
        before, t0 = FD.phase_seconds(), time.perf_counter()
        for t in range(4, 20):
            rt.model.forward(torch.tensor([t]), cache, all_logits=False)
        wall = time.perf_counter() - t0
        after = FD.phase_seconds()
        assert rt.model._fused is not None
    spent = {name: after[name] - before[name] for name in FD.PHASES}
    assert all(s > 0 for s in spent.values()), spent
    assert sum(spent.values()) <= wall


def test_uses_counted_in_c_reach_the_stats_once(make_model):
    """A whole-token call counts its routed uses in C (running totals); the stats take the new ones
    when they are looked at, never twice, and a plan that is replaced hands over its last counts
    and its hook."""
    ids = np.random.default_rng(3).integers(0, 200, 20).tolist()
    with localmoe.load(make_model("qwen3moe", "Q4_0"), device="cpu") as rt:
        old = rt.model._fused
        assert old.whole and old.absorb_uses in rt._stats._on_snapshot
        _, uses = _decode(rt, ids, fused=True)
        assert uses.sum() == len(ids) * rt.spec.n_expert_used * rt.spec.n_layer
        assert (_uses(rt) == _uses(rt)).all()  # a second look adds nothing
        cache = rt.new_cache()
        rt.model.forward(torch.tensor(ids[:8]), cache)
        rt.model.forward(torch.tensor(ids[8:9]), cache)  # counted by the old plan, not yet looked at
        before = old.uses.sum()
        rt.model._fused_key = None  # the next lookup plans again (as after the executor changed)
        new = rt.model._fused_decode()
        assert new is not old and old.absorb_uses not in rt._stats._on_snapshot
        assert new.absorb_uses in rt._stats._on_snapshot
        assert old.uses.sum() == before and _uses(rt).sum() == (len(ids) + 9) * rt.spec.n_expert_used * rt.spec.n_layer
