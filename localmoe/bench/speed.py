"""`localmoe bench`: prompt and decode speed of localmoe against llama.cpp on the same GGUF file.

Both engines get the same token ids (a fixed, seeded prompt), the same thread count and the same
procedure: a warm-up run, then `reps` timed runs of [prefill `prompt_tokens` in one call (which
runs them in ubatches of at most localmoe.model.UBATCH tokens: llama.cpp's n_ubatch is set to it),
then decode `decode_tokens` one token per call through the KV cache]. Sampling is not timed: the decode
steps feed fixed ids, so both engines do identical work. A row reports the median tokens/s and the
achieved memory bandwidth, bytes touched per decoded token × decode tokens/s (as gpt-fast reports
it): every dense weight, one embedding row and the top-k experts of each layer at their size in the
file. Ratios are computed from rows measured in the same run, never from stored figures.

Each engine runs in a process of its own, one after the other (`python -m localmoe.bench.speed
llama-worker|localmoe-worker ...`): a crash in llama.cpp's native code — e.g. the AMX path of a
`-march=native` build on some Xeons — becomes a one-line error instead of killing the benchmark,
each engine's peak RSS is its own, and a 16 GB file fits a 24 GB machine. A fresh process also
gives the cold start a user sees: load time, time to first token (the prompt's prefill, which
makes the first token's logits) and the decode speed of the first `decode_tokens` tokens after load,
before any warm-up; the warm rows (warm-up, then `reps` timed runs) follow in the same process,
the cold start's pass standing in for the first warm-up run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .. import openmp
from ..compute import counters
from ..gguf import names
from ..compute.policy import KERNEL_MODES
from ..errors import LocalMoEError
from ..gguf.file import GGUFModel
from ..gguf.qtypes import BY_NAME as QTYPES_BY_NAME
from ..gguf.qtypes import TYPES as QTYPES

LLAMA_CPP = "llama.cpp"
REBUILD_HINT = (  # a build for another CPU (a cached wheel) or llama.cpp's AMX path on some Xeons
    "rebuild llama-cpp-python for this CPU and without AMX: CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile "
    "-mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install --force-reinstall "
    "--no-cache-dir llama-cpp-python"
)


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128
    decode_tokens: int = 64
    reps: int = 3
    warmup: int = 1
    threads: int = 2
    seed: int = 0  # of the prompt and decode token ids
    rounds: int = 1  # engines run in turn this many times (each round: warm-up + reps)


@dataclass(frozen=True)
class BenchRow:
    """One engine (or one engine configuration, e.g. "localmoe (policy lfu, gpu-mem 6GB)")."""

    engine: str
    prompt_tps: float  # median over the timed repetitions
    decode_tps: float
    prompt_tps_runs: list[float]
    decode_tps_runs: list[float]
    bytes_per_token: int  # weight bytes touched per decoded token
    bandwidth_gbs: float  # bytes_per_token × decode_tps / 1e9
    clock: str = "measured"  # or "modelled:PROFILE" for budgeted runs on a modelled GPU tier
    notes: str = ""
    syncs_per_token: float | None = None  # localmoe: device→host readbacks per decoded token (compute/counters.py)
    launches_per_token: float | None = None  # localmoe: Triton kernel launches per decoded token
    load_s: float | None = None  # cold start, median over rounds: opening the model
    ttft_s: float | None = None  # then the prompt's prefill, which yields the first token
    cold_decode_tps: float | None = None  # then the first decode_tokens tokens, no warm-up
    peak_rss_bytes: int | None = None  # the engine's process, the largest over rounds


@dataclass(frozen=True)
class BenchResult:
    model: str
    config: BenchConfig
    rows: list[BenchRow]
    baseline: str | None  # engine name the ratios divide by
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # engine → {"prompt": x, "decode": y}

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": asdict(self.config),
            "baseline": self.baseline,
            "rows": [asdict(r) for r in self.rows],
            "ratios": self.ratios,
        }


# -- what the benchmark feeds and measures ---------------------------------------------------------
def token_ids(n_vocab: int, cfg: BenchConfig) -> tuple[list[int], list[int]]:
    """The fixed prompt ids and decode ids: seeded, so both engines (and reruns) see the same."""
    rng = np.random.default_rng(cfg.seed)
    hi = min(n_vocab, 32000)
    return rng.integers(0, hi, cfg.prompt_tokens).tolist(), rng.integers(0, hi, cfg.decode_tokens).tolist()


def bytes_per_token(m: GGUFModel) -> int:
    """Weight bytes one decoded token reads, at their size in the file: all dense tensors except
    the embedding table (one row of it), plus the top-k routed experts of every layer."""
    spec = m.spec
    dense = sum(
        t.n_bytes for t in m.tensors.values() if not names.is_expert_tensor(t.name) and t.name != names.TOKEN_EMBD
    )
    embd = m.view(names.TOKEN_EMBD)
    if not m.has(names.OUTPUT):  # tied output head: the whole table is read by the head
        dense += embd.n_bytes
    dense += embd.n_bytes // embd.shape[0]
    experts = sum(spec.n_expert_used * m.expert_bytes(layer) for layer in range(spec.n_layer))
    return dense + experts


def make_row(
    engine: str,
    runs: list[tuple[float, float]],
    cfg: BenchConfig,
    nbytes: int,
    clock: str = "measured",
    notes: str = "",
    per_token: tuple[float, float] | None = None,
    colds: list[dict[str, Any]] | None = None,
) -> BenchRow:
    """runs: (prefill seconds, decode seconds) per timed run → a row of medians. per_token: (host
    syncs, kernel launches) per decoded token, where the engine counts them. colds: each round's
    process's cold start ({"load_s", "ttft_s", "cold_decode_tps", "peak_rss"})."""
    p = [cfg.prompt_tokens / s for s, _ in runs]
    d = [cfg.decode_tokens / s for _, s in runs]
    decode = statistics.median(d)
    syncs, launches = per_token if per_token is not None else (None, None)
    colds = [c for c in colds or [] if c]
    med = (lambda key: statistics.median(c[key] for c in colds)) if colds else (lambda key: None)
    rss = max((c["peak_rss"] for c in colds), default=None)
    return BenchRow(
        engine,
        statistics.median(p),
        decode,
        p,
        d,
        nbytes,
        nbytes * decode / 1e9,
        clock,
        notes,
        syncs,
        launches,
        med("load_s"),
        med("ttft_s"),
        med("cold_decode_tps"),
        rss,
    )


def cold_start(
    load: Callable[[], tuple[list[int], list[int]]],
    prefill: Callable[[list[int]], None],
    decode_one: Callable[[int], None],
) -> dict[str, float]:
    """What a user waits for in a fresh process: load (which returns the prompt and decode ids),
    the prompt (its prefill yields the first token), the first tokens."""
    t0 = time.perf_counter()
    prompt, gen = load()
    load_s = time.perf_counter() - t0
    prefill_s, decode_s = timed_pass(prefill, decode_one, prompt, gen)
    return {"load_s": load_s, "ttft_s": prefill_s, "cold_decode_tps": len(gen) / decode_s}


def timed_pass(
    prefill: Callable[[list[int]], None], decode_one: Callable[[int], None], prompt: list[int], gen: list[int]
) -> tuple[float, float]:
    """(seconds to prefill `prompt`, seconds to decode `gen` one token per call)."""
    t0 = time.perf_counter()
    prefill(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        decode_one(tok)
    return t1 - t0, time.perf_counter() - t1


def peak_rss() -> int:
    """This process's peak resident set, bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_engine(
    prefill: Callable[[list[int]], None],
    decode_one: Callable[[int], None],
    reset: Callable[[], None],
    prompt: list[int],
    gen: list[int],
    cfg: BenchConfig,
) -> list[tuple[float, float]]:
    """The shared procedure: warm-up runs, then timed (prefill seconds, decode seconds) per rep."""
    runs = []
    for rep in range(cfg.warmup + cfg.reps):
        reset()
        timed = timed_pass(prefill, decode_one, prompt, gen)
        if rep >= cfg.warmup:
            runs.append(timed)
    return runs


def after_cold_start(cfg: BenchConfig) -> BenchConfig:
    """The cold start is a full prefill + decode pass: it stands in for one warm-up run."""
    return dataclasses.replace(cfg, warmup=max(0, cfg.warmup - 1))


# -- the engines -----------------------------------------------------------------------------------
class LocalMoETimer:
    """localmoe in this process, loaded once; `runs()` times one round (warm-up + reps).
    load_kwargs go to localmoe.load (device, gpu_mem, policy, ...)."""

    def __init__(self, path: str, cfg: BenchConfig, **load_kwargs: Any):
        self.cfg = cfg
        self.counted = [0, 0, 0]  # host syncs, launches, decode steps
        self._state: dict[str, Any] = {}
        # the cold start: load, the prompt, the first decode_tokens tokens (not counted as runs)
        self.cold = cold_start(lambda: self._load(path, load_kwargs), self._prefill, self._decode_one)
        self._first_round = True  # its warm-up is the cold start's pass
        self.counted = [0, 0, 0]

    def _load(self, path: str, load_kwargs: dict[str, Any]) -> tuple[list[int], list[int]]:
        from ..runtime import load

        cfg = self.cfg
        self.rt = load(path, n_ctx=cfg.prompt_tokens + cfg.decode_tokens + 8, threads=cfg.threads, **load_kwargs)
        self.prompt, self.gen = token_ids(self.rt.spec.n_vocab, cfg)
        self._reset()
        return self.prompt, self.gen

    def _reset(self) -> None:
        self._state["cache"] = self.rt.new_cache()

    def _prefill(self, ids: list[int]) -> None:
        import torch

        counters.readback(
            self.rt.model.forward(torch.tensor(list(ids)), self._state["cache"], all_logits=False)
        )  # waits for the device

    def _decode_one(self, tok: int) -> None:
        import torch

        s0, l0 = counters.host_syncs, counters.launches
        counters.readback(self.rt.model.forward(torch.tensor([tok]), self._state["cache"], all_logits=False))
        self.counted[0] += counters.host_syncs - s0
        self.counted[1] += counters.launches - l0
        self.counted[2] += 1

    def runs(self) -> list[tuple[float, float]]:
        cfg, self._first_round = (after_cold_start(self.cfg) if self._first_round else self.cfg), False
        return time_engine(self._prefill, self._decode_one, self._reset, self.prompt, self.gen, cfg)

    @property
    def per_token(self) -> tuple[float, float] | None:
        """(host syncs, Triton launches) per decoded token over every run so far."""
        syncs, launches, n = self.counted
        return (syncs / n, launches / n) if n else None

    @property
    def clock(self) -> str:
        return self.rt.stats().clock

    def close(self) -> None:
        self.rt.close()


def run_localmoe(path: str, cfg: BenchConfig, engine: str = "localmoe", **load_kwargs: Any) -> BenchRow:
    """One row for localmoe (e.g. engine="localmoe (policy lfu, gpu-mem 6GB)" with load_kwargs)."""
    timer = LocalMoETimer(path, cfg, **load_kwargs)
    try:
        runs = [r for _ in range(cfg.rounds) for r in timer.runs()]
        return make_row(engine, runs, cfg, bytes_per_token(GGUFModel(path)), timer.clock, per_token=timer.per_token)
    finally:
        timer.close()


NATIVE_CRASHES = ("SIGILL", "SIGSEGV", "SIGBUS", "SIGABRT")  # its own code failed (not SIGKILL, SIGINT)


class LlamaCppCrashed(LocalMoEError):
    """llama.cpp's process died on a signal (its native code crashed); `signal` is its name."""

    def __init__(self, sig: str, path: str, plain_buffers: bool):
        name = os.path.basename(path)
        if sig not in NATIVE_CRASHES:  # ended from outside: the OOM killer, Ctrl-C, a timeout
            super().__init__(
                f"llama.cpp was stopped by {sig} while running {name} (out of memory?); free memory or try a "
                "smaller model"
            )
        else:
            buffers = " with plain CPU buffers" if plain_buffers else ""
            super().__init__(f"llama.cpp crashed ({sig}) while running {name}{buffers}; {REBUILD_HINT}")
        self.signal = sig


def _worker(kind: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One round of an engine in its own process: {"runs": [[prefill s, decode s], ...], "cold":
    {load_s, ttft_s, cold_decode_tps, peak_rss}, ...}. A crash raises LlamaCppCrashed (llama.cpp)."""
    engine = LLAMA_CPP if kind == "llama-worker" else "localmoe"
    cmd = [sys.executable, "-m", "localmoe.bench.speed", kind, json.dumps(job)]
    env = openmp.baseline_env() if engine == LLAMA_CPP else None  # llama.cpp as its users run it
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LocalMoEError(f"{engine} did not finish the benchmark within {timeout:.0f} s") from None
    if r.returncode < 0 and engine == LLAMA_CPP:
        raise LlamaCppCrashed(signal.Signals(-r.returncode).name, job["path"], job["plain_buffers"])
    if r.returncode < 0:
        raise LocalMoEError(
            f"localmoe's benchmark process was stopped by {signal.Signals(-r.returncode).name} (out of memory?)"
        )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise LocalMoEError(f"{engine} failed on {os.path.basename(job['path'])}: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_cpp_runs(path: str, cfg: BenchConfig, plain_buffers: bool = False, timeout: float = 1800) -> dict[str, Any]:
    """One round of llama.cpp (llama-cpp-python) in a subprocess; a crash becomes a LocalMoEError."""
    from ..model import UBATCH  # the prompt's ubatches, as localmoe's forward runs it

    job = {"path": path, "config": asdict(cfg), "plain_buffers": plain_buffers, "n_ubatch": UBATCH}
    return _worker("llama-worker", job, timeout)


def localmoe_runs(path: str, cfg: BenchConfig, load_kwargs: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """One round of localmoe in a subprocess (load_kwargs: localmoe.load's, JSON-able)."""
    return _worker("localmoe-worker", {"path": path, "config": asdict(cfg), "load": load_kwargs}, timeout)


class LlamaCppRounds:
    """llama.cpp's rounds of one benchmark, their runs pooled in `runs`. If its default load (extra
    buffer types: AMX, weights repacked at load) crashes in native code, as a build for another CPU
    does on this one, the benchmark goes on with plain CPU buffers from that round on — the runs
    with default buffers are dropped, so one row never mixes the two — and the row says so; a crash
    with plain buffers is the one-line error."""

    def __init__(self, path: str, cfg: BenchConfig, plain_buffers: bool = False):
        self.path, self.cfg, self.plain_buffers = path, cfg, plain_buffers
        self.fell_back = ""  # the signal that made it switch to plain buffers, if it did
        self.runs: list[tuple[float, float]] = []
        self.colds: list[dict[str, Any]] = []

    def round(self) -> None:
        try:
            out = llama_cpp_runs(self.path, self.cfg, self.plain_buffers)
        except LlamaCppCrashed as crash:
            if self.plain_buffers or crash.signal not in NATIVE_CRASHES:
                raise
            self.plain_buffers, self.fell_back = True, crash.signal
            print(
                (
                    f"warning: llama.cpp crashed ({self.fell_back}) with its default buffers; measuring it with "
                    "plain CPU buffers (--llama-plain-buffers)"
                ),
                file=sys.stderr,
            )
            self.runs, self.colds = [], []  # earlier rounds' runs dropped
            out = llama_cpp_runs(self.path, self.cfg, self.plain_buffers)
        self.runs += [tuple(x) for x in out["runs"]]
        self.colds.append(out.get("cold", {}))

    def notes(self) -> str:
        if self.fell_back:
            return f"plain CPU buffers (no repacking; the default buffers crashed: {self.fell_back})"
        return "plain CPU buffers (no repacking)" if self.plain_buffers else ""


def run_llama_cpp(path: str, cfg: BenchConfig, plain_buffers: bool = False) -> BenchRow:
    llama = LlamaCppRounds(path, cfg, plain_buffers)
    for _ in range(cfg.rounds):
        llama.round()
    return make_row(
        LLAMA_CPP, llama.runs, cfg, bytes_per_token(GGUFModel(path)), notes=llama.notes(), colds=llama.colds
    )


def _llama_worker(job: dict[str, Any]) -> None:
    """Runs inside the subprocess: time llama.cpp's cold start, then its warm runs; print JSON."""
    import contextlib

    import llama_cpp

    from ..llama_ref import plain_cpu_buffers

    cfg = BenchConfig(**job["config"])
    n_ctx = cfg.prompt_tokens + cfg.decode_tokens + 8
    held: dict[str, Any] = {}

    def load() -> tuple[list[int], list[int]]:
        with plain_cpu_buffers() if job["plain_buffers"] else contextlib.nullcontext():  # no AMX / repacked weights
            held["llm"] = llama_cpp.Llama(
                model_path=job["path"],
                n_threads=cfg.threads,
                n_threads_batch=cfg.threads,
                n_ctx=n_ctx,
                n_batch=max(cfg.prompt_tokens, 1),
                n_ubatch=min(max(cfg.prompt_tokens, 1), job["n_ubatch"]),  # the prompt in ubatches, as localmoe's
                verbose=False,
            )
        return token_ids(held["llm"].n_vocab(), cfg)

    cold = cold_start(load, lambda ids: held["llm"].eval(ids), lambda tok: held["llm"].eval([tok]))
    llm = held["llm"]
    prompt, gen = token_ids(llm.n_vocab(), cfg)
    llm.reset()
    runs = time_engine(llm.eval, lambda tok: llm.eval([tok]), llm.reset, prompt, gen, after_cold_start(cfg))
    llm.close()
    print(json.dumps({"runs": runs, "cold": {**cold, "peak_rss": peak_rss()}}))


def _localmoe_worker(job: dict[str, Any]) -> None:
    """Runs inside the subprocess: localmoe's cold start, then its warm runs; print JSON."""
    cfg = BenchConfig(**job["config"])
    timer = LocalMoETimer(job["path"], cfg, **job["load"])
    runs = timer.runs()
    out = {
        "runs": runs,
        "cold": {**timer.cold, "peak_rss": peak_rss()},
        "clock": timer.clock,
        "per_token": timer.per_token,
    }
    timer.close()
    print(json.dumps(out))


# -- the comparison and its table ------------------------------------------------------------------
def compare(rows: list[BenchRow], baseline: str | None = LLAMA_CPP) -> dict[str, dict[str, float]]:
    """engine → {"prompt": tps / baseline's, "decode": tps / baseline's}, for every other row."""
    base = next((r for r in rows if r.engine == baseline), None)
    if base is None:
        return {}
    return {
        r.engine: {
            "prompt": r.prompt_tps / base.prompt_tps if base.prompt_tps else 0.0,
            "decode": r.decode_tps / base.decode_tps if base.decode_tps else 0.0,
        }
        for r in rows
        if r is not base
    }


def host_mem_bytes(value: str, model: GGUFModel) -> int | None:
    """A bench --host-mem value: "default" → None (load's default), "25%" → that share of the
    model's expert bytes, else a size ("8GB", "0")."""
    from ..runtime import parse_size

    if value == "default":
        return None
    if value.endswith("%"):
        try:
            share = float(value[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise LocalMoEError(f"--host-mem share '{value}' must be between 0% and 100%")
        return int(share * model.all_expert_bytes())
    return parse_size(value)


def run_bench(
    path: str,
    cfg: BenchConfig,
    vs: str | None = LLAMA_CPP,
    plain_buffers: bool = False,
    modes: list[str] | None = None,
    host_mems: list[str] | None = None,
    **load_kwargs: Any,
) -> BenchResult:
    """Both engines, `cfg.rounds` times in turn (llama.cpp, then localmoe): a machine whose load
    drifts during the benchmark then weighs on both alike. Every run of every round is pooled.
    modes: one localmoe row per CPU kernel mode (load's kernel=: auto, ggml, vnni, torch), all
    in turn in each round; None: one row with the environment's mode. host_mems: one row per
    host-RAM budget (host_mem_bytes' forms), crossed with the modes; None: load's default."""
    model = GGUFModel(path)  # validate before spending minutes
    budgets = {hm: host_mem_bytes(hm, model) for hm in host_mems or ["default"]}
    if vs not in (None, LLAMA_CPP):
        raise LocalMoEError(f"unknown engine to compare with '{vs}'; only llama.cpp is supported")
    for m in modes or []:
        if m not in KERNEL_MODES:  # (compute/policy.py)
            raise LocalMoEError(f"unknown kernel mode '{m}'; choose from {', '.join(KERNEL_MODES)}")
    names = {}
    for mode in modes or [None]:
        for hm, nbytes in budgets.items():
            extra = ([] if mode is None else [f"LOCALMOE_KERNEL={mode}"]) + (
                []
                if host_mems is None
                else [f"host-mem {hm}" + (f" = {nbytes / 2**30:.1f} GiB" if hm.endswith("%") else "")]
            )
            names[(mode, hm)] = "localmoe" + (f" ({', '.join(extra)})" if extra else "")
    llama = LlamaCppRounds(path, cfg, plain_buffers)
    ours = {name: {"runs": [], "colds": [], "per_token": [], "clock": "measured"} for name in names.values()}
    for _ in range(cfg.rounds):  # one process per engine (and kernel mode) per round, one after the other
        if vs == LLAMA_CPP:
            llama.round()
        for (mode, hm), name in names.items():
            worker = load_kwargs | ({} if mode is None else {"kernel": mode})
            worker |= {} if budgets[hm] is None else {"host_mem": budgets[hm]}
            out = localmoe_runs(path, cfg, worker)  # load(..., kernel=mode): the worker's compute policy
            o = ours[name]
            o["runs"] += [tuple(x) for x in out["runs"]]
            o["colds"].append(out["cold"])
            o["clock"] = out["clock"]
            if out.get("per_token"):
                o["per_token"].append(out["per_token"])
    nbytes = bytes_per_token(model)
    rows = (
        [make_row(LLAMA_CPP, llama.runs, cfg, nbytes, notes=llama.notes(), colds=llama.colds)]
        if vs == LLAMA_CPP
        else []
    )
    for name, o in ours.items():
        per_token = tuple(float(np.mean([p[i] for p in o["per_token"]])) for i in range(2)) if o["per_token"] else None
        rows.append(make_row(name, o["runs"], cfg, nbytes, o["clock"], per_token=per_token, colds=o["colds"]))
    return BenchResult(path, cfg, rows, vs, compare(rows, vs))


def format_table(res: BenchResult) -> str:
    """A Markdown table: one row per engine, ratios against the baseline in the last columns."""
    c = res.config
    lines = [
        f"model: {os.path.basename(res.model)}   threads: {c.threads}   prompt: {c.prompt_tokens} tokens   "
        f"decode: {c.decode_tokens} tokens   "
        f"runs: {c.rounds} round(s) × {c.reps} (+{c.warmup} warm-up each), engines in turn; medians",
        "",
        (
            "| engine | load s | load + 1st token s | cold decode tok/s | prompt tok/s | decode tok/s | peak RSS "
            "GiB | MB/token | decode GB/s | prompt ×base | decode ×base | cold decode ×base | syncs/token | "
            "launches/token | clock |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in res.rows:
        ratio = res.ratios.get(r.engine)
        rp, rd = (
            (f"{ratio['prompt']:.2f}", f"{ratio['decode']:.2f}")
            if ratio
            else ("1.00", "1.00")
            if r.engine == res.baseline
            else ("", "")
        )
        name = r.engine + (f" ({r.notes})" if r.notes else "")
        syncs = f"{r.syncs_per_token:.1f}" if r.syncs_per_token is not None else ""
        launches = f"{r.launches_per_token:.1f}" if r.launches_per_token is not None else ""
        base = next((b for b in res.rows if b.engine == res.baseline), None)
        rc = (
            f"{r.cold_decode_tps / base.cold_decode_tps:.2f}"
            if base is not None and r is not base and r.cold_decode_tps and base.cold_decode_tps
            else ""
        )
        load = f"{r.load_s:.2f}" if r.load_s is not None else ""
        first = f"{r.load_s + r.ttft_s:.2f}" if r.load_s is not None and r.ttft_s is not None else ""
        cold = f"{r.cold_decode_tps:.2f}" if r.cold_decode_tps is not None else ""
        rss = f"{r.peak_rss_bytes / 2**30:.2f}" if r.peak_rss_bytes else ""
        lines.append(
            f"| {name} | {load} | {first} | {cold} | {r.prompt_tps:.1f} | {r.decode_tps:.2f} | {rss} | "
            f"{r.bytes_per_token / 1e6:.1f} | {r.bandwidth_gbs:.2f} | {rp} | {rd} | {rc} | {syncs} | "
            f"{launches} | {r.clock} |"
        )
    return "\n".join(lines)


# -- kernel micro-benchmark (`localmoe bench --kernels`) ---------------------------------------------
# (weights per block, bytes per block, byte offsets of float16 scale fields) of each block type
# with a CPU kernel of our own (gguf/qtypes.py); RANDOM_LAYOUTS adds the other types whose scales it
# describes (those the GPU kernels, compute/triton_gguf.py, take)
RANDOM_LAYOUTS = {t.name: (t.block, t.type_size, t.f16_at) for t in QTYPES.values() if t.f16_at is not None}
BLOCK_LAYOUTS = {name: layout for name, layout in RANDOM_LAYOUTS.items() if QTYPES_BY_NAME[name].affine is not None}


def random_blocks(qtype_name: str, n: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """A [n, k] matrix of a block type as random bytes with sane float16 scales (about `scale`):
    every code pattern occurs. Types outside RANDOM_LAYOUTS (the IQ1/IQ2/IQ3 grid types) are plain
    random bytes: fine for timing."""
    if qtype_name not in RANDOM_LAYOUTS:
        per, size = QTYPES_BY_NAME[qtype_name].block, QTYPES_BY_NAME[qtype_name].type_size
        return rng.integers(0, 256, (n, k // per * size), dtype=np.uint8)
    per, size, f16_at = RANDOM_LAYOUTS[qtype_name]
    b = rng.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    for at in f16_at:
        b[..., at : at + 2] = (
            (rng.uniform(0.5, 2.0, (n, k // per)) * scale).astype(np.float16)[..., None].view(np.uint8)
        )
    if qtype_name == "MXFP4":  # the E8M0 exponent byte: scales 2^-8 .. 2^-1 around `scale`
        e = int(round(np.log2(scale))) + 128
        b[..., 0] = rng.integers(e - 3, e + 4, (n, k // per))
    return b.reshape(n, -1)


KERNEL_TYPES = ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4", "IQ2_XXS", "IQ3_S")


def kernel_table(
    threads: int, n: int = 1536, k: int = 2048, rows: tuple[int, ...] = (1, 8, 128), copies_bytes: int = 256 << 20
) -> list[dict[str, Any]]:
    """Time x @ W.T for each quant type and backend on an expert-shaped [n, k] weight. For one row,
    distinct copies totalling ~copies_bytes are cycled so weights come from DRAM, not cache.
    Returns rows: {qtype, backend, rows, us, gbs (file bytes / time)}."""
    import torch
    from gguf import GGMLQuantizationType

    from ..compute import kernels

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    from ..compute import policy
    from ..compute.ggml_backend import usable_ggml
    from ..gguf.blocks import BLOCK_TYPES
    from ..gguf.qtypes import INT4_TYPES

    for name in KERNEL_TYPES:
        qtype = GGMLQuantizationType[name]
        raw = random_blocks(name, n, k, rng)
        # "ggml-rows": the ggml backend with every token count on the per-row driver (no graph)
        g = usable_ggml()
        backends = ["vnni"] if kernels.vnni_lib() is not None and qtype in BLOCK_TYPES else []
        backends += ["ggml", "ggml-rows"] if g is not None and g.computes(qtype) else []
        backends += (["int4"] if qtype in INT4_TYPES else []) + (["bf16"] if qtype in BLOCK_TYPES else [])
        for backend in backends:
            w0 = kernels.repack(raw, qtype, (n, k), backend="ggml" if backend == "ggml-rows" else backend)
            # ggml-rows: no token count reaches the graph path
            graph_rows = 1 << 30 if backend == "ggml-rows" else policy.current().ggml_graph_rows
            copies = [w0] + [
                dataclasses.replace(w0, tensors={key: t.clone() for key, t in w0.tensors.items()})
                for _ in range(max(0, copies_bytes // w0.nbytes - 1))
            ]
            for m in rows:
                x = torch.randn(m, k)
                with policy.override(ggml_graph_rows=graph_rows):
                    us = _time_calls(copies if m == 1 else copies[:4], x, m)
                out.append(
                    {
                        "qtype": name,
                        "backend": backend,
                        "rows": m,
                        "us": us,
                        "gbs": raw.nbytes / us / 1e3,
                        "packed_bytes": w0.nbytes,
                        "file_bytes": raw.nbytes,
                    }
                )
    return out


def _time_calls(ws: list[Any], x: Any, m: int) -> float:
    """Microseconds per call of the weights `ws` on x [m, K], after one warm-up call each."""
    reps = max(2, 64 // len(ws)) if m == 1 else max(3, 256 // m)
    for w in ws:
        w(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        for w in ws:
            w(x)
    return (time.perf_counter() - t0) / (reps * len(ws)) * 1e6


def format_kernel_table(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        f"x [T, 2048] @ W.T, W [1536, 2048] (an expert's fused gate+up), {threads} threads; µs per call (GB/s "
        "of file bytes); "
        "ggml-rows: the ggml backend without its graph path (the per-row driver at every T)",
        "",
        "| type | backend | packed/file bytes | "
        + " | ".join(f"T={m}" for m in sorted({r["rows"] for r in rows}))
        + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in sorted({r["rows"] for r in rows})) + " |",
    ]
    keys = list(dict.fromkeys((r["qtype"], r["backend"]) for r in rows))
    for q, b in keys:
        rs = [r for r in rows if r["qtype"] == q and r["backend"] == b]
        cells = " | ".join(f"{r['us']:.0f} ({r['gbs']:.1f})" for r in sorted(rs, key=lambda r: r["rows"]))
        lines.append(f"| {q} | {b} | {rs[0]['packed_bytes'] / rs[0]['file_bytes']:.2f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("llama-worker", "localmoe-worker"):
        try:
            (_llama_worker if sys.argv[1] == "llama-worker" else _localmoe_worker)(json.loads(sys.argv[2]))
        except LocalMoEError as exc:
            sys.exit(f"error: {exc}")
    else:
        sys.exit(
            "usage: python -m localmoe.bench.speed llama-worker|localmoe-worker JOB_JSON (internal; use "
            "`localmoe bench`)"
        )
