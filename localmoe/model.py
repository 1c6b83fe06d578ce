"""The forward driver: the embedding, the layer loop, the KV cache and the output head. What a layer
computes is its architecture's business:

    x = embd[ids] (× embd_scale)
    per layer i, block = layers[i] (built by archs/<arch>.py's build_block from localmoe/layers/):
        x = x + block.attn(rms(x)·attn_norm)            attention of the architecture's kind
        predict_next(i, x)                              layer i+1's router on x, for residency's prefetch
        x = x + ffn(rms(x)·ffn_norm)                    a dense FFN, or the MoE block: router →
                                                        residency's plan → compute (+ shared expert)
    logits = output · (rms(x)·output_norm)              (soft-capped where the file says)

A block may order its steps otherwise (Block.run, e.g. layers/postnorm.py's norms after each sub-block).

This module names no attention kind, router or activation: the C fast paths (archs.common.fast_paths)
are chosen when the blocks are built. It mirrors llama.cpp's graphs (src/models/*.cpp) step for step.

Shapes in comments: T tokens in this pass (a prompt runs in ubatches of at most UBATCH tokens, `forward`),
D = n_embd, V vocabulary, E experts, k experts used.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
import torch

from . import archs
from .archs.common import fast_paths
from .compute import kernels
from .compute.counters import to_device
from .compute.experts import pack_ffn
from .compute.fused_decode import FusedDecode
from .compute.ggml_backend import usable_ggml
from .compute.kernels import KV_DTYPE, QLinear, fuse_rows, gather_rows, repack, rms_norm
from .errors import LocalMoEError
from .gguf import names
from .gguf.blocks import QUANT_TYPES, dequantize, raw_bytes, to_torch
from .gguf.file import GGUFModel, ModelSpec, TensorView
from .layers.block import Block, weight_bytes
from .layers.ffn import FFN
from .layers.moe import Residency
from .layers.postnorm import softcap
from .layers.rope import Rope

# A prompt runs through the layers in ubatches of at most this many tokens (llama.cpp's n_ubatch,
# 512 by default): the transient memory of a pass (attention scores, the MoE's per-token expert
# activations, the layers' intermediate [T, ·] tensors) is bounded by the ubatch, not by the prompt,
# at the cost of reading the weights once per ubatch rather than once per prompt.
UBATCH = 512


class KVCache:
    """A context's memory: per-layer key and value rows for positions 0..n-1, growing by doubling up
    to n_ctx (each layer's attention says what its rows are, layers.block.Attention.cache_rows:
    heads × width of a key row and of a value row; a width of 0: no values), and, for layers with
    a recurrent state instead (Gated DeltaNet), that state after position n-1.

    KV rows can be cut back to any position; a recurrent state cannot. So the state is copied at the
    end of every prompt (`snapshot`, the last MAX_SNAPSHOTS kept), and `rewind` goes back to the
    latest copy at or before the position asked for: a new chat turn or request that shares a
    prefix resumes there and recomputes the rest."""

    MAX_SNAPSHOTS = 2

    def __init__(self, spec: ModelSpec, n_ctx: int, device: torch.device, kv_dtype: torch.dtype = KV_DTYPE):
        self.spec, self.n_ctx, self.device = spec, n_ctx, device
        self.kv_dtype = kv_dtype  # the rows of the layers whose attention takes the cache's type (cache_dtype None)
        self.n = 0
        self._cap = 0
        self._pointers: tuple[ctypes.Array, ctypes.Array] | None = None  # c_pointers' arrays
        self.k: list[torch.Tensor] = []  # per layer [heads, cap, width], in the layer's cache_dtype
        self.v: list[torch.Tensor] = []  # per layer [heads, cap, width]
        self.states: dict[int, list[torch.Tensor]] = {}  # recurrent layer → its state tensors (the layer's layout)
        self._snapshots: list[tuple[int, dict[int, list[torch.Tensor]]]] = []  # (position, states), oldest first

    def recurrent(self, layer: int, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Layer `layer`'s recurrent state, made by make() before its first token; updated in place."""
        state = self.states.get(layer)
        if state is None:
            state = self.states[layer] = make()
        return state

    def snapshot(self) -> None:
        """Keep a copy of the recurrent states at the current position (no-op without them)."""
        if not self.states:
            return
        self._snapshots = [p for p in self._snapshots if p[0] < self.n][-(self.MAX_SNAPSHOTS - 1) :]
        self._snapshots.append((self.n, {i: [t.clone() for t in st] for i, st in self.states.items()}))

    def rewind(self, n: int) -> int:
        """Go back to position n (≤ self.n) or, where recurrent states cannot be cut there, to the
        latest snapshot before it (0 at worst: a fresh context). Returns the position reached; the
        caller recomputes from there."""
        n = max(0, min(n, self.n))
        if n == self.n or not self.states:
            self.n = n
            return n
        self._snapshots = [p for p in self._snapshots if p[0] <= n]
        if self._snapshots:
            pos, states = self._snapshots[-1]
            self.states = {i: [t.clone() for t in st] for i, st in states.items()}
        else:
            pos, self.states = 0, {}
        self.n = pos
        return pos

    def reserve(
        self, n_total: int, rows: list[tuple[tuple[int, int], tuple[int, int]]], dtypes: list[torch.dtype | None]
    ) -> None:
        """Room for n_total positions; rows: per layer ((heads, width) of a key row, (heads, width)
        of a value row), as the layer's attention lays out its cache (Attention.cache_rows), in the
        element type dtypes[layer] (Attention.cache_dtype; None: the cache's kv_dtype). More than
        n_ctx positions raise LocalMoEError: the rows never grow past n_ctx, and a position beyond
        them would be written outside the cache (the C decode attention does not check)."""
        if n_total > self.n_ctx:
            raise LocalMoEError(
                f"{n_total} positions do not fit the context of {self.n_ctx}; start a new cache (or rewind "
                "this one), or load with a larger n_ctx (--ctx-size)"
            )
        if n_total <= self._cap:
            return
        cap = min(self.n_ctx, max(n_total, 2 * self._cap, 64))
        for i, (((hk, wk), (hv, wv)), dtype) in enumerate(zip(rows, dtypes, strict=True)):
            dtype = self.element_type(dtype)
            k = torch.zeros(hk, cap, wk, dtype=dtype, device=self.device)
            v = torch.zeros(hv, cap, wv, dtype=dtype, device=self.device)
            if self._cap:
                k[:, : self.n] = self.k[i][:, : self.n]
                if v.numel():
                    v[:, : self.n] = self.v[i][:, : self.n]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        self._cap = cap
        self._pointers = None  # (the rows moved)

    def c_pointers(self) -> tuple[ctypes.Array, ctypes.Array]:
        """Every layer's key rows and value rows as C pointer arrays (the fused decode's), kept until
        reserve moves the rows."""
        if self._pointers is None:
            n = len(self.k)
            self._pointers = (
                (ctypes.c_void_p * n)(*(t.data_ptr() for t in self.k)),
                (ctypes.c_void_p * n)(*(t.data_ptr() for t in self.v)),
            )
        return self._pointers

    def element_type(self, dtype: torch.dtype | None) -> torch.dtype:
        """A layer's row type: its attention's own (Attention.cache_dtype), else this cache's kv_dtype."""
        return dtype or self.kv_dtype

    def full_bytes(self, rows: list[tuple[tuple[int, int], tuple[int, int]]], dtypes: list[torch.dtype | None]) -> int:
        """Bytes of reserve's rows (the same layout and types) once they hold n_ctx positions."""
        per_position = (
            (hk * wk + hv * wv) * self.element_type(dtype).itemsize
            for ((hk, wk), (hv, wv)), dtype in zip(rows, dtypes, strict=True)
        )
        return sum(per_position) * self.n_ctx

    def clear(self) -> None:
        self.n = 0
        self.states, self._snapshots = {}, []


class FileWeights:
    """The loader block builders read (layers.block.Weights): small tensors as float32, weight
    matrices repacked for the fast kernels, whose pages of the file are released when the layout is
    a copy (a repacked or dequantized one, not ggml's or the GPU's view of the file's bytes)."""

    def __init__(self, model: GGUFModel, device: torch.device):
        self.model, self.spec, self.device = model, model.spec, device

    def has(self, name: str) -> bool:
        return self.model.has(name)

    def load(self, name: str) -> torch.Tensor:
        v = self.model.view(name)
        return to_torch(v.data, v.qtype, v.shape, self.device)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.load(name) if self.model.has(name) else None

    def raw(self, name: str) -> tuple:  # a weight matrix as (data, quant type, [rows, cols])
        v = self.model.view(name)
        return v.data, v.qtype, v.shape

    def _is_copy(self, w: QLinear) -> bool:
        return w.backend in ("vnni", "int4", "bf16") and self.device.type == "cpu"  # ("f32" may be a view of the file)

    def _copied(self, w: QLinear, mats: list[tuple]) -> QLinear:
        if self._is_copy(w):
            self.model.release([m[0] for m in mats])
        return w

    def linear(self, name: str) -> QLinear:
        m = self.raw(name)
        return self._copied(repack(*m, device=self.device), [m])

    def qkv(self, layer: int, with_v: bool = True) -> list[QLinear]:
        """q, k and v (with_v False: q and k only) of `layer`, fused where their types agree."""
        return self.fuse(
            [self.raw(names.blk(layer, p)) for p in (names.ATTN_Q, names.ATTN_K, names.ATTN_V)[: 3 if with_v else 2]]
        )

    def fuse(self, mats: list[tuple], sources: list[tuple] | None = None) -> list[QLinear]:
        """Matrices with the same columns as one QLinear (their outputs concatenated) when they share
        a quant type, else one each (the caller concatenates). `sources`: the file's matrices that
        `mats` were cut from (rows reordered), whose pages go once the copy is made; default mats."""
        if len({m[1] for m in mats}) == 1:
            ws = [fuse_rows(mats, self.device)]
        else:
            ws = [repack(*m, device=self.device) for m in mats]
        if sources is None:  # each matrix's pages go where its layout is a copy
            pairs = [(ws[0], mats)] if len(ws) == 1 else [(w, [m]) for w, m in zip(ws, mats)]
        else:  # cut from `sources`: theirs go only when every layout is a copy
            pairs = [(ws[0], sources)] if all(self._is_copy(w) for w in ws) else []
        for w, ms in pairs:
            self._copied(w, ms)
        return ws

    def ffn(
        self, layer: int, stems: tuple[str, str, str], act: str | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        w = pack_ffn(*(self.raw(names.blk(layer, p)) for p in stems), device=self.device)
        return FFN(w if act is None else dataclasses.replace(w, act=act, fused_ok=False))


class MoEModel:
    def __init__(self, model: GGUFModel, experts: Residency, device: torch.device):
        self.gguf = model
        self.spec = spec = model.spec
        self.device = device
        self.experts = experts  # residency: where each routed expert runs (layers.moe.Residency)
        self.fused_decode = True  # decode a plain layer in one C call where it qualifies (compute/fused_decode.py)
        self._fused: FusedDecode | None = None
        self._fused_key: tuple[int, int] | None = None
        self.fast = fast_paths(spec)  # the C fast paths this architecture's declarations allow
        w = FileWeights(model, device)
        build = archs.module_for(spec.arch.name).build_block
        self.layers: list[Block] = [build(w, spec, i) for i in range(spec.n_layer)]
        self.cache_rows = [lw.attn.cache_rows(spec) for lw in self.layers]  # KVCache.reserve's layout
        self.cache_dtypes = [lw.attn.cache_dtype for lw in self.layers]  # and element types
        self.embd: TensorView = model.view(names.TOKEN_EMBD)
        self.output_norm = w.load(names.OUTPUT_NORM)
        self.output = w.linear(names.OUTPUT if model.has(names.OUTPUT) else names.TOKEN_EMBD)  # [V, D]; tied if absent
        # the embedding in the C kernel's row-block layout for one-call lookups (CPU) when the output
        # head is tied to it (that layout exists anyway). An untied table is not repacked just for
        # lookups: a 201k × 2880 one (gpt-oss) would cost ~5 s of load and its size again in RAM,
        # where ggml reads the few rows a call needs from the file (embd_mapped, also one C call).
        self.embd_packed: QLinear | None = None
        if "embedding_gather" in self.fast and device.type == "cpu" and not model.has(names.OUTPUT) and self.output.r16:
            self.embd_packed = self.output
        self.embd_mapped: QLinear | None = None  # else the table in place, its rows read by ggml (one C call)
        g = usable_ggml()  # (None when the compute policy's kernel mode rules ggml out)
        mappable = g is not None and self.embd.qtype in QUANT_TYPES and g.computes(self.embd.qtype)
        if self.embd_packed is None and mappable:
            self.embd_mapped = kernels.ggml_weight(
                [(raw_bytes(self.embd.data, self.embd.shape[0]), self.embd.qtype, self.embd.shape[0])], spec.n_embd
            )
        self.rope = Rope(spec)  # the rotation tables, shared by every layer

    # -- pieces -----------------------------------------------------------------------------------
    def dense_bytes(self) -> int:
        """Bytes of the dense (non-expert) weights as placed on the compute device (repacked)."""
        n = self.output_norm.numel() * 4 + self.output.nbytes + self.embd.n_bytes
        n += sum(weight_bytes(lw) for lw in self.layers)
        # routed-expert biases (gpt-oss): float32 beside the experts' bytes, on the compute device
        n += sum(t.n_bytes for name, t in self.gguf.tensors.items() if names.is_expert_bias(name))
        return n

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ids [T] → [T, D]: from the repacked table in one C call when there
        is one (a decode step's torch ops run with cold caches and cost ~0.2 ms; exact for the
        32-weight types, the K-types' composite scales rounded to float16 as in every matmul), else
        only the rows needed dequantized exactly from the file."""
        if self.embd_packed is not None:
            return gather_rows(self.embd_packed, ids)
        if self.embd_mapped is not None:  # ggml's dequantizer on the rows in the memory map
            return to_device(gather_rows(self.embd_mapped, ids), self.device)
        rows = self.embd.data[ids.cpu().numpy()]
        return to_device(dequantize(rows, self.embd.qtype, (len(ids), self.spec.n_embd)), self.device)

    def attention(self, i: int, h: torch.Tensor, cache: KVCache, pos0: int) -> torch.Tensor:
        """h [T, D] (normed) → layer i's attention output [T, D]; appends this call's K/V to the cache."""
        return self.layers[i].attn(self.spec, i, h, cache, pos0, self.rope)

    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of layer i (a layer with experts): h [T, D] → (ids [T, k] int64, weights [T, k] float32)."""
        return self.layers[i].moe.router(self.spec, h)

    def router_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's router on h [T, D] → logits [T, E] (+ the router's bias, where it has one)."""
        return self.layers[i].moe.router.logits(h)

    def ffn_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The normalised input of layer i's MoE block for residual stream x [T, D]."""
        return rms_norm(x, self.layers[i].ffn_norm, self.spec.rms_eps)

    def predict_next(self, i: int, x: torch.Tensor) -> None:
        """x [T, D]: the residual stream after layer i's attention. When residency wants it (its
        prefetch), hand it the experts layer i+1's own router picks on x: the model routes,
        residency never calls the model."""
        nxt = i + 1
        if nxt < self.spec.n_layer and self.spec.is_moe(nxt) and self.experts.wants_prediction(nxt, x.shape[0]):
            ids, _ = self.route(nxt, self.ffn_input(nxt, x))
            self.experts.give_prediction(nxt, ids[0])

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] (normed) → FFN output [T, D]: the dense FFN of a layer without experts, else the
        MoE block (router → the expert function, + the shared expert)."""
        lw = self.layers[i]
        if lw.moe is None:
            return lw.ffn(h)
        return lw.moe(self.spec, i, h, self.experts)

    def plan_decode(self) -> None:
        """Plan the fused decode layers now, at load (30 ms for the 48-layer Qwen3-30B-A3B shape), so that
        the first decode step, timed as decode, does not; a later change of executor plans them again."""
        self._fused_decode()

    def _fused_decode(self) -> FusedDecode | None:
        """The layers that decode in one C call each (compute/fused_decode.py); planned again when
        the executor or the number of resident experts changed since (experts repacked on first use)."""
        if not self.fused_decode:
            return None
        store = getattr(self.experts, "store", None)
        key = (id(self.experts), store.summary()["repacked"] if store is not None else 0)
        if self._fused_key != key:
            if self._fused is not None:
                self._fused.close()
            self._fused, self._fused_key = FusedDecode.build(self), key
        return self._fused

    # -- the whole pass ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = True) -> torch.Tensor:
        """ids [T] at positions cache.n.. → logits [T, V] (or [1, V] for the last token only).
        A prompt longer than UBATCH runs in consecutive ubatches (`ubatches`), each a pass through
        every layer at its positions in the same cache; the output head runs on every ubatch for
        all_logits, else on the last one only. The recurrent states' snapshot is taken once, at the
        end of the whole prompt. A decode token (T = 1) whose layers are all fused runs in one C
        call, embedding to logits (compute/fused_decode.FusedDecode.token)."""
        T, pos0 = ids.shape[0], cache.n
        cache.reserve(pos0 + T, self.cache_rows, self.cache_dtypes)  # the whole prompt's rows up front
        fused = self._fused_decode() if T == 1 and cache.kv_dtype == KV_DTYPE else None  # (the C kernels' cache)
        if fused is not None:
            if fused.whole:  # the embedding, every layer, the norm and the head in one C call
                logits = fused.token(int(ids[0]), cache, pos0)
                cache.n = pos0 + 1
                return logits if not self.spec.final_logit_softcap else softcap(logits, self.spec.final_logit_softcap)
        sizes = ubatches(T)
        out: torch.Tensor | None = None
        start = 0
        for j, n in enumerate(sizes):
            last = j == len(sizes) - 1
            logits = self._pass(ids[start : start + n], cache, "all" if all_logits else "last" if last else None, fused)
            if len(sizes) == 1 or not all_logits:
                out = logits
            else:  # each ubatch's rows in place (a concatenation would hold [T, V] twice)
                if out is None:
                    out = logits.new_empty(T, logits.shape[1])
                out[start : start + n] = logits
            start += n
        if T > 1:  # the end of a prompt: where a later turn or request may resume
            cache.snapshot()
        return out

    def _pass(
        self, ids: torch.Tensor, cache: KVCache, head: str | None, fused: FusedDecode | None
    ) -> torch.Tensor | None:
        """One pass of ids [T] (at most UBATCH of them) at positions cache.n.. through every layer,
        appending to the cache (reserved by forward) → logits [T, V] (head "all"), [1, V] (the
        last token's, "last"), or None (no output head: None). fused: forward's plan for a decode
        token (its runs of fused layers), else None."""
        s = self.spec
        T, pos0 = ids.shape[0], cache.n
        x = self.embed(ids)
        if s.embd_scale != 1.0:
            x = x * s.embd_scale
        if fused is not None:
            x = x.contiguous()
            cos, sin = (t.reshape(-1).contiguous() for t in self.rope.tables(pos0, 1, x.device))
        i = 0
        while i < len(self.layers):
            if fused is not None and i in fused.spans:  # a run of whole layers in one C call, the same steps as below
                i = fused.run(i, x, cache, pos0, cos, sin)
                continue
            lw = self.layers[i]
            if lw.run is not None:  # a block with its own order of operations (layers/block.py)
                x = lw.run(self, i, x, cache, pos0)
            else:
                x = x + self.attention(i, rms_norm(x, lw.attn_norm, s.rms_eps), cache, pos0)
                self.predict_next(i, x)
                x = x + self.moe(i, self.ffn_input(i, x))
            i += 1
        if fused is not None:
            fused.count(self.experts.stats, list(fused.layers))
        cache.n = pos0 + T
        if head is None:
            return None
        if head == "last":
            x = x[-1:]
        logits = self.output(rms_norm(x, self.output_norm, s.rms_eps))
        return logits if not s.final_logit_softcap else softcap(logits, s.final_logit_softcap)


def ubatches(T: int) -> list[int]:
    """The sizes of the consecutive ubatches a forward of T tokens runs in: one of T up to UBATCH,
    else ceil(T / UBATCH) of near-equal size (they differ by one at most), so that none is a single
    token (that would take the decode path) while UBATCH ≥ 3."""
    n = max(1, -(-T // UBATCH))
    q, r = divmod(T, n)
    return [q + 1] * r + [q] * (n - r)
