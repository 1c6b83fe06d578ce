"""`localmoe chat` from the command line: build the app from parsed arguments and run it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from localmoe.errors import LocalMoEError

from .app import ChatApp, Sampling


def run_chat(args: argparse.Namespace, load_kwargs: dict[str, Any]) -> int:
    """Run the app on the parsed `localmoe chat` arguments; `load_kwargs`: the load() arguments of
    the runtime flags, which the CLI owns (localmoe.cli.runtime_kwargs). A model that fails to load
    raises LocalMoEError (the CLI prints `error: ...` and exits 2) after the app has shown the reason
    on screen."""
    from localmoe import load

    if args.max_tokens < 1:
        raise LocalMoEError("--max-tokens must be ≥ 1")
    sampling = Sampling(args.max_tokens, args.temp, args.top_p, args.top_k, args.seed)

    def loader(progress=None):  # the app passes its own progress (the CLI's bar would draw over the screen)
        return load(args.model, **(load_kwargs | {"progress": progress}))

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        loader().close()  # a bad model is reported like every other command's
        raise LocalMoEError("localmoe chat needs an interactive terminal; for scripts use `localmoe run --chat -p TEXT`")
    app = ChatApp(loader=loader, model_label=args.model or "the bundled demo model", system=args.system, sampling=sampling)
    try:
        app.run()
    finally:
        app.close_runtime()
    if app.load_error is not None:
        raise LocalMoEError(app.load_error)
    return app.return_code or 0
