"""The runtime users hold: `localmoe.load(...)` returns one. See docs/api.md."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .bundled import demo_model_path
from .errors import LocalMoEError
from .experts import ExpertExecutor, ExpertStore
from .gguf_file import GGUFModel
from .model import KVCache, MoEModel
from .sampling import SamplingParams, sample
from .stats import Stats, StatsCollector
from .tokenizer import IncrementalDecoder, Tokenizer
from . import names

ON_MISS_POLICIES = ("fetch", "cpu", "buddy", "little", "drop")
DEFAULT_HOST_CACHE = 4 << 30  # bytes of dequantized experts kept in host RAM


@dataclass(frozen=True)
class Chunk:
    """One step of `Runtime.stream`: the text a token added, and at the end why it stopped."""

    text: str
    token: int | None  # None on the closing chunk
    finish_reason: str | None  # None while streaming; "stop" (end-of-generation) or "length" at the end
    stats: Stats


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an int or a string such as "6GB", "512MiB", "1.5g"; None stays None."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise LocalMoEError(f"cannot read the size '{value}'; write it like 6GB, 512MB or 1073741824")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LocalMoEError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise LocalMoEError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


class Runtime:
    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        device: str = "auto",
        gpu_mem: int | str | None = None,
        policy: str = "lfu",
        on_miss: str = "cpu",
        prefetch: bool = True,
        n_ctx: int = 4096,
        seed: int | None = None,
        profile: str | None = None,
        threads: int | None = None,
    ):
        self.path = os.fspath(path) if path is not None else demo_model_path()
        self.device = resolve_device(device)
        if on_miss not in ON_MISS_POLICIES:
            raise LocalMoEError(f"unknown miss policy '{on_miss}'; choose one of {', '.join(ON_MISS_POLICIES)}")
        self.gpu_budget = parse_size(gpu_mem)
        if self.gpu_budget is not None:
            raise LocalMoEError("a GPU-tier budget (gpu_mem / --gpu-mem) needs the expert residency engine, which this build does not have yet; leave it unset to keep every expert resident")
        self.policy, self.on_miss, self.prefetch, self.profile = policy, on_miss, prefetch, profile
        if threads:
            torch.set_num_threads(int(threads))
        if n_ctx < 1:
            raise LocalMoEError(f"n_ctx must be positive, got {n_ctx}")

        self.gguf = GGUFModel(self.path)
        self.spec = self.gguf.spec
        self.n_ctx = min(int(n_ctx), self.spec.ctx_train)
        self.tokenizer = Tokenizer(self.path, self.gguf.meta(names.CHAT_TEMPLATE))
        self._stats = StatsCollector(self.spec.n_layer, self.spec.n_expert)
        self.store = ExpertStore(self.gguf, self.device, DEFAULT_HOST_CACHE)
        self.model = MoEModel(self.gguf, ExpertExecutor(self.store, self._stats), self.device)
        self._cache = KVCache(self.spec, self.n_ctx, self.device)
        self._cache_tokens: list[int] = []  # the ids whose K/V the cache holds, for prefix reuse
        self._lock = threading.Lock()
        self._seed = seed
        self._closed = False

    # -- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.detokenize(list(ids))

    # -- numerics ---------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of `ids`, from a fresh context: (len(ids), n_vocab) float32."""
        ids = self._check_ids(ids)
        with self._lock:
            cache = KVCache(self.spec, self.n_ctx, self.device)
            start = time.perf_counter()
            out = self.model.forward(torch.tensor(ids, dtype=torch.long), cache, all_logits=True)
            self._stats.record_prompt(len(ids), time.perf_counter() - start)
        return out.float().cpu().numpy()

    def _check_ids(self, ids: list[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise LocalMoEError("no tokens to evaluate: the prompt is empty")
        if len(ids) > self.n_ctx:
            raise LocalMoEError(f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx}; shorten it or raise n_ctx (--ctx-size)")
        bad = [t for t in ids if not 0 <= t < self.spec.n_vocab]
        if bad:
            raise LocalMoEError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.n_vocab - 1})")
        return ids

    # -- generation -------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[dict[str, Any]],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
    ) -> Iterator[Chunk]:
        """Yield a Chunk per generated token, then a closing Chunk with the finish reason.
        `prompt` is text, or a list of chat messages rendered with the model's chat template."""
        params = SamplingParams(temperature, top_k, top_p).validate()
        ids = self.tokenizer.tokenize_chat(prompt) if isinstance(prompt, list) else self.tokenize(prompt)
        ids = self._check_ids(ids)
        seed = seed if seed is not None else self._seed
        generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        with self._lock:
            yield from self._generate_locked(ids, max_tokens, params, generator)

    def _generate_locked(self, ids: list[int], max_tokens: int, params: SamplingParams, generator: torch.Generator) -> Iterator[Chunk]:
        # Reuse the cached K/V of the longest common prefix (multi-turn chat re-sends its history).
        keep = 0
        for a, b in zip(self._cache_tokens, ids[:-1]):
            if a != b:
                break
            keep += 1
        self._cache.n = keep
        self._cache_tokens = ids[:keep]
        start = time.perf_counter()
        logits = self._advance(ids[keep:])
        self._stats.record_prompt(len(ids) - keep, time.perf_counter() - start)

        decoder = IncrementalDecoder()
        finish = "length"
        for _ in range(max_tokens):
            token = sample(logits, params, generator)
            if self.tokenizer.is_eog(token):
                finish = "stop"
                break
            text = decoder.feed(self.tokenizer.piece(token))
            yield Chunk(text, token, None, self._stats.snapshot())
            if self._cache.n >= self.n_ctx:  # context full: nothing more fits
                break
            start = time.perf_counter()
            logits = self._advance([token])
            self._stats.record_decode(1, time.perf_counter() - start)
        yield Chunk(decoder.flush(), None, finish, self._stats.snapshot())

    def _advance(self, ids: list[int]) -> torch.Tensor:
        """Run ids after the cached ones; return the last position's logits [V]."""
        out = self.model.forward(torch.tensor(ids, dtype=torch.long), self._cache, all_logits=False)
        self._cache_tokens = self._cache_tokens + list(ids)
        return out[-1]

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, seed: int | None = None) -> str:
        return "".join(c.text for c in self.stream(prompt, max_tokens, temperature, top_p, top_k, seed))

    def chat(self, messages: list[dict[str, Any]], max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, seed: int | None = None) -> str:
        if not isinstance(messages, list):
            raise LocalMoEError("chat() takes a list of {'role': ..., 'content': ...} messages")
        return "".join(c.text for c in self.stream(messages, max_tokens, temperature, top_p, top_k, seed))

    # -- live settings ----------------------------------------------------------------------------
    def configure(self, policy: str | None = None, on_miss: str | None = None, gpu_mem: int | str | None = None, prefetch: bool | None = None) -> None:
        """Change the cache policy, miss policy, GPU budget or prefetching between requests
        (the chat app's /policy, /on-miss and /gpu-mem). Raises LocalMoEError on a bad value."""
        with self._lock:
            if on_miss is not None:
                if on_miss not in ON_MISS_POLICIES:
                    raise LocalMoEError(f"unknown miss policy '{on_miss}'; choose one of {', '.join(ON_MISS_POLICIES)}")
                self.on_miss = on_miss
            if policy is not None:
                self.policy = policy
            if prefetch is not None:
                self.prefetch = bool(prefetch)
            if gpu_mem is not None:
                parse_size(gpu_mem)
                raise LocalMoEError("a GPU-tier budget needs the expert residency engine, which this build does not have yet")

    # -- observability & lifetime -----------------------------------------------------------------
    def stats(self) -> Stats:
        return self._stats.snapshot()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.tokenizer.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    path: str | os.PathLike[str] | None = None,
    device: str = "auto",
    gpu_mem: int | str | None = None,
    policy: str = "lfu",
    on_miss: str = "cpu",
    prefetch: bool = True,
    n_ctx: int = 4096,
    seed: int | None = None,
    profile: str | None = None,
    threads: int | None = None,
) -> Runtime:
    """Open a MoE GGUF model (None → the bundled demo model). Raises LocalMoEError on bad input."""
    return Runtime(path, device, gpu_mem, policy, on_miss, prefetch, n_ctx, seed, profile, threads)
