"""The GPU tier in real device memory (CUDA): where resident experts physically live.

The scheduler decides what is resident (ExpertCache does the accounting); this class does the
moving. Each resident expert is one device buffer holding its GGUF bytes exactly as in the file —
gate rows, up rows, down rows, back to back — so the tier's memory is the accounting's bytes, and
the Triton kernels read those blocks in place (kernels.QLinear, backend "triton"; "gguf", which
dequantizes with torch ops per call, where Triton has no kernel for the type). `addresses` holds
every resident expert's gate_up and down addresses on the device, so a layer whose experts are all
resident can run from device-side routing ids without a host sync. An upload copies the three
row ranges out of the memory-mapped file into a pinned staging buffer, then one host-to-device
copy on a side stream moves the whole expert; an event marks its arrival, and compute that needs
the expert waits on that event on the GPU (the host never blocks on a copy it does not need).

On a CPU device (tests, and the modelled tier's numerics) the same code runs with plain tensors,
no streams and no events, so its bookkeeping is tested everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..gguf import names
from ..errors import LocalMoEError
from ..compute.experts import ExpertEpilogue, ExpertWeights
from ..gguf.file import GGUFModel
from ..compute.kernels import QLinear, gpu_kernel

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate, up and down sit in an expert's buffer (bytes), and their types and shapes."""

    parts: tuple[tuple[int, int, object, tuple[int, int]], ...]  # (start, end, qtype, [rows, cols]) per part
    nbytes: int


class DeviceTier:
    def __init__(self, model: GGUFModel, device: torch.device, n_staging: int | None = None, kernel: str | None = None):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.layouts = [
            self._layout(layer) if model.spec.is_moe(layer) else None for layer in range(model.spec.n_layer)
        ]  # None: a layer without experts
        # "triton" or "gguf" (kernels.py): the GPU kernels when every expert type has one; on the
        # CPU device "gguf" unless asked (the Triton kernels then run under the interpreter)
        types = {part[2] for layout in self.layouts if layout is not None for part in layout.parts}
        self.kernel = kernel or ("triton" if self.cuda and all(gpu_kernel(t) == "triton" for t in types) else "gguf")
        # [2, layer, expert] int64: the gate_up and down addresses of each resident expert (0: not resident)
        self.addresses = torch.zeros(
            (2, model.spec.n_layer, model.spec.n_expert), dtype=torch.int64, device=self.device
        )
        self.buffers: dict[Key, torch.Tensor] = {}  # resident experts: uint8 [nbytes] on the device
        self.ready: dict[Key, torch.cuda.Event] = {}  # CUDA: the copy that filled the buffer
        self.bytes_in_use = 0
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        # a ring of pinned staging buffers, each with the event of the last copy that read it; room for
        # two layers' worth of routed experts in flight before the host waits for a copy to finish
        n_staging = n_staging or max(4, 2 * model.spec.n_expert_used)
        size = max(layout.nbytes for layout in self.layouts if layout is not None)
        self._staging = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(n_staging)]
        self._staging_done: list[torch.cuda.Event | None] = [None] * n_staging
        self._next = 0
        self.copies = 0
        self.copied_bytes = 0
        self.epilogue = ExpertEpilogue(model)  # biases and activation beside the experts' bytes (dense weights)

    def _layout(self, layer: int) -> ExpertLayout:
        parts, at = [], 0
        for part in names.EXPERT_PARTS:
            raw, qtype, shape = self.model.expert_raw(layer, 0, part)
            n = raw.nbytes
            parts.append((at, at + n, qtype, tuple(shape)))
            at += n
        if parts[0][2] != parts[1][2]:
            raise LocalMoEError(
                f"layer {layer}: gate and up experts have different quant types ({parts[0][2].name}, "
                f"{parts[1][2].name}); the GPU tier needs them alike"
            )
        return ExpertLayout(tuple(parts), at)

    # -- moving ---------------------------------------------------------------------------------------
    def upload(self, key: Key) -> None:
        """Start copying expert `key` into a new device buffer (asynchronous on CUDA)."""
        if key in self.buffers:
            return
        buf, event = self._copy_in(key)
        self.buffers[key] = buf
        self.bytes_in_use += buf.numel()
        if event is not None:
            self.ready[key] = event
        (g0, _, _, _), _, (d0, _, _, _) = self.layouts[key[0]].parts
        self.addresses[0, key[0], key[1]] = buf.data_ptr() + g0  # a fill kernel: no host sync
        self.addresses[1, key[0], key[1]] = buf.data_ptr() + d0

    def evict(self, key: Key) -> None:
        buf = self.buffers.pop(key, None)
        if buf is not None:
            self.bytes_in_use -= buf.numel()
            self.addresses[:, key[0], key[1]] = 0
        self.ready.pop(key, None)

    def wait_all(self) -> None:
        """Make the current stream wait for every copy in flight (before device-side routing
        reads experts the host never waits for one by one)."""
        for key in list(self.ready):
            self._wait(self.ready.pop(key), self.buffers[key])

    def clear(self) -> None:
        for key in list(self.buffers):
            self.evict(key)

    def weights(self, key: Key) -> ExpertWeights:
        """A resident expert's matrices as views of its buffer; compute issued after this call waits
        (on the GPU) for the expert's copy."""
        buf = self.buffers[key]
        self._wait(self.ready.pop(key, None), buf)
        return self._views(key, buf)

    def streamed(self, key: Key) -> ExpertWeights:
        """An expert that is not admitted (a fetch beyond the budget, or llama.cpp's batch copy of a
        CPU-layer expert): copied into a scratch buffer that lives only as long as its use."""
        buf, event = self._copy_in(key)
        self._wait(event, buf)
        return self._views(key, buf)

    def _wait(self, event: "torch.cuda.Event | None", buf: torch.Tensor) -> None:
        """Make the current stream wait for the copy into `buf`, and tell the allocator that stream
        reads `buf` (so an evicted buffer's memory is not reused before those reads are done)."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            if event is not None:
                stream.wait_event(event)
            buf.record_stream(stream)

    def _copy_in(self, key: Key) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Gate, up and down rows of `key` from the mapped file → staging → a new device buffer."""
        layer, expert = key
        layout = self.layouts[layer]
        slot = self._next
        self._next = (slot + 1) % len(self._staging)
        if self._staging_done[slot] is not None:
            self._staging_done[slot].synchronize()  # the last copy out of this staging buffer is over
        staging = self._staging[slot][: layout.nbytes]
        host = staging.numpy()
        for (start, end, _, _), part in zip(layout.parts, names.EXPERT_PARTS):
            raw, _, _ = self.model.expert_raw(layer, expert, part)
            host[start:end] = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        self.copies += 1
        self.copied_bytes += layout.nbytes
        if not self.cuda:
            return staging.to(self.device, copy=True), None
        with torch.cuda.stream(self.copy_stream):
            try:
                buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
            except torch.cuda.OutOfMemoryError:
                raise LocalMoEError(
                    f"the GPU ran out of memory loading expert {expert} of layer {layer}; give a smaller "
                    "--gpu-mem (other programs may be using the GPU)"
                ) from None
            buf.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._staging_done[slot] = event
        return buf, event

    def _views(self, key: Key, buf: torch.Tensor) -> ExpertWeights:
        layer = key[0]
        (g0, _, qtype, (n_ff, d)), (_, u1, _, _), (d0, d1, dq, (dn, dk)) = self.layouts[layer].parts
        gate_up = QLinear(self.kernel, 2 * n_ff, d, {"raw": buf[g0:u1].view(2 * n_ff, -1)}, qtype=qtype)
        down = QLinear(self.kernel, dn, dk, {"raw": buf[d0:d1].view(dn, -1)}, qtype=dq)
        return self.epilogue.attach(ExpertWeights(gate_up, down), layer, key[1], self.device)

    def check(self, resident: set[Key]) -> None:
        """The buffers are exactly the accounting's resident set, and their bytes its bytes (tests)."""
        assert set(self.buffers) == resident, sorted(set(self.buffers) ^ resident)
        assert self.bytes_in_use == sum(b.numel() for b in self.buffers.values())
