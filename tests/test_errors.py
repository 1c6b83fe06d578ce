"""Bad input: one `error:` line and exit code 2 from the CLI, LocalMoEError from the API."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

import localmoe
from localmoe import LocalMoEError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *args], capture_output=True, text=True, timeout=120)


def _write_minimal(path, arch: str, experts: int | None) -> str:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(2)
    if experts is not None:
        w.add_expert_count(experts)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def bad_files(tmp_path, qwen3_f32):
    data = open(qwen3_f32, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header-only.gguf"
    header_only.write_bytes(data[:200])
    random_bytes = tmp_path / "random.gguf"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        "truncated": (str(truncated), "truncated"),
        "header-only": (str(header_only), "GGUF"),
        "random": (str(random_bytes), "not a GGUF file"),
        "dense": (_write_minimal(tmp_path / "dense.gguf", "llama", None), "dense model"),
        "unknown-arch": (_write_minimal(tmp_path / "mamba.gguf", "mamba", 8), "not supported"),
        "missing-tensor": (_write_minimal(tmp_path / "broken.gguf", "qwen3moe", 8), "missing"),
        "missing-file": (str(tmp_path / "nope.gguf"), "not found"),
    }


CASES = ["truncated", "header-only", "random", "dense", "unknown-arch", "missing-tensor", "missing-file"]


@pytest.mark.parametrize("case", CASES)
def test_api_raises_one_exception_type(bad_files, case):
    path, words = bad_files[case]
    with pytest.raises(LocalMoEError) as err:
        localmoe.load(path, device="cpu")
    assert words.lower() in str(err.value).lower()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("verb", ["info", "run"])
def test_cli_one_error_line_exit_2(bad_files, case, verb):
    path, words = bad_files[case]
    args = [verb, path] + (["-p", "hello", "-n", "2"] if verb == "run" else [])
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert words.lower() in lines[0].lower()
    assert "Traceback" not in r.stderr


def test_unsupported_architecture_error_names_supported_ones(bad_files):
    with pytest.raises(LocalMoEError, match="qwen3moe, qwen2moe, olmoe, llama"):
        localmoe.load(bad_files["unknown-arch"][0], device="cpu")


def test_prompt_longer_than_context_is_an_error(qwen3_f32):
    with localmoe.load(qwen3_f32, device="cpu", n_ctx=32) as rt:
        with pytest.raises(LocalMoEError, match="context holds 32"):
            rt.logits(list(range(40)))
        with pytest.raises(LocalMoEError, match="context"):
            rt.generate("the " * 40, max_tokens=4)
    r = _cli("run", qwen3_f32, "-p", "the " * 40, "-c", "32", "-n", "2")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "context" in r.stderr


def test_bad_options_are_one_line_errors(qwen3_f32):
    r = _cli("run", qwen3_f32, "-p", "hi", "--top-p", "0")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = _cli("run", qwen3_f32, "-n")
    assert r.returncode == 2 and r.stderr.startswith("error:")
    with pytest.raises(LocalMoEError, match="miss policy"):
        localmoe.load(qwen3_f32, on_miss="teleport")


def test_non_utf8_and_directory_paths(tmp_path):
    with pytest.raises(LocalMoEError, match="directory"):
        localmoe.load(str(tmp_path))
    assert os.path.isdir(tmp_path)
