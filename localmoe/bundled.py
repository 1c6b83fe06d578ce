"""Where the bundled demo model lives."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LocalMoEError

DEMO_MODEL_FILE = "localmoe-demo-moe.gguf"
ENV_VAR = "LOCALMOE_DEMO_MODEL"


def demo_model_path() -> str:
    """The demo model: $LOCALMOE_DEMO_MODEL, else models/ of the source tree this package runs
    from (an editable install or a checkout), else a copy shipped inside the package."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "models" / DEMO_MODEL_FILE, here / "models" / DEMO_MODEL_FILE]
    for path in candidates:
        if path.is_file():
            return str(path)
    raise LocalMoEError(
        f"the bundled demo model ({DEMO_MODEL_FILE}) is not installed; pass a GGUF model path, or train it "
        "with `python models/train_demo_moe.py all` in a checkout of localmoe"
    )
