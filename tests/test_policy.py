"""localmoe.compute.policy: the compute path, read from the environment once and lazily, or given."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from localmoe.compute import policy
from localmoe.compute.policy import ComputePolicy, from_env
from localmoe.errors import LocalMoEError


def test_the_environment_gives_the_fields():
    assert from_env({}) == ComputePolicy() == ComputePolicy("auto", "triton", True, 1 << 30, 8)
    got = from_env(
        {
            "LOCALMOE_KERNEL": "GGML",
            "LOCALMOE_ROW_BLOCKS": "0",
            "LOCALMOE_GEMM_ROWS": "64",
            "LOCALMOE_GGML_GRAPH_ROWS": "4",
            "LOCALMOE_GPU_KERNEL": "gguf",
        }
    )
    assert got == ComputePolicy(kernel="ggml", gpu_kernel="gguf", row_blocks=False, gemm_rows=64, ggml_graph_rows=4)
    assert (got.allows_ggml, got.allows_vnni) == (True, False)
    for bad in ({"LOCALMOE_KERNEL": "fast"}, {"LOCALMOE_GEMM_ROWS": "many"}, {"LOCALMOE_GPU_KERNEL": "cuda"}):
        with pytest.raises(LocalMoEError, match="LOCALMOE|kernel"):
            from_env(bad)


def test_override_is_scoped_to_the_block_and_the_thread():
    base = policy.current()
    seen = []
    with policy.override(kernel="torch") as p:
        assert policy.current() is p and p.kernel == "torch" and not (p.allows_ggml or p.allows_vnni)
        with policy.override(gemm_rows=128):
            assert (policy.current().kernel, policy.current().gemm_rows) == ("torch", 128)
        assert policy.current() is p
        t = threading.Thread(target=lambda: seen.append(policy.current()))
        t.start()
        t.join()
    assert policy.current() == base and seen == [base]  # another thread: the environment's policy


def test_the_environment_is_read_on_first_use_not_at_import():
    env = {**os.environ, "LOCALMOE_KERNEL": "fast"}
    code = "import localmoe, localmoe.compute.kernels, localmoe.cli; print('imported')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "localmoe", "run", "-p", "hi", "-n", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and "fast" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
