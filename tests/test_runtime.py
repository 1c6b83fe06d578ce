"""localmoe.runtime: defaults read from the machine at load."""

from __future__ import annotations

import os

import psutil
import pytest

from localmoe import runtime


@pytest.mark.parametrize(
    ("system_pct", "own_pct", "want"),
    [
        (0.0, 0.0, 4),  # a quiet machine: every core
        (50.0, 0.0, 2),  # two of four cores busy elsewhere
        (100.0, 0.0, 1),  # all busy: still one thread
        (50.0, 200.0, 4),  # the busy cores are this process's own: not counted
        (60.0, 0.0, 2),  # 2.4 busy cores round to 2
    ],
)
def test_default_threads_leave_the_cores_other_processes_keep_busy(monkeypatch, system_pct, own_pct, want):
    monkeypatch.setattr(runtime, "TORCH_THREADS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: system_pct)
    monkeypatch.setattr(psutil.Process, "cpu_percent", lambda self, interval=None: own_pct)
    assert runtime.default_threads(sample_s=0.0) == want


def test_default_threads_stay_within_the_affinity(monkeypatch):
    monkeypatch.setattr(runtime, "TORCH_THREADS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 0.0)
    assert runtime.default_threads(sample_s=0.0) == 1


def test_threads_given_are_used_and_bad_ones_refused(qwen3_f32):
    import torch

    with runtime.load(qwen3_f32, device="cpu", threads=1) as rt:
        assert rt.threads == 1 and rt.threads_given and torch.get_num_threads() == 1
    with pytest.raises(runtime.LocalMoEError, match="threads must be"):
        runtime.load(qwen3_f32, device="cpu", threads=-2)


def test_load_takes_a_load_options_and_keywords_on_top(qwen3_f32):
    from localmoe import LoadOptions

    opts = LoadOptions(device="cpu", n_ctx=64, threads=2)
    with runtime.load(qwen3_f32, opts, threads=1) as rt:  # the keywords win over the options
        assert (rt.n_ctx, rt.threads) == (64, 1)
        assert rt.options == opts.replace(threads=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        runtime.load(qwen3_f32, bogus=1)
