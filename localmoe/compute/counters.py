"""Host syncs and kernel launches: what per-layer overhead is made of on a GPU.

Every place in localmoe that reads device data back to the host goes through `readback`, which
counts it (on the CPU device too, where the count is what a GPU would pay). `per_token(step)`
measures one decode step: on CUDA from the device itself (torch's sync-debug warnings count every
synchronising call, the profiler counts kernels), elsewhere from our counters (readbacks, and the
Triton launches compute/triton_gguf.py makes).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

host_syncs = 0  # readbacks since import
launches = 0  # Triton kernel launches since import (compute/triton_gguf.py counts each)


def readback(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of `tensors` with one synchronisation: they are packed into one int32 buffer on
    the device (ids and float weights as bits), copied once, and unpacked on the host."""
    global host_syncs
    host_syncs += 1
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    flat = [t.reshape(-1) for t in tensors]
    packed = torch.cat(
        [f.to(torch.int32) if not f.is_floating_point() else f.float().view(torch.int32) for f in flat]
    ).cpu()
    out, at = [], 0
    for t, f in zip(tensors, flat):
        part = packed[at : at + f.numel()]
        at += f.numel()
        out.append((part.view(torch.float32) if t.is_floating_point() else part.to(t.dtype)).reshape(t.shape))
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: to CUDA through pinned memory, asynchronously
    (a pageable copy would wait for the stream)."""
    if device.type == "cuda":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def triton_launches() -> int:
    return launches


def per_token(step: Callable[[], None], device: torch.device) -> dict[str, object]:
    """Run `step` (one decode token) once and count its host syncs and kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize(device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return {
            "host_syncs": syncs,
            "launches": kernels,
            "launch_counter": (
                "CUDA profiler: kernels and copies; syncs: torch's sync-debug warnings, the token's logits "
                "readback included"
            ),
        }
    s0, l0 = host_syncs, triton_launches()
    step()
    return {
        "host_syncs": host_syncs - s0,
        "launches": triton_launches() - l0,
        "launch_counter": "Triton launches (CPU device: torch ops are not launches)",
    }
