"""Host memory for the repacked experts: big anonymous chunks, advised for transparent huge pages.

A full-depth model repacks ~16 GB of experts into RAM (a Qwen3-30B-A3B in Q4_0: 6,144 experts of
2.6 MB). Allocated one tensor at a time, each matrix lands on 4 KiB pages: 4 million page-table
entries (32 MB of page tables, as big as the L3 cache), so a decode step that streams 8 experts a
layer misses the TLB on every 4 KiB and walks page tables from DRAM. Carved from chunks whose
2 MiB-aligned interior is madvise(MADV_HUGEPAGE)d, the same bytes sit on 2 MiB pages where the
kernel allows it (`/sys/kernel/mm/transparent_hugepage/enabled` = always or madvise).

The arena never frees a piece on its own: a chunk is returned to the system when the arena and
every tensor carved from it are gone. Use it for memory kept for a model's lifetime (ExpertStore's
experts repacked within --host-mem, never evicted), not for churn.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
CHUNK_BYTES = 256 << 20  # one mapping per 256 MiB of experts (~100 Qwen3-30B-A3B experts)
ALIGN = 64  # bytes: a cache line, what the C kernels' loads want


class HostArena:
    """Bump allocator over huge-page-advised anonymous mappings (CPU tensors only)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, huge_pages: bool = True):
        self.chunk_bytes = chunk_bytes
        self.huge_pages = huge_pages and hasattr(mmap, "MADV_HUGEPAGE")
        self._chunk: torch.Tensor | None = None  # uint8 view of the current chunk's aligned part
        self._used = 0  # bytes of _chunk handed out
        self.mapped_bytes = 0  # bytes mapped in all (for tests and `info`)

    def empty(self, shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape` and `dtype`, 64-byte aligned."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        start = -(-self._used // ALIGN) * ALIGN
        if self._chunk is None or start + nbytes > self._chunk.numel():
            self._chunk = self._map(max(nbytes, self.chunk_bytes))
            start = 0
        self._used = start + nbytes
        return self._chunk[start : start + nbytes].view(dtype).view(shape)

    def _map(self, nbytes: int) -> torch.Tensor:
        """A new anonymous mapping with at least `nbytes` starting on a 2 MiB boundary."""
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive as long as any view lives
        skip = -base.data_ptr() % HUGE_PAGE  # a multiple of the 4 KiB page: the mapping is page-aligned
        if self.huge_pages:
            try:
                mm.madvise(mmap.MADV_HUGEPAGE, skip, size)
            except OSError:  # a kernel without THP: ordinary pages, same bytes
                self.huge_pages = False
        self.mapped_bytes += size + HUGE_PAGE
        return base[skip : skip + size]
