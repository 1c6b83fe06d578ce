"""The `localmoe chat` terminal app (Textual), shipped as `localmoe.tui`. See docs/chat.md."""

from .app import ChatApp, Sampling, fit_messages
from .launch import run_chat

__all__ = ["ChatApp", "Sampling", "fit_messages", "run_chat"]
