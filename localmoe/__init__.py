"""localmoe: run Mixture-of-Experts GGUF models with more experts than fit on the GPU.

In short (docs/api.md has the rest):

    import localmoe
    with localmoe.load("model.gguf") as rt:
        print(rt.generate("Once upon a time", max_tokens=40))
"""

from . import openmp  # noqa: F401  first: it sets libgomp's spin count, which counts only before torch loads libgomp
from .errors import LocalMoEError
from .options import LoadOptions
from .runtime import Chunk, Runtime, load
from .stats import LayerStats, Stats

__all__ = ["load", "LoadOptions", "Runtime", "Chunk", "Stats", "LayerStats", "LocalMoEError"]
__version__ = "0.1.0"
