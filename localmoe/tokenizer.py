"""Tokenizer and chat template, both taken from the GGUF file.

Tokenization is llama.cpp's own (llama-cpp-python with a vocab-only load, so no weights are read
twice). The chat template is Jinja from `tokenizer.chat_template`, which a hostile file could use
to run code: it is rendered only in an ImmutableSandboxedEnvironment.
"""

from __future__ import annotations

import ctypes
import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LocalMoEError

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
            raise LocalMoEError(f"{path}: llama.cpp could not read the tokenizer ({exc}); the file's vocabulary is damaged or unsupported") from None
        self._model = self._llama._model
        self.n_vocab = self._llama.n_vocab()
        self.bos_id = self._model.token_bos()
        self.eos_id = self._model.token_eos()
        self.add_bos = bool(self._model.add_bos_token())
        self._eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._model.vocab, t)}
        self.chat_template_source = chat_template or CHATML_TEMPLATE
        self.has_own_template = chat_template is not None
        self._pieces: dict[int, bytes] = {}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.chat_template_source)
        except TemplateError as exc:
            raise LocalMoEError(f"{path}: the chat template does not parse ({exc}); use plain prompts (`localmoe run -p`) instead") from None

    def token_text(self, token: int) -> str:
        return self._model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens llama.cpp marks as such."""
        return token in self._eog

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text → ids. Special-token text such as <|im_start|> is parsed as the special token."""
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=self.add_bos if add_bos is None else add_bos, special=True))

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
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LocalMoEError("each chat message must be a dict with 'role' and 'content'")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_id) if self.bos_id >= 0 else "",
                eos_token=self.token_text(self.eos_id) if self.eos_id >= 0 else "",
            )
        except LocalMoEError:
            raise
        except Exception as exc:  # SecurityError, UndefinedError, …
            raise LocalMoEError(f"the model's chat template failed to render ({type(exc).__name__}: {exc})") from None

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
