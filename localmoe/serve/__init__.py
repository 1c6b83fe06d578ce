"""An OpenAI-compatible HTTP server for one model, with the expert cache's live figures.

    localmoe serve [MODEL] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--queue 16]

See docs/serve.md. `create_app` builds the ASGI app; `serve` runs it with uvicorn.
"""

from .app import ServeConfig, create_app, model_id_for
from .generation import Defaults
from .server import serve, start_in_thread

__all__ = ["ServeConfig", "Defaults", "create_app", "model_id_for", "serve", "start_in_thread"]
