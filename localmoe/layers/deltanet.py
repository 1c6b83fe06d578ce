"""Gated DeltaNet (Qwen3-Next, Qwen3.5 / Qwen3.6): a linear-attention token mixer whose memory is a
fixed-size state per layer instead of a KV cache growing with the context. llama.cpp:
src/models/qwen35moe.cpp (build_layer_attn_linear) and delta-net-base.cpp.

For each token, with Hk key heads and Hv value heads (value head h reads key head h mod Hk, as
llama.cpp's ggml_repeat tiles the key heads), dk and dv wide:

    [q | k | v] = silu(conv1d(h·Wqkv))     causal, d_conv taps; the last d_conv − 1 inputs are state
    q, k = l2norm(q), l2norm(k);  q = q / √dk
    g = softplus(h·Wα + dt_bias) · A        A = −exp(A_log) < 0, so the decay exp(g) is in (0, 1)
    β = sigmoid(h·Wβ)
    S = exp(g)·S;  S = S + k ⊗ β·(v − Sᵀk);  o = Sᵀq        S [dk, dv] per value head: the state
    out = Wout · (rms(o)·w_norm · silu(z)),  z = h·Wz

Where the C helper is built (compute.kernels.deltanet_step, in the ggml driver) every token runs
through it in order, a decode step and a prompt alike. Without it, torch runs a decode step as one
state update (`delta_rule_recurrent`) and a prompt in chunks of 64 tokens (`delta_rule_chunked`, the
WY form llama.cpp's build_delta_net_chunking computes): the same function, as matrix products.

Shapes: T tokens in this call, D = n_embd, C = 2·Hk·dk + Hv·dv conv channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..compute.kernels import QLinear, deltanet_step, rms_norm
from ..gguf import names

CHUNK = 64  # tokens per chunk of the prompt's delta rule (llama.cpp's CS)
RECURRENT_MAX_T = 4  # calls of up to this many tokens run the per-token recurrence


@dataclass
class GatedDeltaNet:
    w_in: list[QLinear]  # h → [qkv (C) | z (Hv·dv) | β (Hv) | α (Hv)]: one matrix when they share a quant type
    widths: tuple[int, int, int, int]  # C, Hv·dv, Hv, Hv: the split of w_in's outputs
    conv: torch.Tensor  # [C, d_conv]: the causal conv's taps, oldest input first
    dt_bias: torch.Tensor  # [Hv]
    a: torch.Tensor  # [Hv]: −exp(A_log), as the file stores it
    norm: torch.Tensor  # [dv]: the gated RMS norm's weight
    wout: QLinear  # [D, Hv·dv]
    shape: Any  # gguf.file.DeltaNetShape
    cache_dtype: ClassVar[torch.dtype] = torch.float32  # (no KV rows: cache_rows is empty)

    @classmethod
    def load(cls, w: Any, i: int) -> GatedDeltaNet:
        """Layer i's DeltaNet from the file (w: layers.block.Weights)."""
        sh = w.spec.deltanet
        mats = [w.raw(names.blk(i, p)) for p in (names.ATTN_QKV, names.ATTN_GATE, names.SSM_BETA, names.SSM_ALPHA)]
        return cls(
            w_in=w.fuse(mats),
            widths=(sh.conv_dim, sh.value_dim, sh.n_v_heads, sh.n_v_heads),
            conv=w.load(names.blk(i, names.SSM_CONV1D)).reshape(sh.conv_dim, sh.d_conv).contiguous(),
            dt_bias=w.load(names.blk(i, names.SSM_DT, "bias")).reshape(sh.n_v_heads),
            a=w.load(names.blk_bare(i, names.SSM_A)).reshape(sh.n_v_heads),
            norm=w.load(names.blk(i, names.SSM_NORM)).reshape(sh.d_v),
            wout=w.linear(names.blk(i, names.SSM_OUT)),
            shape=sh,
        )

    def cache_rows(self, s: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        return (0, 0), (0, 0)  # no KV rows: the state lives in KVCache.recurrent

    def new_state(self, device: torch.device) -> list[torch.Tensor]:
        """The state before the first token: [the conv's last d_conv − 1 inputs [C, d_conv − 1],
        the delta rule's S [Hv, dk, dv]], zeros."""
        sh = self.shape
        return [
            torch.zeros(sh.conv_dim, sh.d_conv - 1, device=device),
            torch.zeros(sh.n_v_heads, sh.d_k, sh.d_v, device=device),
        ]

    def __call__(self, s: Any, i: int, h: torch.Tensor, cache: Any, pos0: int, rope: Any) -> torch.Tensor:
        """h [T, D] (normed) → [T, D]; advances layer i's state in the cache by T tokens."""
        sh, T = self.shape, h.shape[0]
        proj = self.w_in[0](h) if len(self.w_in) == 1 else torch.cat([w(h) for w in self.w_in], dim=-1)
        conv_state, S = cache.recurrent(i, lambda: self.new_state(h.device))
        # every token in order in one C call where it applies (a decode step, and a prompt too: with
        # the state in cache it takes ~0.14 ms a token at the 35B-A3B shape, where the chunked torch
        # form below takes ~0.4-0.6 ms)
        out = deltanet_step(proj.contiguous(), conv_state, self.conv, sh, self.dt_bias, self.a, self.norm, s.rms_eps, S)
        if out is not None:
            return self.wout(out)
        qkv, z, b, a = proj.split(self.widths, dim=-1)
        x = torch.cat([conv_state, qkv.t()], dim=1)  # [C, d_conv − 1 + T]: the inputs the taps see
        y = (x.unfold(1, sh.d_conv, 1) * self.conv[:, None, :]).sum(-1)  # [C, T]: Σ_j x[c, t + j]·w[c, j]
        conv_state.copy_(x[:, T:])  # the last d_conv − 1 inputs
        y = F.silu(y.t())  # [T, C]
        q, k, v = y.split((sh.key_dim, sh.key_dim, sh.value_dim), dim=-1)
        q = l2_norm(q.reshape(T, sh.n_k_heads, sh.d_k), s.rms_eps)
        k = l2_norm(k.reshape(T, sh.n_k_heads, sh.d_k), s.rms_eps)
        rep = sh.n_v_heads // sh.n_k_heads
        if rep > 1:  # tiled: value head h reads key head h mod Hk
            q, k = q.repeat(1, rep, 1), k.repeat(1, rep, 1)
        q = q * sh.d_k**-0.5
        v = v.reshape(T, sh.n_v_heads, sh.d_v)
        beta = torch.sigmoid(b)  # [T, Hv]
        g = F.softplus(a + self.dt_bias) * self.a  # [T, Hv]: log of the decay
        rule = delta_rule_recurrent if T <= RECURRENT_MAX_T else delta_rule_chunked
        o = rule(q, k, v, g, beta, S)  # [T, Hv, dv]; S advanced in place
        o = rms_norm(o, self.norm, s.rms_eps) * F.silu(z.reshape(T, sh.n_v_heads, sh.d_v))
        return self.wout(o.reshape(T, sh.value_dim))


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(‖x‖, eps) over the last dimension (ggml_l2_norm)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def delta_rule_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, S: torch.Tensor
) -> torch.Tensor:
    """The gated delta rule one token at a time. q, k [T, H, dk], v [T, H, dv], g, beta [T, H];
    S [H, dk, dv] is advanced in place. Returns o [T, H, dv]."""
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        S.mul_(g[t].exp()[:, None, None])
        sk = torch.bmm(k[t][:, None, :], S)[:, 0]  # [H, dv]: Sᵀk
        d = (v[t] - sk) * beta[t][:, None]
        S.baddbmm_(k[t][:, :, None], d[:, None, :])  # S += k ⊗ d
        out[t] = torch.bmm(q[t][:, None, :], S)[:, 0]
    return out


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    S: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The same rule over chunks of `chunk` tokens (the WY representation): within a chunk, with
    G the cumulative sum of g and L[i, j] = β_i (k_i·k_j) e^(G_i − G_j) for j < i,

        U = (I + L)⁻¹ (β·v),  W = (I + L)⁻¹ (β·k·e^G)
        v_new = U − W·S;  o = (q·e^G)·S + tril(q·kᵀ ⊙ e^(G_i − G_j))·v_new
        S = e^(G_last)·S + (k·e^(G_last − G))ᵀ·v_new

    Shapes as delta_rule_recurrent; padding tokens (β = 0, g = 0) change nothing."""
    T, H, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    n = (T + pad) // chunk

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # [T, H, d] → [H, n, chunk, d]
        return F.pad(x.transpose(0, 1), (0, 0, 0, pad)).reshape(H, n, chunk, -1)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    beta = F.pad(beta.t(), (0, pad)).reshape(H, n, chunk)
    G = F.pad(g.t(), (0, pad)).reshape(H, n, chunk).cumsum(-1)  # [H, n, chunk]
    decay = (G[..., :, None] - G[..., None, :]).tril().exp().tril()  # [H, n, chunk, chunk]: e^(G_i − G_j), j ≤ i
    k_beta = k * beta[..., None]
    L = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    inv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False)  # (I + L)⁻¹
    U = inv @ (v * beta[..., None])  # [H, n, chunk, dv]
    W = inv @ (k_beta * G.exp()[..., None])  # [H, n, chunk, dk]
    out = torch.empty(H, n, chunk, dv, dtype=v.dtype, device=v.device)
    for c in range(n):
        qc, kc, Gc = q[:, c], k[:, c], G[:, c]
        v_new = U[:, c] - W[:, c] @ S  # [H, chunk, dv]
        attn = (qc @ kc.transpose(-1, -2) * decay[:, c]).tril()
        out[:, c] = (qc * Gc.exp()[..., None]) @ S + attn @ v_new
        last = Gc[:, -1]
        S.mul_(last.exp()[:, None, None]).add_((kc * (last[:, None] - Gc).exp()[..., None]).transpose(-1, -2) @ v_new)
    return out.reshape(H, n * chunk, dv)[:, :T].transpose(0, 1)
