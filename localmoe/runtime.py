"""The runtime users hold: `localmoe.load(...)` returns one. See docs/api.md."""

from __future__ import annotations

import numbers
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
from .residency.cache_policies import ONLINE_POLICIES
from .compute import policy as compute_policy
from .compute.counters import readback
from .compute.experts import ExpertStore
from .compute.kernels import KV_TYPES
from .residency.gpu_tier import DeviceTier
from .fallback.miss_policies import MISS_POLICIES
from .residency.profiles import get_profile
from .residency.resident import AllResident
from .residency.scheduler import ExpertScheduler, ResidencyConfig
from .residency.trace import TraceRecorder
from .gguf.file import GGUFModel
from .model import KVCache, MoEModel
from .options import LoadOptions, resolve
from .sampling import DEFAULT, MAX_TOKENS, SamplingParams, sample
from .stats import Stats, StatsCollector
from .tokenizer import IncrementalDecoder, Tokenizer
from .gguf import names

ON_MISS_POLICIES = tuple(MISS_POLICIES)
MAX_TOKENS_LIMIT = 2**31 - 1  # max_tokens beyond this is a mistake, not a request


HOST_HEADROOM = 3 << 29  # 1.5 GiB left to the KV cache, activations, Python and the rest of the system


def default_host_mem(dense_bytes: int, available: int | None = None) -> int:
    """Host RAM for repacked experts when the user gives no --host-mem: what is available
    (`available`, else now: free memory plus reclaimable page cache), less the dense weights and
    HOST_HEADROOM; 0 when that leaves nothing. A repacked expert's bytes in the file are not read
    again (their pages are released: GGUFModel.release), so the file's pages need room only for the
    experts beyond the budget, which ggml computes in place from the memory map."""
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    return max(0, available - dense_bytes - HOST_HEADROOM)


TORCH_THREADS = torch.get_num_threads()  # PyTorch's own default (physical cores), read before any load sets another


def default_threads(sample_s: float = 0.1) -> int:
    """CPU threads when the user asks for none: the cores PyTorch would use (physical cores this
    process may run on), less the cores other processes keep busy now (sampled over `sample_s`;
    this process's own use is not counted), at least 1. Measured at full depth (docs/speed.md): with
    two busy processes on 2 cores, 1 thread decodes 3.1× faster than 2 (8.07 against 2.57 tok/s),
    because each of the kernels' parallel regions waits for its slowest, descheduled thread."""
    import psutil

    cores = min(
        TORCH_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    me = psutil.Process()
    psutil.cpu_percent(None)
    me.cpu_percent(None)
    time.sleep(sample_s)
    others = (
        psutil.cpu_percent(None) * psutil.cpu_count() - me.cpu_percent(None)
    ) / 100  # cores busy with other processes
    return max(1, min(cores, round(cores - others)))


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
    def __init__(self, path: str | os.PathLike[str] | None = None, options: LoadOptions | None = None, **kwargs: Any):
        """See `load`: `options` (None → the defaults), with any LoadOptions field as a keyword on top."""
        o = self.options = resolve(options, kwargs)
        # this runtime's compute path (compute/policy.py): the one in effect now, with load's kernel=;
        # in effect during the load and every forward pass of the runtime, whatever thread runs it
        self.compute = compute_policy.current()
        if o.kernel is not None:
            self.compute = self.compute.replace(kernel=o.kernel)
        with compute_policy.use(self.compute):
            self._open(path, o)

    def _open(self, path: str | os.PathLike[str] | None, o: LoadOptions) -> None:
        device, gpu_mem, policy, on_miss, prefetch = o.device, o.gpu_mem, o.policy, o.on_miss, o.prefetch
        n_ctx, threads, host_mem, trace, progress = o.n_ctx, o.threads, o.host_mem, o.trace, o.progress
        miss_options, seed, profile = o.miss_options, o.seed, o.profile
        self.path = os.fspath(path) if path is not None else demo_model_path()
        self.device = resolve_device(device)
        _check_policy_names(policy, on_miss)
        self.gpu_budget = parse_size(gpu_mem)
        self.policy, self.on_miss, self.prefetch, self.profile = policy, on_miss, prefetch, profile
        self.miss_options = dict(miss_options or {})
        if profile is not None:
            get_profile(profile)
        if threads is not None and int(threads) < 1:
            raise LocalMoEError(f"threads must be ≥ 1, got {threads}")
        self.threads = int(threads) if threads else default_threads()
        self.threads_given = bool(threads)
        torch.set_num_threads(self.threads)
        if n_ctx < 1:
            raise LocalMoEError(f"n_ctx must be positive, got {n_ctx}")
        if o.kv_type not in KV_TYPES:
            raise LocalMoEError(f"unknown KV cache type {o.kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        self.kv_type = o.kv_type

        self.gguf = GGUFModel(self.path)
        self.spec = self.gguf.spec
        self.n_ctx = min(int(n_ctx), self.spec.ctx_train)
        self.tokenizer = Tokenizer(self.path, self.gguf.meta(names.CHAT_TEMPLATE))
        self._stats = StatsCollector(self.spec.n_layer, self.spec.n_expert, moe_layers=self.spec.moe_layers)
        # The CPU's copy of the experts (repacked for the CPU kernels). On CUDA the GPU tier is a
        # DeviceTier holding experts in their GGUF bytes, and every run goes through the scheduler.
        # host_mem: repacked experts (VNNI layout) kept in RAM; beyond it ggml computes them in place
        self.host_mem = parse_size(host_mem) if host_mem is not None else default_host_mem(self.gguf.dense_bytes())
        self.host_mem_default = host_mem is None  # the default from the RAM available at load (run --verbose says so)
        if self.host_mem < 0:
            raise LocalMoEError(f"host_mem must be ≥ 0, got {host_mem}")
        self.store = ExpertStore(self.gguf, torch.device("cpu"), self.host_mem)
        # every expert the VNNI kernel computes and host_mem holds is repacked now, once (C, all
        # threads), so that no token waits for a repack: the cold start's decode is the warm one's
        self.store.preload(
            (lambda done, total: progress("repacking experts", done, total)) if progress is not None else None
        )
        self.scheduler: ExpertScheduler | None = None
        self.model = MoEModel(self.gguf, AllResident(self.store, self._stats), self.device)
        cpu_layers = _static_cpu_layers(o.n_cpu_moe, o.cpu_moe, self.spec.n_layer)
        if (
            self.device.type == "cuda"
            or self.gpu_budget is not None
            or profile is not None
            or trace is not None
            or cpu_layers is not None
        ):
            self._start_scheduler(cpu_layers)
        if trace is not None:
            self.scheduler.trace = TraceRecorder(
                trace,
                self.spec.name,
                self.spec.n_layer,
                self.spec.n_expert,
                self.spec.n_expert_used,
                self.scheduler.bytes_per_expert,
            )
        self._cache = self.new_cache()
        self._cache_tokens: list[int] = []  # the ids whose K/V the cache holds, for prefix reuse
        self.model.plan_decode()
        self._lock = threading.Lock()
        self._seed = seed
        self._closed = False

    # -- residency --------------------------------------------------------------------------------
    def _expert_budget(self, cpu_layers: frozenset[int] | None) -> int:
        """Bytes left for experts once the dense weights are placed on the GPU."""
        dense = self.gguf.dense_bytes()
        per_layer = [self.gguf.expert_bytes(layer) * self.spec.n_expert for layer in range(self.spec.n_layer)]
        if self.gpu_budget is None:  # no budget: room for every expert (or for the GPU layers' ones)
            need = sum(b for layer, b in enumerate(per_layer) if cpu_layers is None or layer not in cpu_layers)
            self._check_device_room(need, "every expert" if cpu_layers is None else "every GPU layer's experts")
            return need
        smallest = min(self.gguf.expert_bytes(layer) for layer in self.spec.moe_layers)
        if self.gpu_budget < dense + smallest:
            raise LocalMoEError(
                f"--gpu-mem {_fmt_bytes(self.gpu_budget)} does not hold the dense weights ({_fmt_bytes(dense)}) "
                f"plus one expert; give at least {_fmt_bytes(dense + smallest)} "
                f"(all experts: {_fmt_bytes(dense + sum(per_layer))})"
            )
        self._check_device_room(self.gpu_budget - dense, f"--gpu-mem {_fmt_bytes(self.gpu_budget)}")
        return self.gpu_budget - dense

    def _check_device_room(self, expert_bytes: int, what: str) -> None:
        """On CUDA, refuse an expert tier that cannot fit in the GPU's free memory (the dense weights
        are already placed), keeping 512 MiB for activations, the KV cache and dequantization scratch."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.scheduler is not None and self.scheduler.tier is not None:
            free += self.scheduler.tier.bytes_in_use  # a new configuration replaces the current tier
        room = free - (512 << 20)
        if expert_bytes > room:
            raise LocalMoEError(
                f"{what} needs {_fmt_bytes(expert_bytes)} of GPU memory for experts but only "
                f"{_fmt_bytes(max(room, 0))} is free after the dense weights; give a smaller budget, "
                f"e.g. --gpu-mem {_fmt_bytes(self.gguf.dense_bytes() + max(room, 0) // 2)}"
            )

    def _start_scheduler(self, cpu_layers: frozenset[int] | None = None) -> None:
        profile = get_profile(self.profile or ("desktop-24gb" if self.device.type == "cuda" else "laptop-8gb"))
        config = ResidencyConfig(
            self._expert_budget(cpu_layers),
            self.policy,
            self.on_miss,
            self.prefetch,
            cpu_layers,
            tuple(sorted(self.miss_options.items())),
            all_resident=self.gpu_budget is None,
        )
        table = self._buddy_table()
        tier = DeviceTier(self.gguf, self.device) if self.device.type == "cuda" else None
        try:
            self.scheduler = ExpertScheduler(self.store, self._stats, config, profile, tier)
        except TypeError as exc:  # a miss option the policy does not take
            raise LocalMoEError(f"bad option for miss policy '{self.on_miss}': {exc}") from None
        self.scheduler.buddy_table = table
        self.model.experts = self.scheduler
        self._stats.clock = self.scheduler.clock

    def attach_tier(self, tier: DeviceTier) -> None:
        """Run the GPU tier through `tier` from now on, the residency settings kept (the cache
        restarts). For tests and `scripts/gpu-check --smoke`: a DeviceTier on the CPU device
        (kernel="triton": the Triton kernels under their interpreter) runs the CUDA code path
        without a GPU."""
        with self._lock:
            if self.scheduler is None:
                self._start_scheduler()
            old = self.scheduler
            self._stats.remove_on_snapshot(old.absorb_device_uses)
            if old.tier is not None:
                old.tier.clear()  # its buffers go now, not when the old scheduler is collected
            sched = ExpertScheduler(self.store, self._stats, old.config, old.profile, tier)
            sched.buddy_table, sched.trace = old.buddy_table, old.trace
            self.model.experts = self.scheduler = sched

    def _buddy_table(self):
        """The calibrated buddy table beside the model (needed by on_miss='buddy'; used by 'cost')."""
        if self.on_miss not in ("buddy", "cost"):
            return None
        from .fallback.buddies import BuddyTable, sidecar_path

        path = sidecar_path(self.path)
        if not os.path.exists(path):
            if self.on_miss == "buddy":
                raise LocalMoEError(
                    f"on_miss='buddy' needs a buddy table and {path} does not exist; "
                    f"run `localmoe calibrate {self.path}` first"
                )
            return None
        return BuddyTable.load(path, self.path)

    def _clock(self) -> float:
        """Seconds on the runtime's clock: modelled when a scheduler models the hardware."""
        if self.scheduler is not None and not self.scheduler.measured:
            return self.scheduler.elapsed()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        self._check_open()
        if not isinstance(text, str):
            raise LocalMoEError(f"tokenize() takes a str, got {type(text).__name__}")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise LocalMoEError(f"add_bos must be True, False or None, got {add_bos!r}")
        return self.tokenizer.tokenize(text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids; an id outside the vocabulary raises (llama.cpp would abort)."""
        self._check_open()
        ids = self._token_ids(ids)
        return self.tokenizer.detokenize(ids) if ids else ""

    # -- numerics ---------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of `ids`, from a fresh context: (len(ids), n_vocab) float32."""
        ids = self._check_ids(ids)
        with self._lock:
            cache = self.new_cache()
            start, wall = self._clock(), time.perf_counter()
            out = self._forward(ids, cache, all_logits=True)
            self._stats.record_prompt(len(ids), self._clock() - start, time.perf_counter() - wall)
        return out.float().cpu().numpy()

    def decode_logits(self, ids: list[int]) -> Iterator[tuple[torch.Tensor, float, float]]:
        """Run `ids` one token at a time through a fresh KV cache, as generation decodes (so residency
        behaves as it does in use); yield per token the next-token logits [V] and the seconds the
        step took on the runtime's clock and on the wall clock. The runtime is held while iterating;
        the steps count in the expert counters of `stats()`, not in its prompt and decode rates."""
        ids = self._check_ids(ids)
        with self._lock:
            cache = self.new_cache()
            for token in ids:
                c0, w0 = self._clock(), time.perf_counter()
                logits = self._forward([token], cache, all_logits=False)[-1]
                yield logits, self._clock() - c0, time.perf_counter() - w0

    def new_cache(self) -> KVCache:
        """An empty context of this runtime's size, device and KV cache type."""
        return KVCache(self.spec, self.n_ctx, self.device, KV_TYPES[self.kv_type])

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache's rows once the context is full (n_ctx positions; the cache grows to
        it by doubling). Recurrent states (DeltaNet layers) are not counted: their size is fixed."""
        return self.new_cache().full_bytes(self.model.cache_rows, self.model.cache_dtypes)

    def _forward(self, ids: list[int], cache: KVCache, all_logits: bool) -> torch.Tensor:
        with compute_policy.use(self.compute):
            return self.model.forward(torch.tensor(ids, dtype=torch.long), cache, all_logits=all_logits)

    def _token_ids(self, ids: Any) -> list[int]:
        """ids as a list of Python ints, each inside the vocabulary; anything else raises."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise LocalMoEError(f"token ids must be a list of ints, got {type(ids).__name__}")
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise LocalMoEError(f"token ids must be ints, got {t!r} ({type(t).__name__})")
            out.append(int(t))
        bad = [t for t in out if not 0 <= t < self.spec.n_vocab]
        if bad:
            raise LocalMoEError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.n_vocab - 1})")
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise LocalMoEError("this runtime is closed; load the model again")

    def _check_ids(self, ids: list[int]) -> list[int]:
        self._check_open()
        ids = self._token_ids(ids)
        if not ids:
            raise LocalMoEError("no tokens to evaluate: the prompt is empty")
        if len(ids) > self.n_ctx:
            raise LocalMoEError(
                f"the prompt is {len(ids)} tokens but the context holds {self.n_ctx}; "
                "shorten it or raise n_ctx (--ctx-size)"
            )
        return ids

    # -- generation -------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[dict[str, Any]],
        max_tokens: int = MAX_TOKENS,
        temperature: float = DEFAULT.temperature,
        top_p: float = DEFAULT.top_p,
        top_k: int = DEFAULT.top_k,
        seed: int | None = None,
    ) -> Iterator[Chunk]:
        """Yield a Chunk per generated token, then a closing Chunk with the finish reason.
        `prompt` is text, or a list of chat messages rendered with the model's chat template.
        Bad input raises LocalMoEError here, before the iterator is returned; closing the
        iterator stops generation at the next token."""
        self._check_open()
        params = SamplingParams(temperature, top_k, top_p).validate()
        max_tokens = _check_max_tokens(max_tokens)
        seed = _check_seed(seed if seed is not None else self._seed)
        if isinstance(prompt, list):
            ids = self.tokenizer.tokenize_chat(prompt)
        elif isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            raise LocalMoEError(f"the prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
        ids = self._check_ids(ids)
        generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        return self._stream_locked(ids, max_tokens, params, generator)

    def _stream_locked(
        self, ids: list[int], max_tokens: int, params: SamplingParams, generator: torch.Generator
    ) -> Iterator[Chunk]:
        with self._lock:
            self._check_open()
            yield from self._generate_locked(ids, max_tokens, params, generator)

    def _generate_locked(
        self, ids: list[int], max_tokens: int, params: SamplingParams, generator: torch.Generator
    ) -> Iterator[Chunk]:
        # Reuse the cached K/V of the longest common prefix (multi-turn chat re-sends its history).
        keep = 0
        for a, b in zip(self._cache_tokens, ids[:-1]):
            if a != b:
                break
            keep += 1
        keep = self._cache.rewind(keep)  # (a recurrent state goes back to its latest snapshot ≤ keep)
        self._cache_tokens = ids[:keep]
        start, wall = self._clock(), time.perf_counter()
        logits = self._advance(ids[keep:])
        self._stats.record_prompt(len(ids) - keep, self._clock() - start, time.perf_counter() - wall)

        decoder = IncrementalDecoder()
        finish = "length"
        for i in range(max_tokens):
            token = sample(logits, params, generator)
            if self.tokenizer.is_eog(token):
                finish = "stop"
                break
            text = decoder.feed(self.tokenizer.piece(token))
            yield Chunk(text, token, None, self._stats.snapshot())
            # The last token is not run: its logits would never be read (a forward, ~60 ms at full
            # depth, before the closing chunk). The cache then ends before it, as after a stop token,
            # and _cache_tokens says so; the next turn's prefix reuse runs it with the new ids.
            if i + 1 == max_tokens or self._cache.n >= self.n_ctx:  # (context full: nothing more fits)
                break
            start, wall = self._clock(), time.perf_counter()
            logits = self._advance([token])
            self._stats.record_decode(1, self._clock() - start, time.perf_counter() - wall)
        yield Chunk(decoder.flush(), None, finish, self._stats.snapshot())

    def _advance(self, ids: list[int]) -> torch.Tensor:
        """Run ids after the cached ones; return the last position's logits [V] (on the CPU, where
        sampling and its generator live)."""
        out = self._forward(ids, self._cache, all_logits=False)
        self._cache_tokens = self._cache_tokens + list(ids)
        return readback(out[-1].float())[0]

    def generate(
        self,
        prompt: str,
        max_tokens: int = MAX_TOKENS,
        temperature: float = DEFAULT.temperature,
        top_p: float = DEFAULT.top_p,
        top_k: int = DEFAULT.top_k,
        seed: int | None = None,
    ) -> str:
        if not isinstance(prompt, str):
            raise LocalMoEError(f"generate() takes a str prompt, got {type(prompt).__name__}; use chat() for messages")
        return "".join(c.text for c in self.stream(prompt, max_tokens, temperature, top_p, top_k, seed))

    def chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int = MAX_TOKENS,
        temperature: float = DEFAULT.temperature,
        top_p: float = DEFAULT.top_p,
        top_k: int = DEFAULT.top_k,
        seed: int | None = None,
    ) -> str:
        if not isinstance(messages, list):
            raise LocalMoEError("chat() takes a list of {'role': ..., 'content': ...} messages")
        return "".join(c.text for c in self.stream(messages, max_tokens, temperature, top_p, top_k, seed))

    # -- live settings ----------------------------------------------------------------------------
    def configure(
        self,
        policy: str | None = None,
        on_miss: str | None = None,
        gpu_mem: int | str | None = None,
        prefetch: bool | None = None,
    ) -> None:
        """Change the cache policy, miss policy, GPU budget or prefetching between requests
        (the chat app's /policy, /on-miss and /gpu-mem). Raises LocalMoEError on a bad value."""
        self._check_open()
        for name, value in (("policy", policy), ("on_miss", on_miss)):
            if value is not None and not isinstance(value, str):
                raise LocalMoEError(f"{name} must be a str, got {type(value).__name__}")
        if prefetch is not None and not isinstance(prefetch, bool):
            raise LocalMoEError(f"prefetch must be True, False or None, got {prefetch!r}")
        if gpu_mem is not None and (
            isinstance(gpu_mem, bool) or not isinstance(gpu_mem, (int, str)) or parse_size(gpu_mem) <= 0
        ):
            raise LocalMoEError(f"gpu_mem must be a positive byte count or a size such as '6GB', got {gpu_mem!r}")
        with self._lock, compute_policy.use(self.compute):
            _check_policy_names(policy or self.policy, on_miss or self.on_miss)
            old = (self.policy, self.on_miss, self.prefetch, self.gpu_budget)
            self.policy, self.on_miss = policy or self.policy, on_miss or self.on_miss
            if prefetch is not None:
                self.prefetch = bool(prefetch)
            if gpu_mem is not None:
                self.gpu_budget = parse_size(gpu_mem)
            try:
                if self.scheduler is None:
                    if gpu_mem is not None:
                        self._start_scheduler()
                else:
                    cpu_layers = self.scheduler.config.cpu_layers
                    table = self._buddy_table()
                    params = tuple(sorted(self.miss_options.items())) if self.on_miss == old[1] else ()
                    self.scheduler.reconfigure(
                        policy=self.policy,
                        on_miss=self.on_miss,
                        prefetch=self.prefetch,
                        expert_budget=self._expert_budget(cpu_layers),
                        miss_params=params,
                        all_resident=self.gpu_budget is None,
                    )
                    self.scheduler.buddy_table = table
            except LocalMoEError:
                self.policy, self.on_miss, self.prefetch, self.gpu_budget = old
                raise

    # -- observability & lifetime -----------------------------------------------------------------
    def stats(self) -> Stats:
        return self._stats.snapshot()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.tokenizer.close()
            if self.scheduler is not None and self.scheduler.trace is not None:
                self.scheduler.trace.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | os.PathLike[str] | None = None, options: LoadOptions | None = None, **kwargs: Any) -> Runtime:
    """Open a MoE GGUF model (None → the bundled demo model). Raises LocalMoEError on bad input.
    The options are the fields of LoadOptions (localmoe/options.py: defaults and units), given as
    `options=LoadOptions(...)`, as keywords, or both (the keywords win).

    gpu_mem: GPU-tier budget (bytes or "6GB") for the dense weights plus cached experts;
    None keeps every expert resident. policy: cache policy (lru, lfu, least-stale, reuse).
    on_miss: fetch, cpu, drop, buddy, little or cost. profile: hardware profile of the modelled
    clock (laptop-8gb, desktop-24gb; default laptop-8gb when a budget is set without CUDA).
    n_cpu_moe / cpu_moe: llama.cpp's static placement (experts of the first N layers, or all, stay
    on the CPU). kv_type: the KV cache's element type, "f16" (default, as llama.cpp's) or "f32"
    (exact keys and values; decode then runs torch's attention).
    trace: write the routing of every token to this file (JSON lines). miss_options: parameters of
    the miss policy, e.g. {"share": 0.5} for little, {"min_score": 0.4, "fallback": "fetch"} for
    buddy, {"quality_budget": 0.1} for cost (see docs/fallback.md). host_mem: host RAM (bytes or
    "8GB") for experts repacked into the VNNI kernel's layout; experts beyond it, and every expert of
    a type ggml computes faster, run in place from the memory map (default: the RAM available at load
    less the dense weights and 1.5 GiB); they are repacked at load. progress(what, done, total) is
    called during long steps of the load (the repacking, in experts)."""
    return Runtime(path, options, **kwargs)


def _check_policy_names(policy: str, on_miss: str) -> None:
    if policy not in ONLINE_POLICIES:
        raise LocalMoEError(f"unknown cache policy '{policy}'; choose one of {', '.join(ONLINE_POLICIES)}")
    if on_miss not in ON_MISS_POLICIES:
        raise LocalMoEError(f"unknown miss policy '{on_miss}'; choose one of {', '.join(ON_MISS_POLICIES)}")


def _check_max_tokens(max_tokens: Any) -> int:
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, numbers.Integral)
        or not 0 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise LocalMoEError(f"max_tokens must be a whole number from 0 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}")
    return int(max_tokens)


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise LocalMoEError(f"seed must be a whole number from 0 to 2**64-1, got {seed!r}")
    return int(seed)


def _static_cpu_layers(n_cpu_moe: int | None, cpu_moe: bool, n_layer: int) -> frozenset[int] | None:
    if cpu_moe:
        return frozenset(range(n_layer))
    if n_cpu_moe is None:
        return None
    if n_cpu_moe < 0:
        raise LocalMoEError("--n-cpu-moe must be ≥ 0")
    return frozenset(range(min(n_cpu_moe, n_layer)))


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
