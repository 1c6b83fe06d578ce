"""Fixtures: tiny random-weight MoE models written with gguf.GGUFWriter (no downloads), and
llama.cpp (llama-cpp-python) as the numerical oracle."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton GPU kernels run under Triton's interpreter on CPU tensors; the switch is
# read when triton first compiles a kernel, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from localmoe.bench.synth import SynthConfig, quantize_with_llama_cpp, write_model

ARCHS = ("qwen3moe", "qwen2moe", "olmoe", "llama", "deepseek2", "glm4moe", "gpt-oss", "qwen35moe", "gemma4")
# Written directly by GGUFWriter (gguf.quants), or made by llama.cpp's own quantizer from a file
# written at higher precision (the K-quant mix of a real Q4_K_M file, and the legacy types).
DIRECT_TYPES = ("F32", "Q8_0", "Q4_0")
LLAMA_QUANTIZED = {
    "Q4_K_M": "Q8_0",
    "MXFP4_MOE": "Q8_0",
    "F16": "F32",
    "BF16": "F32",
    "Q4_1": "F32",
    "Q5_0": "F32",
    "Q5_1": "F32",
}


def arch_config(arch: str, **overrides) -> SynthConfig:
    kw = dict(arch=arch)
    if arch == "olmoe":  # llama.cpp's OLMoE sizes k_norm by n_embd: no GQA
        kw["n_head_kv"] = 4
    if arch == "deepseek2":  # V2-Lite's structure in small: MLA without q_lora, one dense layer, 2 shared experts, YaRN
        kw.update(
            n_layer=3,
            head_dim=48,
            n_dense_lead=1,
            n_ff_dense=256,
            n_expert_shared=2,
            n_ff_exp=128,
            yarn_factor=4.0,
            yarn_orig_ctx=32,
            yarn_log_mul=0.707,
            expert_weights_scale=1.0,
        )
    if arch == "glm4moe":
        # GLM-4.5-Air's structure in small: partial rotary, biases, 1 dense layer, sigmoid + bias, one MTP block
        kw.update(
            n_layer=3,
            head_dim=64,
            qk_rope=32,
            n_dense_lead=1,
            n_ff_dense=256,
            n_expert_shared=1,
            n_ff_exp=128,
            gating="sigmoid",
            expert_weights_norm=True,
            expert_weights_scale=1.5,
            n_nextn=1,
        )
    if arch == "gpt-oss":
        # gpt-oss-20b's structure in small: 64-wide heads, a window of 8 on layers 0 and 2, sinks, biases, YaRN
        kw.update(n_layer=3, head_dim=64, n_swa=8, rope_base=150000.0, rms_eps=1e-5, yarn_factor=4.0, yarn_orig_ctx=32)
    if arch == "qwen35moe":
        # Qwen3.6-35B-A3B's structure in small: 3 DeltaNet layers (2 key heads tiled over 4 value heads) then gated
        # attention with partial rotary; M-RoPE sections (1, 1, 1, 1) leave every 4th pair to the text's zero fourth
        # axis
        kw.update(n_layer=4, head_dim=64, qk_rope=16, rope_sections=(1, 1, 1, 1), n_ff_exp=128, n_ff_shexp=192)
    if arch == "gemma4":
        # Gemma 4 26B-A4B's structure in small: windowed layers 0, 1 (window 32, 2 KV heads of 64, base 1e4),
        # layers 2, 3 global (1 KV head of 128, no attn_v, base 1e6, a quarter of the pairs rotated), a dense GeGLU
        # MLP of 192 beside the experts
        kw.update(
            n_layer=4,
            head_dim=64,
            n_swa=32,
            swa_period=3,
            n_head_kv_global=1,
            head_dim_global=128,
            n_ff_dense=192,
            n_ff_exp=128,
            rope_base=1000000.0,
            rope_base_swa=10000.0,
        )
    kw.update(overrides)
    return SynthConfig(**kw)


@contextlib.contextmanager
def served(path: str, model_id: str):
    """`localmoe serve` of the file at `path` in this process (127.0.0.1, a free port): yields its
    base URL once /health answers 200, and stops the server afterwards."""
    import time

    import httpx

    import localmoe
    from localmoe.serve import ServeConfig, create_app, start_in_thread

    server, thread, port = start_in_thread(
        create_app(lambda: localmoe.load(path, device="cpu"), ServeConfig(model_id=model_id))
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if httpx.get(url + "/health").status_code == 200:
                break
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join()


def expert_budget(rt, share: float) -> int:
    """A GPU budget of the dense weights plus `share` of the expert bytes of loaded runtime `rt`."""
    return rt.gguf.dense_bytes() + int(rt.gguf.all_expert_bytes() * share)


def check_budgeted_equals_all_resident(
    path: str, ids: list[int], share: float = 0.3, on_misses: tuple[str, ...] = ("fetch", "cpu")
) -> list:
    """Under a budget of `share` of the expert bytes, each miss policy in `on_misses` gives the
    all-resident logits bit for bit, with misses, and the scheduler's books balance. Returns the
    budgeted runs' Stats, in order, for the caller's own checks."""
    import numpy as np

    import localmoe

    with localmoe.load(path, device="cpu") as rt:
        ref = rt.logits(ids)
        budget = expert_budget(rt, share)
    stats = []
    for on_miss in on_misses:
        with localmoe.load(path, device="cpu", gpu_mem=budget, on_miss=on_miss) as rt:
            np.testing.assert_array_equal(rt.logits(ids), ref)
            s = rt.stats()
            assert s.misses > 0
            rt.scheduler.check()
            stats.append(s)
    return stats


class ModelFactory:
    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple[str, str], str] = {}

    def __call__(self, arch: str = "qwen3moe", qtype: str = "F32") -> str:
        key = (arch, qtype)
        if key not in self._made:
            path = str(self.root / f"{arch}-{qtype}.gguf")
            if qtype in DIRECT_TYPES:
                write_model(path, arch_config(arch, weight_type=qtype))
            else:
                src = self(arch, LLAMA_QUANTIZED[qtype])
                quantize_with_llama_cpp(src, path, qtype)
            self._made[key] = path
        return self._made[key]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory) -> ModelFactory:
    return ModelFactory(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def qwen3_f32(make_model) -> str:
    return make_model("qwen3moe", "F32")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
