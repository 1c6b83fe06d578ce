"""One module per architecture: the registry, the declarations, the fast paths that read them, the blocks
each module builds, and a driver that names none of their kinds."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

import localmoe
import localmoe.compute.experts as experts_mod
import localmoe.layers.attention as attention_mod
import localmoe.layers.routers as routers_mod
import localmoe.model as model_mod
from conftest import ARCHS
from localmoe import archs
from localmoe.archs.common import FAST_PATHS, Attention, ExpertAct, QKNorm, Routing, fast_paths
from localmoe.compute.experts import ExpertStore
from localmoe.compute.kernels import native_lib
from localmoe.gguf.file import GGUFModel
from localmoe.layers.attention import GQA
from localmoe.layers.deltanet import GatedDeltaNet
from localmoe.layers.mla import MLA
from localmoe.layers.routers import ROUTERS
from localmoe.model import KVCache, MoEModel
from localmoe.residency.resident import AllResident
from localmoe.stats import StatsCollector


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_picks_the_module_from_general_architecture(make_model, arch):
    m = GGUFModel(make_model(arch, "F32"))
    assert archs.module_for(arch).ARCH is m.spec.arch
    assert m.spec.arch.name == arch


def test_declarations_decide_the_fast_paths(make_model):
    got = {a: fast_paths(GGUFModel(make_model(a, "F32")).spec) for a in ARCHS}
    assert got["qwen3moe"] == got["llama"] == frozenset(FAST_PATHS)
    assert "fused_qk_norm_rope" not in got["qwen2moe"]  # q/k/v biases
    assert "fused_qk_norm_rope" not in got["olmoe"]  # q/k norm over all heads
    assert {"c_router", "c_decode_attention"} <= got["qwen2moe"] & got["olmoe"]
    assert got["glm4moe"] == {
        "embedding_gather",
        "c_decode_attention",
        "fused_experts",
    }  # biases; sigmoid routing: no C router
    assert got["deepseek2"] == {
        "embedding_gather",
        "c_router",
        "fused_experts",
    }  # MLA: not the GQA kernels; softmax routing (V2): the C router
    # the C attention takes its sinks and windows; biases, sinks and windows: no fused q/k-norm+RoPE; top-k then
    # softmax: no C router; clamped SwiGLU: no fused experts
    assert got["gpt-oss"] == {"embedding_gather", "c_decode_attention"}
    assert got["gemma4"] == {"embedding_gather", "c_decode_attention", "c_router"}  # windows, v norm; GeGLU


# the modules that call the C router, the C decode attention and the fused q/k-norm + RoPE
FAST_CALL_SITES = {"route": routers_mod, "attn_decode": attention_mod, "qk_norm_rope": attention_mod}


class _Spy:
    def __init__(self, fn, allowed: bool):
        self.fn, self.allowed, self.calls = fn, allowed, 0  # allowed: False makes a call fail the test

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if not self.allowed:
            raise AssertionError(f"{self.fn.__name__} ran on an architecture that did not declare what it needs")
        return self.fn(*args, **kwargs)


def _run(gguf: GGUFModel, ids: list[int], monkeypatch, allowed: set[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Prefill 16 ids, then decode the rest one by one (decode attention's path) → logits [len-15, V].
    allowed: the fast calls that may run (FAST_CALL_SITES' and swiglu_decode); any other fails the test."""
    spies = {name: _Spy(getattr(mod, name), name in allowed) for name, mod in FAST_CALL_SITES.items()}
    for name, spy in spies.items():
        monkeypatch.setattr(FAST_CALL_SITES[name], name, spy)
    spies["swiglu_decode"] = _Spy(experts_mod.swiglu_decode, "swiglu_decode" in allowed)
    monkeypatch.setattr(experts_mod, "swiglu_decode", spies["swiglu_decode"])
    stats = StatsCollector(gguf.spec.n_layer, gguf.spec.n_expert)
    m = MoEModel(gguf, AllResident(ExpertStore(gguf, torch.device("cpu"), 1 << 30), stats), torch.device("cpu"))
    cache = KVCache(gguf.spec, 256, torch.device("cpu"))
    steps = [m.forward(torch.tensor(ids[:16]), cache)[-1]]
    for t in ids[16:]:
        steps.append(m.forward(torch.tensor([t]), cache)[-1])
    monkeypatch.undo()
    return torch.stack(steps).numpy(), {k: s.calls for k, s in spies.items()}


def test_undeclared_fast_paths_do_not_run_and_the_reference_path_is_right(make_model, monkeypatch):
    """A qwen3moe file read as an architecture that declares q/k/v biases (none in this file), a
    sliding window (of no length here), expert biases (none here) and expert groups (two of four
    experts each, both used): nothing changes the numbers, but the fused q/k-norm+RoPE, the C
    router and the fused expert kernel no longer fit the declarations — they must not run, and the
    logits must stay right. The C decode attention (which takes biased q/k/v once torch added the
    biases, and windows) still does."""
    path = make_model("qwen3moe", "Q8_0")
    ids = np.random.default_rng(3).integers(0, 300, 24).tolist()
    every = {*FAST_CALL_SITES, "swiglu_decode"}
    base, calls = _run(GGUFModel(path), ids, monkeypatch, allowed=every)
    if native_lib() is not None:  # the spies see the fast paths when they are allowed
        assert calls["route"] and calls["attn_decode"] and calls["qk_norm_rope"] and calls["swiglu_decode"]
    other = GGUFModel(path)
    arch = dataclasses.replace(other.spec.arch, qkv_bias=True, sliding_window=True, expert_bias=True)
    other.spec = dataclasses.replace(other.spec, arch=arch, n_expert_groups=2, n_group_used=2)
    assert fast_paths(other.spec) == {"embedding_gather", "c_decode_attention"}
    ref, calls = _run(other, ids, monkeypatch, allowed={"attn_decode"})
    n_decoded = len(ids) - 16
    assert calls == {"route": 0, "attn_decode": n_decoded * other.spec.n_layer, "qk_norm_rope": 0, "swiglu_decode": 0}
    np.testing.assert_allclose(ref, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
    with localmoe.load(path, device="cpu") as rt:  # and both are the one-pass logits
        full = rt.logits(ids)[15:]
    np.testing.assert_allclose(ref, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_layers_without_experts_have_no_resident_experts():
    snap = StatsCollector(4, 8, moe_layers=(1, 2, 3)).snapshot()
    assert [len(layer.resident) for layer in snap.layers] == [0, 8, 8, 8]


def _driver_words() -> tuple[set[str], set[str]]:
    """localmoe/model.py's identifiers (names, attributes, definitions, imports) and its string
    constants other than docstrings, lowercased."""
    tree = ast.parse(Path(model_mod.__file__).read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    idents, strings = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            idents.add(n.id)
        elif isinstance(n, ast.Attribute):
            idents.add(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            idents.add(n.name)
        elif isinstance(n, ast.alias):
            idents.add(n.asname or n.name)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            strings.add(n.value)
    return {w.lower() for w in idents}, {s.lower() for s in strings}


def test_the_driver_names_no_attention_routing_or_activation_kind():
    """The forward driver runs whatever blocks the architecture modules build: no attention kind,
    router kind or activation appears in its code (a branch on one would need its name)."""
    kinds = {*get_args(Attention), *get_args(Routing), *get_args(ExpertAct), *get_args(QKNorm)} - {"none"}
    words = {
        "gqa",
        "mla",
        "swiglu",
        "geglu",
        "silu",
        "gelu",
        "softmax",
        "sigmoid",
        "topk",
        "sink",
        "swa",
        "window",
        "per_head",
        "qk_norm",
        "routing",
        "shared_expert",
    }
    idents, strings = _driver_words()
    assert "forward" in idents and "cache_rows" in idents  # the walk sees the module's code
    assert not {i for i in idents if any(w in i for w in words)}
    assert not {s for s in strings if s in kinds or any(w in s for w in words)}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_module_builds_the_blocks_the_driver_runs(make_model, arch, monkeypatch):
    """MoEModel's layers are what the architecture's build_block returns: the attention its module
    chose, the router the file chose, a dense FFN exactly in the layers without experts."""
    gguf = GGUFModel(make_model(arch, "F32"))
    module, built = archs.module_for(arch), []
    build = module.build_block

    def spy(w, spec, i):
        built.append(build(w, spec, i))
        return built[-1]

    monkeypatch.setattr(module, "build_block", spy)
    m = MoEModel(gguf, lambda *a: None, torch.device("cpu"))
    s = gguf.spec
    assert len(built) == len(m.layers) == s.n_layer and all(a is b for a, b in zip(m.layers, built))
    mixer = lambda i: MLA if arch == "deepseek2" else GatedDeltaNet if s.is_recurrent(i) else GQA  # noqa: E731
    assert all(isinstance(b.attn, mixer(i)) for i, b in enumerate(m.layers))
    assert any(s.is_recurrent(i) for i in range(s.n_layer)) == (arch == "qwen35moe")
    for i, b in enumerate(m.layers):
        assert (b.moe is None) == (b.ffn is not None) == (not s.is_moe(i))
        if b.moe is not None:
            assert b.moe.router.select is ROUTERS[s.routing][0]
            assert (b.moe.shared is not None) == (s.arch.shared_expert != "none")
