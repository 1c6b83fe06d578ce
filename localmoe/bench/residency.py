"""Residency benchmarks: cache policies replayed on a routing trace, and decode speed of the
placement strategies under a hardware profile (`localmoe bench`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..residency.cache_policies import ONLINE_POLICIES
from ..errors import LocalMoEError
from ..residency.trace import Trace, replay

DEFAULT_PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form, and void;"


# -- trace replay -------------------------------------------------------------------------------
def replay_table(
    trace: Trace, budgets: list[float], policies: list[str], prefetch: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for share in budgets:
        if not 0 < share <= 1:
            raise LocalMoEError(f"budget shares must be in (0, 1], got {share}")
        for name in policies:
            r = replay(trace, name, share, prefetch=prefetch)
            rows.append(
                {
                    "budget_share": share,
                    "budget_bytes": r.budget_bytes,
                    "policy": name,
                    "hit_rate": r.hit_rate,
                    "hits": r.hits,
                    "misses": r.misses,
                    "prefetch_issued": r.prefetch_issued,
                    "prefetch_used": r.prefetch_used,
                }
            )
    return rows


def format_replay(trace: Trace, rows: list[dict[str, Any]]) -> str:
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    budgets = list(dict.fromkeys(r["budget_share"] for r in rows))
    head = (
        f"trace: {trace.model}, {trace.n_tokens} tokens × {trace.n_layer} layers, {trace.n_expert} experts, "
        f"top-{trace.top_k}\n"
    )
    lines = [head, "| budget (of expert bytes) | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for b in budgets:
        cells = [next(r for r in rows if r["budget_share"] == b and r["policy"] == p)["hit_rate"] for p in policies]
        lines.append(f"| {b:.0%} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    return "\n".join(lines)


# -- placement strategies under a profile --------------------------------------------------------
@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    decode_tps: float
    prompt_tps: float
    hit_rate: float
    bytes_to_gpu: int
    cpu_experts: int
    prefetch_precision: float
    prefetch_recall: float
    prefetch_issued: int
    prefetch_used: int
    clock: str
    text: str


def strategies_for(model_path: str | None, gpu_mem: int) -> list[tuple[str, dict[str, Any]]]:
    """The comparison `localmoe bench` runs: llama.cpp-style static placement (the fewest CPU
    layers that fit the budget), on-demand fetch with LRU, and ours."""
    from ..gguf.file import GGUFModel
    from ..bundled import demo_model_path

    m = GGUFModel(model_path or demo_model_path())
    room = gpu_mem - m.dense_bytes()
    per_layer = [m.expert_bytes(layer) * m.spec.n_expert for layer in range(m.spec.n_layer)]
    n_cpu = 0
    while n_cpu < m.spec.n_layer and sum(per_layer[n_cpu:]) > room:
        n_cpu += 1
    return [
        (f"static --n-cpu-moe {n_cpu}", dict(n_cpu_moe=n_cpu, gpu_mem=None)),
        ("fetch + lru", dict(on_miss="fetch", policy="lru", prefetch=False, gpu_mem=gpu_mem)),
        ("cpu + reuse + prefetch", dict(on_miss="cpu", policy="reuse", prefetch=True, gpu_mem=gpu_mem)),
    ]


def run_strategies(
    model_path: str | None, gpu_mem: int, profile: str, prompt: str, max_tokens: int, threads: int | None = None
) -> list[StrategyResult]:
    from ..runtime import load

    results = []
    for label, kwargs in strategies_for(model_path, gpu_mem):
        with load(model_path, device="cpu", profile=profile, threads=threads, **kwargs) as rt:
            text = rt.generate(prompt, max_tokens=max_tokens, temperature=0)
            s = rt.stats()
            results.append(
                StrategyResult(
                    label,
                    s.decode_tps,
                    s.prompt_tps,
                    s.hit_rate,
                    s.bytes_to_gpu,
                    s.cpu_experts,
                    s.prefetch_precision,
                    s.prefetch_recall,
                    s.prefetch_issued,
                    s.prefetch_used,
                    s.clock,
                    text,
                )
            )
    return results


def format_strategies(results: list[StrategyResult], gpu_mem: int) -> str:
    base = next((r.decode_tps for r in results if r.strategy.startswith("fetch")), 0.0)
    lines = [
        f"GPU budget {gpu_mem / 2**20:.1f} MiB, clock {results[0].clock}",
        (
            "| strategy | decode tok/s | vs fetch+lru | prompt tok/s | hit rate | MiB to GPU | CPU experts | "
            "prefetch precision | prefetch recall |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.decode_tps / base if base else 0.0
        pf = (
            (f"{r.prefetch_precision:.1%}", f"{r.prefetch_recall:.1%}")
            if r.prefetch_issued or r.prefetch_recall
            else ("-", "-")
        )
        lines.append(
            f"| {r.strategy} | {r.decode_tps:.1f} | {ratio:.2f}× | {r.prompt_tps:.1f} | {r.hit_rate:.1%} | "
            f"{r.bytes_to_gpu / 2**20:.1f} | {r.cpu_experts} | {pf[0]} | {pf[1]} |"
        )
    return "\n".join(lines)


def strategies_json(results: list[StrategyResult]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(r).items() if k != "text"} for r in results]


DEFAULT_POLICIES = [*ONLINE_POLICIES, "belady"]
