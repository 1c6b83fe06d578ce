"""Choosing the next token from logits: greedy, or temperature → top-k → top-p, seeded.

The sampling defaults live here and nowhere else: SamplingParams' fields (llama.cpp's defaults) and
MAX_TOKENS. Runtime.generate/chat/stream, `run`, `chat`, `serve` and the TUI read them (DEFAULT)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import LocalMoEError


MAX_TOKENS = 128  # tokens generated at most when the caller does not say


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # ≤ 0 → greedy
    top_k: int = 40  # ≤ 0 → all tokens
    top_p: float = 0.95  # ≥ 1 → no nucleus cut

    def validate(self) -> "SamplingParams":
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise LocalMoEError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise LocalMoEError(f"top_k must be a whole number (0 = all tokens), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise LocalMoEError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise LocalMoEError(f"temperature must be ≥ 0, got {self.temperature}")
        return self


DEFAULT = SamplingParams()  # what a request that leaves a setting out gets


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [V] float → one token id."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if math.isinf(float(scores.max())):  # a temperature so small that scores overflow: the greedy limit
        return int(torch.argmax(logits))
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
