"""`localmoe eval`: what each miss policy costs in accuracy and gains in speed.

The all-resident model and each policy read the same tokens in decode mode (one token at a time
through the KV cache, as generation runs, so residency behaves as it does in use), in windows
that start from an empty context. Reported per policy: perplexity, top-1 agreement and mean
KL(all-resident ‖ policy) of the next-token distributions, substitutions, hit rate, and decode
tokens/s — modelled under the profile, and measured on this machine.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..errors import LocalMoEError
from .miss_policies import make_miss_policy, parse_policy_spec


def decode_logprobs(
    rt, ids: list[int], window: int, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, float, float]:
    """Log-probabilities [N-windows, V] of each next token, one token per step, windows of
    `window` tokens; returns (logprobs, clock seconds, wall seconds) of the decode steps."""
    out = []
    clock = wall = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        for logits, step_clock, step_wall in rt.decode_logits(chunk[:-1]):
            clock += step_clock
            wall += step_wall
            out.append(torch.log_softmax(logits.float(), -1).numpy())
            if progress:
                progress(1)
    return np.stack(out), clock, wall


def targets(ids: list[int], window: int) -> np.ndarray:
    """The token each decode step predicts, in the order decode_logprobs produces them."""
    t = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        t += chunk[1:]
    return np.array(t)


def evaluate(
    model_path: str | None,
    text: str,
    policies: list[str],
    gpu_mem: int | str | None,
    profile: str,
    max_tokens: int = 1024,
    window: int = 256,
    policy: str = "lfu",
    miss_options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """`policies`: miss policy specs, each a name with optional options ("little:share=0.9", see
    `parse_policy_spec`); a spec with options runs with those alone, a bare name with
    `miss_options[name]`. The result is keyed by the spec.
    `trace`: also record the all-resident run's routing (decode order, with the prefetcher's
    predictions) to this file, for `localmoe bench --trace`."""
    from ..runtime import load

    miss_options = miss_options or {}
    runs = []  # (spec, policy name, its options): a spec's own options, else the knobs for its name
    for spec in policies:
        name, spec_options = parse_policy_spec(spec)
        options = spec_options if spec_options else dict(miss_options.get(name, {}))
        make_miss_policy(name, **options)  # every option checked before minutes of decoding
        runs.append((spec, name, options))
    with load(model_path, device="cpu", profile=profile, trace=trace) as base:
        ids = base.tokenize(text)[: max_tokens + 1]
        if len(ids) < 2:
            raise LocalMoEError("the evaluation text is too short; give at least a sentence")
        window = min(window, base.n_ctx - 1)
        tgt = targets(ids, window)
        n = len(tgt)
        step = (lambda k: progress("all-resident", k, n)) if progress else None
        ref, ref_clock, ref_wall = decode_logprobs(base, ids, window, _counter(step))
    rows = np.arange(n)
    ref_nll = -ref[rows, tgt]
    ref_top1 = ref.argmax(-1)
    result: dict[str, Any] = {
        "tokens": n,
        "gpu_mem": gpu_mem,
        "profile": profile,
        "baseline": {
            "perplexity": float(math.exp(ref_nll.mean())),
            "decode_tps": n / ref_clock if ref_clock else 0.0,
            "decode_tps_measured": n / ref_wall,
            "clock": f"modelled:{profile}",
        },
        "policies": {},
    }
    for spec, name, options in runs:
        with load(
            model_path,
            device="cpu",
            profile=profile,
            gpu_mem=gpu_mem,
            policy=policy,
            on_miss=name,
            miss_options=options,
        ) as rt:
            step = (lambda k, spec=spec: progress(spec, k, n)) if progress else None
            lp, clock, wall = decode_logprobs(rt, ids, window, _counter(step))
            st = rt.stats()
        nll = -lp[rows, tgt]
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        result["policies"][spec] = {
            "perplexity": float(math.exp(nll.mean())),
            "perplexity_change": float(math.exp(nll.mean() - ref_nll.mean()) - 1.0),
            "top1_agreement": float((lp.argmax(-1) == ref_top1).mean()),
            "kl": float(kl.mean()),
            "decode_tps": n / clock if clock else 0.0,
            "decode_tps_measured": n / wall,
            "clock": st.clock,
            "hit_rate": st.hit_rate,
            "substitutions": st.substitutions,
            "cpu_experts": st.cpu_experts,
            "bytes_to_gpu": st.bytes_to_gpu,
        }
    return result


def _counter(step):
    if step is None:
        return None
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        step(done[0])

    return tick


def format_table(res: dict[str, Any]) -> str:
    b = res["baseline"]
    fetch = res["policies"].get("fetch", {}).get("decode_tps")
    lines = [
        (
            f"{res['tokens']} tokens, GPU budget {res['gpu_mem']}, profile {res['profile']} (decode tok/s: "
            "modelled; measured on this machine in brackets)"
        ),
        (
            "| policy | perplexity | Δ ppl | top-1 agree | KL | decode tok/s | vs fetch | hit rate | buddy | "
            "little | drop |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        (
            f"| all-resident | {b['perplexity']:.3f} | – | 100% | 0 | {b['decode_tps']:.1f} "
            f"[{b['decode_tps_measured']:.1f}] | {_ratio(b['decode_tps'], fetch)} | 100% | | | |"
        ),
    ]
    for name, p in res["policies"].items():
        ratio = _ratio(p["decode_tps"], fetch)
        s = p["substitutions"]
        lines.append(
            f"| {name} | {p['perplexity']:.3f} | {p['perplexity_change']:+.2%} | {p['top1_agreement']:.1%} | "
            f"{p['kl']:.4f} | {p['decode_tps']:.1f} [{p['decode_tps_measured']:.1f}] | {ratio} | "
            f"{p['hit_rate']:.1%} | {s['buddy']} | {s['little']} | {s['drop']} |"
        )
    return "\n".join(lines)


def _ratio(tps: float, fetch: float | None) -> str:
    return f"{tps / fetch:.2f}×" if fetch else "–"
