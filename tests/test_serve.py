"""`localmoe serve` over real HTTP on 127.0.0.1: the openai client, the error corpus, /metrics,
a bounded load test; and the Runtime's input validation beneath it.

The demo-model server runs in a subprocess (`python -m localmoe serve --port 0`); the tests that
need a particular model or a slow loader start the app in-process on a thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import localmoe
from localmoe import LocalMoEError
from localmoe.serve import Defaults, ServeConfig, create_app, start_in_thread
from localmoe.bench.synth import SynthConfig, write_model

KEY = "sk-test-" + "x" * 24
QUEUE = 10
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The in-process servers' tiny models: one thread (see `demo`), restored for other modules."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- servers --------------------------------------------------------------------------------------
class Subprocess:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._log_file = open(log, "w")
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localmoe", "serve", *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + 120
        m = None
        while m is None:
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start: " + log.read_text()
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            time.sleep(0.05)
        self.url = m.group(1)
        while httpx.get(self.url + "/health").status_code != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The bundled demo model behind `localmoe serve` with an API key and a queue of QUEUE."""
    # one torch thread: on a small, busy machine two threads of tiny matmuls spin far more than they compute
    server = Subprocess(
        ["--port", "0", "--api-key", KEY, "--queue", str(QUEUE), "-t", "1"],
        tmp_path_factory.mktemp("serve") / "server.log",
    )
    yield server
    assert server.proc.poll() is None, "the server died: " + server.log.read_text()
    server.stop()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()


class InProcess:
    def __init__(self, loader, config: ServeConfig):
        self.app = create_app(loader, config)
        self.server, self.thread, port = start_in_thread(self.app)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def moe16(tmp_path_factory) -> str:
    """3 layers × 16 experts, top-4: enough experts for the cache to matter."""
    return write_model(
        tmp_path_factory.mktemp("serve-models") / "moe16.gguf",
        SynthConfig(n_layer=3, n_expert=16, n_expert_used=4, weight_type="Q8_0"),
    )


def _budget(path: str, share: float) -> int:
    with localmoe.load(path, device="cpu") as rt:
        return rt.gguf.dense_bytes() + int(rt.gguf.all_expert_bytes() * share)


def _metrics(url: str, headers=None, http=httpx) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    r = http.get(url + "/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


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
        assert rt.generate("the", max_tokens=4, temperature=1e-300, seed=1) == rt.generate(
            "the", max_tokens=4, temperature=0
        )
        assert rt.generate("the", max_tokens=0) == ""
    with pytest.raises(LocalMoEError, match="closed"):
        rt.detokenize([1])
    with pytest.raises(LocalMoEError, match="closed"):
        rt.generate("hi", max_tokens=1)


def test_chat_template_render_time_limit(tmp_path, monkeypatch):
    loop = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
    )
    path = write_model(tmp_path / "loop.gguf", SynthConfig(chat_template=loop))
    monkeypatch.setattr("localmoe.tokenizer.RENDER_SECONDS", 0.3)
    with localmoe.load(path, device="cpu") as rt:
        start = time.monotonic()
        with pytest.raises(LocalMoEError, match="ran for more than 0.3 s"):
            rt.chat([{"role": "user", "content": "hi"}], max_tokens=1)
        assert time.monotonic() - start < 3
        assert isinstance(rt.generate("the", max_tokens=2), str)  # plain prompts still work


# -- the openai client ----------------------------------------------------------------------------
def test_openai_client_chat_and_completions(demo):
    client = _client(demo)
    assert [m.id for m in client.models.list().data] == ["localmoe-demo-moe"]
    msgs = [{"role": "user", "content": "Tell me a fortune."}]
    full = client.chat.completions.create(
        model="localmoe-demo-moe", messages=msgs, max_tokens=8, seed=11, temperature=0.9
    )
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens == 8 if choice.finish_reason == "length" else full.usage.completion_tokens <= 8
    assert (
        full.usage.prompt_tokens > 5
        and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    )

    # streamed: the same seed gives the same text, in deltas, then usage and [DONE]
    parts, finish, usage = [], None, None
    for ev in client.chat.completions.create(
        model="localmoe-demo-moe",
        messages=msgs,
        max_completion_tokens=8,
        seed=11,
        temperature=0.9,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == choice.message.content and finish == choice.finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens

    # a stop sequence taken from the output cuts it there
    text = choice.message.content
    words = text.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.chat.completions.create(
            model="localmoe-demo-moe", messages=msgs, max_tokens=8, seed=11, temperature=0.9, stop=[stop]
        )
        assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    # /v1/completions, plain and streamed; temperature 0 is greedy whatever the seed
    a = client.completions.create(
        model="localmoe-demo-moe", prompt="Once upon a time", max_tokens=6, temperature=0, seed=1
    )
    b = client.completions.create(
        model="localmoe-demo-moe", prompt="Once upon a time", max_tokens=6, temperature=0, seed=2, stream=True
    )
    assert a.object == "text_completion" and "".join(e.choices[0].text for e in b) == a.choices[0].text
    assert a.usage.completion_tokens <= 6 and len(a.choices[0].text) > 0

    # the `moe` and `timings` objects ride along (llama-server's names)
    raw = httpx.post(
        demo.url + "/v1/completions", headers=AUTH, json={"prompt": "In the beginning", "max_tokens": 3}, timeout=60
    ).json()
    assert raw["timings"]["predicted_n"] == raw["usage"]["completion_tokens"] and raw["timings"]["clock"] == "measured"
    assert raw["moe"]["hits"] > 0 and raw["moe"]["hit_rate"] == 1.0  # no budget: every expert resident

    # the wrong key is refused by the client too
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=demo.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)


# -- the bad-request corpus -----------------------------------------------------------------------
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
CORPUS = [
    # (name, method, path, headers, body, status, code, param)
    ("no key", "POST", CHAT, {}, {"messages": HI}, 401, "invalid_api_key", None),
    ("wrong key", "POST", CHAT, {"Authorization": "Bearer nope"}, {"messages": HI}, 401, "invalid_api_key", None),
    (
        "key, wrong scheme",
        "POST",
        CHAT,
        {"Authorization": f"Basic {KEY}"},
        {"messages": HI},
        401,
        "invalid_api_key",
        None,
    ),
    ("key missing on /metrics", "GET", "/metrics", {}, None, 401, "invalid_api_key", None),
    ("bad JSON", "POST", CHAT, AUTH, b'{"messages": [', 400, "invalid_json", None),
    (
        "NaN",
        "POST",
        CHAT,
        AUTH,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "invalid_json",
        None,
    ),
    ("not UTF-8", "POST", CHAT, AUTH, b"\xff\xfe{}", 400, "invalid_json", None),
    ("array body", "POST", CHAT, AUTH, b"[1, 2]", 400, "invalid_json", None),
    ("missing messages", "POST", CHAT, AUTH, {"max_tokens": 3}, 400, "missing_required_parameter", "messages"),
    ("empty messages", "POST", CHAT, AUTH, {"messages": []}, 400, "invalid_value", "messages"),
    ("unknown field", "POST", CHAT, AUTH, {"messages": HI, "temprature": 0.5}, 400, "unknown_parameter", "temprature"),
    (
        "temperature str",
        "POST",
        CHAT,
        AUTH,
        {"messages": HI, "temperature": "hot"},
        400,
        "invalid_value",
        "temperature",
    ),
    ("temperature neg", "POST", CHAT, AUTH, {"messages": HI, "temperature": -1}, 400, "invalid_value", "temperature"),
    (
        "temperature inf",
        "POST",
        CHAT,
        AUTH,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
        400,
        "invalid_value",
        "temperature",
    ),
    ("top_p 0", "POST", CHAT, AUTH, {"messages": HI, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("max_tokens neg", "POST", CHAT, AUTH, {"messages": HI, "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ("max_tokens bool", "POST", CHAT, AUTH, {"messages": HI, "max_tokens": True}, 400, "invalid_value", "max_tokens"),
    ("max_tokens float", "POST", CHAT, AUTH, {"messages": HI, "max_tokens": 2.5}, 400, "invalid_value", "max_tokens"),
    ("seed huge", "POST", CHAT, AUTH, {"messages": HI, "seed": 2**64}, 400, "invalid_value", "seed"),
    (
        "content int",
        "POST",
        CHAT,
        AUTH,
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "invalid_value",
        "messages.0.content",
    ),
    (
        "image part",
        "POST",
        CHAT,
        AUTH,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "invalid_value",
        "messages.0.content.0.type",
    ),
    (
        "role missing",
        "POST",
        CHAT,
        AUTH,
        {"messages": [{"content": "hi"}]},
        400,
        "missing_required_parameter",
        "messages.0.role",
    ),
    ("n 2", "POST", CHAT, AUTH, {"messages": HI, "n": 2}, 400, "unsupported_parameter", "n"),
    (
        "penalty",
        "POST",
        CHAT,
        AUTH,
        {"messages": HI, "frequency_penalty": 0.5},
        400,
        "unsupported_parameter",
        "frequency_penalty",
    ),
    ("stop 5", "POST", CHAT, AUTH, {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ("stream str", "POST", CHAT, AUTH, {"messages": HI, "stream": "yes"}, 400, "invalid_value", "stream"),
    (
        "context overflow",
        "POST",
        CHAT,
        AUTH,
        {"messages": HI, "max_tokens": 300},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "prompt too long",
        "POST",
        "/v1/completions",
        AUTH,
        {"prompt": "and the " * 300},
        400,
        "context_length_exceeded",
        "prompt",
    ),
    ("prompt list of 2", "POST", "/v1/completions", AUTH, {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("unknown model", "POST", CHAT, AUTH, {"model": "gpt-4o", "messages": HI}, 404, "model_not_found", "model"),
    (
        "oversize body",
        "POST",
        CHAT,
        AUTH,
        {"messages": [{"role": "user", "content": "x" * (5 << 20)}]},
        413,
        "request_too_large",
        None,
    ),
    ("unknown route", "GET", "/v1/engines", AUTH, None, 404, "not_found", None),
    ("wrong method", "GET", CHAT, AUTH, None, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_requests_answer_openai_errors(demo, case):
    name, method, path, headers, body, status, code, param = case
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = httpx.request(
        method, demo.url + path, headers={"Content-Type": "application/json", **headers}, content=content, timeout=60
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param, err
    assert (
        isinstance(err["message"], str) and err["message"] and "\n" not in err["message"] and "Traceback" not in r.text
    )
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if code == "context_length_exceeded":
        assert "256" in err["message"] and re.search(r"prompt is \d+ tokens", err["message"]), err["message"]


def test_oversize_body_without_content_length_is_413(demo):
    def chunks():
        for _ in range(6):
            yield b"x" * (1 << 20)

    r = httpx.post(demo.url + CHAT, headers=AUTH, content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(demo.url + "/health").json() == {"status": "ok"}


# -- in-process servers: loading, templates, metrics under a budget --------------------------------
def test_health_is_503_while_loading(moe16):
    release = threading.Event()

    reported = threading.Event()

    def slow_loader(progress=None):
        assert reported.wait(30)
        progress("repacking experts", 3, 10)  # what load() reports on a big model
        release.wait(30)
        return localmoe.load(moe16, device="cpu", progress=progress)

    srv = InProcess(slow_loader, ServeConfig("moe16"))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        reported.set()
        deadline = time.monotonic() + 30
        while (r := httpx.get(srv.url + "/health")).json() == {"status": "loading"}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and r.json() == {
            "status": "loading",
            "step": "repacking experts",
            "done": 3,
            "total": 10,
        }
        r = httpx.post(srv.url + CHAT, json={"messages": HI})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        srv.wait_ready()
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        r = httpx.post(srv.url + CHAT, json={"messages": HI, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        release.set()
        srv.stop()


def test_failed_load_is_reported(tmp_path):
    def bad_loader():
        return localmoe.load(str(tmp_path / "missing.gguf"), device="cpu")

    srv = InProcess(bad_loader, ServeConfig("missing"))
    try:
        deadline = time.monotonic() + 20
        while (body := httpx.get(srv.url + "/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["status"] == "error" and "not found" in body["message"]
        r = httpx.post(srv.url + CHAT, json={"messages": HI})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    finally:
        srv.stop()
    r = subprocess.run(
        [sys.executable, "-m", "localmoe", "serve", str(tmp_path / "missing.gguf"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip().splitlines()[-1].startswith("error:")
        and "not found" in r.stderr
        and "Traceback" not in r.stderr
    )


TEMPLATE_FAILURES = [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages[0].content.nope() }}", "failed to render"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than 0.3 s"),
]


@pytest.mark.parametrize("template,words", TEMPLATE_FAILURES, ids=["raises", "undefined", "loops"])
def test_template_failure_is_400(tmp_path, monkeypatch, template, words):
    monkeypatch.setattr("localmoe.tokenizer.RENDER_SECONDS", 0.3)
    path = write_model(tmp_path / "bad-template.gguf", SynthConfig(chat_template=template))
    srv = InProcess(lambda: localmoe.load(path, device="cpu"), ServeConfig("bad-template"))
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + CHAT, json={"messages": HI, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "chat_template_error" and words in err["message"]
        # the plain-text endpoint needs no template
        assert (
            httpx.post(srv.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=60).status_code
            == 200
        )
    finally:
        srv.stop()


def test_metrics_hit_rate_moves_under_a_budget(moe16):
    budget = _budget(moe16, 0.15)
    srv = InProcess(
        lambda: localmoe.load(moe16, device="cpu", gpu_mem=budget),
        ServeConfig("moe16", defaults=Defaults(max_tokens=8)),
    )
    try:
        srv.wait_ready()
        m0 = _metrics(srv.url)
        assert m0[("localmoe_expert_hit_rate", ())] == 0.0 and m0[("localmoe_expert_hits_total", ())] == 0
        assert m0[("localmoe_queue_depth", ())] == 0 and m0[("localmoe_queue_capacity", ())] == 16
        rates, generated = [], 0
        for prompt in ("the model of experts", "a cache of the hot experts and"):
            body = httpx.post(
                srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60
            ).json()
            generated += body["usage"]["completion_tokens"]
            m = _metrics(srv.url)
            rates.append(m[("localmoe_expert_hit_rate", ())])
            assert 0 < rates[-1] < 1  # the budget holds 15% of the experts: some uses miss
            hits, misses = (
                m[("localmoe_expert_hits_total", ())],
                sum(v for (n, _), v in m.items() if n == "localmoe_expert_misses_total"),
            )
            assert rates[-1] == pytest.approx(hits / (hits + misses))
            assert m[("localmoe_expert_misses_total", (("outcome", "cpu"),))] > 0  # on_miss=cpu
            assert m[("localmoe_gpu_tier_bytes_in_use", ())] <= m[("localmoe_gpu_tier_budget_bytes", ())]
            assert sum(1 for (n, _) in m if n == "localmoe_layer_hit_rate") == 3
            assert 0 <= m[("localmoe_prefetch_precision", ())] <= 1 and 0 <= m[("localmoe_prefetch_recall", ())] <= 1
            assert body["moe"]["misses"] > 0 and body["timings"]["clock"] == "modelled:laptop-8gb"
            assert ("localmoe_decode_tokens_per_second", (("clock", "measured"),)) in m
        assert rates[0] != rates[1]
        assert (
            m[("localmoe_completion_tokens_total", ())] - m0[("localmoe_completion_tokens_total", ())] == generated > 0
        )
        stats = httpx.get(srv.url + "/v1/localmoe/stats").json()
        assert stats["hits"] == m[("localmoe_expert_hits_total", ())] and stats["clock"] == "modelled:laptop-8gb"
        assert set(localmoe.Stats.__dataclass_fields__) == set(stats)
    finally:
        srv.stop()


# -- the load test --------------------------------------------------------------------------------
CLIENTS, REQUESTS, ROUNDS = 8, 4, 3
N = int(os.environ.get("LOCALMOE_LOAD_TOKENS", "8"))  # tokens per request (docs/serve.md's table also uses 32)


def _prompt(c: int) -> str:
    return (
        f"Chapter {c + 1}. The {['king', 'river', 'city', 'prophet', 'shepherd', 'temple', 'night', 'wind'][c]} of the"
    )


# One client for all the load test's requests (thread-safe, pooled): making an httpx.Client costs
# ~50 ms of CPU, which would spread a burst out over a second. A stream closed before its end closes
# its connection, so a hang-up is a real disconnect.
HTTP = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def _stream(url: str, body: dict, disconnect_after: int | None = None) -> dict:
    """One streamed completion over raw HTTP: text, token count (usage), latency; or, with
    `disconnect_after`, read that many deltas and hang up."""
    start = time.monotonic()
    text, usage, finish, deltas = [], None, None, 0
    with HTTP.stream(
        "POST",
        url + "/v1/completions",
        headers=AUTH,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                if ch["text"]:
                    text.append(ch["text"])
                    deltas += 1
                finish = ch["finish_reason"] or finish
            if disconnect_after is not None and deltas >= disconnect_after:
                return {"disconnected": True, "deltas": deltas}
    return {
        "text": "".join(text),
        "tokens": usage["completion_tokens"],
        "finish": finish,
        "latency": time.monotonic() - start,
    }


def _plain(url: str, body: dict, headers=AUTH) -> httpx.Response:
    return HTTP.post(url + "/v1/completions", headers=headers, json=body)


def test_load_concurrent_streams_and_disconnects(demo):
    def body(c: int, r: int) -> dict:
        return {"prompt": _prompt(c), "max_tokens": N, "temperature": 0.9, "seed": 1000 * c + r}

    # the same-seed runs alone, one at a time
    ref, alone = {}, []
    start = time.monotonic()
    for c in range(CLIENTS):
        for r in range(REQUESTS):
            t = time.monotonic()
            out = _plain(demo.url, body(c, r)).json()
            alone.append(time.monotonic() - t)
            ref[c, r] = (
                out["choices"][0]["text"],
                out["usage"]["completion_tokens"],
                out["choices"][0]["finish_reason"],
            )
            assert out["usage"]["completion_tokens"] == N or out["choices"][0]["finish_reason"] == "stop"
    alone_tps = sum(v[1] for v in ref.values()) / (time.monotonic() - start)

    def client(c: int) -> list[dict]:
        return [_stream(demo.url, body(c, r)) | {"key": (c, r)} for r in range(REQUESTS)]

    def leaver(i: int) -> dict:
        return _stream(
            demo.url, {"prompt": _prompt(i), "max_tokens": 200, "temperature": 0, "seed": i}, disconnect_after=2
        )

    rss, figures = [], []
    for _round in range(ROUNDS):
        m0 = _metrics(demo.url, AUTH)
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS + 2) as pool:
            futures = [pool.submit(client, c) for c in range(CLIENTS)] + [pool.submit(leaver, i) for i in range(2)]
            results = [f.result(timeout=300) for f in futures]
        wall = time.monotonic() - start
        done = [x for res in results[:CLIENTS] for x in res]
        assert len(done) == CLIENTS * REQUESTS and all(res["disconnected"] for res in results[CLIENTS:])
        for x in done:  # every stream is its own: the same text and token count as the run alone
            assert (x["text"], x["tokens"], x["finish"]) == ref[x["key"]], x["key"]
        # the leavers' generations were cancelled, within one token of the hang-up
        deadline = time.monotonic() + 30
        while (m := _metrics(demo.url, AUTH))[("localmoe_generations_total", (("outcome", "cancelled"),))] < m0.get(
            ("localmoe_generations_total", (("outcome", "cancelled"),)), 0
        ) + 2:
            assert time.monotonic() < deadline, "the disconnected streams were not cancelled"
            time.sleep(0.1)
        assert m[("localmoe_cancel_overrun_tokens_total", ())] - m0[("localmoe_cancel_overrun_tokens_total", ())] <= 2
        assert m[("localmoe_queue_depth", ())] == 0
        assert m.get(("localmoe_requests_total", (("code", "429"), ("endpoint", "/v1/completions"))), 0) == 0
        lat = sorted(x["latency"] for x in done)
        tokens = sum(x["tokens"] for x in done)
        figures.append((np.percentile(lat, 50), np.percentile(lat, 95), tokens / wall, wall))
        rss.append(demo.rss())
    print(
        f"\nalone: {CLIENTS * REQUESTS} requests of {N} tokens one at a time: p50 "
        f"{np.percentile(alone, 50):.2f} s, p95 {np.percentile(alone, 95):.2f} s, {alone_tps:.1f} tok/s"
    )
    for i, (p50, p95, tps, wall) in enumerate(figures):
        print(
            f"\nload round {i + 1}: {CLIENTS} clients x {REQUESTS} streamed requests of {N} tokens + 2 "
            f"disconnects: p50 {p50:.2f} s, p95 {p95:.2f} s, {tps:.1f} tok/s over {wall:.1f} s; server RSS "
            f"{rss[i] / 2**20:.0f} MiB"
        )
    growth = max(rss) - rss[0]
    assert growth < 16 << 20, f"server memory grew by {growth / 2**20:.1f} MiB across rounds"

    assert demo.proc.poll() is None and httpx.get(demo.url + "/health").json() == {"status": "ok"}


class _Gated:
    """The demo runtime with a gate: while it is shut, a generation waits before its next token,
    holding the model. The demo model decodes a whole context in under a second here, so without
    the gate no request would stay busy long enough for a burst to meet a full queue."""

    def __init__(self, rt):
        self._rt = rt
        self.open, self.holding = threading.Event(), threading.Event()
        self.open.set()
        self.delay = 0.0  # seconds before each token: a slow model

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def stream(self, *args, **kwargs):
        it = self._rt.stream(*args, **kwargs)

        def gated():
            try:
                for chunk in it:
                    if not self.open.is_set():
                        self.holding.set()
                        self.open.wait(60)
                    time.sleep(self.delay)
                    yield chunk
            finally:
                it.close()

        return gated()


class _Blocker:
    """Hold the model: shut the gate, start a stream, wait until the worker is stuck in it; at the
    end hang up (the generation is cancelled) and open the gate."""

    def __init__(self, url: str, gate: _Gated):
        self.url, self.gate, self.hang_up = url, gate, threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with HTTP.stream(
            "POST",
            self.url + "/v1/completions",
            json={"prompt": "And it came to pass", "max_tokens": 100, "stream": True},
        ) as r:
            assert r.status_code == 200
            self.hang_up.wait(60)

    def __enter__(self) -> "_Blocker":
        self.gate.holding.clear()
        self.gate.open.clear()
        self.thread.start()
        assert self.gate.holding.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.hang_up.set()
        self.thread.join(60)
        self.gate.open.set()


def test_burst_past_the_queue_gets_exactly_the_overflow_429():
    gate = _Gated(localmoe.load(None, device="cpu"))
    srv = InProcess(lambda: gate, ServeConfig("localmoe-demo-moe", queue=QUEUE))
    try:
        srv.wait_ready()
        run_burst(srv, gate)
        deadline = time.monotonic() + 30
        while (m := _metrics(srv.url, http=HTTP))[("localmoe_requests_running", ())] or m[("localmoe_queue_depth", ())]:
            assert time.monotonic() < deadline, "the server did not go idle"  # the blockers' ends settled
            time.sleep(0.02)
        assert m[("localmoe_requests_total", (("code", "429"), ("endpoint", "/v1/completions")))] == 3

        # a non-streamed request whose client gives up while it runs is cancelled too
        gate.delay = 0.02  # 100 tokens would take 2 s
        # (a counting prompt: the demo model's greedy continuation runs the whole 100 tokens, where
        # a prose prompt may meet an end-of-text token before the client gives up)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": "1, 2, 3, 4,", "max_tokens": 100, "temperature": 0},
                timeout=0.4,
            )
        key = ("localmoe_generations_total", (("outcome", "cancelled"),))
        deadline = time.monotonic() + 10
        while (m2 := _metrics(srv.url, http=HTTP)).get(key, 0) < m.get(key, 0) + 1:
            assert time.monotonic() < deadline, "the abandoned request was not cancelled"
            time.sleep(0.02)
        gate.delay = 0.0
        made = m2[("localmoe_completion_tokens_total", ())] - m[("localmoe_completion_tokens_total", ())]
        assert (
            0 < made < 100
            and m2[("localmoe_cancel_overrun_tokens_total", ())] - m[("localmoe_cancel_overrun_tokens_total", ())] <= 1
        )
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    finally:
        gate.open.set()
        srv.stop()


def run_burst(srv, gate) -> None:
    url = srv.url
    # a burst past the queue: one runs (held at the gate), QUEUE wait, the rest get 429 at once
    burst = {"prompt": "In the beginning", "max_tokens": 2, "temperature": 0.9, "seed": 5}
    solo = _plain(url, burst).json()
    extra = 3

    def state() -> tuple[float, float]:
        m = _metrics(url, http=HTTP)
        return m[("localmoe_requests_running", ())], m[("localmoe_queue_depth", ())]

    def until(cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    with ThreadPoolExecutor(QUEUE + extra) as pool:
        with _Blocker(url, gate):
            futures = [pool.submit(_plain, url, burst) for _ in range(QUEUE + extra)]
            until(lambda: sum(f.done() for f in futures) >= extra, "the overflow was not answered at once")
            assert state() == (1, QUEUE)
            assert sum(f.done() for f in futures) == extra  # the others wait
        answers = [f.result(timeout=120) for f in futures]
    rejected = [a for a in answers if a.status_code == 429]
    accepted = [a for a in answers if a.status_code == 200]
    assert len(rejected) == extra and len(accepted) == QUEUE, [a.status_code for a in answers]
    for a in rejected:
        assert int(a.headers["retry-after"]) >= 1 and a.json()["error"]["code"] == "queue_full"
    for a in accepted:
        out = a.json()
        assert out["choices"][0]["text"] == solo["choices"][0]["text"] and out["usage"] == solo["usage"]

    # a client that hangs up while it waits leaves the queue at once
    give_up = threading.Event()

    def quitter() -> int:  # accepted (the 200 and headers come at once), waits, then hangs up
        with HTTP.stream("POST", url + "/v1/completions", json={**burst, "stream": True}) as r:
            give_up.wait(60)
            return r.status_code

    with ThreadPoolExecutor(1) as pool:
        with _Blocker(url, gate):
            quit_future = pool.submit(quitter)
            until(lambda: state() == (1, 1), "the quitter was not queued behind the blocker")
            give_up.set()
            assert quit_future.result(timeout=30) == 200
            until(lambda: state() == (1, 0), "a client that left the queue did not free its slot")
