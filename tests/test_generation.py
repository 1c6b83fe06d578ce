"""Tokenizer, chat template, sampling and the generation loop."""

from __future__ import annotations

import numpy as np
import pytest

import localmoe
from localmoe import LocalMoEError
from localmoe.sampling import SamplingParams, sample
from localmoe.bench.synth import write_model
from conftest import arch_config


def test_tokenize_roundtrip_and_special_tokens(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        text = "the model of experts, ünïcode!"
        ids = rt.tokenize(text)
        assert rt.detokenize(ids) == text
        assert len(ids) < len(text.encode())  # merges applied, not bytes only
        im_start = rt.tokenize("<|im_start|>")
        assert len(im_start) == 1 and rt.tokenizer.token_text(im_start[0]) == "<|im_start|>"


def test_greedy_generation_follows_argmax_of_logits(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        prompt = rt.tokenize("the expert model")
        chunks = list(rt.stream("the expert model", max_tokens=6, temperature=0))
        tokens = [c.token for c in chunks if c.token is not None]
        assert chunks[-1].finish_reason in ("length", "stop")
        # each greedy token is the argmax of a fresh full pass over prompt + tokens so far
        for i, tok in enumerate(tokens):
            logits = rt.logits(prompt + tokens[:i])[-1]
            assert tok == int(np.argmax(logits))
        assert "".join(c.text for c in chunks) == rt.detokenize(tokens)


def test_max_tokens_and_finish_reason(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        chunks = list(rt.stream("the", max_tokens=3, temperature=0))
        assert chunks[-1].finish_reason in ("length", "stop")
        if chunks[-1].finish_reason == "length":
            assert sum(c.token is not None for c in chunks) == 3
        st = rt.stats()
        assert st.prompt_tokens == len(rt.tokenize("the"))
        assert st.hits > 0 and st.hit_rate == 1.0 and st.clock == "measured"
        assert st.as_dict()["layers"][0]["hits"] > 0


def test_generation_stops_at_end_of_generation_token(qwen3_f32, monkeypatch):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        eos = rt.tokenizer.eos_id
        assert rt.tokenizer.is_eog(eos)
        monkeypatch.setattr("localmoe.runtime.sample", lambda logits, params, gen: eos)
        chunks = list(rt.stream("the", max_tokens=10))
        assert chunks[-1].finish_reason == "stop" and all(c.token is None for c in chunks)


def test_seeded_sampling_is_reproducible(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        a = rt.generate("the", max_tokens=8, temperature=1.0, seed=7)
        b = rt.generate("the", max_tokens=8, temperature=1.0, seed=7)
        assert a == b


def test_sampling_filters():
    import torch

    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0), g) == 1
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), g) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.1), g) for _ in range(50)}
    assert picks == {1}
    with pytest.raises(LocalMoEError):
        SamplingParams(top_p=0).validate()


def test_chat_uses_the_gguf_template(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        text = rt.tokenizer.render_chat(msgs)
        assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        out = rt.chat(msgs, max_tokens=4, temperature=0)
        assert isinstance(out, str)
        # a second turn reuses the cached prefix and still gives the same greedy reply
        assert rt.chat(msgs, max_tokens=4, temperature=0) == out


def test_hostile_chat_template_is_sandboxed(tmp_path):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    path = write_model(tmp_path / "evil.gguf", arch_config("qwen3moe", chat_template=evil))
    with localmoe.load(path, device="cpu") as rt:
        with pytest.raises(LocalMoEError, match="chat template"):
            rt.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    from localmoe.tokenizer import ImmutableSandboxedEnvironment

    assert ImmutableSandboxedEnvironment is not None


def test_incremental_decoder_never_splits_characters():
    from localmoe.tokenizer import IncrementalDecoder

    d = IncrementalDecoder()
    data = "ü€😀".encode()
    out = "".join(d.feed(data[i : i + 1]) for i in range(len(data))) + d.flush()
    assert out == "ü€😀"


def test_the_last_token_is_not_run_and_the_next_turn_runs_it(qwen3_f32, monkeypatch):
    """max_tokens reached: the last token's forward (whose logits nothing reads) is skipped, the cache
    ends before it, and a next turn that re-sends it runs it and replies as a fresh runtime does."""
    import localmoe.runtime as runtime_mod

    real_sample = runtime_mod.sample

    def no_stop(logits, params, gen):  # never an end-of-generation token, so the reply runs to max_tokens
        logits = logits.clone()
        logits[[i for i in range(logits.numel()) if rt.tokenizer.is_eog(i)]] = float("-inf")
        return real_sample(logits, params, gen)

    monkeypatch.setattr(runtime_mod, "sample", no_stop)
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        run = []
        forward = rt._forward
        monkeypatch.setattr(rt, "_forward", lambda ids, *a, **k: run.append(len(ids)) or forward(ids, *a, **k))
        prompt = rt.tokenize("the expert model")
        chunks = list(rt.stream("the expert model", max_tokens=4, temperature=0))
        tokens = [c.token for c in chunks if c.token is not None]
        assert chunks[-1].finish_reason == "length" and len(tokens) == 4
        assert run == [len(prompt), 1, 1, 1]  # the prompt, then tokens 1-3; token 4 is not run
        assert rt._cache.n == len(prompt) + 3 and rt.stats().decode_tokens == 3
        follow = "the expert model" + rt.detokenize(tokens) + " and"
        run.clear()
        again = rt.generate(follow, max_tokens=3, temperature=0)
        assert run[0] < len(rt.tokenize(follow))  # the cached prefix was reused
    with localmoe.load(qwen3_f32, device="cpu") as fresh:
        assert again == fresh.generate(follow, max_tokens=3, temperature=0)
