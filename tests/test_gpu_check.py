"""scripts/gpu-check --smoke: the GPU session's script, run on the CPU (Triton's interpreter, a tiny
model) so that it cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_its_table(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), str(tmp_path), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = res["steps"]
    assert set(steps) >= {"env", "kernels", "link", "model", "runs"}
    assert all("error" not in st for st in steps.values()), steps
    assert {r["type"] for r in steps["kernels"]["rows"]} and steps["kernels"]["launch_us"] > 0
    rows = {r["name"]: r for r in steps["runs"]["rows"]}
    assert "all resident" in rows and all("error" not in r for r in rows.values()), rows
    resident = rows["all resident"]
    # the Triton tier really ran: its kernels launched, its bytes were in use, its clock measured
    assert resident["gpu_bytes_peak"] > 0 and resident["hit_rate"] == 1.0
    assert resident["syncs_per_token"] == 1  # all resident: only the logits come back
    budgeted = [r for name, r in rows.items() if name.endswith("cpu")]
    assert budgeted and all(r["gpu_bytes_peak"] <= r["gpu_budget"] for r in budgeted)
    md = (tmp_path / "gpu-check.md").read_text()
    assert "## Runs" in md and "| all resident |" in md
