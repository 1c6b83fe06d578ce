"""`localmoe bench speed MODEL --vs llama.cpp` on a tiny model: the JSON shape, and ratios that come
from the figures measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from localmoe.bench import speed as bench
from localmoe.errors import LocalMoEError
from localmoe.gguf.file import GGUFModel


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *args], capture_output=True, text=True, timeout=300)


def test_bench_vs_llama_cpp_json(make_model):
    path = make_model("qwen3moe", "Q4_0")
    r = _cli(
        "bench",
        "speed",
        path,
        "--vs",
        "llama.cpp",
        "--json",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--reps",
        "2",
        "--rounds",
        "2",
        "-t",
        "1",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"] == "llama.cpp"
    assert d["config"] == {
        "prompt_tokens": 8,
        "decode_tokens": 4,
        "reps": 2,
        "warmup": 1,
        "threads": 1,
        "seed": 0,
        "rounds": 2,
    }
    rows = {row["engine"]: row for row in d["rows"]}
    assert set(rows) == {"llama.cpp", "localmoe"}
    for row in rows.values():
        assert len(row["prompt_tps_runs"]) == len(row["decode_tps_runs"]) == 4  # 2 rounds × 2 reps
        assert row["prompt_tps"] > 0 and row["decode_tps"] > 0 and row["clock"] == "measured"
        assert row["bytes_per_token"] == bench.bytes_per_token(GGUFModel(path))
        assert row["bandwidth_gbs"] == pytest.approx(row["bytes_per_token"] * row["decode_tps"] / 1e9)
        # each engine in a fresh process of its own: its cold start and its own peak RSS
        assert row["load_s"] > 0 and row["ttft_s"] > 0 and row["cold_decode_tps"] > 0
        assert row["peak_rss_bytes"] > 50 << 20
    ours, base = rows["localmoe"], rows["llama.cpp"]
    assert ours["syncs_per_token"] >= 1 and base["syncs_per_token"] is None  # localmoe counts its readbacks
    assert d["ratios"] == {
        "localmoe": {
            "prompt": pytest.approx(ours["prompt_tps"] / base["prompt_tps"]),
            "decode": pytest.approx(ours["decode_tps"] / base["decode_tps"]),
        }
    }


def test_table_has_a_row_per_engine_configuration():
    cfg = bench.BenchConfig(prompt_tokens=10, decode_tokens=5, reps=2)
    rows = [
        bench.make_row("llama.cpp", [(0.1, 0.5), (0.2, 0.5)], cfg, 1_000_000),
        bench.make_row("localmoe", [(0.05, 0.25), (0.05, 0.25)], cfg, 1_000_000),
        bench.make_row(
            "localmoe (policy lfu, gpu-mem 6GB)", [(0.1, 1.0), (0.1, 1.0)], cfg, 1_000_000, clock="modelled:laptop-8gb"
        ),
    ]
    assert rows[0].prompt_tps == pytest.approx(75.0) and rows[0].decode_tps == pytest.approx(10.0)
    ratios = bench.compare(rows)
    assert ratios["localmoe"] == {"prompt": pytest.approx(200 / 75), "decode": pytest.approx(2.0)}
    assert ratios["localmoe (policy lfu, gpu-mem 6GB)"]["decode"] == pytest.approx(0.5)
    table = bench.format_table(bench.BenchResult("m.gguf", cfg, rows, "llama.cpp", ratios))
    assert "| localmoe (policy lfu, gpu-mem 6GB) |" in table and "modelled:laptop-8gb" in table and "| 2.00 |" in table


def _fake_llama_worker(crash_unless_plain: bool, signum: int):
    """subprocess.run for the llama.cpp worker: crashes on `signum` with the default buffers (and
    with plain ones too unless `crash_unless_plain`), else prints one round of timings."""

    def run(cmd, *a, **k):
        plain = json.loads(cmd[-1])["plain_buffers"]
        if plain and crash_unless_plain:
            return subprocess.CompletedProcess(cmd, 0, json.dumps({"runs": [[0.01, 0.02]]}) + "\n", "")
        return subprocess.CompletedProcess(cmd, -signum, "", "")

    return run


def test_llama_cpp_crash_is_one_line_error(monkeypatch, make_model):
    path = make_model("qwen3moe", "Q4_0")
    monkeypatch.setattr(bench.subprocess, "run", _fake_llama_worker(crash_unless_plain=False, signum=11))
    with pytest.raises(
        LocalMoEError, match=r"llama.cpp crashed \(SIGSEGV\).*with plain CPU buffers.*mno-amx-tile.*--no-cache-dir"
    ) as exc:
        bench.run_llama_cpp(path, bench.BenchConfig(prompt_tokens=4, decode_tokens=2, reps=1))
    assert "\n" not in str(exc.value)


def test_llama_cpp_crash_with_default_buffers_falls_back_to_plain(monkeypatch, make_model, capsys):
    """A llama-cpp-python build for another CPU died on SIGILL in CI with its default (repacking)
    buffers, while plain buffers ran: the benchmark goes on with plain buffers and says so."""
    path = make_model("qwen3moe", "Q4_0")
    monkeypatch.setattr(bench.subprocess, "run", _fake_llama_worker(crash_unless_plain=True, signum=4))
    row = bench.run_llama_cpp(path, bench.BenchConfig(prompt_tokens=4, decode_tokens=2, reps=1, rounds=2))
    assert len(row.prompt_tps_runs) == 2 and row.prompt_tps == pytest.approx(400.0)
    assert row.notes == "plain CPU buffers (no repacking; the default buffers crashed: SIGILL)"
    assert capsys.readouterr().err.count("warning: llama.cpp crashed (SIGILL)") == 1


def test_llama_cpp_runs_from_before_a_crash_are_dropped_and_a_kill_is_no_crash(monkeypatch, make_model):
    """Round 1 runs with default buffers, round 2 crashes: the row holds plain-buffer runs only. A
    process killed from outside (SIGKILL: out of memory) is reported, not retried."""
    path = make_model("qwen3moe", "Q4_0")
    calls = []

    def run(cmd, *a, **k):
        plain = json.loads(cmd[-1])["plain_buffers"]
        calls.append(plain)
        if len(calls) == 2 and not plain:
            return subprocess.CompletedProcess(cmd, -11, "", "")
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"runs": [[0.04 if plain else 0.01, 0.02]]}) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", run)
    row = bench.run_llama_cpp(path, bench.BenchConfig(prompt_tokens=4, decode_tokens=2, reps=1, rounds=2))
    assert calls == [False, False, True] and row.prompt_tps_runs == [pytest.approx(100.0)]
    monkeypatch.setattr(bench.subprocess, "run", _fake_llama_worker(crash_unless_plain=True, signum=9))
    with pytest.raises(LocalMoEError, match=r"stopped by SIGKILL .*out of memory"):
        bench.run_llama_cpp(path, bench.BenchConfig(prompt_tokens=4, decode_tokens=2, reps=1))


def test_bench_user_errors(make_model):
    r = _cli("bench", "speed", make_model("qwen3moe", "Q4_0"), "--vs", "llama.cpp", "--reps", "0")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_synth_user_errors(tmp_path):
    r = _cli("synth", "no-such-model", "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "unknown preset" in r.stderr
    r = _cli("synth", "qwen3-30b-a3b", "--quant", "Q3_K", "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "unknown quantization" in r.stderr


def test_bench_host_mem_rows_load_with_their_budgets(make_model, monkeypatch):
    """--host-mem default,25%,0: one localmoe row per budget, each worker loaded with its budget
    (the share is of the model's expert bytes; "default" passes none, so load's default applies)."""
    path = make_model("qwen3moe", "Q4_0")
    experts = GGUFModel(path).all_expert_bytes()
    assert bench.host_mem_bytes("25%", GGUFModel(path)) == int(0.25 * experts)
    assert (
        bench.host_mem_bytes("default", GGUFModel(path)) is None
        and bench.host_mem_bytes("2GB", GGUFModel(path)) == 2 << 30
    )
    with pytest.raises(LocalMoEError, match="between 0% and 100%"):
        bench.host_mem_bytes("150%", GGUFModel(path))
    seen = []
    real = bench.localmoe_runs
    monkeypatch.setattr(
        bench, "localmoe_runs", lambda p, cfg, kw: seen.append(kw.get("host_mem", "default")) or real(p, cfg, kw)
    )
    res = bench.run_bench(
        path, bench.BenchConfig(prompt_tokens=4, decode_tokens=2, reps=1), vs=None, host_mems=["default", "25%", "0"]
    )
    assert seen == ["default", int(0.25 * experts), 0]
    assert [r.engine for r in res.rows] == [
        "localmoe (host-mem default)",
        f"localmoe (host-mem 25% = {0.25 * experts / 2**30:.1f} GiB)",
        "localmoe (host-mem 0)",
    ]
    r = _cli("bench", "speed", path, "--host-mem", "lots")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "lots" in r.stderr
