"""A decode token through a whole llama-style MoE layer in one C call (vnni.c's lm_decode_layer).

The Python decode path calls a dozen C helpers per layer (RMS norm, the QKV matvec, q/k norm +
RoPE, attention over the cache, Wo, RMS norm, the router, the routed experts) with Python and torch
allocations between them: ~0.1-0.15 ms a layer, 5-7 ms of a 48-layer Qwen3-30B-A3B token whose
weights take ~50 ms to read. lm_decode_layer makes the same calls, in the same order, on the same
buffers, so the logits are the same to the bit (tests/test_fused_decode.py). A run of consecutive
fused layers is one call from Python (lm_decode_layers): ~20 µs a call, ~1 ms of a 48-layer token.
Where that run is every layer and the output head is a VNNI weight, the token is one call
(lm_decode_token): the layers, the routed-use count and the output norm and head, ~0.2 ms less per
token on the 4-layer Qwen3-30B-A3B shape (docs/speed.md).

It applies to a layer only where that layer is exactly what the C calls compute, checked once per
layer when the plan is built (`FusedDecode.build`): the plain GQA attention (its q, k, v weights
in one matrix or one per type, no biases, no sinks, no sliding window, no output gate, a per-head
or no q/k norm, the model's own RoPE), the plain MoE block (the C router's softmax → top-k, no
shared expert, no per-expert scale) and every expert of the layer repacked for the VNNI kernel and
resident in the host store (residency/resident.AllResident: the trivial plan, no residency
decisions to make).
Any other layer runs the Python path, as before.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from .kernels import QLinear, _desc, _kp, _WeightDesc, vnni_lib


# The steps of a decode token whose seconds vnni.c sums over the process (its PH_* order): a
# layer's RMS norm and q | k | v pass, q/k norm and RoPE, attention over the cache, Wo, the residual
# add and the FFN's RMS norm, the router, then the routed experts' gate | up, SiLU, down.
PHASES = ("norm + qkv", "q/k norm + rope", "attention", "wo", "add + norm", "router", "gate|up", "silu", "down")


def phase_seconds() -> dict[str, float] | None:
    """Seconds each decode step (PHASES) has taken in this process so far, or None without the
    VNNI kernel. Differences around a stream give a token's breakdown (scripts/token-profile)."""
    lib = vnni_lib()
    if lib is None:
        return None
    out = (ctypes.c_double * len(PHASES))()
    lib.lm_phase_seconds(out)
    return dict(zip(PHASES, out))


class _Layer(ctypes.Structure):  # lm_layer_t in vnni.c
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("attn_rms", "ffn_rms", "q_rms", "k_rms", "router")]
        + [(name, ctypes.c_void_p) for name in ("qkv", "wo", "gate_up", "down")]
        + [(name, ctypes.c_int) for name in ("n_qkv", "D", "nq", "nkv", "d", "dv", "n_rot", "neox")]
        + [(name, ctypes.c_int) for name in ("E", "k", "norm_topk")]
        + [(name, ctypes.c_float) for name in ("eps", "kq_scale", "w_scale")]
    )


def _f32(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def _unpadded_vnni(w: QLinear) -> bool:
    return w.backend == "vnni" and _kp(w) == w.k


class FusedDecode:
    """The layers of one model that decode in one C call each, with what those calls read."""

    def __init__(self, model: Any, lib: ctypes.CDLL, layers: dict[int, tuple[_Layer, list[Any]]]):
        self.model = model
        self.experts = model.experts  # the executor the plan was built for (rebuilt if it changes)
        self.lib = lib
        self.layers = layers  # layer → (its descriptor, what keeps the memory it points at alive)
        s = model.spec
        self.ids = torch.empty(s.n_layer, max(s.n_expert_used, 1), dtype=torch.int64)  # [L, k]: this token's routing
        self.wts = torch.empty(s.n_layer, max(s.n_expert_used, 1), dtype=torch.float32)
        # runs of consecutive fused layers, each decoded in one C call: first layer → (its layers, their descriptors)
        runs: list[list[int]] = []
        for i in sorted(layers):
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        self.spans = {
            run[0]: (run, (ctypes.c_void_p * len(run))(*(ctypes.addressof(layers[i][0]) for i in run))) for run in runs
        }
        # The whole token in one call (lm_decode_token) where one run holds every layer and the output
        # head is a weight the C matvec takes: the head's descriptor, else None. Its routed uses are
        # counted in C into `uses` (running totals) and reach the stats when they are looked at.
        self.head = self._whole_head(model)
        self.x = torch.empty(1, s.n_embd, dtype=torch.float32)  # `token`'s hidden state
        self._tok = ctypes.c_int64(0)  # the token id the embedding row is read for
        self._embed_row = _embedding_row(model, self._tok)
        self.uses = np.zeros((s.n_layer, s.n_expert), dtype=np.int64)  # [L, E]
        self._uses_seen = self.uses.copy()
        self.stats = model.experts.stats if self.head is not None else None
        if self.stats is not None:
            self.stats.on_snapshot(self.absorb_uses)

    @classmethod
    def build(cls, model: Any) -> FusedDecode | None:
        """The plan for `model` (a model.MoEModel), or None where no layer qualifies."""
        from ..residency.resident import AllResident

        lib = vnni_lib()  # (None where the compute policy rules the VNNI kernel out)
        if lib is None or model.device.type != "cpu" or type(model.experts) is not AllResident:
            return None
        layers = {}
        for i, lw in enumerate(model.layers):
            got = _layer(model, i, lw)
            if got is not None:
                layers[i] = got
        return cls(model, lib, layers) if layers else None

    def run(self, first: int, x: torch.Tensor, cache: Any, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> int:
        """The run of fused layers that starts at layer `first` (a key of self.spans), on x [1, D]
        (contiguous float32, updated in place) at position pos; cos/sin [n_rot/2] contiguous at pos.
        The routing lands in self.ids / self.wts at those layers' rows. Returns the layer after the run."""
        run, descs = self.spans[first]
        n = len(run)
        kcs = (ctypes.c_void_p * n)(*(cache.k[i].data_ptr() for i in run))
        vcs = (ctypes.c_void_p * n)(*(cache.v[i].data_ptr() for i in run))
        k = self.ids.shape[1]
        rc = self.lib.lm_decode_layers(
            n,
            descs,
            x.data_ptr(),
            kcs,
            vcs,
            cache.k[first].shape[1],  # every layer's capacity (KVCache.reserve grows them together)
            pos,
            cos.data_ptr(),
            sin.data_ptr(),
            self.ids.data_ptr() + first * k * self.ids.element_size(),
            self.wts.data_ptr() + first * k * self.wts.element_size(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("lm_decode_layer could not allocate its scratch buffers")
        return run[-1] + 1

    @staticmethod
    def _whole_head(model: Any) -> _WeightDesc | None:
        s, out, norm = model.spec, model.output, model.output_norm
        if not isinstance(out, QLinear) or not _unpadded_vnni(out) or out.k != s.n_embd:
            return None
        if norm is None or not _f32(norm) or norm.numel() != s.n_embd:
            return None
        return _desc(out)

    @property
    def whole(self) -> bool:
        """Whether a decode token runs in one call (`token`): every layer fused, in one run."""
        first = self.spans.get(0)
        return self.head is not None and first is not None and len(first[0]) == self.model.spec.n_layer

    def token(self, tok: int, cache: Any, pos: int) -> torch.Tensor:
        """The logits [1, V] of decode token `tok` at position pos (cache reserved for it). Only where
        `whole`. Its embedding row is read by one C call where the table has a row reader, and the
        RoPE rows are addressed in place: no torch op before the token's call but the logits' buffer."""
        m = self.model
        if self._embed_row is not None:
            n = self._embed_row[1]
            if not 0 <= tok < n:  # (the C readers do not check)
                raise IndexError(f"row id out of range for a weight of {n} rows")
            self._tok.value = tok
            self._embed_row[0](self.x.data_ptr())
        else:
            x = m.embed(torch.tensor([tok]))
            self.x.copy_(x * m.spec.embd_scale if m.spec.embd_scale != 1.0 else x)
        cos, sin = m.rope.row_addresses(pos, m.device)
        run, descs = self.spans[0]
        kcs, vcs = cache.c_pointers()
        logits = torch.empty(1, m.output.n, dtype=torch.float32)
        rc = self.lib.lm_decode_token(
            len(run),
            descs,
            self.x.data_ptr(),
            kcs,
            vcs,
            cache.k[0].shape[1],
            pos,
            cos,
            sin,
            self.ids.data_ptr(),
            self.wts.data_ptr(),
            self.uses.ctypes.data,
            self.model.output_norm.data_ptr(),
            self.model.spec.rms_eps,
            ctypes.byref(self.head),
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("lm_decode_token could not allocate its scratch buffers")
        return logits

    def absorb_uses(self) -> None:
        """Give the stats the routed uses `token` counted since the last call (all hits: every
        expert resident). Running totals, read then differenced: a count landing meanwhile is
        given next time, never lost."""
        now = self.uses.copy()
        delta, self._uses_seen = now - self._uses_seen, now
        if delta.any():
            self.stats.add_uses(delta)

    def close(self) -> None:
        """The plan is replaced: its last counts go to the stats, and its hook with them."""
        if self.stats is not None:
            self.absorb_uses()
            self.stats.remove_on_snapshot(self.absorb_uses)
            self.stats = None

    def count(self, stats: Any, layers: list[int]) -> None:
        """Record this token's routed uses of `layers` (all resident: hits) in the stats."""
        s = self.model.spec
        ids = self.ids.numpy()[layers]  # [len(layers), k]
        # (layer, expert) as one index: one bincount, not an np.add.at per layer
        flat = (np.asarray(layers, dtype=np.int64)[:, None] * s.n_expert + ids).reshape(-1)
        stats.add_uses(np.bincount(flat, minlength=s.n_layer * s.n_expert).reshape(s.n_layer, s.n_expert))


def _embedding_row(model: Any, tok: ctypes.c_int64) -> tuple[Any, int] | None:
    """(a function writing the embedding row of token tok.value to a float32 [D] address, the number
    of rows) for a table one C call reads without torch — the repacked one (lm_r16_rows) or, in
    place, a one-part ggml one (lg_rows) — where no scale applies; None otherwise."""
    s, packed, mapped = model.spec, model.embd_packed, model.embd_mapped
    if s.embd_scale != 1.0:
        return None
    if packed is not None and packed.r16 and _unpadded_vnni(packed) and packed.k == s.n_embd:
        lib, desc = vnni_lib(), _desc(packed)
        if lib is None:
            return None
        return (lambda out: lib.lm_r16_rows(ctypes.byref(desc), ctypes.byref(tok), 1, out)), packed.n
    one_part = mapped is not None and mapped.backend == "ggml" and len(mapped.parts) == 1
    if packed is None and one_part and mapped.k == s.n_embd:
        from .ggml_backend import ggml

        raw = mapped.tensors["raw0"]
        read = ggml().row_reader(raw, mapped.parts[0][0], mapped.k)
        return None if read is None else ((lambda out: read(tok, out)), raw.shape[0])
    return None


def _layer(model: Any, i: int, lw: Any) -> tuple[_Layer, list[Any]] | None:
    """Layer i's descriptor, or None where the layer is not exactly what lm_decode_layer computes."""
    from ..layers.attention import GQA
    from ..layers.moe import MoE

    s, a, m = model.spec, lw.attn, lw.moe
    if lw.run is not None or not isinstance(a, GQA) or not isinstance(m, MoE) or s.n_expert_used < 1:
        return None
    plain_attn = (
        len(a.wqkv) in (1, 3)  # lm_decode_layer's q | k | v pass takes one weight or one per type
        and all(_unpadded_vnni(w) for w in a.wqkv)
        and _unpadded_vnni(a.wo)
        and a.fused_qk_norm_rope
        and a.c_decode  # (granted to windowed and sink layers as well: the checks below keep those out)
        and a.qk_norm in ("none", "per_head")
        and not a.out_gate
        and not a.v_from_k
        and a.v_norm is None
        and a.sinks is None
        and not s.is_swa(i)  # lm_decode_layer attends over every position (its lm_attn_decode: no window)
        and a.spec is None
        and a.rope is None
        and all(b is None for b in (a.bq, a.bk, a.bv, a.bo))
    )
    r = m.router
    plain_moe = (
        m.shared is None
        and m.shared_gate is None
        and m.expert_norm is None
        and m.expert_scale is None
        and r.c_router
        and r.probs_bias is None
        and r.bias is None
        and r.input_scale is None
    )
    q_norm, k_norm = (a.q_norm, a.k_norm) if a.qk_norm == "per_head" else (None, None)
    if not plain_attn or not plain_moe:
        return None
    if not all(_f32(t) for t in (lw.attn_norm, lw.ffn_norm, q_norm, k_norm, r.weight)):
        return None
    if lw.attn_norm is None or lw.ffn_norm is None or tuple(r.weight.shape) != (s.n_expert, s.n_embd):
        return None
    store = model.experts.store
    ws = [store.repacked(i, e) for e in range(s.n_expert)]  # kept alive below, whatever the store does later
    if any(w is None or not w.plain for w in ws):
        return None
    shape = lambda w: (w.gate_up.n, w.gate_up.k, w.down.n, _kp(w.down))  # noqa: E731
    if any(not _unpadded_vnni(w.gate_up) or w.down.backend != "vnni" or shape(w) != shape(ws[0]) for w in ws):
        return None
    if ws[0].gate_up.k != s.n_embd or ws[0].down.n != s.n_embd:
        return None
    gate_up = (_WeightDesc * s.n_expert)(*(_desc(w.gate_up) for w in ws))
    down = (_WeightDesc * s.n_expert)(*(_desc(w.down) for w in ws))
    qkv, wo = (_WeightDesc * len(a.wqkv))(*(_desc(w) for w in a.wqkv)), _desc(a.wo)
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
    desc = _Layer(
        ptr(lw.attn_norm),
        ptr(lw.ffn_norm),
        ptr(q_norm),
        ptr(k_norm),
        ptr(r.weight),
        ctypes.addressof(qkv),
        ctypes.addressof(wo),
        ctypes.addressof(gate_up),
        ctypes.addressof(down),
        len(a.wqkv),
        s.n_embd,
        s.n_head,
        s.n_head_kv,
        s.head_dim,
        s.head_dim_v,
        s.n_rot,
        int(model.rope.neox),
        s.n_expert,
        s.n_expert_used,
        int(s.norm_topk),
        s.rms_eps,
        s.kq_scale,
        s.expert_weights_scale,
    )
    qkv_rows = (s.n_head + s.n_head_kv) * s.head_dim + s.n_head_kv * s.head_dim_v
    if sum(w.n for w in a.wqkv) != qkv_rows or wo.K != s.n_head * s.head_dim_v:
        return None
    return desc, [qkv, wo, gate_up, down, ws, lw, r]
