"""glm4moe beyond the shared oracle cases (tests/test_oracle.py): the MTP block is skipped, and the
residency engine runs it (a dense first layer, a shared expert) exactly as the all-resident run."""

from __future__ import annotations

import numpy as np

import localmoe
from conftest import check_budgeted_equals_all_resident
from localmoe.gguf import names


def test_mtp_block_is_skipped(make_model):
    with localmoe.load(make_model("glm4moe", "F32"), device="cpu") as rt:
        assert rt.gguf.meta(names.arch_key("glm4moe", names.BLOCK_COUNT)) == 4 and rt.spec.n_layer == 3
        assert not any(n.startswith("blk.3.") for n in rt.gguf.tensors)
        assert rt.spec.moe_layers == (1, 2) and rt.spec.routing == "sigmoid_bias_groups" and rt.spec.n_rot == 32


def test_budgeted_run_equals_all_resident(make_model):
    for s in check_budgeted_equals_all_resident(
        make_model("glm4moe", "Q8_0"), np.random.default_rng(3).integers(0, 300, 40).tolist()
    ):
        assert s.layers[0].resident == ()  # the leading dense layer holds no experts
