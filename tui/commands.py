"""Slash commands typed into the chat box (`/policy lfu`, `/on-miss buddy`, ...), parsed without
any UI so that they are easy to test. The app turns a parsed `Command` into an action."""

from __future__ import annotations

from dataclasses import dataclass

from localmoe.errors import LocalMoEError


@dataclass(frozen=True)
class Command:
    name: str  # canonical name, e.g. "on-miss"
    arg: str  # the rest of the line, stripped ("" when absent)


# name: (argument, what it does); the order is the order /help lists them in.
COMMANDS: dict[str, tuple[str, str]] = {
    "policy": ("NAME", "cache policy for the GPU tier (e.g. lru, lfu), applied between replies"),
    "on-miss": ("NAME", "what a miss does: fetch, cpu, buddy, little or drop"),
    "gpu-mem": ("SIZE", "GPU-tier budget for experts, e.g. 2GB or 512MB"),
    "prefetch": ("on|off", "prefetch the next layer's experts"),
    "system": ("[TEXT]", "set the system prompt (no text: remove it); applies from the next reply"),
    "temp": ("T", "sampling temperature (0 = greedy)"),
    "max-tokens": ("N", "longest reply in tokens"),
    "new": ("", "start a new conversation (keeps the system prompt)"),
    "help": ("", "keys and commands"),
    "quit": ("", "leave the app"),
}
ALIASES = {
    "onmiss": "on-miss",
    "on_miss": "on-miss",
    "gpumem": "gpu-mem",
    "gpu_mem": "gpu-mem",
    "clear": "new",
    "reset": "new",
    "exit": "quit",
    "?": "help",
    "max_tokens": "max-tokens",
    "n": "max-tokens",
    "temperature": "temp",
}
NEEDS_ARG = {"policy", "on-miss", "gpu-mem", "prefetch", "temp", "max-tokens"}


def parse(line: str) -> Command | None:
    """A Command for a line starting with one "/", None for a chat message. "//text" sends "/text".
    Raises LocalMoEError (one line, for a notification) for an unknown command or a missing argument."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    head, _, arg = text[1:].partition(" ")
    name = head.lower()
    name = ALIASES.get(name, name)
    if name not in COMMANDS:
        raise LocalMoEError(f"unknown command /{head}; /help lists the commands")
    arg = arg.strip()
    if name in NEEDS_ARG and not arg:
        usage = COMMANDS[name][0]
        raise LocalMoEError(f"/{name} needs a value: /{name} {usage}")
    return Command(name, arg)


def unescape(line: str) -> str:
    """The chat text of a line that is not a command ("//x" → "/x")."""
    text = line.strip()
    return text[1:] if text.startswith("//") else text


def parse_switch(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise LocalMoEError(f"'{value}' is not on or off")


def parse_temperature(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise LocalMoEError(f"temperature '{value}' is not a number") from None
    if not t >= 0:
        raise LocalMoEError(f"temperature must be ≥ 0, got {value}")
    return t


def parse_max_tokens(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise LocalMoEError(f"max tokens '{value}' is not a whole number") from None
    if n < 1:
        raise LocalMoEError(f"max tokens must be ≥ 1, got {value}")
    return n
