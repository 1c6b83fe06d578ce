"""DeepSeek's multi-head latent attention, in llama.cpp's absorbed form (src/models/deepseek2.cpp):
the cache holds one latent row per position, [rms(kv_c)·kv_a_norm | RoPE(k_pe)] [r + rope]; a
query head scores it with [k_b·q_nope | RoPE(q_pe)], reads the compressed values back, and v_b
decompresses them. Older files with one attn_kv_b are split at load as llama.cpp's converter
splits it.

Shapes: T tokens, S cached positions, D = n_embd, H heads, r = kv_lora_rank, rope = n_rot rotated
dims, nope = head_dim − rope, v = head_dim_v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..compute.kernels import QLinear, rms_norm
from ..gguf import names
from .block import Weights


@dataclass
class MLA:
    wq: QLinear | None  # [H·(nope+rope), D] (q_lora_rank 0)
    wq_a: QLinear | None  # [q_lora_rank, D]
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    wq_b: QLinear | None  # [H·(nope+rope), q_lora_rank]
    wkv_a: QLinear  # [r + rope, D]
    kv_a_norm: torch.Tensor  # [r]
    k_b: torch.Tensor  # [H, r, nope]
    v_b: torch.Tensor  # [H, v, r]
    wo: QLinear  # [D, H·v]
    # the latent rows stay float32: torch's matmuls read them whole every step (no C kernel here), and
    # half-precision rows would be converted back, all of them, in every layer of every token
    cache_dtype: ClassVar[torch.dtype] = torch.float32

    @classmethod
    def load(cls, w: Weights, i: int) -> MLA:
        s = w.spec
        blk = lambda stem: names.blk(i, stem)  # noqa: E731
        if w.has(blk(names.ATTN_K_B)):
            k_b = w.load(blk(names.ATTN_K_B))  # [H, r, nope]
            v_b = w.load(blk(names.ATTN_V_B))  # [H, v, r]
        else:  # older files: one kv_b [H·(nope+v), r]
            kv_b = w.load(blk(names.ATTN_KV_B)).view(s.n_head, -1, s.kv_lora_rank)
            nope = s.head_dim - s.n_rot
            k_b, v_b = kv_b[:, :nope].transpose(1, 2).contiguous(), kv_b[:, nope:].contiguous()
        lora = s.q_lora_rank > 0
        return cls(
            wq=None if lora else w.linear(blk(names.ATTN_Q)),
            wq_a=w.linear(blk(names.ATTN_Q_A)) if lora else None,
            q_a_norm=w.load(blk(names.ATTN_Q_A_NORM)) if lora else None,
            wq_b=w.linear(blk(names.ATTN_Q_B)) if lora else None,
            wkv_a=w.linear(blk(names.ATTN_KV_A_MQA)),
            kv_a_norm=w.load(blk(names.ATTN_KV_A_NORM)),
            k_b=k_b,
            v_b=v_b,
            wo=w.linear(blk(names.ATTN_OUT)),
        )

    def cache_rows(self, s: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        return (1, s.kv_lora_rank + s.n_rot), (1, 0)  # the latent row; no values

    def __call__(self, s: Any, i: int, h: torch.Tensor, cache: Any, pos0: int, rope: Any) -> torch.Tensor:
        """h [T, D] (normed) → [T, D]; writes this call's latent rows into layer i's cache."""
        T, H, r, n_rot = h.shape[0], s.n_head, s.kv_lora_rank, s.n_rot
        nope = s.head_dim - n_rot
        if self.wq is not None:
            q = self.wq(h)  # [T, H·(nope+rope)]
        else:
            q = self.wq_b(rms_norm(self.wq_a(h), self.q_a_norm, s.rms_eps))
        q = q.view(T, H, nope + n_rot)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        kv = self.wkv_a(h)  # [T, r + rope]
        kv_c = rms_norm(kv[:, :r].contiguous(), self.kv_a_norm, s.rms_eps)  # [T, r]
        k_pe = rope(kv[:, None, r:], pos0)[:, 0]  # [T, rope]
        q_pe = rope(q_pe, pos0)  # [T, H, rope]
        q_abs = torch.einsum("thn,hrn->htr", q_nope, self.k_b)  # [H, T, r]
        latent = cache.k[i][0]  # [cap, r + rope]
        latent[pos0 : pos0 + T] = torch.cat([kv_c, k_pe], dim=-1)
        S = pos0 + T
        keys = latent[:S]
        scores = (q_abs @ keys[:, :r].T + q_pe.transpose(0, 1) @ keys[:, r:].T) * s.kq_scale  # [H, T, S]
        if T > 1:  # query t sees keys up to pos0 + t
            pos = torch.arange(pos0, pos0 + T, device=h.device)
            scores = scores.masked_fill(torch.arange(S, device=h.device)[None, :] > pos[:, None], float("-inf"))
        o_lat = scores.softmax(-1) @ keys[:, :r]  # [H, T, r]
        o = torch.einsum("htr,hvr->thv", o_lat, self.v_b)  # [T, H, v]
        return self.wo(o.reshape(T, H * s.head_dim_v))
