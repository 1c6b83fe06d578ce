"""`localmoe chat` from the command line: build the app from parsed arguments and run it."""

from __future__ import annotations

import argparse
import sys

from localmoe.errors import LocalMoEError
from localmoe.options import LoadOptions

from .app import ChatApp, Sampling


def run_chat(args: argparse.Namespace, options: LoadOptions) -> int:
    """Run the app on the parsed `localmoe chat` arguments; `options`: the LoadOptions of the runtime
    flags, which the CLI owns (localmoe.cli.load_options). A model that fails to load
    raises LocalMoEError (the CLI prints `error: ...` and exits 2) after the app has shown the reason
    on screen."""
    from localmoe import load

    if args.max_tokens < 1:
        raise LocalMoEError("--max-tokens must be ≥ 1")
    sampling = Sampling(args.max_tokens, args.temp, args.top_p, args.top_k, args.seed)

    def loader(progress=None):  # the app passes its own progress (the CLI's bar would draw over the screen)
        return load(args.model, options.replace(progress=progress))

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        loader().close()  # a bad model is reported like every other command's
        raise LocalMoEError(
            "localmoe chat needs an interactive terminal; for scripts use `localmoe run --chat -p TEXT`"
        )
    app = ChatApp(
        loader=loader, model_label=args.model or "the bundled demo model", system=args.system, sampling=sampling
    )
    try:
        app.run()
    finally:
        app.close_runtime()
    if app.load_error is not None:
        raise LocalMoEError(app.load_error)
    return app.return_code or 0
