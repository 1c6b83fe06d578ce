"""`localmoe info` and `localmoe run` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *args], capture_output=True, text=True, timeout=300)


def test_info_text_and_json_on_q4_k_m(make_model):
    path = make_model("qwen3moe", "Q4_K_M")
    r = _cli("info", path)
    assert r.returncode == 0, r.stderr
    for words in ("qwen3moe", "layers         2", "8 per layer, top-2", "bytes/expert", "Q4_K", "Q6_K", "fit 8GB GPU"):
        assert words in r.stdout
    r = _cli("info", path, "--json")
    d = json.loads(r.stdout)
    assert d["architecture"] == "qwen3moe" and d["layers"] == 2
    assert d["experts"] == {
        "count": 8,
        "used": 2,
        "ffn_length": 256,
        "shared_ffn_length": 0,
        "shared_count": 0,
        "normalised_top_k": True,
        "activation": "swiglu",
        "biases": False,
    }
    assert d["attention"]["kind"] == "gqa" and d["dense_layers"] == [] and d["routing"]["kind"] == "softmax_topk"
    assert {"Q4_K", "Q6_K", "F32"} <= set(d["quant_mix"])
    # the per-expert bytes, layer by layer, add up to the expert tensors' bytes (Q4_K_M mixes types by layer)
    assert sum(d["bytes_per_expert_by_layer"]) * 8 == d["expert_bytes"]
    assert len(set(d["bytes_per_expert_by_layer"])) == 2
    assert d["dense_bytes"] + d["expert_bytes"] == d["file_bytes"]
    # the default --host-mem on this machine, from the RAM available now, and what it holds
    h = d["host_memory"]
    assert h["default_host_mem_bytes"] == max(
        0, h["available_bytes"] - h["dense_bytes"] - h["headroom_bytes"]
    )  # one reading of the RAM
    assert h["dense_bytes"] == d["dense_bytes"] and 0 <= h["repacked_share"] <= 1
    assert "host memory    --host-mem default" in _cli("info", path).stdout


def test_run_streams_text_and_verbose_timings(qwen3_f32):
    r = _cli("run", qwen3_f32, "-p", "the expert", "-n", "5", "--temp", "0", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for words in (
        "prompt eval:",
        "decode:",
        "tok/s",
        "peak memory:",
        "hit rate",
        "--host-mem",
        "by default",
        "openmp wait",
        "kv cache       f16, ",
    ):
        assert words in r.stderr
    again = _cli("run", qwen3_f32, "-p", "the expert", "-n", "5", "--temp", "0")
    assert again.stdout == r.stdout  # greedy is deterministic


def test_help_explains_commands():
    r = _cli("--help")
    assert r.returncode == 0 and "info" in r.stdout and "run" in r.stdout
    r = _cli("run", "--help")
    assert "--max-tokens" in r.stdout and "--temp" in r.stdout and "--seed" in r.stdout


def test_bench_subcommands_each_list_only_their_flags():
    from localmoe.cli import _legacy_bench, build_parser

    bench = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    subs = next(a for a in bench._actions if a.dest == "bench").choices
    assert set(subs) == {"speed", "kernels", "policies", "trace"}
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in subs.items()}
    assert {"--vs", "--kernel-modes", "--host-mem", "--rounds"} <= flags["speed"] and "--budgets" not in flags["speed"]
    assert flags["kernels"] == {"-h", "--help", "-t", "--threads", "--json"}
    assert {"--budget-share", "--profile"} <= flags["policies"] and "--vs" not in flags["policies"]
    assert {"--budgets", "--policies", "--replay-prefetch"} <= flags["trace"] and "--vs" not in flags["trace"]
    r = _cli("bench", "kernels", "--help")
    assert r.returncode == 0 and "--threads" in r.stdout and "--vs" not in r.stdout
    r = _cli("bench")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "speed" in r.stderr
    # the forms bench had before its subcommands still work
    speed = ["m.gguf", "--vs", "llama.cpp", "-t", "2"]
    assert _legacy_bench(["bench", *speed]) == ["bench", "speed", *speed]
    assert _legacy_bench(["bench", "--kernels", "-t", "1"]) == ["bench", "kernels", "-t", "1"]
    assert _legacy_bench(["bench", "--trace", "r.jsonl", "--json"]) == ["bench", "trace", "r.jsonl", "--json"]
    assert _legacy_bench(["bench", "m.gguf", "-n", "6"]) == ["bench", "policies", "m.gguf", "-n", "6"]
    assert _legacy_bench(["bench", "speed", "m.gguf"]) == ["bench", "speed", "m.gguf"]
