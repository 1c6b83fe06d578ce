"""RoPE as ggml computes it: θ_i(pos) = pos · theta_scale[i] for each rotated pair i < n_rot/2,
plain (base^(-2i/n_rot)), linear (× freq_scale) or YaRN-mixed; cos/sin × the magnitude mscale.

Shapes: T positions, n_rot rotated dims of a head (the rest pass through).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_corr_dims(
    n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float
) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dims between which YaRN ramps from extrapolation to interpolation."""

    def corr_dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(corr_dim(beta_fast))), min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))


def rope_theta_scale(spec: Any) -> tuple[torch.Tensor, float]:
    """Per rotated pair i < n_rot/2: (the factor θ_i(pos)/pos [n_rot/2] float64, the cos/sin
    magnitude). Plain: base^(-2i/n_rot) · freq_scale; YaRN (ggml's rope_yarn): the interpolated and
    the extrapolated angle mixed by a ramp over [corr_dims], magnitudes × attn_factor ·
    (1 + 0.1·ln(1/freq_scale))."""
    half = spec.n_rot // 2
    inv_freq = spec.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / spec.n_rot)
    fs = spec.rope_freq_scale
    if spec.rope_scaling != "yarn" or spec.yarn_ext_factor == 0.0:
        return inv_freq, spec.rope_attn_factor
    low, high = yarn_corr_dims(spec.n_rot, spec.yarn_orig_ctx, spec.rope_base, spec.yarn_beta_fast, spec.yarn_beta_slow)
    i = torch.arange(half, dtype=torch.float64)
    ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
    mix = ramp * spec.yarn_ext_factor
    mscale = spec.rope_attn_factor * (1.0 + 0.1 * math.log(1.0 / fs))
    return inv_freq * (fs * (1 - mix) + mix), mscale


def text_mrope_mask(sections: tuple[int, ...], half: int) -> torch.Tensor:
    """Interleaved M-RoPE (ggml's IMROPE, Qwen3-VL and Qwen3.5) for text tokens, whose positions
    llama.cpp sets to (p, p, p, 0) on the axes (t, h, w, e): pair i belongs to sector s = i mod
    Σsections, which turns by axis s mod 3 while s < 3·sections[s mod 3], else by the fourth axis.
    Returns per pair 1.0 (turned by p) or 0.0 (by 0: left as it is) [half] float64."""
    t, h, w = (list(sections) + [0, 0, 0])[:3]
    total = sum(sections)
    out = torch.zeros(half, dtype=torch.float64)
    for i in range(half):
        s = i % total if total else i
        axis_n = (t, h, w)[s % 3]
        out[i] = 1.0 if s < 3 * axis_n else 0.0
    return out


class Rope:
    """One model's rotation: `tables(pos0, T, device)` → (cos, sin) [T, 1, n_rot/2], and
    `rope(x, pos0)` rotates x [T, heads, d]. neox rotates halves (i, i + n_rot/2), else adjacent
    pairs (2i, 2i+1)."""

    def __init__(self, spec: Any, freq_factors: torch.Tensor | None = None):
        """freq_factors [n_rot/2] (the file's rope_freqs, llama.cpp's freq_factors): θ_i ÷ factor i.
        A huge factor leaves pair i unrotated: Gemma 4's "proportional" RoPE rotates the first
        quarter of a global head's pairs at the frequencies of the whole head this way."""
        self.n_rot = spec.n_rot
        self.neox = spec.arch.rope_style == "neox"
        self.yarn = spec.rope_scaling == "yarn"  # the frequency scale is inside inv_freq
        self.freq_scale = spec.rope_freq_scale
        self.inv_freq, self.mscale = rope_theta_scale(spec)  # [n_rot/2] float64, float
        if spec.rope_sections:  # M-RoPE on text: the pairs of the fourth axis turn by its position, 0
            self.inv_freq = self.inv_freq * text_mrope_mask(spec.rope_sections, spec.n_rot // 2)
        if freq_factors is not None:
            self.inv_freq = self.inv_freq / freq_factors.detach().cpu().double().reshape(-1)
        self._cached: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def tables(self, pos0: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions pos0 .. pos0+T-1 → (cos, sin) [T, 1, n_rot/2] float32 on `device`: slices of
        tables computed once for every position so far (doubling), so a decode step runs no
        trigonometry. Keyed on host integers: no device readback."""
        cached = self._table(pos0 + T, device)
        return cached[1][pos0 : pos0 + T], cached[2][pos0 : pos0 + T]

    def _table(self, n_pos: int, device: torch.device) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
        """(device, cos, sin) with rows for positions 0 .. n_pos-1 at least, [n, 1, n_rot/2] float32."""
        cached = self._cached
        if cached is None or cached[0] != device or cached[1].shape[0] < n_pos:
            n = max(n_pos, 256, 2 * cached[1].shape[0] if cached is not None and cached[0] == device else 0)
            pos = torch.arange(n, dtype=torch.float64, device=device)
            if self.yarn:
                theta = pos[:, None] * self.inv_freq.to(device)[None, :]  # [n, n_rot/2]
            else:
                theta = (pos * self.freq_scale)[:, None] * self.inv_freq.to(device)[None, :]
            cos, sin = torch.cos(theta), torch.sin(theta)
            if self.mscale != 1.0:
                cos, sin = cos * self.mscale, sin * self.mscale
            cached = self._cached = (device, cos.float()[:, None, :], sin.float()[:, None, :])
        return cached

    def row_addresses(self, pos: int, device: torch.device) -> tuple[int, int]:
        """The addresses of position pos's cos and sin rows [n_rot/2] float32 in `tables`' tables (a C
        decode step's, without slicing tensors)."""
        cached = self._table(pos + 1, device)
        row = cached[1].stride(0) * cached[1].element_size()  # (contiguous [n, 1, n_rot/2] tables)
        return cached[1].data_ptr() + pos * row, cached[2].data_ptr() + pos * row

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x [T, heads, d] at positions pos0.. → x with its first n_rot dims of every head rotated."""
        n_rot = self.n_rot
        cos, sin = (t.to(x.dtype) for t in self.tables(pos0, x.shape[0], x.device))
        rot, rest = x[..., :n_rot], x[..., n_rot:]
        if self.neox:
            x0, x1 = rot[..., : n_rot // 2], rot[..., n_rot // 2 :]
            out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        else:
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1) if rest.numel() else out
