"""A prompt runs through the model in ubatches of at most model.UBATCH tokens (localmoe/model.py,
as llama.cpp's n_ubatch): the same logits as one pass, chunks of near-equal size (never a single
token, which would take the decode path), the output head only where its logits are returned, and
the recurrent states' snapshot once, at the end of the whole prompt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import localmoe
from conftest import check_budgeted_equals_all_resident
from localmoe import model as model_mod
from localmoe.model import KVCache

IDS = np.random.default_rng(35).integers(0, 300, 60).tolist()
ARCHS = ["qwen3moe", "gpt-oss", "gemma4", "qwen35moe"]  # plain GQA; window + sinks; windows; DeltaNet states
# per architecture, bounds on ubatched against one-pass logits (prompt and decode), by relative norm and by
# the largest difference over the largest logit: a few times what they reach (the sums' order changes with
# the pass's length: qwen3moe 1.4e-6 and 1.3e-6, gpt-oss 1.2e-6 and 2.7e-6, qwen35moe 7.8e-7 and 1.3e-6;
# gemma4 3.1e-5 and 2.4e-4, its float16 GELU table amplifying such jitter, tests/test_gemma4.py)
BOUNDS = {"gemma4": (1e-4, 1e-3)}
DEFAULT_BOUNDS = (1e-5, 1e-5)


def _check_close(got: np.ndarray, want: np.ndarray, bounds: tuple[float, float]) -> None:
    assert got.shape == want.shape
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= bounds[0] and worst <= bounds[1], f"relative norm {rel:.2e}, largest difference {worst:.2e}"


def _run(rt, ids: list[int], all_logits: bool, decode: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A fresh cache: the prompt's logits, then each decoded token's."""
    cache = rt.new_cache()
    prompt = rt.model.forward(torch.tensor(ids), cache, all_logits=all_logits).numpy()
    steps = [rt.model.forward(torch.tensor([t]), cache, all_logits=False).numpy() for t in decode]
    assert cache.n == len(ids) + len(decode)
    return prompt, steps


@pytest.mark.parametrize("arch", ARCHS)
def test_ubatches_give_the_logits_of_one_pass(make_model, monkeypatch, arch):
    """A 40-token prompt in ubatches of 8 (gpt-oss's window is 8, Gemma 4's 32: the later ubatches
    attend across the window's edge into the cached rows) gives one pass's logits, all of them and
    the last one alone, and decoding 3 tokens after it gives the same logits too, up to the order
    of the sums (BOUNDS)."""
    ids, decode, bounds = IDS[:40], IDS[40:43], BOUNDS.get(arch, DEFAULT_BOUNDS)
    with localmoe.load(make_model(arch, "F32"), device="cpu") as rt:
        ref = {a: _run(rt, ids, a, decode) for a in (True, False)}  # UBATCH 512: one pass
        monkeypatch.setattr(model_mod, "UBATCH", 8, raising=False)
        seen = []
        embed = rt.model.embed
        monkeypatch.setattr(rt.model, "embed", lambda x: (seen.append(len(x)), embed(x))[1])
        for all_logits in (True, False):
            seen.clear()
            prompt, steps = _run(rt, ids, all_logits, decode)
            assert seen == [8] * 5 + [1] * 3  # (the test runs what it means to)
            want, want_steps = ref[all_logits]
            assert prompt.shape == want.shape == ((40 if all_logits else 1), rt.spec.n_vocab)
            _check_close(prompt, want, bounds)
            for got, exp in zip(steps, want_steps, strict=True):
                _check_close(got, exp, bounds)
        _check_close(ref[False][0], ref[True][0][-1:], bounds)


@pytest.mark.parametrize("T", [9, 17, 40, 41, 47])
def test_a_prompt_runs_in_near_equal_ubatches_of_at_most_ubatch(qwen3_f32, monkeypatch, T):
    """Each pass through the layers sees at most UBATCH tokens, ceil(T / UBATCH) passes whose sizes
    differ by one at most (none a single token); the output head runs on every ubatch's tokens for
    all the logits, and on the last token alone otherwise."""
    monkeypatch.setattr(model_mod, "UBATCH", 8, raising=False)
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        passes, heads = [], []
        embed, output = rt.model.embed, rt.model.output
        monkeypatch.setattr(rt.model, "embed", lambda x: (passes.append(len(x)), embed(x))[1])
        monkeypatch.setattr(rt.model, "output", lambda x: (heads.append(x.shape[0]), output(x))[1])
        for all_logits in (True, False):
            passes.clear(), heads.clear()
            out = rt.model.forward(torch.tensor(IDS[:T]), rt.new_cache(), all_logits=all_logits)
            assert out.shape == ((T if all_logits else 1), rt.spec.n_vocab)
            assert sum(passes) == T and len(passes) == math.ceil(T / 8)
            assert max(passes) <= 8 and max(passes) - min(passes) <= 1 and min(passes) > 1
            assert heads == (passes if all_logits else [1])


def test_ubatch_sizes(monkeypatch):
    """model.ubatches over many lengths and ubatch sizes (3 is the least that never leaves one token)."""
    for ub in (3, 4, 8, 512):
        monkeypatch.setattr(model_mod, "UBATCH", ub)
        for T in range(1, 2100):
            sizes = model_mod.ubatches(T)
            assert sum(sizes) == T and len(sizes) == math.ceil(T / ub)
            assert max(sizes) <= ub and max(sizes) - min(sizes) <= 1
            assert T == 1 or min(sizes) > 1


def test_the_snapshot_is_taken_once_at_the_end_of_the_prompt(make_model, monkeypatch):
    """A recurrent model, prompts longer than UBATCH: one snapshot a prompt, at its end, so a rewind
    goes back to a prompt's end, never to an ubatch's inside it, and resumes with one pass's logits.
    (A snapshot per ubatch would keep only the last two, 34 and 40 here, and rewind(30) would reach 0.)"""
    monkeypatch.setattr(model_mod, "UBATCH", 8, raising=False)
    taken = []
    snapshot = KVCache.snapshot
    monkeypatch.setattr(KVCache, "snapshot", lambda self: (taken.append(self.n), snapshot(self))[1])
    ids = IDS[:40]
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt:
        monkeypatch.setattr(model_mod, "UBATCH", 512)
        full = rt.logits(ids)
        monkeypatch.setattr(model_mod, "UBATCH", 8)
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        taken.clear()
        rt.model.forward(torch.tensor(ids[:20]), cache)  # ubatches of 7, 7, 6
        rt.model.forward(torch.tensor(ids[20:40]), cache)
        assert taken == [20, 40]
        assert [p for p, _ in cache._snapshots] == [20, 40]
        assert cache.rewind(30) == 20
        out = rt.model.forward(torch.tensor(ids[20:40]), cache)  # recomputed from the snapshot at 20
        _check_close(out.numpy(), full[20:40], DEFAULT_BOUNDS)
        assert taken[-1] == 40


def test_a_prompt_past_the_context_is_refused_before_any_ubatch(qwen3_f32, monkeypatch):
    """The whole prompt's rows are reserved before its first ubatch: one past n_ctx raises without
    running any of it (the cache stays empty), and one that fits grows the rows once."""
    monkeypatch.setattr(model_mod, "UBATCH", 8, raising=False)
    with localmoe.load(qwen3_f32, device="cpu", n_ctx=32) as rt:
        cache = rt.new_cache()
        with pytest.raises(localmoe.LocalMoEError, match="33 positions do not fit the context of 32"):
            rt.model.forward(torch.tensor(IDS[:33]), cache)
        assert cache.n == 0 and not cache.k
        rt.model.forward(torch.tensor(IDS[:32]), cache)
        assert cache.n == 32 and cache.k[0].shape[1] == 32


def test_a_budgeted_run_in_ubatches_equals_all_resident(qwen3_f32, monkeypatch):
    """Under a GPU budget the scheduler plans each layer once per ubatch (its token clock advancing
    by each); fetch and cpu still give the all-resident logits bit for bit and its books balance."""
    monkeypatch.setattr(model_mod, "UBATCH", 8, raising=False)
    check_budgeted_equals_all_resident(qwen3_f32, IDS[:40])
