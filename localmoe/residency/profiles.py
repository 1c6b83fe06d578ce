"""Hardware profiles and the modelled clock.

Without CUDA the GPU tier lives on the CPU device and time is *modelled*: each transfer and each
computation is charged to a timeline of the profile's hardware. Numerics are always real; only
time is modelled. Every figure below is sourced in docs/residency.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LocalMoEError

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    vram_bytes: int  # GPU memory
    pcie_bytes_per_s: float  # host→device copy bandwidth from pinned memory
    pcie_latency_s: float  # fixed cost of one copy (launch + DMA setup)
    gpu_mem_bytes_per_s: float  # GPU memory bandwidth (weight reads during compute)
    gpu_flops: float  # sustained FLOP/s of quantized matmuls on the GPU
    cpu_mem_bytes_per_s: float  # usable host RAM bandwidth for CPU expert compute
    cpu_flops: float  # sustained FLOP/s of the CPU expert kernels
    sync_latency_s: float  # per-layer router readback / synchronisation (GPU → host)

    def gpu_seconds(self, nbytes: float, flops: float) -> float:
        """Weight-read or compute bound, whichever is slower (roofline)."""
        return max(nbytes / self.gpu_mem_bytes_per_s, flops / self.gpu_flops)

    def cpu_seconds(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.cpu_mem_bytes_per_s, flops / self.cpu_flops)

    def copy_seconds(self, nbytes: float) -> float:
        return self.pcie_latency_s + nbytes / self.pcie_bytes_per_s


PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            name="laptop-8gb",
            description="8 GB laptop GPU (RTX 4060 Laptop class) on PCIe 4.0 x8, dual-channel DDR5 laptop",
            vram_bytes=8 * (1 << 30),
            pcie_bytes_per_s=12 * GB,
            pcie_latency_s=10e-6,
            gpu_mem_bytes_per_s=256 * GB,
            gpu_flops=15e12,
            cpu_mem_bytes_per_s=35 * GB,
            cpu_flops=0.5e12,
            sync_latency_s=20e-6,
        ),
        HardwareProfile(
            name="desktop-24gb",
            description="24 GB desktop GPU (RTX 4090 class) on PCIe 4.0 x16, dual-channel DDR5 desktop",
            vram_bytes=24 * (1 << 30),
            pcie_bytes_per_s=25 * GB,
            pcie_latency_s=10e-6,
            gpu_mem_bytes_per_s=1008 * GB,
            gpu_flops=80e12,
            cpu_mem_bytes_per_s=50 * GB,
            cpu_flops=1.0e12,
            sync_latency_s=15e-6,
        ),
    )
}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise LocalMoEError(f"unknown hardware profile '{name}'; choose one of {', '.join(PROFILES)}") from None


class Timeline:
    """Three resources that work in parallel — the GPU, the CPU and the PCIe link — each with the
    time it is next free (seconds). A step starts when its resource is free and its inputs are
    ready, and returns when it ends."""

    def __init__(self) -> None:
        self.gpu = self.cpu = self.link = 0.0
        self.now = 0.0  # the time the token's critical path has reached

    def run_gpu(self, seconds: float, ready: float) -> float:
        self.gpu = max(self.gpu, ready) + seconds
        return self.gpu

    def run_cpu(self, seconds: float, ready: float) -> float:
        self.cpu = max(self.cpu, ready) + seconds
        return self.cpu

    def copy(self, seconds: float, ready: float) -> float:
        self.link = max(self.link, ready) + seconds
        return self.link
