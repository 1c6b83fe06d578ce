"""The forward driver (localmoe/model.py): the context's cache (KV rows cut anywhere, recurrent
states rewound to their latest snapshot). How the model hands residency its prediction:
tests/test_scheduler.py."""

from __future__ import annotations

import numpy as np
import pytest
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
    from localmoe.compute import kernels
    from localmoe.layers import attention

    ran_c = []  # per C attention call: what it returned (None where it does not apply)

    def counted(*a, **kw):
        ran_c.append(kernels.attn_decode(*a, **kw))
        return ran_c[-1]

    monkeypatch.setattr(attention, "attn_decode", counted)
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


def test_a_position_past_the_context_is_refused_not_written(make_model):
    """The cache holds n_ctx positions: a forward that would go past them (a prompt, or one more
    decode token through the fused C layers) raises LocalMoEError and leaves the cache as it was.
    Before, reserve capped its rows at n_ctx and the C decode attention wrote the next position
    past the rows' end (glibc then aborted on a corrupted heap)."""
    with localmoe.load(make_model("qwen3moe", "Q4_0"), device="cpu", n_ctx=24) as rt:
        cache = rt.new_cache()
        with pytest.raises(localmoe.LocalMoEError, match="25 positions do not fit the context of 24"):
            rt.model.forward(torch.tensor(IDS_200[:25]), cache)
        assert cache.n == 0
        rt.model.forward(torch.tensor(IDS_200[:20]), cache)
        for t in IDS_200[20:24]:  # decode up to the last position the rows hold
            rt.model.forward(torch.tensor([t]), cache)
        assert cache.n == 24 and cache.k[0].shape[1] == 24
        with pytest.raises(localmoe.LocalMoEError, match="start a new cache"):
            rt.model.forward(torch.tensor([IDS_200[24]]), cache)
        assert cache.n == 24
        cache.rewind(23)  # room again: the last position decodes as before
        assert torch.isfinite(rt.model.forward(torch.tensor([IDS_200[24]]), cache)).all()


def _helper_sets() -> list[str]:
    """The C decode helpers this machine has, as `load`'s kernel choice: the default (AVX-512 where
    built, else the portable ones) and, beside the AVX-512 ones, the portable ones alone (ggml)."""
    from localmoe.compute.ggml_backend import ggml
    from localmoe.compute.kernels import native_lib

    vnni, portable = native_lib() is not None, ggml() is not None
    return (["auto"] if vnni or portable else []) + (["ggml"] if vnni and portable else [])


# per architecture, bounds on the C attention's logits against torch's over the same cache, by relative
# norm and by the largest difference over the largest logit: a few times what they reach (gpt-oss 2.4e-6
# and 4.0e-6, Gemma 4 with the exact GELU 6.8e-6 and 8.9e-5; AVX-512 and portable helpers alike)
WINDOW_SINK_BOUNDS = {"gpt-oss": (1e-5, 2e-5), "gemma4": (3e-5, 3e-4)}


@pytest.mark.parametrize("kernel", _helper_sets())
@pytest.mark.parametrize("arch", ["gpt-oss", "gemma4"])
def test_windowed_and_sink_layers_decode_through_the_c_attention(make_model, monkeypatch, arch, kernel):
    """gpt-oss (sinks on every layer, a window of 8 on every other) and Gemma 4 (a window of 32 on
    its windowed layers, each kind of layer with its own head shape, values = the keys' projection
    v-normed on the global ones) decode through the C attention over the half-precision cache: every
    layer at every position, 40 tokens one by one (past both windows), each call within 1e-5 of
    attend_explicit over the same halves, and the logits those of torch's attention over the same
    cache. No layer of theirs runs fused."""
    import torch.nn.functional as F

    from localmoe.compute import experts, kernels
    from localmoe.layers import attention

    # Gemma 4's GELU is ggml's float16 table: a float rounding at its input can move its output by a
    # float16 step and the logits by ~1e-4 (tests/test_gemma4.py): the exact GELU here (both runs), so
    # that what is left is the attention's
    monkeypatch.setattr(experts, "gelu_ggml", lambda x: F.gelu(x, approximate="tanh"))
    ids = IDS_200[:40]
    logits, ran, cut = {}, [], []  # ran: per call, whether the C kernel ran; cut: (pos, window) where it cut rows
    for c_attention in (True, False):  # False: the C kernel never called, torch's attention over the same cache

        def attn(qkv, kc, vc, pos, n_q, n_kv, d, dv, scale, n_swa=0, sinks=None, c_attention=c_attention):
            if not c_attention:
                ran.append(False)
                return None
            out = kernels.attn_decode(qkv, kc, vc, pos, n_q, n_kv, d, dv, scale, n_swa=n_swa, sinks=sinks)
            ran.append(out is not None)
            if out is None:
                return None
            if 0 < n_swa <= pos:
                cut.append((pos, n_swa))
            # this call against attend_explicit over the halves it read (its own row, appended, included)
            qh = qkv[0, : n_q * d].view(n_kv, n_q // n_kv, d)
            want = attention.attend_explicit(
                qh, kc[:, : pos + 1].float(), vc[:, : pos + 1].float(), pos, 1, scale, sinks, n_swa
            )
            torch.testing.assert_close(out.view(n_q, dv), want.reshape(n_q, dv), rtol=1e-5, atol=1e-5)
            return out

        monkeypatch.setattr(attention, "attn_decode", attn)
        ran[:] = []
        with localmoe.load(make_model(arch, "F32"), device="cpu", kernel=None if kernel == "auto" else kernel) as rt:
            assert rt.kv_type == "f16" and all(lw.attn.c_decode for lw in rt.model.layers)
            assert all((lw.attn.sinks is not None) == (arch == "gpt-oss") for lw in rt.model.layers)
            logits[c_attention] = np.stack([lg.float().numpy() for lg, _, _ in rt.decode_logits(ids)])
            assert rt.model._fused is None  # (lm_decode_layer knows no window, sink, bias or post-norm)
            n_layer, n_swa = rt.spec.n_layer, rt.spec.n_swa
        assert ran == [c_attention] * (n_layer * len(ids))
    assert {w for _, w in cut} == {n_swa} and max(p for p, _ in cut) == len(ids) - 1  # the window cut rows
    c, ref = logits[True], logits[False]
    rel = np.linalg.norm(c - ref) / np.linalg.norm(ref)
    worst = np.abs(c - ref).max() / np.abs(ref).max()
    print(f"{arch} {kernel}: rel {rel:.2e}, max {worst:.2e}")
    rel_bound, worst_bound = WINDOW_SINK_BOUNDS[arch]
    assert rel <= rel_bound and worst <= worst_bound, (rel, worst)
    assert (c.argmax(-1) == ref.argmax(-1)).all()
