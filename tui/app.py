"""`localmoe chat`: a Textual chat with a live view of the expert cache.

The app talks to the runtime only through the public API (`stream`, `stats`, `configure`, the
`spec`/`policy`/`on_miss`/`gpu_budget` attributes), so a scripted fake runtime can drive it in
tests. Loading and generation run in thread workers that report back with messages; the UI thread
only reads frozen `Stats` snapshots, a few times a second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psutil
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, LoadingIndicator, Static
from textual.worker import Worker, get_current_worker

from localmoe.residency.cache_policies import ONLINE_POLICIES
from localmoe.sampling import DEFAULT, MAX_TOKENS
from localmoe.errors import LocalMoEError
from localmoe.runtime import ON_MISS_POLICIES

from . import commands
from .commands import Command
from .panels import DecodeRate, ExpertHeat, ExpertPanel, StatsPanel, tps
from .screens import HelpScreen

Messages = list[dict[str, str]]


@dataclass
class Sampling:  # the chat's live settings, from localmoe's defaults (localmoe/sampling.py)
    max_tokens: int = MAX_TOKENS
    temperature: float = DEFAULT.temperature
    top_p: float = DEFAULT.top_p
    top_k: int = DEFAULT.top_k
    seed: int | None = None


def fit_messages(rt: Any, system: str | None, history: Messages, text: str, max_tokens: int) -> tuple[Messages, int]:
    """The messages to send: system prompt, as much recent history as fits the context with room
    for a reply, and the new user turn. Returns them and how many old history messages were left out.
    Token counts are estimated (content tokens + a few per turn for the template's markers)."""
    n_ctx = getattr(rt, "n_ctx", None)
    tokenize = getattr(rt, "tokenize", None)
    head = [{"role": "system", "content": system}] if system else []
    tail = [{"role": "user", "content": text}]
    if not n_ctx or tokenize is None or not history:
        return head + history + tail, 0
    budget = n_ctx - min(max_tokens, n_ctx // 2)

    def cost(m: dict[str, str]) -> int:
        return len(tokenize(m["content"])) + 6

    total = sum(cost(m) for m in head + tail) + 4
    costs = [cost(m) for m in history]
    drop = 0
    while drop < len(history) and total + sum(costs[drop:]) > budget:
        drop += 2 if drop + 1 < len(history) else 1  # whole exchanges: user + assistant
    return head + history[drop:] + tail, drop


# -- messages from the workers ------------------------------------------------------------------
class ModelLoaded(Message):
    def __init__(self, runtime: Any, seconds: float):
        super().__init__()
        self.runtime, self.seconds = runtime, seconds


class ModelFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class ReplyChunk(Message):
    def __init__(self, seq: int, text: str):
        super().__init__()
        self.seq, self.text = seq, text


class ReplyDone(Message):
    def __init__(self, seq: int, finish_reason: str, stats: Any, dropped: int):
        super().__init__()
        self.seq, self.finish_reason, self.stats, self.dropped = seq, finish_reason, stats, dropped


class ReplyFailed(Message):
    def __init__(self, seq: int, error: str):
        super().__init__()
        self.seq, self.error = seq, error


class SettingApplied(Message):
    def __init__(self, what: str, error: str | None):
        super().__init__()
        self.what, self.error = what, error


# -- widgets ------------------------------------------------------------------------------------
class MessageView(Static):
    """One turn of the conversation (or a note from the app)."""

    LABELS = {"user": "you", "assistant": "model", "note": ""}

    def __init__(self, role: str, text: str = "", **kwargs):
        super().__init__("", classes=role, **kwargs)
        self.role, self.text, self.meta = role, text, ""
        self.update(self._content())

    def set_text(self, text: str) -> None:
        self.text = text
        self.update(self._content())

    def finish(self, meta: str) -> None:
        self.meta = meta
        self.update(self._content())

    def _content(self) -> Text:
        t = Text()
        label = self.LABELS.get(self.role, "")
        if label:
            t.append(label + "\n", "bold")
        t.append(self.text if self.text or self.role != "assistant" else "…")
        if self.meta:
            t.append("\n" + self.meta, "dim italic")
        return t


class LoadingPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield LoadingIndicator()
        yield Static("", id="loading-text")


@dataclass
class PendingReply:
    seq: int
    text: str  # the user's message
    user_view: MessageView
    reply_view: MessageView
    reply: str = ""
    started: float = field(default_factory=time.monotonic)


# -- the app ------------------------------------------------------------------------------------
class ChatApp(App[None]):
    """Chat with a MoE model and watch its expert cache.

    Pass either a loaded `runtime`, or a `loader` that makes one (run in a thread while a loading
    screen shows; a LocalMoEError shows on screen, then the app exits with return code 2)."""

    CSS_PATH = "chat.tcss"
    TITLE = "localmoe chat"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("escape", "cancel_reply", "Cancel"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("f1", "help", "Help"),
        Binding("f2", "toggle_panel", "Panel"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        runtime: Any = None,
        *,
        loader: Callable[..., Any] | None = None,
        model_label: str = "",
        system: str | None = None,
        sampling: Sampling | None = None,
        refresh_interval: float = 0.25,
        error_linger: float = 5.0,
    ):
        super().__init__()
        if (runtime is None) == (loader is None):
            raise ValueError("pass a runtime or a loader")
        self.rt = runtime
        self._loader = loader
        self._owns_rt = runtime is None
        self.model_label = model_label
        self.system = system or None
        self.sampling = sampling or Sampling()
        self.refresh_interval = refresh_interval
        self.error_linger = error_linger
        self.history: Messages = []
        self.load_error: str | None = None
        self.load_step: tuple[str, int, int] | None = None  # the loader's progress: (what, done, total)
        self.pending: PendingReply | None = None
        self._seq = 0
        self._reply_worker: Worker | None = None
        self._threads = 0  # generation threads still running (a cancelled one stops at its next token)
        self._threads_cv = threading.Condition()
        self._heat: ExpertHeat | None = None
        self._rate = DecodeRate()
        self._last_stats: Any = None
        self._last_settings: str | None = None
        self._last_resident: tuple | None = None  # per layer, as last drawn in the expert map
        self._process = psutil.Process()
        self._rss: int | None = None
        self._rss_at = 0.0
        self._load_started = time.monotonic()

    # -- layout -----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield LoadingPanel(id="loading")
                yield VerticalScroll(id="chat")
                yield Static("", id="status")
                yield Input(placeholder="Message (Enter sends · /help)", id="prompt", disabled=True)
            with Vertical(id="side"):
                stats = StatsPanel(id="stats")
                stats.border_title = "stats"
                yield stats
                experts = ExpertPanel(id="experts")
                experts.border_title = "experts"
                yield experts
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat", VerticalScroll).anchor()
        if self.rt is not None:
            self._attach(self.rt, None)
        else:
            self.query_one("#chat").display = False
            self._set_status("loading the model…")
            self._show_loading()
            self._loading_timer = self.set_interval(0.5, self._show_loading)
            self._load()

    # -- loading ----------------------------------------------------------------------------------
    def _show_loading(self) -> None:
        if self.load_error is None:
            secs = time.monotonic() - self._load_started
            step = self.load_step
            doing = (
                f" — {step[0]} {step[1] / max(1, step[2]):.0%} ({step[1]:,} of {step[2]:,})" if step is not None else ""
            )
            self.query_one("#loading-text", Static).update(
                Text(f"loading {self.model_label or 'the model'} … {secs:.0f} s{doing}", style="bold")
            )

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load(self) -> None:
        start = time.monotonic()
        try:
            rt = self._loader(progress=self._record_load_step)
        except LocalMoEError as exc:
            self.post_message(ModelFailed(str(exc)))
        except Exception as exc:  # a bug or an environment problem: still no traceback on screen
            self.post_message(ModelFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(ModelLoaded(rt, time.monotonic() - start))

    def _record_load_step(self, what: str, done: int, total: int) -> None:
        """load()'s progress, from the loading thread; the loading timer shows it."""
        self.load_step = (what, done, total)

    def on_model_loaded(self, msg: ModelLoaded) -> None:
        self._loading_timer.stop()
        self.rt = msg.runtime
        self._attach(msg.runtime, msg.seconds)

    def on_model_failed(self, msg: ModelFailed) -> None:
        self._loading_timer.stop()
        self.load_error = msg.error
        self.query_one(LoadingIndicator).display = False
        t = Text()
        t.append("could not load the model\n\n", "bold red")
        t.append(msg.error + "\n\n")
        t.append(
            "press any key to quit"
            + (f" (quits by itself in {self.error_linger:.0f} s)" if self.error_linger > 0 else ""),
            "dim",
        )
        self.query_one("#loading-text", Static).update(t)
        self._set_status("not loaded")
        if self.error_linger <= 0:
            self.exit(return_code=2)
        else:
            self.set_timer(self.error_linger, partial(self.exit, None, 2))

    def on_key(self, event: Any) -> None:
        if self.load_error is not None:
            event.stop()
            self.exit(return_code=2)

    def _attach(self, rt: Any, seconds: float | None) -> None:
        spec = rt.spec
        self._heat = ExpertHeat(spec.n_layer, spec.n_expert, spec.n_expert_used)
        self.sub_title = f"{spec.name} · {spec.n_layer}×{spec.n_expert} experts, top-{spec.n_expert_used}"
        self.query_one(ExpertPanel).setup(spec.n_layer, spec.n_expert)
        self.query_one("#loading").display = False
        self.query_one("#chat").display = True
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.focus()
        loaded = f"loaded {os.path.basename(getattr(rt, 'path', '') or '') or spec.name}" + (
            f" in {seconds:.1f} s" if seconds is not None else ""
        )
        self._note(loaded + " · F1 help · Esc cancels a reply")
        if self.system:
            self._note(f"system prompt: {self.system}")
        self._set_status("ready")
        self._tick()
        self.set_interval(self.refresh_interval, self._tick)

    # -- live stats -------------------------------------------------------------------------------
    def _settings_line(self) -> str:
        rt = self.rt
        prefetch = getattr(rt, "prefetch", None)
        parts = [f"policy {getattr(rt, 'policy', '?')}", f"miss {getattr(rt, 'on_miss', '?')}"]
        if prefetch is not None:
            parts.append(f"prefetch {'on' if prefetch else 'off'}")
        return " · ".join(parts)

    def _tick(self) -> None:
        if self.rt is None:
            return
        try:
            self._refresh_panels()
        except NoMatches:  # the app is shutting down: its widgets are gone
            pass

    def _refresh_panels(self) -> None:
        try:
            st = self.rt.stats()
        except Exception as exc:  # the stats must never take the UI down
            self._set_status(f"stats unavailable: {exc}")
            return
        now = time.monotonic()
        rss_changed = False
        if now - self._rss_at >= 1.0:
            self._rss_at = now
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                rss = None
            rss_changed, self._rss = rss != self._rss, rss
        settings = self._settings_line()
        if st == self._last_stats and not rss_changed and settings == self._last_settings:
            return
        self._last_stats, self._last_settings = st, settings
        self._rate.update(st)
        self.query_one(StatsPanel).show(st, self._rate, self._rss, settings)
        resident = tuple(layer.resident for layer in st.layers)  # changes without new uses after /gpu-mem, /policy
        if self._heat is not None and (self._heat.update(st) or resident != self._last_resident):
            self.query_one(ExpertPanel).show(self._heat, st)
        self._last_resident = resident
        if self.pending is not None:
            self._set_status(f"writing · {st.decode_tokens} tokens · {tps(st.decode_tps)} tok/s · Esc stops")

    def _set_status(self, text: str) -> None:
        try:
            self.query_one("#status", Static).update(text)
        except NoMatches:  # shutting down
            pass

    # -- the conversation -------------------------------------------------------------------------
    def _note(self, text: str) -> MessageView:
        view = MessageView("note", text)
        self.query_one("#chat", VerticalScroll).mount(view)
        return view

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        line = event.value
        if not line.strip():
            return
        try:
            cmd = commands.parse(line)
        except LocalMoEError as exc:
            self.notify(str(exc), severity="error")
            return
        prompt = self.query_one("#prompt", Input)
        if cmd is not None:
            prompt.value = ""
            self.run_command(cmd)
            return
        if self.rt is None:
            self.notify("the model is still loading", severity="warning")
            return
        if self.pending is not None:
            self.notify("a reply is still being written: wait for it, or press Esc to cancel it", severity="warning")
            return
        prompt.value = ""
        self.send(commands.unescape(line))

    def send(self, text: str) -> None:
        """Show the user's turn and start streaming the reply in a thread."""
        chat = self.query_one("#chat", VerticalScroll)
        self._seq += 1
        user_view, reply_view = MessageView("user", text), MessageView("assistant", "")
        chat.mount(user_view, reply_view)
        self.pending = PendingReply(self._seq, text, user_view, reply_view)
        with self._threads_cv:
            self._threads += 1
        self._reply_worker = self._generate(
            self._seq, self.system, list(self.history), text, Sampling(**vars(self.sampling))
        )
        self._set_status("reading the prompt · Esc stops")
        self.refresh_bindings()

    @work(thread=True, exclusive=True, group="reply", exit_on_error=False)
    def _generate(self, seq: int, system: str | None, history: Messages, text: str, sampling: Sampling) -> None:
        worker = get_current_worker()
        try:
            messages, dropped = fit_messages(self.rt, system, history, text, sampling.max_tokens)
            stream = self.rt.stream(
                messages,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
            )
            final = None
            try:
                for chunk in stream:
                    if worker.is_cancelled:
                        return  # closing the stream (below) stops the engine
                    if chunk.text:
                        self.post_message(ReplyChunk(seq, chunk.text))
                    if chunk.finish_reason is not None:
                        final = chunk
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            self.post_message(
                ReplyDone(seq, final.finish_reason if final else "stop", final.stats if final else None, dropped)
            )
        except LocalMoEError as exc:
            self.post_message(ReplyFailed(seq, str(exc)))
        except Exception as exc:
            self.post_message(ReplyFailed(seq, f"{type(exc).__name__}: {exc}"))
        finally:
            with self._threads_cv:
                self._threads -= 1
                self._threads_cv.notify_all()

    def _current(self, seq: int) -> PendingReply | None:
        return self.pending if self.pending is not None and self.pending.seq == seq else None

    def on_reply_chunk(self, msg: ReplyChunk) -> None:
        p = self._current(msg.seq)
        if p is None:
            return
        p.reply += msg.text
        p.reply_view.set_text(p.reply)

    def on_reply_done(self, msg: ReplyDone) -> None:
        p = self._current(msg.seq)
        if p is None:
            return
        if msg.dropped:
            del self.history[: msg.dropped]
            n_ctx = getattr(self.rt, "n_ctx", "?")
            self.notify(
                (
                    f"the conversation is longer than the {n_ctx}-token context: the {msg.dropped} oldest messages "
                    "were left out"
                ),
                severity="warning",
            )
        self.history += [{"role": "user", "content": p.text}, {"role": "assistant", "content": p.reply}]
        meta = [msg.finish_reason]
        st = msg.stats
        if st is not None:
            clock = "" if st.clock == "measured" else " (modelled)"
            meta = [
                f"{st.decode_tokens} tokens",
                f"{tps(st.decode_tps)} tok/s{clock}",
                f"hit rate {st.hit_rate:.0%}" if st.hits + st.misses else "",
                msg.finish_reason,
            ]
        p.reply_view.finish(" · ".join(m for m in meta if m))
        self._end_reply("ready")

    def on_reply_failed(self, msg: ReplyFailed) -> None:
        p = self._current(msg.seq)
        if p is None:
            return
        self._unsend(p)
        self.notify(msg.error, title="engine error", severity="error", timeout=10)
        self._end_reply("the last message was not sent; it is back in the input")

    def _unsend(self, p: PendingReply) -> None:
        """Take a turn back: remove its views and return its text to the input (unless the user
        has typed something new there meanwhile). The history never held it."""
        p.user_view.remove()
        p.reply_view.remove()
        prompt = self.query_one("#prompt", Input)
        if not prompt.value:
            prompt.value = p.text
            prompt.cursor_position = len(p.text)

    def _end_reply(self, status: str) -> None:
        self.pending = None
        self._set_status(status)
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_reply":
            return self.pending is not None
        return True

    def action_cancel_reply(self) -> None:
        p = self.pending
        if p is None:
            return
        if self._reply_worker is not None:
            self._reply_worker.cancel()
        if p.reply:
            self.history += [{"role": "user", "content": p.text}, {"role": "assistant", "content": p.reply}]
            p.reply_view.finish("cancelled")
            self._end_reply("cancelled")
        else:
            self._unsend(p)
            self._end_reply("cancelled before the first token; your message is back in the input")

    def action_new_conversation(self) -> None:
        if self.pending is not None:
            if self._reply_worker is not None:
                self._reply_worker.cancel()
            self._end_reply("ready")
        self.history.clear()
        chat = self.query_one("#chat", VerticalScroll)
        chat.remove_children()
        self._note("new conversation" + (f" · system prompt: {self.system}" if self.system else ""))
        self._set_status("ready")

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_panel(self) -> None:
        side = self.query_one("#side")
        side.display = not side.display

    # -- commands and settings --------------------------------------------------------------------
    def run_command(self, cmd: Command) -> None:
        try:
            if cmd.name == "policy":
                self.apply_setting("policy", cmd.arg)
            elif cmd.name == "on-miss":
                self.apply_setting("on_miss", cmd.arg)
            elif cmd.name == "gpu-mem":
                self.apply_setting("gpu_mem", cmd.arg)
            elif cmd.name == "prefetch":
                self.apply_setting("prefetch", commands.parse_switch(cmd.arg))
            elif cmd.name == "system":
                self.system = cmd.arg or None
                self._note(f"system prompt: {self.system}" if self.system else "system prompt removed")
                self.notify("the system prompt applies from the next reply")
            elif cmd.name == "temp":
                self.sampling.temperature = commands.parse_temperature(cmd.arg)
                self.notify(f"temperature {self.sampling.temperature:g}")
            elif cmd.name == "max-tokens":
                self.sampling.max_tokens = commands.parse_max_tokens(cmd.arg)
                self.notify(f"replies of at most {self.sampling.max_tokens} tokens")
            elif cmd.name == "new":
                self.action_new_conversation()
            elif cmd.name == "help":
                self.action_help()
            elif cmd.name == "quit":
                self.exit()
        except LocalMoEError as exc:
            self.notify(str(exc), severity="error")

    def apply_setting(self, name: str, value: Any) -> None:
        """Change a runtime setting through `configure`, in a thread: the runtime applies it between
        replies (it waits for a reply being written to finish). Errors become notifications."""
        if self.rt is None:
            self.notify("the model is still loading", severity="warning")
            return
        if self.pending is not None:
            self.notify(f"{name.replace('_', '-')} → {value}: applies when this reply ends")
        self._configure(name, value)

    @work(thread=True, group="settings", exit_on_error=False)
    def _configure(self, name: str, value: Any) -> None:
        label = name.replace("_", "-")
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        try:
            self.rt.configure(**{name: value})
        except LocalMoEError as exc:
            self.post_message(SettingApplied(label, str(exc)))
        except Exception as exc:
            self.post_message(SettingApplied(label, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(SettingApplied(f"{label} → {shown}", None))

    def on_setting_applied(self, msg: SettingApplied) -> None:
        if msg.error:
            self.notify(msg.error, title=f"cannot set {msg.what}", severity="error", timeout=10)
        else:
            self.notify(msg.what, title="applied")
            self._tick()

    def _prefill(self, text: str) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.value = text
        prompt.cursor_position = len(text)
        prompt.focus()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: keys and commands", "every key, slash command and panel", self.action_help)
        yield SystemCommand(
            "New conversation", "forget the history (keeps the system prompt)", self.action_new_conversation
        )
        for name in ONLINE_POLICIES:
            yield SystemCommand(
                f"Cache policy: {name}",
                f"/policy {name}: what leaves the GPU tier when the budget is full",
                partial(self.apply_setting, "policy", name),
            )
        for name in ON_MISS_POLICIES:
            yield SystemCommand(
                f"Miss policy: {name}",
                f"/on-miss {name}: what happens when a routed expert is not resident",
                partial(self.apply_setting, "on_miss", name),
            )
        yield SystemCommand(
            "GPU budget…", "type /gpu-mem SIZE (e.g. 2GB) in the message box", partial(self._prefill, "/gpu-mem ")
        )
        yield SystemCommand("Prefetch: on", "/prefetch on", partial(self.apply_setting, "prefetch", True))
        yield SystemCommand("Prefetch: off", "/prefetch off", partial(self.apply_setting, "prefetch", False))
        yield SystemCommand(
            "System prompt…", "type /system TEXT in the message box", partial(self._prefill, "/system ")
        )

    # -- shutdown ---------------------------------------------------------------------------------
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no generation thread runs (after a cancel it stops at its next token)."""
        with self._threads_cv:
            return self._threads_cv.wait_for(lambda: self._threads == 0, timeout)

    def close_runtime(self, timeout: float = 30.0) -> None:
        """Close a runtime this app loaded, once no thread uses it any more."""
        if self._reply_worker is not None:
            self._reply_worker.cancel()
        if self._owns_rt and self.rt is not None and self.wait_idle(timeout):
            self.rt.close()
            self.rt = None
