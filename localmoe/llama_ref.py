"""llama.cpp (through llama-cpp-python), the reference engine: loading options shared by the
oracle tests and `bench --vs llama.cpp`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def plain_cpu_buffers() -> Iterator[None]:
    """Load llama.cpp models into its plain CPU buffers (`use_extra_bufts = False`) while active.

    llama.cpp's extra buffer types (AMX, runtime-repacked weights) are a speed feature; on some CPUs
    (seen on an AMX-capable Xeon) the AMX one crashes the process on quantized matmuls, and the plain
    path is the reference numerics anyway. llama-cpp-python has no keyword for this model parameter,
    so its default-parameters factory is wrapped for the duration."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original
