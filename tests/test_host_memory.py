"""Host memory of the CPU expert store (compute/experts.py ExpertStore, gguf/file.py release): an
expert repacked into RAM is not also resident from the memory-mapped file, and a budget too small
for every expert computes the rest in place — never by a path slower than in place (no repacking
while generating, no eviction)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import localmoe
from localmoe.bench.synth import SynthConfig, write_model
from localmoe.compute.kernels import native_lib
from localmoe.gguf.file import GGUFModel

PAGE = os.sysconf("SC_PAGE_SIZE")
pytestmark = [
    pytest.mark.skipif(
        native_lib() is None, reason="no AVX-512 VNNI C kernel: every expert runs in place, nothing is repacked"
    ),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps"),
]


@pytest.fixture(scope="module")
def wide_q4_0(tmp_path_factory) -> str:
    """Experts of 18 pages a matrix (512 × 256 in Q4_0), so the pages shared by two experts' byte
    ranges (never released) are a small part of the whole."""
    path = tmp_path_factory.mktemp("hostmem") / "wide-q4_0.gguf"
    return str(write_model(path, SynthConfig(n_layer=2, n_ff_exp=512, weight_type="Q4_0")))


def file_rss(path: str) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps), over all its mappings."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header line
                inside = len(head) >= 6 and os.path.realpath(head[-1]) == real
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def unreleasable_bytes(model: GGUFModel) -> int:
    """An upper bound on the expert bytes that stay mapped after every expert is released: the
    pages shared by neighbouring experts' ranges (release drops whole pages only), per tensor."""
    n_tensors = sum(1 for name in model.tensors if model.tensors[name].n_bytes and "_exps.weight" in name)
    return n_tensors * (model.spec.n_expert + 1) * PAGE


def test_a_repacked_expert_is_not_also_resident_from_the_file(wide_q4_0, monkeypatch):
    g = GGUFModel(wide_q4_0)
    experts = g.all_expert_bytes()
    assert experts >= 100 * PAGE
    with localmoe.load(wide_q4_0, device="cpu") as rt:
        assert len(rt.store._cache) == rt.spec.n_expert * len(rt.spec.moe_layers)  # every expert repacked
        released = file_rss(wide_q4_0)
        list(rt.stream("the model", max_tokens=4))  # generating reads no expert from the file again
        after_use = file_rss(wide_q4_0)
    size = os.path.getsize(wide_q4_0)
    assert released <= size - experts + unreleasable_bytes(g)
    assert after_use <= size - experts + unreleasable_bytes(g)
    # the check can fail: without the release, the repacked experts' file pages stay resident too
    monkeypatch.setattr(GGUFModel, "release", lambda self, arrays: None)
    with localmoe.load(wide_q4_0, device="cpu") as rt:
        assert file_rss(wide_q4_0) >= experts - unreleasable_bytes(g)


def test_a_budget_for_a_quarter_of_the_experts_computes_the_rest_in_place(wide_q4_0, monkeypatch):
    import localmoe.compute.experts as experts_mod

    g = GGUFModel(wide_q4_0)
    quarter = g.all_expert_bytes() // 4
    ids = list(range(100, 140))
    with localmoe.load(wide_q4_0, device="cpu", host_mem=quarter) as rt:
        assert 0 < rt.store._cached_bytes <= quarter
        n_all = rt.spec.n_expert * len(rt.spec.moe_layers)
        assert len(rt.store._cache) + len(rt.store._mapped) == n_all  # each expert: repacked, or in place
        assert {w.gate_up.backend for w in rt.store._mapped.values()} == {"ggml"}
        packed = []
        real = experts_mod.pack_ffn
        monkeypatch.setattr(experts_mod, "pack_ffn", lambda *a, **k: packed.append(1) or real(*a, **k))
        budgeted = rt.logits(ids)
        list(rt.stream("the model", max_tokens=8))
        assert packed == [] and rt.store._cached_bytes <= quarter  # no repacking, no eviction while generating
    with localmoe.load(wide_q4_0, device="cpu", host_mem=0) as rt:
        assert rt.store._cache == {} and len(rt.store._mapped) == n_all
        in_place = rt.logits(ids)
    # the same model: the in-place experts are ggml's, the repacked ones the VNNI kernel's
    assert np.linalg.norm(budgeted - in_place) / np.linalg.norm(in_place) < 3e-2


def test_a_load_repacks_experts_side_by_side_into_the_same_bytes(wide_q4_0, monkeypatch):
    """With two threads, preload repacks a layer's experts one per thread (ExpertStore._pack, one C
    thread each) instead of one at a time on both: the same layouts, byte for byte."""
    from localmoe.compute.experts import ExpertStore

    side_by_side = []
    real = ExpertStore._pack
    monkeypatch.setattr(ExpertStore, "_pack", lambda self, *a: side_by_side.append(a) or real(self, *a))
    stores = []
    for threads in (1, 2):
        side_by_side.clear()
        with localmoe.load(wide_q4_0, device="cpu", threads=threads) as rt:
            n_all = rt.spec.n_expert * len(rt.spec.moe_layers)
            assert len(side_by_side) == (n_all if threads == 2 else 0)
            assert len(rt.store._cache) == n_all
            stores.append(dict(rt.store._cache))
    one, two = stores
    assert one.keys() == two.keys()
    for key, w in one.items():
        for part in ("gate_up", "down"):
            a, b = getattr(w, part).tensors, getattr(two[key], part).tensors
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), (key, part)
