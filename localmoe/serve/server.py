"""`localmoe serve`: bind, start uvicorn, load the model in the background, serve until stopped."""

from __future__ import annotations

import socket
import sys
import threading

import uvicorn

from ..bundled import demo_model_path
from ..errors import LocalMoEError
from ..options import LoadOptions
from ..runtime import load
from .app import ServeConfig, create_app, model_id_for


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; a port in use or a bad host is a LocalMoEError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LocalMoEError(f"cannot resolve --host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)  # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on each connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise LocalMoEError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | None,
    options: LoadOptions | None = None,
    config: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    verbose: bool = False,
) -> int:
    """Run the server in this thread until SIGINT/SIGTERM; returns the exit code (2 when the
    model failed to load). `options`: how to load the model (None → LoadOptions' defaults)."""
    options = options or LoadOptions()
    path = model or demo_model_path()
    config = config or ServeConfig(model_id_for(path))
    sock = bind(host, port)
    bound = sock.getsockname()
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    def loader(progress=None):  # progress: /health's; the CLI's stderr bar (options.progress) keeps running
        bar = options.progress

        def both(what: str, done: int, total: int) -> None:
            for report in (bar, progress):
                if report is not None:
                    report(what, done, total)

        rt = load(path, options.replace(progress=both))
        print(f"localmoe serve: {config.model_id} loaded; ready", file=sys.stderr, flush=True)
        return rt

    app = create_app(loader, config, on_load_error)
    ucfg = uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=verbose, timeout_graceful_shutdown=5, lifespan="on"
    )
    server = uvicorn.Server(ucfg)
    url = f"http://{bound[0] if ':' not in bound[0] else '[' + bound[0] + ']'}:{bound[1]}"
    print(f"localmoe serve: listening on {url} (model {config.model_id}, loading)", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print("localmoe serve: warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise LocalMoEError(failure[0])
    return 0


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Start `app` on a background thread (tests, notebooks); returns the server, thread and port.
    Stop it with `server.should_exit = True; thread.join()`."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, sock.getsockname()[1]
