"""The forward driver (localmoe/model.py): the context's cache (KV rows cut anywhere, recurrent
states rewound to their latest snapshot). How the model hands residency its prediction:
tests/test_scheduler.py."""

from __future__ import annotations

import numpy as np
import torch

import localmoe
from localmoe.model import KVCache

IDS_200 = np.random.default_rng(35).integers(0, 300, 200).tolist()  # as tests/test_qwen35moe.py draws them


def test_rewind_resumes_from_the_latest_snapshot(make_model):
    """KV rows cut anywhere; a recurrent state goes back to the snapshot taken at the end of the
    latest prompt at or before the position asked for (0 if none), and recomputing from there
    gives the logits of one uninterrupted pass."""
    ids = IDS_200[:40]
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt:
        full = rt.logits(ids)
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        rt.model.forward(torch.tensor(ids[:20]), cache)  # a prompt: snapshot at 20
        for t in ids[20:30]:
            rt.model.forward(torch.tensor([t]), cache)
        assert cache.n == 30
        assert cache.rewind(30) == 30 and cache.rewind(26) == 20
        out = rt.model.forward(torch.tensor(ids[20:40]), cache)  # a prompt again: snapshot at 40
        np.testing.assert_allclose(out.numpy(), full[20:40], rtol=1e-4, atol=1e-4)
        assert cache.rewind(15) == 0 and not cache.states  # before every snapshot: a fresh context
    with localmoe.load(make_model("qwen3moe", "F32"), device="cpu") as rt:  # no recurrent state: any position
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        rt.model.forward(torch.tensor(ids[:20]), cache)
        assert cache.rewind(13) == 13


def test_kv_cache_type_sets_the_rows_element_and_their_bytes(make_model, monkeypatch):
    """kv_type f16 (the default) keeps the attention layers' keys and values in half precision, f32
    in float32; the cache's bytes once full are exactly what `kv_cache_bytes` (and `--verbose`) say,
    half of f32's. The C decode attention reads the half-precision cache; a float32 one decodes
    through torch's attention. An unknown type is refused with the ones there are."""
    import pytest

    from localmoe.compute import kernels
    from localmoe.layers import attention

    ran_c = []  # per C attention call: whether it ran (it returns None where it does not apply)
    monkeypatch.setattr(attention, "attn_decode", lambda *a: ran_c.append(kernels.attn_decode(*a)) or ran_c[-1])
    path = make_model("qwen3moe", "F32")
    sizes = {}
    for kv_type in ("f16", "f32"):
        with localmoe.load(path, device="cpu", kv_type=kv_type, n_ctx=100) as rt:
            rt.model.fused_decode = False  # the Python decode path, whose attention call is counted above
            cache, ran_c[:] = rt.new_cache(), []
            rt.model.forward(torch.tensor(IDS_200[:90]), cache)
            rt.model.forward(torch.tensor(IDS_200[90:91]), cache)  # reserve grows to n_ctx (100)
            assert {t.dtype for t in cache.k + cache.v} == {kernels.KV_TYPES[kv_type]}
            assert cache.k[0].shape[1] == rt.n_ctx == 100
            assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == rt.kv_cache_bytes()
            ran = [out is not None for out in ran_c]
            assert ran == [kv_type == "f16"] * rt.spec.n_layer  # one call a layer for the decode token
            sizes[kv_type] = rt.kv_cache_bytes()
    assert sizes["f32"] == 2 * sizes["f16"] > 0
    with pytest.raises(localmoe.LocalMoEError, match="unknown KV cache type 'q8_0'; choose one of f16, f32"):
        localmoe.load(path, device="cpu", kv_type="q8_0")
