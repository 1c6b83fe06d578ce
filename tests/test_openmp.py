"""localmoe sets libgomp's spin count before torch loads libgomp, keeps the user's, and runs bench's
llama.cpp baseline without it (localmoe/openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from localmoe import openmp
from localmoe.bench import speed

PROBE = "import os, localmoe; from localmoe import openmp; print(os.environ.get('GOMP_SPINCOUNT'), openmp.source)"


def _python(code: str, **env: str) -> list[str]:
    """Run code in a fresh interpreter whose environment has neither variable unless given."""
    base = {k: v for k, v in os.environ.items() if k not in (openmp.SPIN_ENV, openmp.DEFAULTS_ENV)}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_importing_localmoe_sets_the_spin_count_before_torch_is_loaded():
    # "localmoe" (not "late"): torch was not in sys.modules when the variable was set, so libgomp,
    # loaded with torch afterwards, reads it
    assert _python(PROBE) == [str(openmp.SPIN_COUNT), "localmoe"]
    assert _python("import localmoe, torch, sys; print('torch' in sys.modules)") == ["True"]


def test_a_value_the_user_set_is_kept_and_the_opt_out_leaves_libgomps_default():
    assert _python(PROBE, GOMP_SPINCOUNT="123") == ["123", "user"]
    assert _python(PROBE, LOCALMOE_OPENMP_DEFAULTS="0") == ["None", "libgomp"]


def test_torch_imported_first_is_said_not_hidden():
    code = "import torch; " + PROBE
    assert _python(code) == ["None", "late"]
    line = _python("import torch; from localmoe import openmp; print(openmp.describe())")
    assert "torch was imported before localmoe" in " ".join(line)


def test_the_llama_cpp_baseline_runs_without_our_value(monkeypatch):
    monkeypatch.setattr(openmp, "source", "localmoe")
    monkeypatch.setenv(openmp.SPIN_ENV, str(openmp.SPIN_COUNT))
    env = openmp.baseline_env()
    assert openmp.SPIN_ENV not in env and env[openmp.DEFAULTS_ENV] == "0"
    monkeypatch.setattr(openmp, "source", "user")  # the user's own value goes to both engines
    assert openmp.baseline_env()[openmp.SPIN_ENV] == str(openmp.SPIN_COUNT)

    monkeypatch.setattr(openmp, "source", "localmoe")
    seen = {}

    def fake_run(cmd, env=None, **kw):
        seen[cmd[3]] = env  # [python, -m, localmoe.bench.speed, kind, job]
        return subprocess.CompletedProcess(cmd, 0, stdout='{"runs": []}\n', stderr="")

    monkeypatch.setattr(speed.subprocess, "run", fake_run)
    speed._worker("llama-worker", {"path": "m.gguf"}, 10)
    speed._worker("localmoe-worker", {"path": "m.gguf"}, 10)
    assert openmp.SPIN_ENV not in seen["llama-worker"] and seen["llama-worker"][openmp.DEFAULTS_ENV] == "0"
    assert seen["localmoe-worker"] is None  # localmoe's worker inherits this process's environment
