"""The forward pass, read from the architecture's declarations (localmoe/archs/) and the ModelSpec.

Mirrors llama.cpp's graphs (src/models/{qwen3moe,qwen2moe,olmoe,llama,deepseek2,glm4-moe,openai-moe}.cpp) step for step:

    x = embd[ids]
    per layer:  h = rms(x)·attn_norm → attention: GQA (q,k,v (+bias) → qk-norm → RoPE → causal
                    attention, windowed on SWA layers, with per-head sinks → wo (+bias)) or MLA
                    (archs declare which)
                x = x + attn
                h = rms(x)·ffn_norm → a dense SwiGLU (leading dense layers), or
                    router (archs/common.route_reference) → experts(h, ids, w) (+ shared expert)
                x = x + ffn
    logits = output · (rms(x)·output_norm)

No step asks for the architecture's name: a C fast path runs only when archs.common.fast_paths
says the declarations fit it.

Shapes in comments: T tokens in this call, S positions in the KV cache, D = n_embd, H heads,
Hkv KV heads, d head size, E experts, k experts used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .archs.common import fast_paths, rope_theta_scale, route_reference
from .compute import kernels
from .gguf import names
from .compute.experts import ExpertWeights, pack_ffn, swiglu_expert
from .gguf.file import GGUFModel, ModelSpec, TensorView
from .compute.counters import to_device
from .compute.kernels import QLinear, attn_decode, fuse_rows, gather_rows, native_lib, qk_norm_rope, repack, rms_norm, route
from .compute.ggml_backend import ggml
from .gguf.blocks import QUANT_TYPES, dequantize, raw_bytes, to_torch


class ExpertFn(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...

    def after_attention(self, layer: int, x: torch.Tensor) -> None:
        """Called with the residual stream [T, D] after each layer's attention (for prefetch)."""


@dataclass
class MLAWeights:
    """DeepSeek's multi-head latent attention, in llama.cpp's absorbed form: the cache holds the
    compressed KV (kv_lora_rank) and the rotated key part (n_rot) per position."""

    wq: QLinear | None  # [H·(nope+rope), D] (q_lora_rank 0)
    wq_a: QLinear | None  # [q_lora_rank, D]
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    wq_b: QLinear | None  # [H·(nope+rope), q_lora_rank]
    wkv_a: QLinear  # [kv_lora_rank + rope, D]
    kv_a_norm: torch.Tensor  # [kv_lora_rank]
    k_b: torch.Tensor  # [H, kv_lora_rank, nope]
    v_b: torch.Tensor  # [H, v, kv_lora_rank]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wqkv: list[QLinear]  # [H*d + Hkv*d + Hkv*dv, D] as one matrix when q, k, v share a quant type, else three (GQA; [] for MLA)
    wo: QLinear  # [D, H*dv]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    q_norm: torch.Tensor | None  # [d] (per_head) or [H*d] (full)
    k_norm: torch.Tensor | None
    ffn_norm: torch.Tensor  # [D]
    router: torch.Tensor | None  # [E, D]; None in a layer without experts
    shared: ExpertWeights | None
    shared_gate: torch.Tensor | None  # [D] (a gated shared expert)
    dense: ExpertWeights | None = None  # the FFN of a layer without experts
    probs_bias: torch.Tensor | None = None  # [E]: added to the routing scores to select, not to weigh
    router_bias: torch.Tensor | None = None  # [E]: added to the router's logits (gpt-oss)
    sinks: torch.Tensor | None = None  # [H]: one extra logit per head in the attention softmax (gpt-oss)
    mla: MLAWeights | None = None


class KVCache:
    """Per-layer keys and values for positions 0..n-1; grows by doubling up to n_ctx. MLA layers
    keep one latent row per position (kv_lora_rank compressed KV + n_rot rotated key) in k, and
    no v."""

    def __init__(self, spec: ModelSpec, n_ctx: int, device: torch.device):
        self.spec, self.n_ctx, self.device = spec, n_ctx, device
        self.n = 0
        self._cap = 0
        self.k: list[torch.Tensor] = []  # per layer [Hkv, cap, d]
        self.v: list[torch.Tensor] = []  # per layer [Hkv, cap, dv]

    def reserve(self, n_total: int) -> None:
        if n_total <= self._cap:
            return
        cap = min(self.n_ctx, max(n_total, 2 * self._cap, 64))
        s = self.spec
        mla = s.arch.attention == "mla"
        for i in range(s.n_layer):
            if mla:
                k = torch.zeros(1, cap, s.kv_lora_rank + s.n_rot, device=self.device)
                v = torch.zeros(1, 0, 0, device=self.device)
            else:
                k = torch.zeros(s.n_head_kv, cap, s.head_dim, device=self.device)
                v = torch.zeros(s.n_head_kv, cap, s.head_dim_v, device=self.device)
            if self._cap:
                k[:, : self.n] = self.k[i][:, : self.n]
                if v.numel():
                    v[:, : self.n] = self.v[i][:, : self.n]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
        self._cap = cap

    def clear(self) -> None:
        self.n = 0



class MoEModel:
    def __init__(self, model: GGUFModel, experts: ExpertFn, device: torch.device):
        self.gguf = model
        self.spec = spec = model.spec
        self.device = device
        self.experts = experts

        def load(name: str) -> torch.Tensor:  # small tensors (norms, biases, router): float32
            v = model.view(name)
            return to_torch(v.data, v.qtype, v.shape, device)

        def maybe(name: str) -> torch.Tensor | None:
            return load(name) if model.has(name) else None

        def raw(name: str) -> tuple:  # a weight matrix as (data, quant type, [rows, cols])
            v = model.view(name)
            return v.data, v.qtype, v.shape

        def copied(w: QLinear, mats: list[tuple]) -> QLinear:
            """w, made from `mats`; their pages of the file are released when w is a copy (a
            repacked or dequantized layout, not ggml's or the GPU's view of the file's bytes)."""
            if w.backend in ("vnni", "int4", "bf16") and device.type == "cpu":  # ("f32" may be a view of the file)
                model.release([m[0] for m in mats])
            return w

        def linear(name: str) -> QLinear:  # a weight matrix, repacked for the fast kernels
            m = raw(name)
            return copied(repack(*m, device=device), [m])

        def qkv(i: int) -> list[QLinear]:
            mats = [raw(names.blk(i, p)) for p in (names.ATTN_Q, names.ATTN_K, names.ATTN_V)]
            if len({m[1] for m in mats}) == 1:
                return [copied(fuse_rows(mats, device), mats)]
            return [copied(repack(*m, device=device), [m]) for m in mats]

        arch = spec.arch
        self.fast = fast_paths(spec)  # the C fast paths this architecture's declarations allow

        def dense_ffn(i: int, stems: tuple[str, str, str]) -> ExpertWeights:
            return pack_ffn(*(raw(names.blk(i, p)) for p in stems), device=device)

        def mla(i: int) -> MLAWeights:
            blk = lambda stem: names.blk(i, stem)  # noqa: E731
            if model.has(blk(names.ATTN_K_B)):
                k_b = load(blk(names.ATTN_K_B))  # [H, r, nope]
                v_b = load(blk(names.ATTN_V_B))  # [H, v, r]
            else:  # older files: one kv_b [H·(nope+v), r], split as llama.cpp's converter splits it
                kv_b = load(blk(names.ATTN_KV_B)).view(spec.n_head, -1, spec.kv_lora_rank)
                nope = spec.head_dim - spec.n_rot
                k_b, v_b = kv_b[:, :nope].transpose(1, 2).contiguous(), kv_b[:, nope:].contiguous()
            lora = spec.q_lora_rank > 0
            return MLAWeights(
                wq=None if lora else linear(blk(names.ATTN_Q)),
                wq_a=linear(blk(names.ATTN_Q_A)) if lora else None,
                q_a_norm=load(blk(names.ATTN_Q_A_NORM)) if lora else None,
                wq_b=linear(blk(names.ATTN_Q_B)) if lora else None,
                wkv_a=linear(blk(names.ATTN_KV_A_MQA)),
                kv_a_norm=load(blk(names.ATTN_KV_A_NORM)),
                k_b=k_b,
                v_b=v_b,
            )

        self.layers: list[LayerWeights] = []
        for i in range(spec.n_layer):
            moe_layer = spec.is_moe(i)
            shared = None
            if moe_layer and arch.shared_expert != "none":
                shared = dense_ffn(i, (names.FFN_GATE_SHEXP, names.FFN_UP_SHEXP, names.FFN_DOWN_SHEXP))
            gqa = arch.attention == "gqa"
            bias = (lambda stem: maybe(names.blk(i, stem, "bias"))) if arch.qkv_bias else (lambda stem: None)
            self.layers.append(
                LayerWeights(
                    attn_norm=load(names.blk(i, names.ATTN_NORM)),
                    wqkv=qkv(i) if gqa else [],
                    wo=linear(names.blk(i, names.ATTN_OUT)),
                    bq=bias(names.ATTN_Q),
                    bk=bias(names.ATTN_K),
                    bv=bias(names.ATTN_V),
                    bo=bias(names.ATTN_OUT),
                    q_norm=maybe(names.blk(i, names.ATTN_Q_NORM)) if arch.qk_norm != "none" else None,
                    k_norm=maybe(names.blk(i, names.ATTN_K_NORM)) if arch.qk_norm != "none" else None,
                    ffn_norm=load(names.blk(i, arch.ffn_norm)),
                    router=load(names.blk(i, names.FFN_GATE_INP)).reshape(spec.n_expert, spec.n_embd) if moe_layer else None,
                    shared=shared,
                    shared_gate=load(names.blk(i, names.FFN_GATE_INP_SHEXP)).reshape(-1) if moe_layer and arch.shared_expert == "gated" else None,
                    dense=None if moe_layer else dense_ffn(i, (names.FFN_GATE, names.FFN_UP, names.FFN_DOWN)),
                    probs_bias=maybe(names.blk(i, names.FFN_EXP_PROBS_B, "bias")) if moe_layer else None,
                    router_bias=maybe(names.blk(i, names.FFN_GATE_INP, "bias")) if moe_layer and arch.router_bias else None,
                    sinks=maybe(names.blk(i, names.ATTN_SINKS)) if arch.sinks else None,
                    mla=None if gqa else mla(i),
                )
            )
        self.embd: TensorView = model.view(names.TOKEN_EMBD)
        self.output_norm = load(names.OUTPUT_NORM)
        self.output = linear(names.OUTPUT) if model.has(names.OUTPUT) else linear(names.TOKEN_EMBD)  # [V, D]; tied when absent
        # the embedding in the C kernel's row-block layout for one-call lookups (CPU) when the output
        # head is tied to it (that layout exists anyway). An untied table is not repacked just for
        # lookups: a 201k × 2880 one (gpt-oss) would cost ~5 s of load and its size again in RAM,
        # where ggml reads the few rows a call needs from the file (embd_mapped, also one C call).
        self.embd_packed: QLinear | None = None
        if "embedding_gather" in self.fast and device.type == "cpu" and not model.has(names.OUTPUT) and self.output.r16:
            self.embd_packed = self.output
        self.embd_mapped: QLinear | None = None  # else the table in place, its rows read by ggml (one C call)
        if self.embd_packed is None and self.embd.qtype in QUANT_TYPES and ggml() is not None and ggml().computes(self.embd.qtype):
            self.embd_mapped = kernels.ggml_weight([(raw_bytes(self.embd.data, self.embd.shape[0]), self.embd.qtype, self.embd.shape[0])], spec.n_embd)
        # θ_i(pos) = pos · theta_scale[i]: base^(-2i/n_rot) (float64 then rounded once, like ggml's
        # float powers), YaRN-mixed when the file says so; cos/sin times rope_mscale
        self.inv_freq, self.rope_mscale = rope_theta_scale(spec)

    # -- pieces -----------------------------------------------------------------------------------
    def dense_bytes(self) -> int:
        """Bytes of the dense (non-expert) weights as placed on the compute device (repacked)."""
        n = self.output_norm.numel() * 4 + self.output.nbytes + self.embd.n_bytes
        for lw in self.layers:
            n += sum(t.numel() * t.element_size() for t in vars(lw).values() if isinstance(t, torch.Tensor))
            n += sum(w.nbytes for w in lw.wqkv) + lw.wo.nbytes
            n += sum(f.nbytes for f in (lw.shared, lw.dense) if f is not None)
            if lw.mla is not None:
                n += sum(t.nbytes for t in vars(lw.mla).values() if isinstance(t, QLinear))
                n += sum(t.numel() * t.element_size() for t in vars(lw.mla).values() if isinstance(t, torch.Tensor))
        # routed-expert biases (gpt-oss): float32 beside the experts' bytes, on the compute device
        n += sum(t.n_bytes for name, t in self.gguf.tensors.items() if name.endswith(".bias") and any(f".{p}." in name for p in names.EXPERT_BIAS_PARTS))
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

    def rope_tables(self, pos0: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions pos0 .. pos0+T-1 → (cos, sin) [T, 1, n_rot/2] float32 on `device`: slices of
        tables computed once for every position so far (doubling), so a decode step runs no
        trigonometry. Keyed on host integers: no device readback."""
        cached = getattr(self, "_rope", None)
        if cached is None or cached[0] != device or cached[1].shape[0] < pos0 + T:
            n = max(pos0 + T, 256, 2 * cached[1].shape[0] if cached is not None and cached[0] == device else 0)
            pos = torch.arange(n, dtype=torch.float64, device=device)
            if self.spec.rope_scaling == "yarn":  # the frequency scale is inside inv_freq
                theta = pos[:, None] * self.inv_freq.to(device)[None, :]  # [n, n_rot/2]
            else:
                theta = (pos * self.spec.rope_freq_scale)[:, None] * self.inv_freq.to(device)[None, :]
            cos, sin = torch.cos(theta), torch.sin(theta)
            if self.rope_mscale != 1.0:
                cos, sin = cos * self.rope_mscale, sin * self.rope_mscale
            cached = self._rope = (device, cos.float()[:, None, :], sin.float()[:, None, :])
        return cached[1][pos0 : pos0 + T], cached[2][pos0 : pos0 + T]

    def rope(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x [T, heads, d] at positions pos0.. → x with its first n_rot dims of every head rotated."""
        s = self.spec
        cos, sin = (t.to(x.dtype) for t in self.rope_tables(pos0, x.shape[0], x.device))
        rot, rest = x[..., : s.n_rot], x[..., s.n_rot :]
        if s.arch.rope_style == "neox":
            x0, x1 = rot[..., : s.n_rot // 2], rot[..., s.n_rot // 2 :]
            out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        else:  # "norm": adjacent pairs
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1) if rest.numel() else out

    def _fused_qk_norm_rope(self, lw: LayerWeights, qkv: torch.Tensor, pos0: int) -> bool:
        """Per-head q/k norm and RoPE in place on qkv with one C call (decode's per-op overhead is a
        large share of a token); False when this layer needs the general path."""
        s = self.spec
        if "fused_qk_norm_rope" not in self.fast or qkv.device.type != "cpu":
            return False
        per_head = s.arch.qk_norm == "per_head"
        T = qkv.shape[0]
        cos, sin = self.rope_tables(pos0, T, qkv.device)
        return qk_norm_rope(qkv, s.n_head + s.n_head_kv, s.n_head, s.head_dim, lw.q_norm if per_head else None, lw.k_norm if per_head else None,
                            s.rms_eps, s.n_rot, cos.reshape(T, -1), sin.reshape(T, -1), s.arch.rope_style == "neox")

    def attention(self, i: int, h: torch.Tensor, cache: KVCache, pos0: int) -> torch.Tensor:
        """h [T, D] (normed) → attention output [T, D]; appends this call's K/V to the cache."""
        if self.spec.arch.attention == "mla":
            return self.attention_mla(i, h, cache, pos0)
        s, lw = self.spec, self.layers[i]
        T = h.shape[0]
        qkv = lw.wqkv[0](h) if len(lw.wqkv) == 1 else torch.cat([w(h) for w in lw.wqkv], dim=-1)  # [T, (H + 2 Hkv) d]
        if not self._fused_qk_norm_rope(lw, qkv, pos0):  # the general path: biases, OLMoE's norm, no C kernel
            q, k, v = qkv.split([s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.n_head_kv * s.head_dim_v], dim=-1)
            q, k, v = (t if b is None else t + b for t, b in ((q, lw.bq), (k, lw.bk), (v, lw.bv)))
            if s.arch.qk_norm == "full":  # OLMoE: RMS-norm over all heads at once
                q = rms_norm(q, lw.q_norm, s.rms_eps)
                k = rms_norm(k, lw.k_norm, s.rms_eps)
            q = q.reshape(T, s.n_head, s.head_dim)
            k = k.reshape(T, s.n_head_kv, s.head_dim)
            if s.arch.qk_norm == "per_head" and lw.q_norm is not None:  # Qwen3 (and GLM files with the weights): RMS-norm over each head
                q = rms_norm(q, lw.q_norm, s.rms_eps)
                k = rms_norm(k, lw.k_norm, s.rms_eps)
            qkv = torch.cat([self.rope(torch.cat([q, k], dim=1), pos0).flatten(1), v], dim=-1)
        scale = s.kq_scale
        # decode: cache append + attention in one C call; otherwise (or without the kernel) torch
        out = None
        if T == 1 and "c_decode_attention" in self.fast:
            out = attn_decode(qkv, cache.k[i], cache.v[i], pos0, s.n_head, s.n_head_kv, s.head_dim, s.head_dim_v, scale)
        if out is None:
            out = self._sdpa(i, qkv, cache, pos0, scale)
        out = lw.wo(out)
        return out + lw.bo if lw.bo is not None else out

    def attention_mla(self, i: int, h: torch.Tensor, cache: KVCache, pos0: int) -> torch.Tensor:
        """DeepSeek's MLA as llama.cpp runs it (absorbed): h [T, D] → [T, D]. The cache row of a
        position is [rms(kv_c)·kv_a_norm | RoPE(k_pe)] [r + rope]; a query head scores it with
        [k_b·q_nope | RoPE(q_pe)], reads the compressed values back, and v_b decompresses them."""
        s, lw = self.spec, self.layers[i]
        m = lw.mla
        T, H, r, rope = h.shape[0], s.n_head, s.kv_lora_rank, s.n_rot
        nope = s.head_dim - rope
        q = m.wq(h) if m.wq is not None else m.wq_b(rms_norm(m.wq_a(h), m.q_a_norm, s.rms_eps))  # [T, H·(nope+rope)]
        q = q.view(T, H, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        kv = m.wkv_a(h)  # [T, r + rope]
        kv_c = rms_norm(kv[:, :r].contiguous(), m.kv_a_norm, s.rms_eps)  # [T, r]
        k_pe = self.rope(kv[:, None, r:], pos0)[:, 0]  # [T, rope]
        q_pe = self.rope(q_pe, pos0)  # [T, H, rope]
        q_abs = torch.einsum("thn,hrn->htr", q_nope, m.k_b)  # [H, T, r]
        latent = cache.k[i][0]  # [cap, r + rope]
        latent[pos0 : pos0 + T] = torch.cat([kv_c, k_pe], dim=-1)
        S = pos0 + T
        keys = latent[:S]
        scores = (q_abs @ keys[:, :r].T + q_pe.transpose(0, 1) @ keys[:, r:].T) * s.kq_scale  # [H, T, S]
        if T > 1:  # query t sees keys up to pos0 + t
            pos = torch.arange(pos0, pos0 + T, device=h.device)
            scores = scores.masked_fill(torch.arange(S, device=h.device)[None, :] > pos[:, None], float("-inf"))
        o_lat = scores.softmax(-1) @ keys[:, :r]  # [H, T, r]
        o = torch.einsum("htr,hvr->thv", o_lat, m.v_b)  # [T, H, v]
        return lw.wo(o.reshape(T, H * s.head_dim_v))

    def _sdpa(self, i: int, qkv: torch.Tensor, cache: KVCache, pos0: int, scale: float) -> torch.Tensor:
        """torch's attention for qkv [T, ...] (q/k normed and rotated) at positions pos0..: appends
        K/V to layer i's cache, returns [T, n_head · dv]."""
        s, T = self.spec, qkv.shape[0]
        q, k, v = qkv.split([s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.n_head_kv * s.head_dim_v], dim=-1)
        q = q.view(T, s.n_head, s.head_dim)
        k = k.view(T, s.n_head_kv, s.head_dim)
        v = v.view(T, s.n_head_kv, s.head_dim_v)
        cache.k[i][:, pos0 : pos0 + T] = k.transpose(0, 1)
        cache.v[i][:, pos0 : pos0 + T] = v.transpose(0, 1)
        S = pos0 + T
        keys = cache.k[i][:, :S]  # [Hkv, S, d]
        vals = cache.v[i][:, :S]  # [Hkv, S, dv]
        group = s.n_head // s.n_head_kv  # query head h reads KV head h // group
        qh = q.transpose(0, 1).reshape(s.n_head_kv, group * T, s.head_dim)  # [Hkv, group*T, d]: row g*T + t
        lw = self.layers[i]
        if lw.sinks is not None or s.is_swa(i):
            out = self._attend_explicit(qh, keys, vals, pos0, T, scale, lw.sinks, s.n_swa if s.is_swa(i) else 0)  # [Hkv, group*T, dv]
            return out.view(s.n_head, T, s.head_dim_v).transpose(0, 1).reshape(T, s.n_head * s.head_dim_v)
        mask = None
        if T > 1:  # query t sees keys up to pos0 + t (a single new token sees every key)
            pos = torch.arange(pos0, pos0 + T, device=qkv.device)
            mask = (torch.arange(S, device=qkv.device)[None, :] <= pos[:, None]).repeat(group, 1)  # [group*T, S]
        out = F.scaled_dot_product_attention(qh[None], keys[None], vals[None], attn_mask=mask, scale=scale)  # [1, Hkv, group*T, dv]
        return out.view(s.n_head, T, s.head_dim_v).transpose(0, 1).reshape(T, s.n_head * s.head_dim_v)

    def _attend_explicit(self, qh: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, pos0: int, T: int, scale: float,
                         sinks: torch.Tensor | None, n_swa: int) -> torch.Tensor:
        """Attention with what SDPA has no argument for, as llama.cpp's soft_max_ext computes it.
        qh [Hkv, group·T, d] (row g·T + t is query head kvh·group + g at position pos0 + t), keys
        [Hkv, S, d], vals [Hkv, S, dv] → [Hkv, group·T, dv]. Query p sees key p0 when p0 ≤ p and,
        with a window (n_swa > 0), p − p0 < n_swa. A sink is one more logit per head, unscaled, in
        the softmax's denominator only: it takes probability mass and gives back no value."""
        Hkv, GT, _ = qh.shape
        S = keys.shape[1]
        group = GT // T
        scores = (qh @ keys.transpose(1, 2)) * scale  # [Hkv, group·T, S]
        q_pos = torch.arange(pos0, pos0 + T, device=qh.device).repeat(group)  # [group·T]
        k_pos = torch.arange(S, device=qh.device)
        hidden = k_pos[None, :] > q_pos[:, None]
        if n_swa > 0:
            hidden |= q_pos[:, None] - k_pos[None, :] >= n_swa
        scores = scores.masked_fill(hidden, float("-inf"))
        if sinks is not None:
            sink = sinks.view(Hkv, group, 1).expand(Hkv, group, T).reshape(Hkv, GT, 1).to(scores.dtype)
            scores = torch.cat([scores, sink], dim=-1)
        probs = scores.softmax(-1)[..., :S]
        return probs @ vals

    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router of layer i (a layer with experts): h [T, D] → (ids [T, k] int64, weights [T, k] float32)."""
        s, lw = self.spec, self.layers[i]
        if "c_router" in self.fast and lw.probs_bias is None:  # the same steps in one C call (decode's per-op overhead)
            fast = route(h, lw.router, s.n_expert_used, s.norm_topk, s.expert_weights_scale)
            if fast is not None:
                return fast
        return route_reference(self.router_logits(i, h), s, lw.probs_bias)

    def router_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's router on h [T, D] → logits [T, E] (+ the router's bias, where it has one)."""
        lw = self.layers[i]
        logits = h @ lw.router.T
        return logits if lw.router_bias is None else logits + lw.router_bias

    def ffn_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The normalised input of layer i's MoE block for residual stream x [T, D]."""
        return rms_norm(x, self.layers[i].ffn_norm, self.spec.rms_eps)

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] (normed) → FFN output [T, D]: the dense FFN of a layer without experts, else the
        routed experts (+ the shared expert)."""
        lw = self.layers[i]
        if lw.dense is not None:
            return swiglu_expert(lw.dense, h)
        ids, weights = self.route(i, h)
        y = self.experts(i, h, ids, weights)
        if lw.shared is not None:
            sh = swiglu_expert(lw.shared, h)
            y = y + (sh if lw.shared_gate is None else torch.sigmoid(h @ lw.shared_gate)[:, None] * sh)
        return y

    # -- the whole pass ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = True) -> torch.Tensor:
        """ids [T] at positions cache.n.. → logits [T, V] (or [1, V] for the last token only)."""
        s = self.spec
        T, pos0 = ids.shape[0], cache.n
        cache.reserve(pos0 + T)
        x = self.embed(ids)
        for i, lw in enumerate(self.layers):
            x = x + self.attention(i, rms_norm(x, lw.attn_norm, s.rms_eps), cache, pos0)
            self.experts.after_attention(i, x)
            x = x + self.moe(i, self.ffn_input(i, x))
        cache.n = pos0 + T
        if not all_logits:
            x = x[-1:]
        return self.output(rms_norm(x, self.output_norm, s.rms_eps))
