"""`localmoe serve` over real HTTP on 127.0.0.1: the openai client, the error corpus, /metrics,
a bounded load test; and the Runtime's input validation beneath it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import localmoe
from localmoe import LocalMoEError
from localmoe.synth import SynthConfig, write_model


# -- the Runtime's input validation -----------------------------------------------------------------
def test_runtime_rejects_bad_input_without_aborting(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu") as rt:
        V = rt.spec.n_vocab
        for ids in ([V + 5], [-1], [2**70], [1.5], [True], "abc", 7, [None]):
            with pytest.raises(LocalMoEError, match="token id"):
                rt.detokenize(ids)
            with pytest.raises(LocalMoEError, match="token id"):
                rt.logits(ids)
        assert rt.detokenize(np.array([3, 4])) == rt.detokenize([3, 4]) and rt.detokenize([]) == ""
        bad_calls = [
            lambda: rt.generate("hi", max_tokens=-1),
            lambda: rt.generate("hi", max_tokens=2**40),
            lambda: rt.generate("hi", max_tokens=2.5),
            lambda: rt.generate("hi", temperature=float("nan")),
            lambda: rt.generate("hi", temperature=float("inf")),
            lambda: rt.generate("hi", temperature="hot"),
            lambda: rt.generate("hi", top_p=float("nan")),
            lambda: rt.generate("hi", top_k=1.5),
            lambda: rt.generate("hi", seed=-3),
            lambda: rt.generate("hi", seed=2**64),
            lambda: rt.generate(["hi"]),
            lambda: rt.stream(42),
            lambda: rt.chat("hi"),
            lambda: rt.chat([]),
            lambda: rt.chat([{"role": "user", "content": 5}]),
            lambda: rt.tokenize(b"bytes"),
            lambda: rt.tokenize("x", add_bos="yes"),
            lambda: rt.configure(policy=3),
            lambda: rt.configure(gpu_mem=-5),
            lambda: rt.configure(prefetch="no"),
        ]
        for call in bad_calls:
            with pytest.raises(LocalMoEError) as err:
                call()
            assert "\n" not in str(err.value)
        # stream() checks before it returns, so a caller learns of bad input before iterating
        with pytest.raises(LocalMoEError, match="max_tokens"):
            rt.stream("hi", max_tokens=-1)
        # a temperature so small that logits/T overflows is the greedy limit, not a crash
        assert rt.generate("the", max_tokens=4, temperature=1e-300, seed=1) == rt.generate("the", max_tokens=4, temperature=0)
        assert rt.generate("the", max_tokens=0) == ""
    with pytest.raises(LocalMoEError, match="closed"):
        rt.detokenize([1])
    with pytest.raises(LocalMoEError, match="closed"):
        rt.generate("hi", max_tokens=1)


def test_chat_template_render_time_limit(tmp_path, monkeypatch):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
    path = write_model(tmp_path / "loop.gguf", SynthConfig(chat_template=loop))
    monkeypatch.setattr("localmoe.tokenizer.RENDER_SECONDS", 0.3)
    with localmoe.load(path, device="cpu") as rt:
        start = time.monotonic()
        with pytest.raises(LocalMoEError, match="ran for more than 0.3 s"):
            rt.chat([{"role": "user", "content": "hi"}], max_tokens=1)
        assert time.monotonic() - start < 3
        assert isinstance(rt.generate("the", max_tokens=2), str)  # plain prompts still work
