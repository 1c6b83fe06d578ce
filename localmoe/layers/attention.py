"""Grouped-query attention with what the GQA architectures add, each optional: biases on q, k, v
and the output, an RMS norm of q and k (over each head, or over all heads at once), learned
per-head sinks, a sliding window on the layers the file marks (ModelSpec.is_swa), and an output
gate computed beside the queries (Qwen3.5: the attention's output × sigmoid(gate) before Wo).

    qkv = [q | k | v (| gate)] = h·Wqkv (+ biases) → q/k norm → RoPE
    out = causal (windowed) softmax(q·kᵀ·scale (+ sink))·v (× sigmoid(gate)) → ·Wo (+ bias)

Shapes: T tokens in this call, S positions in the KV cache, D = n_embd, H heads, Hkv KV heads,
d head size, dv value head size; query head h reads KV head h // (H / Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..compute.kernels import QLinear, attn_decode, qk_norm_rope, rms_norm
from ..gguf import names
from .block import Weights


@dataclass
class GQA:
    wqkv: list[QLinear]  # [H·d + Hkv·d + Hkv·dv (+ H·dv), D]: one matrix when q, k, v (, gate) share a quant type
    wo: QLinear  # [D, H·dv]
    qk_norm: str = "none"  # archs.common.QKNorm: "none", "per_head" (weights [d]) or "full" (weights [H·d])
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    bq: torch.Tensor | None = None  # [H·d]
    bk: torch.Tensor | None = None  # [Hkv·d]
    bv: torch.Tensor | None = None  # [Hkv·dv]
    bo: torch.Tensor | None = None  # [D]
    sinks: torch.Tensor | None = None  # [H]: one extra logit per head in the softmax's denominator
    fused_qk_norm_rope: bool = False  # the C q/k-norm + RoPE may run (archs.common.fast_paths)
    c_decode: bool = False  # the C decode attention may run
    out_gate: bool = False  # wqkv's last H·dv outputs gate the attention's output (× sigmoid) before Wo
    v_from_k: bool = False  # no V projection: the values are the keys' projection, before the k norm (wqkv is [q | k])
    v_norm: torch.Tensor | None = None  # [dv]: the values RMS-normed over each head (all ones: without a weight)
    spec: Any = None  # this layer's own shape (heads, head size, RoPE dims) where it differs from the model's
    rope: Any = None  # this layer's own rotation where it differs from the model's (layers/rope.Rope)
    cache_dtype: ClassVar[torch.dtype | None] = None  # keys and values in the cache's type (LoadOptions.kv_type)

    @classmethod
    def load(
        cls,
        w: Weights,
        i: int,
        *,
        qk_norm: str = "none",
        biases: bool = False,
        sinks: bool = False,
        fast: frozenset[str] = frozenset(),
        v_norm: bool = False,
        spec: Any = None,
        rope: Any = None,
    ) -> GQA:
        """Layer i's attention. A per-head q/k norm runs only where the file has its weights (GLM).
        A layer without attn_v uses its keys' projection as values (Gemma 4's global layers);
        v_norm: the values RMS-normed per head without a weight; spec, rope: the layer's own."""
        blk = lambda stem, kind="weight": names.blk(i, stem, kind)  # noqa: E731
        bias = (lambda stem: w.maybe(blk(stem, "bias"))) if biases else (lambda stem: None)
        v_from_k = not w.has(blk(names.ATTN_V))
        s = spec if spec is not None else w.spec
        return cls(
            wqkv=w.qkv(i, with_v=not v_from_k),
            v_from_k=v_from_k,
            v_norm=torch.ones(s.head_dim_v, device=w.device) if v_norm else None,
            spec=spec,
            rope=rope,
            wo=w.linear(blk(names.ATTN_OUT)),
            qk_norm=qk_norm,
            q_norm=w.maybe(blk(names.ATTN_Q_NORM)) if qk_norm != "none" else None,
            k_norm=w.maybe(blk(names.ATTN_K_NORM)) if qk_norm != "none" else None,
            bq=bias(names.ATTN_Q),
            bk=bias(names.ATTN_K),
            bv=bias(names.ATTN_V),
            bo=bias(names.ATTN_OUT),
            sinks=w.maybe(blk(names.ATTN_SINKS)) if sinks else None,
            fused_qk_norm_rope="fused_qk_norm_rope" in fast,
            c_decode="c_decode_attention" in fast,
        )

    @staticmethod
    def _widths(s: Any) -> list[int]:
        return [s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.n_head_kv * s.head_dim_v]  # q, k, v in qkv

    def cache_rows(self, s: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        s = s if self.spec is None else self.spec
        return (s.n_head_kv, s.head_dim), (s.n_head_kv, s.head_dim_v)

    def _fused_qk_norm_rope(self, s: Any, qkv: torch.Tensor, pos0: int, rope: Any) -> bool:
        """Per-head q/k norm and RoPE in place on qkv with one C call (decode's per-op overhead is a
        large share of a token); False when this layer needs the general path."""
        if not self.fused_qk_norm_rope or qkv.device.type != "cpu" or self.v_from_k or self.v_norm is not None:
            return False
        per_head = self.qk_norm == "per_head"
        T = qkv.shape[0]
        cos, sin = rope.tables(pos0, T, qkv.device)
        q_norm, k_norm = (self.q_norm, self.k_norm) if per_head else (None, None)
        return qk_norm_rope(
            qkv,
            s.n_head + s.n_head_kv,
            s.n_head,
            s.head_dim,
            q_norm,
            k_norm,
            s.rms_eps,
            s.n_rot,
            cos.reshape(T, -1),
            sin.reshape(T, -1),
            rope.neox,
        )

    def __call__(self, s: Any, i: int, h: torch.Tensor, cache: Any, pos0: int, rope: Any) -> torch.Tensor:
        """h [T, D] (normed) → attention output [T, D]; appends this call's K/V to layer i's cache."""
        T = h.shape[0]
        if self.spec is not None:
            s = self.spec
        if self.rope is not None:
            rope = self.rope
        qkv = (
            self.wqkv[0](h) if len(self.wqkv) == 1 else torch.cat([w(h) for w in self.wqkv], dim=-1)
        )  # [T, (H+2Hkv)d (+H·dv)]
        gate = None
        if self.out_gate:  # the gate columns stay where they are; q, k, v are the leading ones
            gate = qkv[:, sum(self._widths(s)) :]
        if not self._fused_qk_norm_rope(s, qkv, pos0, rope):  # the general path: biases, a norm over all heads, no C
            if self.v_from_k:  # [q | k]: v is k as projected
                q, k = qkv.split(self._widths(s)[:2], dim=-1)
                v = k
            else:
                q, k, v = qkv[:, : sum(self._widths(s))].split(self._widths(s), dim=-1)
            q, k, v = (t if b is None else t + b for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
            if self.qk_norm == "full":  # RMS-norm over all heads at once (OLMoE)
                q = rms_norm(q, self.q_norm, s.rms_eps)
                k = rms_norm(k, self.k_norm, s.rms_eps)
            q = q.reshape(T, s.n_head, s.head_dim)
            k = k.reshape(T, s.n_head_kv, s.head_dim)
            if self.qk_norm == "per_head" and self.q_norm is not None:  # over each head (Qwen3; GLM files with weights)
                q = rms_norm(q, self.q_norm, s.rms_eps)
                k = rms_norm(k, self.k_norm, s.rms_eps)
            if self.v_norm is not None:
                v = rms_norm(v.reshape(T, s.n_head_kv, s.head_dim_v), self.v_norm, s.rms_eps).flatten(1)
            qkv = torch.cat([rope(torch.cat([q, k], dim=1), pos0).flatten(1), v], dim=-1)
        elif gate is not None:
            qkv = qkv[:, : sum(self._widths(s))]  # (one row: still contiguous, as the C decode needs)
        scale = s.kq_scale
        # decode: cache append + attention (its window and sinks too) in one C call; otherwise (or
        # without the kernel) torch
        out = None
        if T == 1 and self.c_decode:
            n_swa = s.n_swa if s.is_swa(i) else 0  # (0: no window on this layer)
            heads = (s.n_head, s.n_head_kv, s.head_dim, s.head_dim_v)
            out = attn_decode(qkv, cache.k[i], cache.v[i], pos0, *heads, scale, n_swa=n_swa, sinks=self.sinks)
        if out is None:
            out = self._sdpa(s, i, qkv, cache, pos0, scale)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out = self.wo(out)
        return out + self.bo if self.bo is not None else out

    def _sdpa(self, s: Any, i: int, qkv: torch.Tensor, cache: Any, pos0: int, scale: float) -> torch.Tensor:
        """torch's attention for qkv [T, ...] (q/k normed and rotated) at positions pos0..: appends
        K/V to layer i's cache, returns [T, H·dv]."""
        T = qkv.shape[0]
        q, k, v = qkv.split(self._widths(s), dim=-1)
        q = q.view(T, s.n_head, s.head_dim)
        k = k.view(T, s.n_head_kv, s.head_dim)
        v = v.view(T, s.n_head_kv, s.head_dim_v)
        cache.k[i][:, pos0 : pos0 + T] = k.transpose(0, 1)
        cache.v[i][:, pos0 : pos0 + T] = v.transpose(0, 1)
        S = pos0 + T
        # [Hkv, S, d] / [Hkv, S, dv] in the queries' type (the cache's may be float16: its rows as cached)
        keys, vals = cache.k[i][:, :S].to(q.dtype), cache.v[i][:, :S].to(q.dtype)
        group = s.n_head // s.n_head_kv  # query head h reads KV head h // group
        qh = q.transpose(0, 1).reshape(s.n_head_kv, group * T, s.head_dim)  # [Hkv, group·T, d]: row g·T + t
        if self.sinks is not None or s.is_swa(i):
            n_swa = s.n_swa if s.is_swa(i) else 0
            out = attend_explicit(qh, keys, vals, pos0, T, scale, self.sinks, n_swa)  # [Hkv, group·T, dv]
            return out.view(s.n_head, T, s.head_dim_v).transpose(0, 1).reshape(T, s.n_head * s.head_dim_v)
        mask = None
        if T > 1:  # query t sees keys up to pos0 + t (a single new token sees every key)
            pos = torch.arange(pos0, pos0 + T, device=qkv.device)
            mask = (torch.arange(S, device=qkv.device)[None, :] <= pos[:, None]).repeat(group, 1)  # [group·T, S]
        out = F.scaled_dot_product_attention(qh[None], keys[None], vals[None], attn_mask=mask, scale=scale)
        # out [1, Hkv, group·T, dv]
        return out.view(s.n_head, T, s.head_dim_v).transpose(0, 1).reshape(T, s.n_head * s.head_dim_v)


# The most score elements attend_explicit holds at once (float32: 64 MiB): a prompt's queries go in
# blocks under it. Whole, a 4096-token prompt of gpt-oss's shape (64 heads) made [64, 4096, 4096]
# scores and their masked and softmaxed copies, ≈ 9 GiB more peak memory for a 4-layer file.
EXPLICIT_SCORES = 1 << 24


def attend_explicit(
    qh: torch.Tensor,
    keys: torch.Tensor,
    vals: torch.Tensor,
    pos0: int,
    T: int,
    scale: float,
    sinks: torch.Tensor | None,
    n_swa: int,
) -> torch.Tensor:
    """Attention with what SDPA has no argument for, as llama.cpp's soft_max_ext computes it.
    qh [Hkv, group·T, d] (row g·T + t is query head kvh·group + g at position pos0 + t), keys
    [Hkv, S, d], vals [Hkv, S, dv] → [Hkv, group·T, dv]. Query p sees key p0 when p0 ≤ p and,
    with a window (n_swa > 0), p − p0 < n_swa. A sink is one more logit per head, unscaled, in
    the softmax's denominator only: it takes probability mass and gives back no value. The queries
    go in blocks of positions whose scores fit EXPLICIT_SCORES, each block against only the keys
    it can see (from its first query's window start to its last query)."""
    Hkv, GT, d = qh.shape
    group = GT // T
    q4 = qh.view(Hkv, group, T, d)
    out = qh.new_empty(Hkv, group, T, vals.shape[-1])
    sink = None if sinks is None else sinks.view(Hkv, group, 1, 1).to(qh.dtype)
    per_query = EXPLICIT_SCORES // (Hkv * group)  # score elements a block may hold per (KV head, group row)
    if n_swa > 0:  # at most n_swa queries a block: each sees ≤ 2·n_swa keys between them
        block = max(1, min(n_swa, per_query // (2 * n_swa)))
    else:  # each query sees at most all the keys
        block = max(1, per_query // keys.shape[1])
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        lo = max(0, pos0 + t0 - n_swa + 1) if n_swa > 0 else 0  # the first key any of these queries sees
        hi = pos0 + t1  # one past the last
        scores = (q4[:, :, t0:t1] @ keys[:, None, lo:hi].transpose(-1, -2)) * scale  # [Hkv, group, tb, hi - lo]
        q_pos = torch.arange(pos0 + t0, pos0 + t1, device=qh.device)[:, None]
        k_pos = torch.arange(lo, hi, device=qh.device)[None, :]
        hidden = k_pos > q_pos
        if n_swa > 0:
            hidden |= q_pos - k_pos >= n_swa
        scores = scores.masked_fill(hidden, float("-inf"))
        if sink is not None:
            scores = torch.cat([scores, sink.expand(Hkv, group, t1 - t0, 1)], dim=-1)
        probs = scores.softmax(-1)[..., : hi - lo]
        out[:, :, t0:t1] = probs @ vals[:, None, lo:hi]
    return out.view(Hkv, GT, -1)
