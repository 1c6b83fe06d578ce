"""The `localmoe` command. Each verb maps onto one Python API call (see docs/cli.md).

User errors exit with code 2 and one line on stderr starting with `error:`; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

from . import __version__, openmp
from .residency.cache_policies import ONLINE_POLICIES
from .errors import LocalMoEError
from .fallback.miss_policies import MISS_POLICIES
from .residency.profiles import PROFILES
from .bench.residency import DEFAULT_POLICIES
from .compute.kernels import KV_TYPES
from .options import DEFAULTS, LoadOptions
from .sampling import DEFAULT, MAX_TOKENS

ON_MISS_POLICIES = tuple(MISS_POLICIES)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_model_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "model",
        nargs=None if required else "?",
        metavar="MODEL",
        help="path of a MoE GGUF file" + ("" if required else " (default: the bundled demo model)"),
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The load options' flags; their defaults are LoadOptions' (localmoe/options.py)."""
    d = DEFAULTS
    g = p.add_argument_group("runtime")
    g.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=d.n_ctx,
        help="context size in tokens, capped at the model's training context (default %(default)s)",
    )
    g.add_argument(
        "--kv-type",
        default=d.kv_type,
        choices=tuple(KV_TYPES),
        help="element type of the KV cache: f16 (llama.cpp's default, half the memory and the bytes each "
        "decode step reads) or f32 (exact keys and values; decode runs torch's attention) (default %(default)s)",
    )
    g.add_argument(
        "-t",
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads (default: the physical cores less those other processes keep busy at load, at least 1)",
    )
    g.add_argument(
        "--device",
        default=d.device,
        choices=("auto", "cpu", "cuda"),
        help="compute device (default %(default)s: cuda when available)",
    )
    r = p.add_argument_group("expert residency")
    r.add_argument(
        "--gpu-mem",
        metavar="SIZE",
        default=d.gpu_mem,
        help="GPU-tier budget for dense weights + cached experts, e.g. 6GB (default: every expert resident)",
    )
    r.add_argument(
        "--host-mem",
        metavar="SIZE",
        default=d.host_mem,
        help="host RAM for experts repacked (at load, once) for the VNNI kernel, e.g. 8GB; beyond it "
        "experts are computed in place from the file by ggml (default: available RAM less the dense "
        "weights and 1.5 GiB)",
    )
    r.add_argument(
        "--policy",
        default=d.policy,
        choices=ONLINE_POLICIES,
        help="cache eviction policy (default %(default)s; see docs/residency.md)",
    )
    r.add_argument(
        "--on-miss",
        default=d.on_miss,
        choices=ON_MISS_POLICIES,
        help="what a missing expert does: fetch it, compute it on the CPU, drop it, run a resident buddy, "
        "run the little expert set, or choose by cost (default %(default)s; docs/fallback.md)",
    )
    r.add_argument(
        "--no-prefetch",
        action="store_false",
        dest="prefetch",
        default=d.prefetch,
        help="do not prefetch the next layer's predicted experts",
    )
    r.add_argument(
        "--profile",
        default=d.profile,
        choices=tuple(PROFILES),
        help="hardware profile of the modelled clock when the GPU tier is simulated (default laptop-8gb)",
    )
    r.add_argument(
        "--n-cpu-moe",
        type=int,
        default=d.n_cpu_moe,
        metavar="N",
        help="llama.cpp's static placement: experts of the first N layers stay on the CPU, nothing moves",
    )
    r.add_argument(
        "--cpu-moe",
        action="store_true",
        default=d.cpu_moe,
        help="llama.cpp's static placement: every expert stays on the CPU",
    )
    r.add_argument(
        "--trace",
        metavar="FILE",
        default=d.trace,
        help="record the routing of every token (JSON lines) for `localmoe bench trace`",
    )


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The LoadOptions the runtime flags give (run, chat and serve; the chat app and the server take them)."""
    return LoadOptions(
        device=args.device,
        n_ctx=args.ctx_size,
        kv_type=args.kv_type,
        threads=args.threads,
        gpu_mem=args.gpu_mem,
        policy=args.policy,
        on_miss=args.on_miss,
        prefetch=args.prefetch,
        profile=args.profile,
        n_cpu_moe=args.n_cpu_moe,
        cpu_moe=args.cpu_moe,
        trace=args.trace,
        host_mem=args.host_mem,
        seed=getattr(args, "seed", None),
        progress=load_progress(),
    )


def load_progress():
    """load()'s progress callback for the CLI: a bar on stderr for a long step (≥ 1,024 experts to
    repack, seconds on a big model), nothing for small models."""
    from .progress import Progress

    bars: dict[str, Progress] = {}

    def report(what: str, done: int, total: int) -> None:
        if total >= 1024:
            bars.setdefault(what, Progress(what, total)).update(done)

    return report


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "-n", "--max-tokens", type=int, default=MAX_TOKENS, help="tokens to generate at most (default %(default)s)"
    )
    g.add_argument(
        "--temp", type=float, default=DEFAULT.temperature, help="temperature; 0 = greedy (default %(default)s)"
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT.top_k,
        help="sample from the k most likely tokens; 0 = all (default %(default)s)",
    )
    g.add_argument("--top-p", type=float, default=DEFAULT.top_p, help="nucleus sampling mass (default %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


BENCH_COMMANDS = ("speed", "kernels", "policies", "trace")


def _add_bench_parsers(sub) -> None:
    """`localmoe bench SUBCOMMAND`: four benchmarks, each with its own flags."""
    bench = sub.add_parser(
        "bench",
        help="benchmarks: speed against llama.cpp, kernels, residency policies, traces",
        description="Benchmarks, one per subcommand; `localmoe bench SUBCOMMAND --help` lists its flags.",
    )
    bsub = bench.add_subparsers(dest="bench", metavar="SUBCOMMAND", parser_class=_Parser)

    p = bsub.add_parser(
        "speed",
        help="prompt and decode tokens/s of localmoe (and llama.cpp) on one file",
        description="Time prompt and decode tokens/s of localmoe and, with --vs llama.cpp, of "
        "llama.cpp on MODEL: the same ids and threads, each engine in its own process. "
        "See docs/speed.md.",
    )
    _add_model_arg(p, required=False)
    p.add_argument(
        "--vs",
        choices=("llama.cpp",),
        default=None,
        help="also time llama.cpp on MODEL and print the ratios (default: localmoe's rows alone)",
    )
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads of both engines (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decoded tokens (default %(default)s)")
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed repetitions after one warm-up; medians are reported (default %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the engines in turn this many times, pooling the runs (default %(default)s; 3+ on a busy machine)",
    )
    p.add_argument(
        "--device", default="cpu", choices=("auto", "cpu", "cuda"), help="localmoe's device (default %(default)s)"
    )
    p.add_argument(
        "--kernel-modes",
        metavar="MODES",
        default=None,
        help="one localmoe row per CPU kernel mode, in turn each round: auto, ggml (ggml's kernels only: "
        "what a CPU without AVX-512 runs), vnni, torch; comma-separated, e.g. auto,ggml (default: "
        "LOCALMOE_KERNEL's)",
    )
    p.add_argument(
        "--host-mem",
        metavar="SIZES",
        default=None,
        help="one localmoe row per host-RAM budget for repacked experts, in turn each round: default, a "
        "size (8GB) or a share of the expert bytes (25%%); comma-separated, e.g. default,25%%,0 "
        "(default: the user-facing default only)",
    )
    p.add_argument(
        "--llama-plain-buffers",
        action="store_true",
        help="load llama.cpp with use_extra_bufts=False from the start (no AMX/repacked weights: slower; "
        "bench switches to it by itself when the default buffers crash)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = bsub.add_parser(
        "kernels",
        help="micro-benchmark the quantized matmul kernels per quant type (no model)",
        description="Time each CPU backend's quantized matmul per quant type on random weights of the "
        "Qwen3-30B-A3B expert shape; no model needed. See docs/speed.md.",
    )
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = bsub.add_parser(
        "policies",
        help="placement strategies and miss policies under a GPU budget (modelled clock)",
        description="Decode the same prompt with static placement (llama.cpp's --n-cpu-moe), "
        "fetch+LRU and cpu+reuse+prefetch under a GPU budget and hardware profile. See "
        "docs/residency.md.",
    )
    _add_model_arg(p, required=False)
    p.add_argument(
        "--gpu-mem", metavar="SIZE", help="GPU budget (default: dense weights + --budget-share of expert bytes)"
    )
    p.add_argument(
        "--budget-share", type=float, default=0.25, help="expert share of the default budget (default %(default)s)"
    )
    p.add_argument(
        "--profile",
        default="laptop-8gb",
        choices=tuple(PROFILES),
        help="hardware profile of the modelled clock (default %(default)s)",
    )
    p.add_argument("-p", "--prompt", default=None, help="prompt (default: a fixed sentence)")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to decode (default %(default)s)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = bsub.add_parser(
        "trace",
        help="replay the cache policies on a recorded routing trace (seconds, no model)",
        description="Replay the cache policies on a routing trace (from `localmoe run --trace FILE`) "
        "at several budgets: hit rates, without the model. See docs/residency.md.",
    )
    p.add_argument("trace", metavar="FILE", help="the trace (JSON lines) to replay")
    p.add_argument("--budgets", default="0.25,0.5", help="budgets as shares of all expert bytes (default %(default)s)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="policies to compare (default %(default)s)")
    p.add_argument("--replay-prefetch", action="store_true", help="also load the recorded prefetch predictions")
    p.add_argument("--json", action="store_true", help="print JSON")


def _legacy_bench(argv: list[str]) -> list[str]:
    """The flag forms `bench` had before its subcommands, kept working: `bench MODEL --vs llama.cpp`
    (or --host-mem, --kernel-modes) is `bench speed`, `bench --kernels` is `bench kernels`,
    `bench --trace FILE` is `bench trace FILE`, and `bench [MODEL]` with other flags is `bench policies`."""
    if len(argv) < 2 or argv[0] != "bench" or argv[1] in (*BENCH_COMMANDS, "-h", "--help"):
        return argv
    rest = argv[1:]
    if "--kernels" in rest:
        return ["bench", "kernels", *[a for a in rest if a != "--kernels"]]
    if any(a == f or a.startswith(f + "=") for a in rest for f in ("--vs", "--host-mem", "--kernel-modes")):
        return ["bench", "speed", *rest]
    if "--trace" in rest:
        i = rest.index("--trace")
        return ["bench", "trace", *rest[:i], *rest[i + 1 :]]
    return ["bench", "policies", *rest]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="localmoe", description="Run Mixture-of-Experts GGUF models with more experts than fit on your GPU."
    )
    parser.add_argument("--version", action="version", version=f"localmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "info",
        help="describe a model: architecture, experts, bytes per expert, quant mix, fit",
        description="Describe a MoE GGUF file without loading its weights.",
    )
    _add_model_arg(p, required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "run",
        help="generate text from a prompt",
        description="Generate a continuation of a prompt and stream it to stdout.",
    )
    _add_model_arg(p, required=False)
    p.add_argument(
        "-p", "--prompt", default="", help="the prompt text (default: read from stdin when it is not a terminal)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat template")
    p.add_argument(
        "--verbose", action="store_true", help="print a timing block (tokens/s, peak memory, expert counters) to stderr"
    )
    _add_sampling_args(p)
    _add_runtime_args(p)

    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a live view of the expert cache",
        description=(
            "A terminal chat (Textual) with live stats and a map of which experts are resident and hot. See "
            "docs/chat.md."
        ),
    )
    _add_model_arg(p, required=False)
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    _add_sampling_args(p)
    _add_runtime_args(p)
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with live expert-cache metrics",
        description=(
            "Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), "
            "/health, Prometheus /metrics and /v1/localmoe/stats. One request runs at a time; others wait in a "
            "bounded queue. The sampling flags are the defaults for requests that leave them out. See "
            "docs/serve.md."
        ),
    )
    _add_model_arg(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port", type=int, default=8080, help="TCP port (default 8080; 0 = any free port, printed at start)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=(
            "require 'Authorization: Bearer KEY' on every endpoint but /health (default: the LOCALMOE_API_KEY "
            "environment variable, else none)"
        ),
    )
    p.add_argument(
        "--queue",
        type=int,
        default=16,
        metavar="N",
        help="requests that may wait while one runs; more get 429 (default 16)",
    )
    p.add_argument(
        "--max-body", default="4MB", metavar="SIZE", help="largest request body; larger gets 413 (default 4MB)"
    )
    p.add_argument("--verbose", action="store_true", help="log every request (uvicorn's access log)")
    _add_sampling_args(p)
    _add_runtime_args(p)

    _add_bench_parsers(sub)

    p = sub.add_parser(
        "synth",
        help="write a random-weight MoE GGUF with a real model's shapes (for benchmarks)",
        description=(
            "Write a random-weight MoE GGUF file shaped like a real model, for benchmarking without downloads. "
            "K-quants (Q4_K_M, ...) are made by llama.cpp's quantizer from a Q8_0 file."
        ),
    )
    from .bench.synth import PRESETS

    p.add_argument("preset", metavar="PRESET", help=", ".join(PRESETS) + " (tiny-moe: a 256-wide toy)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument(
        "--quant",
        default="Q4_K_M",
        help=(
            "F32, F16, Q8_0, Q4_0 (written directly) or a llama.cpp type: Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, "
            "Q3_K_S, Q3_K_M, Q3_K_L, Q2_K, IQ4_XS, IQ4_NL, MXFP4_MOE, Q4_1, Q5_0, Q5_1, BF16 (default Q4_K_M)"
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument(
        "--fast",
        action="store_true",
        help=(
            "write random block bytes instead of quantizing random floats: seconds instead of minutes for a "
            "full-depth file (--quant Q4_K_M, Q4_0, Q8_0, Q6_K or MXFP4_MOE; Q4_K_M = Q4_K with Q6_K expert down, "
            "attn_v and head; MXFP4_MOE = MXFP4 experts, Q8_0 elsewhere; rows that are not whole 256-blocks get "
            "llama.cpp's fallback types). For speed and memory runs only: the numbers it computes are noise"
        ),
    )
    p = sub.add_parser(
        "calibrate",
        help="expert statistics and the buddy table, saved beside the model",
        description=(
            "Run the model over calibration text and record, per layer, expert usage, co-activation, functional "
            "similarity of experts on real activations and router-score correlation; build the buddy table used by "
            "--on-miss buddy/cost and save it as MODEL.buddies.json with its provenance."
        ),
    )
    _add_model_arg(p, required=False)
    p.add_argument("--text", metavar="FILE", help="calibration text (default: the built-in multi-domain sample)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use at most (default 4096)")
    p.add_argument("--samples", type=int, default=64, help="inputs kept per expert to measure similarity (default 64)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for PyTorch")

    p = sub.add_parser(
        "eval",
        help="perplexity, agreement and speed of miss policies against the all-resident model",
        description=(
            "Decode the same tokens with the all-resident model and with each miss policy under a GPU budget; "
            "report perplexity, top-1 agreement, KL divergence, substitutions and decode tok/s (modelled under the "
            "profile, and measured)."
        ),
    )
    _add_model_arg(p, required=False)
    p.add_argument("--text", metavar="FILE", required=True, help="evaluation text")
    p.add_argument(
        "--on-miss",
        default="fetch,cpu,drop,buddy,little,cost",
        help=(
            "miss policies to compare, comma-separated (default: all); each may carry its own options, "
            "NAME:option=value[:option=value], e.g. buddy:min_score=0.3 (a row per spec; a spec with options "
            "ignores the knobs below)"
        ),
    )
    p.add_argument(
        "--gpu-mem", metavar="SIZE", help="GPU budget (default: dense weights + --budget-share of expert bytes)"
    )
    p.add_argument("--budget-share", type=float, default=0.25, help="expert share of the default budget (default 0.25)")
    p.add_argument("--policy", default="lfu", choices=ONLINE_POLICIES, help="cache policy for every run (default lfu)")
    p.add_argument(
        "--profile",
        default="laptop-8gb",
        choices=tuple(PROFILES),
        help="hardware profile of the modelled clock (default laptop-8gb)",
    )
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text to evaluate (default 1024)")
    p.add_argument(
        "--window",
        type=int,
        default=256,
        help="tokens per window; each window starts from an empty context (default 256)",
    )
    p.add_argument(
        "--little-share",
        type=float,
        default=None,
        help=(
            "little: share of the tokens, the most router-confident ones per layer, that run the little set on a "
            "miss (default 0.9; 0 = never)"
        ),
    )
    p.add_argument(
        "--little-threshold",
        type=float,
        default=None,
        help=(
            "little: an absolute confidence instead (router-weight share of a token's top half of experts) at or "
            "above which a token is unimportant; >1 = never"
        ),
    )
    p.add_argument(
        "--little-prefer-resident",
        type=float,
        default=None,
        help=(
            "little: router-weight share a resident expert is worth over a missing one when the little set (k/2 "
            "experts) is chosen (default 0: the heaviest half, as MoBiLE; 1 = resident first)"
        ),
    )
    p.add_argument(
        "--buddy-min-score", type=float, default=None, help="buddy: least buddy score accepted (default 0.5)"
    )
    p.add_argument(
        "--buddy-max-per-token",
        type=int,
        default=None,
        help="buddy: most substitutions per token and layer (default min(3, k-1))",
    )
    p.add_argument(
        "--quality-budget",
        type=float,
        default=None,
        help=(
            "cost: output error (router-weight share × relative error of the stand-in) a token may take on per "
            "layer (default 0.2; 0 = exact)"
        ),
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        default=None,
        help="also record the all-resident run's routing (with the prefetcher's predictions) for "
        "`localmoe bench trace FILE`",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for PyTorch")
    return parser


def cmd_calibrate(args: argparse.Namespace) -> int:
    import hashlib

    from .fallback.buddies import builtin_calibration_text, calibrate, sidecar_path
    from .progress import Progress
    from .runtime import load

    text, source = (
        (builtin_calibration_text(), "built-in sample") if not args.text else (_read_text(args.text), args.text)
    )
    with load(args.model, device="cpu", threads=args.threads) as rt:
        bar = Progress("calibrating", min(args.tokens, len(rt.tokenize(text))))
        table = calibrate(
            rt, text, max_tokens=args.tokens, samples=args.samples, progress=lambda done, total: bar.update(done)
        )
        table.provenance["calibration_text"] = source
        table.provenance["calibration_text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        out = sidecar_path(rt.path)
        table.save(out)
        summary = {
            "sidecar": out,
            "tokens": table.provenance["tokens"],
            "layers": [
                {
                    "layer": i,
                    "most_used": int(lc.usage.argmax()),
                    "max_share": float(lc.usage.max() / max(lc.usage.sum(), 1)),
                    "tae_tau": lc.tae_tau,
                    "mean_best_buddy_score": float(
                        sum(b[0][1] for b in lc.buddies.values() if b)
                        / max(1, sum(1 for b in lc.buddies.values() if b))
                    ),
                }
                for i, lc in enumerate(table.layers)
            ],
        }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"buddy table for {len(table.layers)} layers from {summary['tokens']} tokens of {source} → {out}")
        for row in summary["layers"]:
            print(
                f"  layer {row['layer']:2d}: most used expert {row['most_used']:3d} ({row['max_share']:.1%} of "
                f"uses), TAE τ {row['tae_tau']:.3f}, mean best buddy score {row['mean_best_buddy_score']:.3f}"
            )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .fallback.evaluate import evaluate, format_table
    from .bundled import demo_model_path
    from .gguf.file import GGUFModel
    from .progress import Progress
    from .runtime import parse_size

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [p.strip() for p in args.on_miss.split(",") if p.strip()]
    path = args.model or demo_model_path()
    gpu_mem = parse_size(args.gpu_mem)
    if gpu_mem is None:
        m = GGUFModel(path)
        gpu_mem = m.dense_bytes() + int(m.all_expert_bytes() * args.budget_share)
    options = {
        "little": {
            "share": args.little_share,
            "threshold": args.little_threshold,
            "prefer_resident": args.little_prefer_resident,
        },
        "buddy": {"min_score": args.buddy_min_score, "max_per_token": args.buddy_max_per_token},
        "cost": {"quality_budget": args.quality_budget},
    }
    options = {k: {o: v for o, v in d.items() if v is not None} for k, d in options.items()}
    bars: dict[str, Progress] = {}

    def progress(name: str, done: int, total: int) -> None:
        bars.setdefault(name, Progress(name, total)).update(done)

    res = evaluate(
        path,
        _read_text(args.text),
        policies,
        gpu_mem,
        args.profile,
        args.tokens,
        args.window,
        args.policy,
        options,
        progress,
        trace=args.trace,
    )
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LocalMoEError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalMoEError(f"cannot read {path} as UTF-8 text: {exc}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench is None:
        raise LocalMoEError(f"bench needs a subcommand: {', '.join(BENCH_COMMANDS)}")
    return {
        "speed": cmd_bench_speed,
        "kernels": cmd_bench_kernels,
        "policies": cmd_bench_policies,
        "trace": cmd_bench_trace,
    }[args.bench](args)


def cmd_bench_trace(args: argparse.Namespace) -> int:
    from .bench import residency as rb
    from .residency.trace import load_trace

    trace = load_trace(args.trace)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        raise LocalMoEError(f"--budgets takes comma-separated shares such as 0.25,0.5, not '{args.budgets}'") from None
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rows = rb.replay_table(trace, budgets, policies, prefetch=args.replay_prefetch)
    print(json.dumps(rows, indent=2) if args.json else rb.format_replay(trace, rows))
    return 0


def cmd_bench_policies(args: argparse.Namespace) -> int:
    from .bench import residency as rb
    from .bundled import demo_model_path
    from .gguf.file import GGUFModel
    from .runtime import parse_size

    path = args.model or demo_model_path()
    gpu_mem = parse_size(args.gpu_mem)
    if gpu_mem is None:
        m = GGUFModel(path)
        gpu_mem = m.dense_bytes() + int(m.all_expert_bytes() * args.budget_share)
    results = rb.run_strategies(
        path, gpu_mem, args.profile, args.prompt or rb.DEFAULT_PROMPT, args.max_tokens, args.threads
    )
    out = {"gpu_mem": gpu_mem, "profile": args.profile, "results": rb.strategies_json(results)}
    print(json.dumps(out, indent=2) if args.json else rb.format_strategies(results, gpu_mem))
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .bench.speed import format_kernel_table, kernel_table

    rows = kernel_table(args.threads or 2)
    print(json.dumps(rows, indent=2) if args.json else format_kernel_table(rows, args.threads or 2))
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from .bench.speed import BenchConfig, format_table, run_bench
    from .bundled import demo_model_path

    if min(args.prompt_tokens, args.decode_tokens, args.reps, args.rounds) < 1:
        raise LocalMoEError("--prompt-tokens, --decode-tokens, --reps and --rounds must be at least 1")
    cfg = BenchConfig(args.prompt_tokens, args.decode_tokens, args.reps, threads=args.threads or 2, rounds=args.rounds)
    modes = [m.strip() for m in args.kernel_modes.split(",") if m.strip()] if args.kernel_modes else None
    host_mems = [m.strip() for m in args.host_mem.split(",") if m.strip()] if args.host_mem else None
    res = run_bench(
        args.model or demo_model_path(), cfg, args.vs, args.llama_plain_buffers, modes, host_mems, device=args.device
    )
    print(json.dumps(res.as_dict(), indent=2) if args.json else format_table(res))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .bench.synth import write_preset

    bar = Progress("writing weights", 1)  # counted in weights, not bytes (bench/synth.py write_model)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    if args.quant not in ("F32", "F16", "Q8_0", "Q4_0") and not args.fast:
        print(f"(then {args.quant} by llama.cpp's quantizer)", file=sys.stderr)
    write_preset(args.preset, args.output, args.layers, args.quant, args.seed, progress, fast=args.fast)
    print(args.output)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .gguf.file import GGUFModel
    from .info import describe, format_text

    d = describe(GGUFModel(args.model))
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import load

    prompt = args.prompt
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not prompt:
        raise LocalMoEError("no prompt: pass -p TEXT or pipe text on stdin")
    if args.max_tokens < 0:
        raise LocalMoEError("--max-tokens must be ≥ 0")
    with load(args.model, load_options(args)) as rt:
        source = [{"role": "user", "content": prompt}] if args.chat else prompt
        for chunk in rt.stream(
            source,
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            print_timings(rt.stats(), sys.stderr)
            print_backends(rt, sys.stderr)
    return 0


def print_timings(st, out) -> None:  # st: Stats
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    clock = "measured" if st.clock == "measured" else f"modelled ({st.clock.split(':', 1)[1]})"
    lines = [
        f"prompt eval:  {st.prompt_tokens:6d} tokens  {st.prompt_tps:9.2f} tok/s  [{clock}]",
        f"decode:       {st.decode_tokens:6d} tokens  {st.decode_tps:9.2f} tok/s  [{clock}]",
    ]
    if st.clock != "measured":
        lines.append(
            f"wall clock:   prompt {st.prompt_tps_measured:.2f} tok/s, decode {st.decode_tps_measured:.2f} "
            "tok/s on this machine [measured]"
        )
    lines += [
        f"peak memory:  {peak_rss / (1 << 20):9.1f} MiB RSS",
        (
            f"experts:      {st.hits} hits, {st.misses} misses (hit rate {st.hit_rate:.1%}), {st.cpu_experts} "
            "computed on CPU"
        ),
    ]
    if st.decode_tokens:
        lines.append(
            f"overhead:     {st.decode_host_syncs / st.decode_tokens:.1f} host syncs and "
            f"{st.decode_launches / st.decode_tokens:.1f} Triton launches per decoded token"
        )
    if st.gpu_budget is not None:
        decode_s = st.decode_tokens / st.decode_tps if st.decode_tps else 0.0
        gbps = f", {st.bytes_to_gpu / decode_s / 1e9:.2f} GB/s over decode" if decode_s else ""
        lines += [
            (
                f"gpu tier:     {st.gpu_bytes_in_use / 2**20:.1f} MiB of {st.gpu_budget / 2**20:.1f} MiB expert "
                f"budget in use (peak {st.gpu_bytes_peak / 2**20:.1f} MiB)"
            ),
            f"moved:        {st.bytes_to_gpu / 2**20:.1f} MiB to the GPU{gbps}",
            (
                f"prefetch:     {st.prefetch_issued} issued, {st.prefetch_used} used; prediction precision "
                f"{st.prefetch_precision:.1%}, recall {st.prefetch_recall:.1%}"
            ),
            "substitutions: " + ", ".join(f"{k} {v}" for k, v in st.substitutions.items()),
        ]
    print("\n".join(lines), file=out)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .runtime import parse_size

    try:
        from .serve import Defaults, ServeConfig, model_id_for, serve
    except ModuleNotFoundError as exc:
        raise LocalMoEError(
            f"the server needs {exc.name}, which is not installed; `pip install -e .` installs it"
        ) from None
    from .bundled import demo_model_path

    if args.queue < 1:
        raise LocalMoEError("--queue must be at least 1")
    if not 0 <= args.port <= 65535:
        raise LocalMoEError(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_tokens < 0:
        raise LocalMoEError("--max-tokens must be ≥ 0")
    max_body = parse_size(args.max_body)
    if not max_body or max_body < 1024:
        raise LocalMoEError(f"--max-body must be at least 1KB, got {args.max_body}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LOCALMOE_API_KEY") or None
    defaults = Defaults(args.max_tokens, args.temp, args.top_p, args.top_k, args.seed)
    config = ServeConfig(model_id_for(args.model or demo_model_path()), api_key, args.queue, max_body, defaults)
    return serve(args.model, load_options(args), config, args.host, args.port, args.verbose)


def print_backends(rt, out) -> None:
    """Which CPU kernel each quant type of the model uses on this machine, and why."""
    from .info import backend_lines, cpu_backends

    qtypes = sorted({t.qtype.name for t in rt.gguf.tensors.values()})
    print("\n".join(backend_lines(cpu_backends(qtypes))), file=out)
    print(
        f"threads        {rt.threads}"
        + ("" if rt.threads_given else " (the cores not busy with other processes at load)"),
        file=out,
    )
    print(f"openmp wait    {openmp.describe()}", file=out)
    print(f"kv cache       {rt.kv_type}, {rt.kv_cache_bytes() / 2**20:,.1f} MiB at {rt.n_ctx:,} positions", file=out)
    st = rt.store.summary()
    print(
        f"host memory    {st['repacked']:,} experts repacked at load ({st['repacked_bytes'] / 2**30:.2f} GiB; "
        f"--host-mem {rt.host_mem / 2**30:.2f} GiB"
        f"{' by default' if rt.host_mem_default else ''}), {st['in_place']:,} computed in place from the file (ggml)",
        file=out,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        from .tui import run_chat
    except ModuleNotFoundError as exc:
        if exc.name != "localmoe.tui":
            raise
        raise LocalMoEError(
            "the chat app (localmoe.tui) is not installed; install the package with `pip install -e .`"
        ) from None
    return run_chat(args, load_options(args))


COMMANDS = {
    "info": cmd_info,
    "run": cmd_run,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "synth": cmd_synth,
    "calibrate": cmd_calibrate,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_legacy_bench(list(sys.argv[1:] if argv is None else argv)))
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except LocalMoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    sys.exit(main())
