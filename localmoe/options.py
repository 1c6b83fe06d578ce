"""The load options: one dataclass holds them with their defaults, and `load()`, the CLI's flags and
their --help, the chat app and the server all read them from here (docs/api.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadOptions:
    """How `localmoe.load` opens a model. Frozen: derive a changed copy with `.replace(**changes)`."""

    device: str = "auto"  # "auto" (cuda when PyTorch sees a GPU) | "cpu" | "cuda"
    gpu_mem: int | str | None = None  # GPU-tier budget for dense weights + cached experts: bytes or "6GB"; None → all
    policy: str = "lfu"  # cache eviction policy (residency/cache_policies.py ONLINE_POLICIES)
    on_miss: str = "cpu"  # what a missing expert does: fetch, cpu, drop, buddy, little, cost (fallback/)
    prefetch: bool = True  # prefetch the next layer's predicted experts
    n_ctx: int = 4096  # context size in tokens, capped at the model's training context
    kv_type: str = "f16"  # element type of the attention layers' KV cache (compute/kernels.KV_TYPES): f16 | f32
    seed: int | None = None  # default sampling seed of the runtime; None → a fresh one per request
    profile: str | None = None  # hardware profile of the modelled clock (residency/profiles.py); None → measured
    threads: int | None = None  # CPU threads; None → the physical cores less those busy at load, at least 1
    n_cpu_moe: int | None = None  # llama.cpp's static placement: experts of the first N layers stay on the CPU
    cpu_moe: bool = False  # llama.cpp's static placement: every expert stays on the CPU
    trace: str | None = None  # file to record the routing of every token in (JSON lines); None → no trace
    miss_options: Mapping[str, Any] | None = None  # parameters of the miss policy, e.g. {"share": 0.5} for little
    host_mem: int | str | None = None  # host RAM for repacked experts: bytes or "8GB"; None → available less dense
    kernel: str | None = None  # CPU kernels: auto, ggml, vnni, torch; None → LOCALMOE_KERNEL's (compute/policy.py)
    # progress(what, done, total) during long steps of the load (the repacking, in experts); not a setting
    progress: Callable[[str, int, int], None] | None = field(default=None, compare=False, repr=False)

    def replace(self, **changes: Any) -> "LoadOptions":
        """A copy with `changes`; an unknown name raises TypeError, as a bad keyword to load() does."""
        unknown = sorted(set(changes) - NAMES)
        if unknown:
            raise TypeError(f"load() got an unexpected keyword argument '{unknown[0]}'")
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as load()'s keyword arguments (for a process that rebuilds them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


NAMES = frozenset(f.name for f in dataclasses.fields(LoadOptions))
DEFAULTS = LoadOptions()  # the defaults, for the CLI's flags and their --help


def resolve(options: LoadOptions | None, kwargs: Mapping[str, Any]) -> LoadOptions:
    """`options` (None → the defaults) with the loose keyword arguments of load() applied on top."""
    if options is not None and not isinstance(options, LoadOptions):
        raise TypeError(f"options must be a LoadOptions, got {type(options).__name__}")
    return (options or DEFAULTS).replace(**kwargs) if kwargs else (options or DEFAULTS)
