"""A request's generation: prepared on the event loop's thread pool (template, tokens, context
check, validated by `Runtime.stream`), run on the model's worker thread, one token at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import LocalMoEError
from ..runtime import Runtime
from ..sampling import DEFAULT, MAX_TOKENS
from ..stats import Stats
from .metrics import ServerMetrics
from .queue import Job
from .schemas import APIError


@dataclass(frozen=True)
class Defaults:
    """Sampling settings for requests that leave them out (`serve`'s -n, --temp, --top-p, ...)."""

    max_tokens: int = MAX_TOKENS
    temperature: float = DEFAULT.temperature
    top_p: float = DEFAULT.top_p
    top_k: int = DEFAULT.top_k
    seed: int | None = None


@dataclass
class Prepared:
    iterator: Any  # Runtime.stream's iterator, not started
    prompt_tokens: int
    max_tokens: int
    stops: list[str]


@dataclass
class Result:
    text: str
    completion_tokens: int
    finish_reason: str
    timings: dict[str, Any]
    moe: dict[str, Any]
    first_token_s: float | None = None  # seconds from admission to the first token


def prepare(rt: Runtime, prompt: str | list[dict[str, str]], req: Any, defaults: Defaults) -> Prepared:
    """Tokens and limits of one request; an APIError(400) for a template that fails, a prompt that
    does not fit, or a value the runtime refuses."""
    if isinstance(prompt, list):
        try:
            ids = rt.tokenizer.tokenize_chat(prompt)
        except LocalMoEError as exc:
            raise APIError(400, str(exc), param="messages", code="chat_template_error") from None
    else:
        ids = rt.tokenize(prompt)
    n_prompt, n_ctx = len(ids), rt.n_ctx
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    room = n_ctx - n_prompt
    limit = req.limit()
    if limit is None:
        if room <= 0:
            raise APIError(
                400,
                (
                    f"this model's context holds {n_ctx} tokens and the prompt is {n_prompt} tokens: no room to "
                    "generate; shorten the prompt"
                ),
                param="messages" if isinstance(prompt, list) else "prompt",
                code="context_length_exceeded",
            )
        limit = min(defaults.max_tokens, room)
    elif n_prompt + limit > n_ctx:
        raise APIError(
            400,
            (
                f"this model's context holds {n_ctx} tokens; the prompt is {n_prompt} tokens and max_tokens asks "
                f"for {limit} more ({n_prompt + limit}); shorten the prompt or lower max_tokens"
            ),
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        iterator = rt.stream(
            prompt,
            max_tokens=limit,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else req.top_k,
            seed=defaults.seed if req.seed is None else req.seed,
        )
    except LocalMoEError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
    return Prepared(iterator, n_prompt, limit, req.stops())


class StopMatcher:
    """Cuts the output before the first stop sequence; holds back a tail that may begin one, so a
    streamed delta never shows part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self._buf += text
        if not self.stops:
            out, self._buf = self._buf, ""
            return out, False
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), keep, -1):
                if self._buf.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self._buf) - keep
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


def run(job: Job, rt: Runtime, prep: Prepared, metrics: ServerMetrics) -> None:
    """On the worker thread: generate, handing each piece of text to the request as it comes;
    stop at the next token once the job is cancelled."""
    stop = StopMatcher(prep.stops)
    before = rt.stats()
    finish, text, first = "length", [], None
    metrics.queue_wait.observe(job.started - job.admitted)
    it = prep.iterator
    try:
        for chunk in it:
            if job.cancelled.is_set():  # checked before each next token is asked for, so at most
                if chunk.token is not None:  # the one in flight when the client left is made after it
                    job.tokens += 1
                    metrics.cancel_overrun.inc()
                break
            piece = chunk.text
            if chunk.token is not None:
                job.tokens += 1
                if first is None:
                    first = time.monotonic() - job.admitted
                    metrics.first_token.observe(first)
            out, hit = stop.feed(piece)
            if chunk.finish_reason is not None and not hit:
                out += stop.flush()
                finish = chunk.finish_reason
            if out:
                text.append(out)
                job.emit("delta", out)
            if hit:
                finish = "stop"
                break
    except BaseException:
        metrics.generations.labels("failed").inc()
        raise
    finally:
        it.close()  # a generator stopped early: the runtime's lock is released, the KV cache kept
        metrics.completion_tokens.inc(job.tokens)
        metrics.prompt_tokens.inc(prep.prompt_tokens)
    after = rt.stats()
    if job.cancelled.is_set():
        metrics.generations.labels("cancelled").inc()
        job.emit("cancelled")
        return
    metrics.generations.labels("completed").inc()
    metrics.latency.observe(time.monotonic() - job.admitted)
    job.emit(
        "end", Result("".join(text), job.tokens, finish, timings(after, job.tokens), moe_delta(before, after), first)
    )


def timings(st: Stats, generated: int) -> dict[str, Any]:
    """llama-server's `timings` names, from the request's Stats (the runtime's clock: `clock`)."""
    return {
        "prompt_n": st.prompt_tokens,
        "prompt_ms": 1000 * st.prompt_tokens / st.prompt_tps if st.prompt_tps else 0.0,
        "prompt_per_second": st.prompt_tps,
        "predicted_n": generated,
        "predicted_ms": 1000 * st.decode_tokens / st.decode_tps if st.decode_tps else 0.0,
        "predicted_per_second": st.decode_tps,
        "clock": st.clock,
    }


def moe_delta(before: Stats, after: Stats) -> dict[str, Any]:
    """The expert cache's figures for one request (counters as differences)."""
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "cpu_experts": after.cpu_experts - before.cpu_experts,
        "bytes_to_gpu": after.bytes_to_gpu - before.bytes_to_gpu,
        "prefetch_issued": after.prefetch_issued - before.prefetch_issued,
        "prefetch_used": after.prefetch_used - before.prefetch_used,
        "substitutions": {
            k: after.substitutions.get(k, 0) - before.substitutions.get(k, 0) for k in after.substitutions
        },
        "gpu_bytes_in_use": after.gpu_bytes_in_use,
        "gpu_budget": after.gpu_budget,
        "clock": after.clock,
    }
