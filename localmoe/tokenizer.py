"""Tokenizer and chat template, both taken from the GGUF file.

Tokenization is llama.cpp's own (llama-cpp-python with a vocab-only load, so no weights are read
twice). The chat template is Jinja from `tokenizer.chat_template`, which a hostile file could use
to run code: it is rendered only in an ImmutableSandboxedEnvironment.
"""

from __future__ import annotations

import ctypes
import datetime
import sys
import time
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LocalMoEError

RENDER_SECONDS = 2.0  # a chat template that renders for longer is stopped (a hostile or broken loop)
RENDER_CHARS = 4 << 20  # and one whose output grows past this many characters

# Used when a file carries no template: ChatML, which most MoE chat models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    def __init__(self, path: str, chat_template: str | None):
        import llama_cpp  # heavy import, only when a model is opened

        silence_llama_cpp_logs()
        try:
            self._llama = llama_cpp.Llama(model_path=path, vocab_only=True, n_ctx=8, verbose=False)
        except Exception as exc:
            raise LocalMoEError(
                f"{path}: llama.cpp could not read the tokenizer ({exc}); the file's vocabulary is damaged or "
                "unsupported"
            ) from None
        self._model = self._llama._model
        self.n_vocab = self._llama.n_vocab()
        self.bos_id = self._model.token_bos()
        self.eos_id = self._model.token_eos()
        self.add_bos = bool(self._model.add_bos_token())
        self._eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._model.vocab, t)}
        self.chat_template_source = chat_template or CHATML_TEMPLATE
        self.has_own_template = chat_template is not None
        self._pieces: dict[int, bytes] = {}
        env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.chat_template_source)
        except TemplateError as exc:
            raise LocalMoEError(
                f"{path}: the chat template does not parse ({exc}); use plain prompts (`localmoe run -p`) instead"
            ) from None

    def token_text(self, token: int) -> str:
        return self._model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens llama.cpp marks as such."""
        return token in self._eog

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text → ids. Special-token text such as <|im_start|> is parsed as the special token."""
        return list(
            self._llama.tokenize(
                text.encode("utf-8"), add_bos=self.add_bos if add_bos is None else add_bos, special=True
            )
        )

    def piece(self, token: int) -> bytes:
        """The bytes one token contributes to the output (control tokens contribute none)."""
        cached = self._pieces.get(token)
        if cached is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # the piece is longer than the buffer: -n bytes are needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def detokenize(self, ids: list[int]) -> str:
        return self._llama.detokenize(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The messages through the chat template, in the sandbox, stopped after RENDER_SECONDS
        or RENDER_CHARS characters of output."""
        if not isinstance(messages, list) or not messages:
            raise LocalMoEError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LocalMoEError("each chat message must be a dict with 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise LocalMoEError(
                    f"a chat message's 'role' and 'content' must be strings, got {type(m['role']).__name__} "
                    f"and {type(m['content']).__name__}"
                )
        context = dict(
            messages=messages,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=self.token_text(self.bos_id) if self.bos_id >= 0 else "",
            eos_token=self.token_text(self.eos_id) if self.eos_id >= 0 else "",
        )
        try:
            return _render_limited(self._template, context, RENDER_SECONDS, RENDER_CHARS)
        except LocalMoEError:
            raise
        except Exception as exc:  # SecurityError, UndefinedError, …
            message = " ".join(str(exc).split())[:200]
            raise LocalMoEError(
                f"the model's chat template failed to render ({type(exc).__name__}: {message})"
            ) from None

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.render_chat(messages)
        bos_text = self.token_text(self.bos_id) if self.bos_id >= 0 else None
        add_bos = self.add_bos and not (bos_text and text.startswith(bos_text))
        return self.tokenize(text, add_bos=add_bos)

    def close(self) -> None:
        self._llama.close()


_NO_LOG = None  # the ctypes callback must outlive its registration


def silence_llama_cpp_logs() -> None:
    """llama.cpp writes warnings straight to stderr; our errors say what matters in one line."""
    global _NO_LOG
    if _NO_LOG is None:
        import llama_cpp

        _NO_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_NO_LOG, ctypes.c_void_p(0))


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a cap on `*` and `**`: one C-level operation ('a' * 10**10) would run
    past any time limit that Python code can enforce."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise LocalMoEError(f"chat template: exponent {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS:
                    raise LocalMoEError(f"chat template: a repetition makes more than {RENDER_CHARS} items")
        return super().call_binop(context, operator, left, right)


class _RenderTimeout(BaseException):  # not an Exception: nothing on the way up catches it
    pass


def _render_limited(template, context: dict[str, Any], seconds: float, max_chars: int) -> str:
    """Render with a deadline: a trace function on this thread checks the clock as the compiled
    template's Python runs (every line and call), so a loop that emits nothing is stopped too."""
    deadline = time.monotonic() + seconds
    fired = False

    def tracer(frame, event, arg):
        nonlocal fired
        if fired:
            return None  # unwinding: no more tracing
        if time.monotonic() > deadline:
            fired = True
            raise _RenderTimeout
        return tracer

    previous = sys.gettrace()
    parts: list[str] = []
    size = 0
    sys.settrace(tracer)
    try:
        for part in template.generate(**context):
            parts.append(part)
            size += len(part)
            if size > max_chars:
                raise LocalMoEError(
                    f"the model's chat template renders more than {max_chars} characters; it is broken or hostile"
                )
    except _RenderTimeout:
        raise LocalMoEError(
            f"the model's chat template ran for more than {seconds:g} s and was stopped; it is broken or hostile"
        ) from None
    finally:
        sys.settrace(previous)
    return "".join(parts)


def _raise_template_error(message: str) -> None:
    raise LocalMoEError(f"chat template: {message}")


class IncrementalDecoder:
    """Turns a stream of token pieces into text without splitting a UTF-8 character."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, piece: bytes) -> str:
        data = self._pending + piece
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text
