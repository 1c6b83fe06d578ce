"""The sampling defaults have one home (localmoe/sampling.py): the Python API, the CLI's flags and
their --help, the server's and the TUI's settings all read them from there."""

from __future__ import annotations

import inspect

from localmoe.cli import build_parser
from localmoe.runtime import Runtime
from localmoe.sampling import DEFAULT, MAX_TOKENS, SamplingParams
from localmoe.serve.generation import Defaults
from tui.app import Sampling


def test_the_defaults():
    assert (DEFAULT.temperature, DEFAULT.top_k, DEFAULT.top_p, MAX_TOKENS) == (0.8, 40, 0.95, 128)  # llama.cpp's
    assert DEFAULT == SamplingParams()


def test_every_entry_point_reads_them():
    want = {
        "max_tokens": MAX_TOKENS,
        "temperature": DEFAULT.temperature,
        "top_p": DEFAULT.top_p,
        "top_k": DEFAULT.top_k,
        "seed": None,
    }
    for method in (Runtime.stream, Runtime.generate, Runtime.chat):
        params = inspect.signature(method).parameters
        assert {k: params[k].default for k in want} == want, method.__name__
    for settings in (Defaults(), Sampling()):
        assert {k: getattr(settings, k) for k in want} == want, type(settings).__name__
    for command in ("run", "chat", "serve"):
        args = build_parser().parse_args([command, "x.gguf"])
        assert (args.max_tokens, args.temp, args.top_p, args.top_k, args.seed) == (
            MAX_TOKENS,
            DEFAULT.temperature,
            DEFAULT.top_p,
            DEFAULT.top_k,
            None,
        )


def test_help_shows_them():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["run"]
    text = " ".join(sub.format_help().split())
    for value in (MAX_TOKENS, DEFAULT.temperature, DEFAULT.top_k, DEFAULT.top_p):
        assert f"(default {value})" in text


def test_the_load_options_have_one_home():
    """The runtime flags of run, chat and serve build LoadOptions' defaults, and --help shows them."""
    from localmoe.cli import load_options
    from localmoe.options import DEFAULTS, LoadOptions

    assert DEFAULTS == LoadOptions()
    assert inspect.signature(Runtime.__init__).parameters.keys() == {"self", "path", "options", "kwargs"}
    for command in ("run", "chat", "serve"):
        assert load_options(build_parser().parse_args([command, "x.gguf"])) == DEFAULTS, command
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    text = " ".join(sub.format_help().split())
    for value in (DEFAULTS.n_ctx, DEFAULTS.device, DEFAULTS.policy, DEFAULTS.on_miss):
        assert f"(default {value}" in text
