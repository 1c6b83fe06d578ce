"""Routed experts: where their weights come from (ExpertStore) and the kernels that run them.

Which experts of a layer run where is residency's plan; compute/plan.py executes it with the
functions here. The forward pass knows nothing about either.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..gguf import names
from ..gguf.blocks import raw_bytes
from .counters import to_device
from .kernels import (
    QLinear,
    RawMatrix,
    choose_backend,
    fuse_rows,
    ggml_weight,
    ggml_experts_decode,
    matvec_many,
    repack,
    swiglu_decode,
    swiglu_prefill,
)

ExpertId = tuple[int, int]  # (layer, expert)


class ExpertFile(Protocol):
    """The GGUF file as the experts read it (gguf.file.GGUFModel; named by its methods here so that
    compute imports no reader, which imports the architectures and their layers)."""

    spec: Any  # gguf.file.ModelSpec

    def view(self, name: str) -> Any: ...  # a TensorView: .qtype, .shape, .data

    def expert_raw(self, layer: int, expert: int, part: str) -> tuple: ...  # (raw data, quant type, [rows, cols])

    def expert_bytes(self, layer: int) -> int: ...

    def expert_biases(self, layer: int) -> tuple: ...  # float32 [E, 2·n_ff] gate|up and [E, D] down, or None

    def release(self, arrays: list) -> None: ...


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU FFN (a routed expert, or a shared one) in a layout with a fast kernel, with what
    its architecture adds around the two matmuls (ExpertEpilogue.attach)."""

    gate_up: QLinear  # [2·n_ff, n_embd]: the gate rows, then the up rows (one matmul for both)
    down: QLinear  # [n_embd, n_ff]
    act: str = "swiglu"  # archs.common.ExpertAct: silu(g)·u, or gpt-oss's clamped "swiglu_oai" (swiglu_act)
    gate_up_bias: torch.Tensor | None = None  # [2·n_ff] float32, added to gate_up's output
    down_bias: torch.Tensor | None = None  # [n_embd] float32, added to down's output
    fused_ok: bool = True  # the architecture declares "fused_experts" (archs.common.fast_paths)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    @property
    def plain(self) -> bool:
        """Exactly what the fused kernels compute (swiglu_decode, the GPU's grouped and
        device-routed decode): silu(g)·u, no biases, and declared so."""
        return self.fused_ok and self.act == "swiglu" and self.gate_up_bias is None and self.down_bias is None


# gpt-oss's clamped SwiGLU (llama.cpp's ggml_swiglu_oai with the model's constants)
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def gelu_ggml(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) as ggml's CPU kernels compute it (GGML_GELU_FP16): x rounded to float16
    indexes a table of float16 results; x ≤ −10 gives 0 and x ≥ 10 gives x. The rounding is
    ~5e-4 relative, far above float32's, so matching llama.cpp takes the same table."""
    y = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def swiglu_act(act: str, gu: torch.Tensor) -> torch.Tensor:
    """gu [n, 2·n_ff] (gate | up) → [n, n_ff]. swiglu: silu(g)·u. swiglu_oai: g' = min(g, 7),
    u' = clamp(u, −7, 7), g'·sigmoid(1.702·g')·(u' + 1). geglu: gelu(g)·u (gelu_ggml)."""
    gate, up = gu.chunk(2, dim=-1)
    if act == "swiglu":
        return F.silu(gate).mul_(up)
    if act == "geglu":
        return gelu_ggml(gate).mul_(up)
    g = gate.clamp(max=OAI_LIMIT)
    return (g * torch.sigmoid(OAI_ALPHA * g)).mul_(up.clamp(-OAI_LIMIT, OAI_LIMIT).add_(1.0))


class ExpertEpilogue:
    """What a layer's routed experts carry beyond their matrices — biases (gate|up [E, 2·n_ff],
    down [E, D], float32, read from the file once per layer and device) and the activation — and
    the fast-path declaration that decides whether the fused kernels may run them."""

    def __init__(self, model: ExpertFile):
        from ..archs.common import fast_paths

        self.model = model
        arch = model.spec.arch
        self.act = arch.expert_act
        self.with_biases = arch.expert_bias
        self.fused_ok = "fused_experts" in fast_paths(model.spec)
        self._biases: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def attach(self, w: ExpertWeights, layer: int, expert: int, device: torch.device) -> ExpertWeights:
        if self.fused_ok:  # fast_paths declares fused_experts exactly for plain SwiGLU without biases
            return w
        gu_b = d_b = None
        if self.with_biases:
            key = (layer, str(device))
            if key not in self._biases:
                self._biases[key] = tuple(
                    None if b is None else torch.from_numpy(b).to(device) for b in self.model.expert_biases(layer)
                )
            gu_all, d_all = self._biases[key]
            gu_b = None if gu_all is None else gu_all[expert]
            d_b = None if d_all is None else d_all[expert]
        return dataclasses.replace(w, act=self.act, gate_up_bias=gu_b, down_bias=d_b, fused_ok=self.fused_ok)


def pack_ffn(
    gate: RawMatrix, up: RawMatrix, down: RawMatrix, device: torch.device, threads: int | None = None
) -> ExpertWeights:
    """Repack one FFN's three GGUF matrices (raw data, quant type, [rows, cols]) once (threads: for
    the C repack; None → torch's thread count)."""
    return ExpertWeights(fuse_rows([gate, up], device, threads), repack(*down, device=device, threads=threads))


def swiglu_expert(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """One expert on the rows routed to it: x [n, n_embd] → [n, n_embd]."""
    gu = w.gate_up(x)  # [n, 2·n_ff]
    if w.gate_up_bias is not None:
        gu = gu + w.gate_up_bias
    y = w.down(swiglu_act(w.act, gu))
    return y if w.down_bias is None else y + w.down_bias


def _plus_biases(y: torch.Tensor, biases: list[torch.Tensor | None]) -> torch.Tensor:
    """y [k, n] + each row's bias (rows without one: + 0)."""
    if all(b is None for b in biases):
        return y
    return y + torch.stack(
        [torch.zeros(y.shape[1], dtype=y.dtype, device=y.device) if b is None else b.to(y.dtype) for b in biases]
    )


def swiglu_experts(ws: list[ExpertWeights], x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_e weights[e] · expert_e(x) for one row x [1, n_embd] → [1, n_embd] (decode). Plain
    C-kernel experts of one shape run in one call (every gate+up, the SwiGLU, every down, the
    weighted sum); otherwise two calls — every gate+up, then every down — instead of 2·k, with the
    biases and the activation in torch between them."""
    if all(w.plain for w in ws):
        y = swiglu_decode([w.gate_up for w in ws], [w.down for w in ws], x, weights)
        if y is not None:
            return y
    elif all(w.act == ws[0].act for w in ws):  # biases or another activation: ggml's own call takes them
        y = ggml_experts_decode(
            [w.gate_up for w in ws],
            [w.down for w in ws],
            x,
            weights,
            ws[0].act,
            [w.gate_up_bias for w in ws],
            [w.down_bias for w in ws],
        )
        if y is not None:
            return y
    kinds = {w.gate_up.backend for w in ws}
    if (
        len(kinds) > 1 and len(ws) > 1
    ):  # e.g. repacked (vnni) experts beside ones computed in place (ggml): one call per kind
        out = None
        for kind in kinds:
            sel = [i for i, w in enumerate(ws) if w.gate_up.backend == kind]
            part = swiglu_experts([ws[i] for i in sel], x, [weights[i] for i in sel])
            out = part if out is None else out.add_(part)
        return out
    gu = matvec_many([w.gate_up for w in ws], x)  # [k, 2·n_ff]
    if gu is None:
        out = swiglu_expert(ws[0], x).mul_(weights[0])
        for w, c in zip(ws[1:], weights[1:]):
            out.add_(swiglu_expert(w, x).mul_(c))
        return out
    h = swiglu_act(ws[0].act, _plus_biases(gu, [w.gate_up_bias for w in ws]))  # one layer's experts: one activation
    y = matvec_many([w.down for w in ws], h)  # [k, n_embd]
    if y is None:
        y = torch.cat([w.down(r[None]) for w, r in zip(ws, h)])
    y = _plus_biases(y, [w.down_bias for w in ws])
    return torch.tensor(weights, dtype=y.dtype)[None] @ y


def swiglu_prompt(
    ws: list[ExpertWeights], x: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor | None:
    """Σ_s weight · expert_s(x[tokens_s]) → [T, D] for a prompt's routed experts `ws` (rows[s] =
    (token indices, router weights), summed in the order given) in one C call
    (kernels.swiglu_prefill), or None where that call does not compute exactly these experts: not
    all plain (silu(g)·u, no biases, fused_experts declared) or not all VNNI weights of one shape
    below policy().gemm_rows rows each. The caller then runs swiglu_expert per expert."""
    if not ws or not all(w.plain for w in ws):
        return None
    return swiglu_prefill([w.gate_up for w in ws], [w.down for w in ws], x, rows)


# -- grouped execution on the GPU tier (Triton) --------------------------------------------------
def grouped_ready(ws: list[ExpertWeights]) -> bool:
    """The experts can run as one group: plain (the grouped kernels fuse silu(g)·u and add no
    biases), Triton-backed, one quant type and shape per matrix."""
    if (
        not ws
        or not all(w.plain for w in ws)
        or any(w.gate_up.backend != "triton" or w.down.backend != "triton" for w in ws)
    ):
        return False
    g, d = ws[0].gate_up, ws[0].down
    return all(
        (w.gate_up.qtype, w.gate_up.n, w.gate_up.k, w.down.qtype, w.down.n, w.down.k)
        == (g.qtype, g.n, g.k, d.qtype, d.n, d.k)
        for w in ws
    )


def grouped_swiglu(
    ws: list[ExpertWeights], x: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Σ_s weight_s · expert_s(x[tokens_s]) → [T, D] for grouped_ready experts `ws`, rows[s] =
    (token indices [n] int64, router weights [n] float32) on the host. Decode (T = 1): 3 launches
    — gate+up of every expert, down of every expert with the SwiGLU read in, the weighted sum —
    and 2 small uploads; prefill: the tokens sorted by expert and padded to the tile (one plan
    upload), 2 grouped GEMMs and one index_add."""
    from . import triton_gguf as tg  # only reached with "triton" weights: Triton is installed

    g, d = ws[0].gate_up, ws[0].down
    dev = x.device
    ptrs = to_device(
        torch.tensor(
            [[w.gate_up.tensors["raw"].data_ptr() for w in ws], [w.down.tensors["raw"].data_ptr() for w in ws]],
            dtype=torch.int64,
        ),
        dev,
    )
    raw = g.tensors["raw"]
    T = x.shape[0]
    if T == 1:
        coef = to_device(torch.cat([w for _, w in rows]).float(), dev)  # [S]
        gu = tg.gemv(raw, g.qtype.name, g.n, g.k, x, table=ptrs[0])  # [S, 2F]
        y = tg.gemv(raw, d.qtype.name, d.n, d.k, gu, table=ptrs[1], swiglu=True)  # [S, D]
        return coef[None] @ y
    plan = tg.GroupedRows.build([(s, tok) for s, (tok, _) in enumerate(rows)], dev)
    gu = tg.gemm(
        raw, g.qtype.name, g.n, g.k, x, x_rows=plan.rows, table=ptrs[0], block_slot=plan.block_slot, M=plan.n_rows
    )
    y = tg.gemm(raw, d.qtype.name, d.n, d.k, gu, table=ptrs[1], block_slot=plan.block_slot, M=plan.n_rows, swiglu=True)
    dst = torch.zeros(plan.n_rows, dtype=torch.int64)
    wt = torch.zeros(plan.n_rows, dtype=torch.float32)
    for s, (tok, w) in enumerate(rows):
        at = plan.starts[s]
        dst[at : at + len(tok)] = tok
        wt[at : at + len(tok)] = w
    dst, wt = to_device(dst, dev), to_device(wt, dev)
    return torch.zeros_like(x).index_add_(0, dst, y * wt[:, None])


def resident_decode(
    addresses: torch.Tensor, like: ExpertWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Every expert of the layer resident, decode: the routing never leaves the device. addresses
    [2, E] int64 (each expert's gate_up and down bytes on the device; compute/gpu_tier.py), `like`
    any of the layer's experts (types and shapes), ids/weights [1, k] on the device → [1, D]:
    3 launches and no host sync."""
    from . import triton_gguf as tg

    g, d = like.gate_up, like.down
    raw = g.tensors["raw"]
    gu = tg.gemv(raw, g.qtype.name, g.n, g.k, x, table=addresses[0], ids=ids[0])  # [k, 2F]
    y = tg.gemv(raw, d.qtype.name, d.n, d.k, gu, table=addresses[1], ids=ids[0], swiglu=True)  # [k, D]
    return weights[0:1].float() @ y


def mapped_ffn(gate: RawMatrix, up: RawMatrix, down: RawMatrix) -> ExpertWeights:
    """One FFN computed by ggml in place: views of the memory-mapped file, nothing copied."""
    gu = ggml_weight([(raw_bytes(d, shape[0]), q, shape[0]) for d, q, shape in (gate, up)], gate[2][1])
    return ExpertWeights(gu, ggml_weight([(raw_bytes(down[0], down[2][0]), down[1], down[2][0])], down[2][1]))


class ExpertStore:
    """Expert weights at rest stay quantized in the memory-mapped file.

    Where ggml's kernels are the backend for the experts' types (kernels.choose_backend), an expert
    is computed in place from the file: no repacking, no copy, no RAM beyond the page cache (its
    ExpertWeights are views, kept in `_mapped`). Where the VNNI kernel is the backend, an expert is
    repacked once on first use into its layout and kept in host RAM under `host_cache_bytes`; once
    that budget is full, further experts are computed by ggml from the file rather than evicting
    and repacking again (with no ggml at all, the repacked experts form an LRU as before)."""

    # the repacked layout's bytes per byte of the file, at most (≈ 1 for every type); the budget
    # checks count an expert at this much before it is repacked
    LAYOUT_BYTES_PER_FILE_BYTE = 1.11

    def __init__(self, model: ExpertFile, device: torch.device, host_cache_bytes: int):
        self.model = model
        self.device = device
        self.host_cache_bytes = host_cache_bytes
        self._cache: OrderedDict[ExpertId, ExpertWeights] = OrderedDict()
        self._cached_bytes = 0
        self._mapped: dict[ExpertId, ExpertWeights] = {}
        self._layer_backend: dict[int, tuple[str, bool]] = {}  # layer → (backend of its experts, ggml can take them)
        self.epilogue = ExpertEpilogue(model)  # biases and activation, attached to every expert handed out

    def backend(self, layer: int) -> tuple[str, bool]:
        """(the backend choose_backend picks for layer's expert types, whether ggml computes them all)."""
        got = self._layer_backend.get(layer)
        if got is None:
            from .ggml_backend import ggml
            from .kernels import kernel_mode

            qtypes = {self.model.view(names.blk(layer, p)).qtype for p in names.EXPERT_PARTS}
            picks = {choose_backend(q, self.device) for q in qtypes}
            g = ggml() if self.device.type == "cpu" and kernel_mode() not in ("torch", "vnni") else None
            got = (picks.pop() if len(picks) == 1 else "mixed", g is not None and all(g.computes(q) for q in qtypes))
            self._layer_backend[layer] = got
        return got

    def weights(self, layer: int, expert: int, packed: ExpertWeights | None = None) -> ExpertWeights:
        """The expert's weights: computed in place from the file, or repacked once into host RAM where
        `host_cache_bytes` holds them. packed: pack_ffn's result for this expert, made beforehand
        (ExpertStore.preload repacks several side by side), used instead of repacking here."""
        key = (layer, expert)
        w = self._mapped.get(key)
        if w is not None:
            return w
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            return w
        raws = self._raws(layer, expert)
        backend, ggml_ok = self.backend(layer)
        # the repacked layout is ≈ the file's bytes (_layout_bytes): an expert that would not fit the budget
        # is computed in place instead of evicting one (no repacking twice). Experts whose matrices
        # would get different backends (a ggml-only gate/up type beside a vnni down type) run all
        # on ggml: one decode call, no copy.
        if backend == "ggml" or (
            ggml_ok and (backend != "vnni" or self._cached_bytes + self._layout_bytes(layer) > self.host_cache_bytes)
        ):
            w = self._mapped[key] = self.epilogue.attach(mapped_ffn(*raws), layer, expert, self.device)
            return w
        w = self.epilogue.attach(packed or pack_ffn(*raws, device=self.device), layer, expert, self.device)
        if w.nbytes <= self.host_cache_bytes:
            self._cache[key] = w
            self._cached_bytes += w.nbytes
            evicted = False
            while self._cached_bytes > self.host_cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
                evicted = True
            if (
                not evicted and backend == "vnni" and self.device.type == "cpu"
            ):  # kept for good, a copy: its bytes in the file are not read again
                self.model.release([r[0] for r in raws])
        return w

    def repacked_layers(self) -> list[int]:
        """The layers whose experts the VNNI kernel computes: the ones repacked into RAM, as far
        as `host_cache_bytes` holds them (the rest run in place on ggml)."""
        return [layer for layer in self.model.spec.moe_layers if self.backend(layer)[0] == "vnni"]

    def repacked(self, layer: int, expert: int) -> ExpertWeights | None:
        """The expert as repacked into host RAM, or None where it is not (yet) or runs in place."""
        return self._cache.get((layer, expert))

    def summary(self) -> dict[str, int]:
        """Where the experts handed out so far live: repacked in RAM (count, bytes) or in place."""
        return {"repacked": len(self._cache), "repacked_bytes": self._cached_bytes, "in_place": len(self._mapped)}

    def preload(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Repack, once and up front, every expert that the VNNI kernel computes and `host_cache_bytes`
        holds (in C: kernels.lm_repack_r16), so no decode step ever repacks; the rest are computed
        in place from the memory map by ggml. progress(done, total) in experts. Returns the number
        of experts repacked.

        Where the budget holds a whole layer, its experts are repacked side by side, one per thread
        (torch's thread count), each on one C thread: one parallel region per matrix made each of
        the 12,000 calls of the 48-layer Qwen3-30B-A3B load wait for whichever thread the scheduler
        had put aside (docs/speed.md: 112 s against 68 s on one thread under a busy loop)."""
        layers = self.repacked_layers()
        n_expert = self.model.spec.n_expert
        total, done = len(layers) * n_expert, 0
        workers = torch.get_num_threads()
        planned = float(self._cached_bytes)  # the budget as whole layers' experts would fill it (_layout_bytes)
        side = ThreadPoolExecutor(workers, thread_name_prefix="localmoe-repack") if workers > 1 else nullcontext()
        with side as pool:
            for layer in layers:
                planned += n_expert * self._layout_bytes(layer)
                todo = [e for e in range(n_expert) if (layer, e) not in self._cache and (layer, e) not in self._mapped]
                side_by_side = pool is not None and planned <= self.host_cache_bytes
                packs = iter(pool.map(partial(self._pack, layer), todo)) if side_by_side else iter(())
                waiting = set(todo) if side_by_side else set()
                for expert in range(n_expert):
                    self.weights(layer, expert, next(packs) if expert in waiting else None)
                    done += 1
                    if progress is not None and (done % 64 == 0 or done == total):
                        progress(done, total)
        return len(self._cache)

    def _pack(self, layer: int, expert: int) -> ExpertWeights:
        """pack_ffn of one expert from the file, on one C thread (preload runs several side by side)."""
        return pack_ffn(*self._raws(layer, expert), device=self.device, threads=1)

    def _raws(self, layer: int, expert: int) -> list[RawMatrix]:
        """The expert's gate, up and down as the file holds them (views of the memory map)."""
        return [self.model.expert_raw(layer, expert, p) for p in names.EXPERT_PARTS]

    def _layout_bytes(self, layer: int) -> float:
        """An expert of `layer` in the repacked layout, at most (LAYOUT_BYTES_PER_FILE_BYTE)."""
        return self.LAYOUT_BYTES_PER_FILE_BYTE * self.model.expert_bytes(layer)
