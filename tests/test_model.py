"""The forward driver (localmoe/model.py): the context's cache (KV rows cut anywhere, recurrent
states rewound to their latest snapshot). How the model hands residency its prediction:
tests/test_scheduler.py."""

from __future__ import annotations

import numpy as np
import torch

import localmoe
from localmoe.model import KVCache

IDS_200 = np.random.default_rng(35).integers(0, 300, 200).tolist()  # as tests/test_qwen35moe.py draws them


def test_rewind_resumes_from_the_latest_snapshot(make_model):
    """KV rows cut anywhere; a recurrent state goes back to the snapshot taken at the end of the
    latest prompt at or before the position asked for (0 if none), and recomputing from there
    gives the logits of one uninterrupted pass."""
    ids = IDS_200[:40]
    with localmoe.load(make_model("qwen35moe", "F32"), device="cpu") as rt:
        full = rt.logits(ids)
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        rt.model.forward(torch.tensor(ids[:20]), cache)  # a prompt: snapshot at 20
        for t in ids[20:30]:
            rt.model.forward(torch.tensor([t]), cache)
        assert cache.n == 30
        assert cache.rewind(30) == 30 and cache.rewind(26) == 20
        out = rt.model.forward(torch.tensor(ids[20:40]), cache)  # a prompt again: snapshot at 40
        np.testing.assert_allclose(out.numpy(), full[20:40], rtol=1e-4, atol=1e-4)
        assert cache.rewind(15) == 0 and not cache.states  # before every snapshot: a fresh context
    with localmoe.load(make_model("qwen3moe", "F32"), device="cpu") as rt:  # no recurrent state: any position
        cache = KVCache(rt.spec, rt.n_ctx, rt.device)
        rt.model.forward(torch.tensor(ids[:20]), cache)
        assert cache.rewind(13) == 13
