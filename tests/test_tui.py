"""`localmoe chat` (the Textual app in localmoe.tui), driven with Textual's Pilot.

Most tests use a scripted fake runtime that speaks the public API (stream, stats, configure, spec
and the settings attributes); one runs a real model through `localmoe.load`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from textual.command import CommandList
from textual.widgets import Input

import localmoe
from localmoe import Chunk, LocalMoEError
from localmoe.stats import StatsCollector
from localmoe.tui import ChatApp, Sampling, fit_messages
from localmoe.tui import commands
from localmoe.tui.app import MessageView
from localmoe.tui.panels import DecodeRate, ExpertHeat, ExpertMap, clock_label, human_bytes, map_text

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "localmoe-demo-moe.gguf"


class FakeRuntime:
    """Streams scripted replies a word at a time and keeps counters like the real runtime.
    With `gate` set, every token after the first waits for the test to release it."""

    def __init__(
        self,
        replies=("Hello from the fake model.",),
        n_layer=3,
        n_expert=8,
        top_k=2,
        gate: threading.Event | None = None,
    ):
        self.spec = SimpleNamespace(n_layer=n_layer, n_expert=n_expert, n_expert_used=top_k, name="fake-moe")
        self.path = "fake.gguf"
        self.policy, self.on_miss, self.gpu_budget, self.prefetch = "lfu", "cpu", None, True
        self.replies = list(replies)
        self.gate = gate
        self.fail: str | None = None  # a LocalMoEError message for the next stream()
        self.calls: list[list[dict]] = []
        self.closed_streams = 0
        self.finished_streams = 0
        self.configured: list[dict] = []
        self._base = StatsCollector(n_layer, n_expert).snapshot()
        self._lock = threading.Lock()
        self.tokens = self.decode_tokens = self.hits = 0
        self.uses = np.zeros((n_layer, n_expert), dtype=np.int64)

    def stats(self):
        with self._lock:
            layers = tuple(
                dataclasses.replace(
                    layer, hits=int(self.uses[i].sum()), expert_uses=tuple(int(u) for u in self.uses[i])
                )
                for i, layer in enumerate(self._base.layers)
            )
            return dataclasses.replace(
                self._base,
                tokens=self.tokens,
                decode_tokens=self.decode_tokens,
                decode_tps=10.0 if self.decode_tokens else 0.0,
                hits=self.hits,
                hit_rate=1.0 if self.hits else 0.0,
                layers=layers,
            )

    def _step(self, n_tokens: int, decode: bool) -> None:
        with self._lock:
            for _ in range(n_tokens):
                t = self.tokens
                self.tokens += 1
                self.decode_tokens += decode
                for layer in range(self.spec.n_layer):
                    for j in range(self.spec.n_expert_used):  # a deterministic routing pattern
                        self.uses[layer, (t + layer + j) % self.spec.n_expert] += 1
                        self.hits += 1

    def stream(self, messages, max_tokens=128, temperature=0.8, top_p=0.95, top_k=40, seed=None):
        self.calls.append(messages)
        if self.fail:
            raise LocalMoEError(self.fail)
        words = self.replies[(len(self.calls) - 1) % len(self.replies)].split(" ")
        return self._gen(words[:max_tokens])

    def _gen(self, words):
        try:
            with self._lock:
                self.decode_tokens = 0
            self._step(3, decode=False)  # the prompt
            for i, word in enumerate(words):
                if self.gate is not None and i > 0:
                    assert self.gate.wait(10), "the test never released the fake runtime"
                self._step(1, decode=True)
                yield Chunk(word if i == 0 else " " + word, i, None, self.stats())
            yield Chunk("", None, "stop", self.stats())
            self.finished_streams += 1
        except GeneratorExit:
            self.closed_streams += 1
            raise

    def configure(self, policy=None, on_miss=None, gpu_mem=None, prefetch=None):
        self.configured.append(dict(policy=policy, on_miss=on_miss, gpu_mem=gpu_mem, prefetch=prefetch))
        if on_miss is not None:
            if on_miss not in ("fetch", "cpu", "buddy", "little", "drop"):
                raise LocalMoEError(f"unknown miss policy '{on_miss}'")
            self.on_miss = on_miss
        if policy is not None:
            self.policy = policy
        if prefetch is not None:
            self.prefetch = prefetch
        if gpu_mem is not None:
            raise LocalMoEError("a GPU-tier budget needs the expert residency engine")

    def close(self):
        pass


def run(coro):
    return asyncio.run(coro)


async def wait_until(pilot, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.02)


async def send(pilot, text: str) -> None:
    prompt = pilot.app.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")


async def chat(pilot, text: str) -> None:
    """Send a message and wait until its reply has ended (streamed, failed or stopped)."""
    app = pilot.app
    seq = app._seq
    await send(pilot, text)
    await wait_until(pilot, lambda: app._seq > seq and app.pending is None, timeout=60)


def views(app, role: str) -> list[MessageView]:
    return [v for v in app.query(MessageView) if v.role == role]


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


# -- the chat -----------------------------------------------------------------------------------
def test_message_streams_a_reply_and_the_stats_update():
    rt = FakeRuntime(replies=("one two three four",))

    async def go():
        app = ChatApp(rt, system="Be brief.", refresh_interval=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            await chat(pilot, "hello")
            assert [v.text for v in views(app, "user")] == ["hello"]
            assert views(app, "assistant")[-1].text == "one two three four"
            assert "4 tokens" in views(app, "assistant")[-1].meta
            assert app.query_one("#prompt", Input).value == ""
            # the system prompt and the history go through the chat messages
            assert rt.calls[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
            await wait_until(pilot, lambda: app._last_stats is not None and app._last_stats.tokens == 7)
            body = str(app.query_one("#stats-body").render())
            assert "42 hit" in body and "100.0%" in body and "measured" in body
            # the expert map shows every layer, with heat where the fake routed
            emap = app.query_one(ExpertMap)
            assert emap.share.shape == (3, 8) and emap.share.max() > 0
            assert len(str(emap.render()).splitlines()) == 3
            # a second turn sends the whole conversation
            await chat(pilot, "again")
            assert [m["role"] for m in rt.calls[1]] == ["system", "user", "assistant", "user"]
            assert rt.calls[1][2]["content"] == "one two three four"

    run(go())


def test_escape_cancels_a_reply():
    gate = threading.Event()
    rt = FakeRuntime(replies=("first second third fourth",), gate=gate)

    async def go():
        app = ChatApp(rt, refresh_interval=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "tell me")
            await wait_until(pilot, lambda: views(app, "assistant") and views(app, "assistant")[-1].text == "first")
            await pilot.press("escape")
            assert app.pending is None
            reply = views(app, "assistant")[-1]
            assert reply.meta == "cancelled"
            gate.set()  # the engine thread goes on to its next token, sees the cancel and stops
            await app.workers.wait_for_complete()
            assert app.wait_idle(5)
            await pilot.pause()
            assert rt.closed_streams == 1 and rt.finished_streams == 0
            assert reply.text == "first"  # nothing arrived after the cancel
            assert app.history == [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "first"}]

    run(go())


def test_escape_before_the_first_token_returns_the_message_to_the_input():
    gate = threading.Event()
    rt = FakeRuntime(gate=gate)
    started = threading.Event()
    real_stream = rt.stream

    def slow_stream(*args, **kwargs):  # a long prompt: nothing comes for a while
        started.set()
        gate.wait(10)
        return real_stream(*args, **kwargs)

    rt.stream = slow_stream

    async def go():
        app = ChatApp(rt)
        async with app.run_test() as pilot:
            await send(pilot, "a long question")
            await wait_until(pilot, started.is_set)
            await pilot.press("escape")
            assert app.query_one("#prompt", Input).value == "a long question"
            assert not views(app, "user") and app.history == []
            gate.set()
            await app.workers.wait_for_complete()
            assert app.wait_idle(5)

    run(go())


def test_engine_error_keeps_the_conversation_and_the_input():
    rt = FakeRuntime(replies=("fine thanks",))

    async def go():
        app = ChatApp(rt)
        async with app.run_test() as pilot:
            await chat(pilot, "how are you")
            rt.fail = "the prompt is 300 tokens but the context holds 256"
            await chat(pilot, "and now something long")
            assert app.query_one("#prompt", Input).value == "and now something long"
            assert any("context holds 256" in n for n in notifications(app))
            assert app.history == [
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"},
            ]
            assert [v.text for v in views(app, "user")] == ["how are you"]
            assert app.is_running  # no crash
            # it recovers: the next send works
            rt.fail = None
            await chat(pilot, "short")
            assert len(app.history) == 4

    run(go())


def test_new_conversation_key_and_command():
    rt = FakeRuntime(replies=("ok",))

    async def go():
        app = ChatApp(rt, system="S")
        async with app.run_test() as pilot:
            await chat(pilot, "hi")
            assert len(app.history) == 2
            await pilot.press("ctrl+n")
            assert app.history == [] and not views(app, "user")
            await chat(pilot, "hi again")
            assert rt.calls[-1] == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi again"}]
            await send(pilot, "/new")
            assert app.history == []
            await send(pilot, "/system You are a pirate.")
            assert app.system == "You are a pirate."
            await send(pilot, "/system")
            assert app.system is None

    run(go())


# -- live controls ------------------------------------------------------------------------------
def test_slash_commands_change_the_runtime_settings():
    rt = FakeRuntime()

    async def go():
        app = ChatApp(rt, refresh_interval=0.05)
        async with app.run_test() as pilot:
            await send(pilot, "/on-miss buddy")
            await wait_until(pilot, lambda: rt.on_miss == "buddy")
            await send(pilot, "/policy lru")
            await wait_until(pilot, lambda: rt.policy == "lru")
            await send(pilot, "/prefetch off")
            await wait_until(pilot, lambda: rt.prefetch is False)
            await wait_until(pilot, lambda: "miss buddy" in str(app.query_one("#stats-body").render()))
            # a refused value is a notification, not a crash
            await send(pilot, "/gpu-mem 2GB")
            await wait_until(pilot, lambda: any("residency engine" in n for n in notifications(app)))
            assert rt.configured[-1]["gpu_mem"] == "2GB"
            await send(pilot, "/on-miss sideways")
            await wait_until(pilot, lambda: any("unknown miss policy" in n for n in notifications(app)))
            assert rt.on_miss == "buddy"
            # a bad command keeps the input for fixing
            await send(pilot, "/frobnicate")
            assert app.query_one("#prompt", Input).value == "/frobnicate"
            assert any("unknown command" in n for n in notifications(app))
            await send(pilot, "/temp 0")
            await send(pilot, "/max-tokens 2")
            assert app.sampling.temperature == 0 and app.sampling.max_tokens == 2

    run(go())


def test_command_palette_sets_the_miss_policy():
    rt = FakeRuntime()

    async def go():
        app = ChatApp(rt)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("ctrl+p")
            await wait_until(pilot, lambda: type(app.screen).__name__ == "CommandPalette")
            app.screen.query_one(Input).value = "miss policy drop"
            options = app.screen.query_one(CommandList)
            await wait_until(pilot, lambda: options.option_count == 1)
            assert "Miss policy: drop" in str(options.get_option_at_index(0).prompt)
            await pilot.press("down", "enter")
            await app.workers.wait_for_complete()
            await wait_until(pilot, lambda: rt.on_miss == "drop")

    run(go())


def test_help_screen_lists_keys_and_commands():
    async def go():
        app = ChatApp(FakeRuntime())
        async with app.run_test() as pilot:
            await pilot.press("f1")
            await pilot.pause()
            text = str(app.screen.query_one("#help-text").render()) if app.screen.query("#help-text") else ""
            assert type(app.screen).__name__ == "HelpScreen"
            await pilot.press("escape")
            await pilot.pause()
            assert type(app.screen).__name__ != "HelpScreen"
            await send(pilot, "/help")
            await pilot.pause()
            assert type(app.screen).__name__ == "HelpScreen"
            return text

    run(go())
    from localmoe.tui.screens import help_text
    from rich.console import Console

    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(help_text())
    out = console.export_text()
    for words in ("Esc", "Ctrl+N", "F1", "/policy NAME", "/on-miss NAME", "/gpu-mem SIZE", "/system", "/new", "/help"):
        assert words in out


def test_layout_fits_80x24():
    """The demo model's shape (6 layers × 32 experts) at the smallest supported size: every stats
    line and every layer of the map is on screen, one cell per expert, nothing scrolled away."""
    rt = FakeRuntime(n_layer=6, n_expert=32, top_k=4, replies=("a b c",))

    async def go():
        app = ChatApp(rt, refresh_interval=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            await chat(pilot, "hi")
            await pilot.pause(0.1)
            footer_top = app.query_one("Footer").region.y
            for selector in (
                "#stats-speed",
                "#tps-spark",
                "#stats-body",
                "#map-legend",
                "#expert-map",
                "#status",
                "#prompt",
            ):
                region = app.query_one(selector).region
                assert region.height > 0 and region.bottom <= footer_top and region.right <= 80, selector
            body = app.query_one("#stats-body")
            assert body.region.height == len(str(body.render()).splitlines())
            scroll = app.query_one("#map-scroll")
            assert scroll.max_scroll_y == 0 and app.query_one("#expert-map").region.height == 6
            rows = str(app.query_one(ExpertMap).render()).splitlines()
            assert all(len(row) >= 2 + 32 for row in rows)  # one cell per expert
            assert app.query_one("#chat-column").region.width >= 40

    run(go())


# -- loading ------------------------------------------------------------------------------------
def test_load_failure_shows_why_and_exits_with_code_2():
    def loader(progress=None):
        raise LocalMoEError("bad.gguf is not a GGUF file")

    async def go():
        app = ChatApp(loader=loader, model_label="bad.gguf", error_linger=30)
        async with app.run_test() as pilot:
            await wait_until(pilot, lambda: app.load_error is not None)
            text = str(app.query_one("#loading-text").render())
            assert "could not load the model" in text and "not a GGUF file" in text
            await pilot.press("q")  # any key leaves
            await wait_until(pilot, lambda: app.return_code is not None)
        return app

    app = run(go())
    assert app.return_code == 2 and app.load_error == "bad.gguf is not a GGUF file"


def test_loading_state_then_chat():
    release = threading.Event()
    rt = FakeRuntime(replies=("loaded fine",))

    def loader(progress=None):
        progress("repacking experts", 512, 2048)  # what load() reports on a big model
        assert release.wait(10)
        return rt

    async def go():
        app = ChatApp(loader=loader, model_label="fake.gguf")
        async with app.run_test() as pilot:
            await pilot.pause()
            assert "loading fake.gguf" in str(app.query_one("#loading-text").render())
            await wait_until(
                pilot, lambda: "repacking experts 25% (512 of 2,048)" in str(app.query_one("#loading-text").render())
            )
            assert app.query_one("#prompt", Input).disabled
            release.set()
            await wait_until(pilot, lambda: app.rt is rt)
            assert not app.query_one("#prompt", Input).disabled
            await chat(pilot, "hi")
            assert views(app, "assistant")[-1].text == "loaded fine"

    run(go())


def test_cli_chat_with_a_bad_model_prints_error_and_exits_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    r = subprocess.run(
        [sys.executable, "-m", "localmoe", "chat", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "localmoe", "chat", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--system" in r.stdout and "--temp" in r.stdout


# -- a real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_model() -> str:
    """The bundled demo model (trained, in the repository): the app as users meet it."""
    assert DEMO.is_file(), f"{DEMO} is missing: it ships with the repository"
    return str(DEMO)


def test_real_model_streams_a_reply_with_stats_and_expert_map(real_model):
    async def go():
        app = ChatApp(
            loader=lambda progress=None: localmoe.load(real_model, device="cpu", seed=0, progress=progress),
            sampling=Sampling(max_tokens=12, temperature=0.0),
            refresh_interval=0.05,
        )
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.rt is not None or app.load_error is not None, timeout=60)
            assert app.load_error is None
            await send(pilot, "Tell me a fortune.")
            await wait_until(pilot, lambda: app.pending is None, timeout=60)
            reply = views(app, "assistant")[-1]
            assert reply.meta and "tok/s" in reply.meta
            await wait_until(pilot, lambda: app._last_stats is not None and app._last_stats.hits > 0)
            st = app._last_stats
            n_layer = app.rt.spec.n_layer
            assert "hit rate" in str(app.query_one("#stats-body").render())
            rows = str(app.query_one(ExpertMap).render()).splitlines()
            assert len(rows) == n_layer
            assert app.query_one(ExpertMap).share.sum() > 0
            assert st.tokens > 0
        app.close_runtime()
        assert app.rt is None  # closed: the app loaded it

    run(go())


# -- pieces -------------------------------------------------------------------------------------
def test_commands_parse():
    assert commands.parse("hello") is None
    assert commands.parse("//etc/passwd is a path") is None and commands.unescape("//x") == "/x"
    assert commands.parse("/on-miss buddy") == commands.Command("on-miss", "buddy")
    assert commands.parse("/ON_MISS  drop ") == commands.Command("on-miss", "drop")
    assert commands.parse("/system  be nice ") == commands.Command("system", "be nice")
    assert commands.parse("/system") == commands.Command("system", "")
    with pytest.raises(LocalMoEError, match="needs a value"):
        commands.parse("/gpu-mem")
    with pytest.raises(LocalMoEError, match="unknown command"):
        commands.parse("/nope")
    assert commands.parse_switch("off") is False
    with pytest.raises(LocalMoEError):
        commands.parse_temperature("-1")


def test_fit_messages_leaves_out_the_oldest_turns():
    rt = SimpleNamespace(n_ctx=100, tokenize=lambda s: s.split())
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"q{i} " * 5}, {"role": "assistant", "content": f"a{i} " * 5}]
    msgs, dropped = fit_messages(rt, "sys", history, "now", max_tokens=20)
    assert dropped % 2 == 0 and dropped > 0
    assert (
        msgs[0]["role"] == "system" and msgs[1] == history[dropped] and msgs[-1] == {"role": "user", "content": "now"}
    )
    assert fit_messages(SimpleNamespace(), None, history, "x", 10) == (history + [{"role": "user", "content": "x"}], 0)


def test_heat_rate_and_map_text():
    rt = FakeRuntime(n_layer=2, n_expert=8, top_k=2)
    heat = ExpertHeat(2, 8, 2)
    rate = DecodeRate()
    heat.update(rt.stats())
    rt._step(1, decode=True)
    assert heat.update(rt.stats())
    share = heat.share()
    assert share.shape == (2, 8) and np.isclose(share[0].sum(), 2) and share.max() == 1.0
    assert not heat.update(rt.stats())  # nothing new
    # a decode rate from two snapshots on the runtime's clock
    base = rt.stats()
    assert rate.update(dataclasses.replace(base, decode_tokens=10, decode_tps=10.0)) == pytest.approx(
        10.0
    )  # 10 tokens in 1 s
    assert rate.update(dataclasses.replace(base, decode_tokens=30, decode_tps=15.0)) == pytest.approx(
        20.0
    )  # 20 more in the next 1 s
    assert rate.update(dataclasses.replace(base, decode_tokens=4, decode_tps=8.0)) == pytest.approx(8.0)  # a new reply
    assert list(rate.samples) == pytest.approx([10.0, 20.0, 8.0])
    # map: one cell per expert when it fits, grouped when it does not
    resident = [set(range(4)), set()]
    text, group = map_text(share, resident, [1.0, None], 40)
    rows = str(text).splitlines()
    assert group == 1 and len(rows) == 2 and "100%" in rows[0]
    assert rows[0].startswith("0 ██▁▁····") and rows[1].startswith("1 ·▒▒·····")  # used: bars if resident, ▒ if not
    wide = np.zeros((48, 128))
    text, group = map_text(wide, [set(range(128))] * 48, [None] * 48, 35)
    assert group == 4 and all(len(r) <= 35 for r in str(text).splitlines())
    text, group = map_text(wide, [set()] * 48, [None] * 48, 200)
    assert group == 1 and str(text).splitlines()[0].startswith(" 0 " + "·" * 128)
    assert human_bytes(3 * 2**20) == "3.0 MiB" and clock_label("modelled:laptop-8gb") == "modelled (laptop-8gb)"
