"""`localmoe chat` from the command line: build the app from parsed arguments and run it."""

from __future__ import annotations

import argparse
import sys

from localmoe.errors import LocalMoEError

from .app import ChatApp, Sampling

# Runtime flags that `localmoe` may grow for every command (DESIGN.md's common flags); chat passes
# on whichever the parser has, so they work here as soon as they exist.
_OPTIONAL_RUNTIME_FLAGS = ("gpu_mem", "policy", "on_miss", "profile")


def load_kwargs(args: argparse.Namespace) -> dict:
    try:  # the CLI's own mapping of its runtime flags, where it has one
        from localmoe.cli import runtime_kwargs
    except ImportError:
        runtime_kwargs = None
    if runtime_kwargs is not None:
        return runtime_kwargs(args) | {"seed": args.seed}
    kwargs = dict(device=args.device, n_ctx=args.ctx_size, seed=args.seed, threads=args.threads)
    for name in _OPTIONAL_RUNTIME_FLAGS:
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "no_prefetch", False):
        kwargs["prefetch"] = False
    return kwargs


def run_chat(args: argparse.Namespace) -> int:
    """Run the app; a model that fails to load raises LocalMoEError (the CLI prints `error: ...`
    and exits 2) after the app has shown the reason on screen."""
    from localmoe import load

    if args.max_tokens < 1:
        raise LocalMoEError("--max-tokens must be ≥ 1")
    sampling = Sampling(args.max_tokens, args.temp, args.top_p, args.top_k, args.seed)
    kwargs = load_kwargs(args)

    def loader():
        return load(args.model, **kwargs)

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
