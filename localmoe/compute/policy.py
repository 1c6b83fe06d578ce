"""Which compute path runs: one frozen configuration that kernels.py, ggml_backend.py, the expert
store, the embedding and the GPU kernels all ask (`current()`).

It is read from the LOCALMOE_* environment variables once, on first use (never at import), or
given explicitly: `load(path, kernel="ggml")` gives a runtime its own (it is in effect during that
runtime's load and forward passes), and `override(...)` sets one for a block of code in this thread
(tests, the benchmarks). Nothing sets os.environ or a module global to select a path. docs/cli.md
lists the variables.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LocalMoEError

KERNEL_MODES = ("auto", "ggml", "vnni", "torch")
GPU_KERNELS = ("triton", "gguf")


@dataclass(frozen=True)
class ComputePolicy:
    """The compute path. `kernel` is the user's switch; the rest are research knobs, kept for the
    benchmarks that measured them (docs/speed.md)."""

    # CPU kernels: auto (per quant type, as `localmoe info` reports), ggml (ggml's kernels for every
    # quantized type: what a CPU without AVX-512 runs), vnni (no ggml where the VNNI kernel applies),
    # torch (neither C library: torch's int4 matmul and dequantized bf16)
    kernel: str = "auto"
    gpu_kernel: str = "triton"  # GPU matmuls: triton (where Triton has the type), gguf (dequantize per call)
    row_blocks: bool = True  # VNNI weights interleaved in blocks of 16 rows (2-3x faster than per row)
    gemm_rows: int = 1 << 30  # from this many tokens, a VNNI matmul dequantizes + SGEMM (never faster: off)
    ggml_graph_rows: int = 8  # from this many tokens, a ggml matmul goes through ggml's graph (tiled loops)

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_MODES:
            raise LocalMoEError(f"unknown kernel mode '{self.kernel}'; choose from {', '.join(KERNEL_MODES)}")
        if self.gpu_kernel not in GPU_KERNELS:
            raise LocalMoEError(f"unknown GPU kernel '{self.gpu_kernel}'; choose from {', '.join(GPU_KERNELS)}")
        if self.gemm_rows < 1 or self.ggml_graph_rows < 1:
            raise LocalMoEError("gemm_rows and ggml_graph_rows must be at least 1")

    @property
    def allows_vnni(self) -> bool:
        """Whether our VNNI C kernel (and its decode helpers) may run."""
        return self.kernel not in ("ggml", "torch")

    @property
    def allows_ggml(self) -> bool:
        """Whether ggml's kernels (and the portable helpers of the ggml driver) may run."""
        return self.kernel not in ("vnni", "torch")

    def replace(self, **changes: Any) -> "ComputePolicy":
        return dataclasses.replace(self, **changes)


# the environment variable of each field, and how its text becomes the field's value
ENV = {
    "kernel": ("LOCALMOE_KERNEL", lambda v: v.lower() or "auto"),
    "gpu_kernel": ("LOCALMOE_GPU_KERNEL", lambda v: v.lower() or "triton"),
    "row_blocks": ("LOCALMOE_ROW_BLOCKS", lambda v: v != "0"),
    "gemm_rows": ("LOCALMOE_GEMM_ROWS", int),
    "ggml_graph_rows": ("LOCALMOE_GGML_GRAPH_ROWS", int),
}


def from_env(environ: Mapping[str, str] | None = None) -> ComputePolicy:
    """The policy the LOCALMOE_* variables of `environ` (default: this process's) ask for; unset ones
    keep ComputePolicy's defaults. A value that cannot be read raises LocalMoEError."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, (var, parse) in ENV.items():
        if var in environ:
            try:
                values[name] = parse(environ[var])
            except ValueError:
                raise LocalMoEError(f"{var}={environ[var]!r} is not a valid value") from None
    try:
        return ComputePolicy(**values)
    except LocalMoEError as exc:
        raise LocalMoEError(f"{exc} (from the LOCALMOE_* environment variables)") from None


_env_lock = threading.Lock()
_from_env: ComputePolicy | None = None  # the environment's policy, read on the first current()
_active: contextvars.ContextVar[ComputePolicy | None] = contextvars.ContextVar("localmoe_compute_policy", default=None)


def current() -> ComputePolicy:
    """The policy in effect: the innermost `use`/`override` of this thread, else the environment's."""
    global _from_env
    policy = _active.get()
    if policy is not None:
        return policy
    if _from_env is None:
        with _env_lock:
            if _from_env is None:
                _from_env = from_env()
    return _from_env


@contextlib.contextmanager
def use(policy: ComputePolicy) -> Iterator[ComputePolicy]:
    """`policy` in effect for the block (in this thread)."""
    token = _active.set(policy)
    try:
        yield policy
    finally:
        _active.reset(token)


def override(**changes: Any) -> contextlib.AbstractContextManager[ComputePolicy]:
    """The current policy with `changes` in effect for the block, e.g. `with override(kernel="ggml"):`."""
    return use(current().replace(**changes))
