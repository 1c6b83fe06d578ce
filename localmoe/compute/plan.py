"""The seam between residency and compute: one layer's routed experts, placed, and their execution.

Residency (residency/scheduler.py, or residency/resident.py when every expert is addressable)
turns a layer's routing into an `ExpertPlan` — which experts run, on which token rows, with which
router weights, from which weights and on which side — and does the accounting (hits, misses,
loads, the modelled clock). `run_plan` executes any plan; it decides nothing. The MoE block
(layers/moe.py) asks residency for the plan and hands it to `run_plan`, as mixtral-offloading's
MoE block asks its expert cache for experts and computes them itself.

Shapes: T tokens, k experts per token, D = n_embd, E experts per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .counters import readback, to_device
from .experts import (
    ExpertWeights,
    grouped_ready,
    grouped_swiglu,
    resident_decode,
    swiglu_expert,
    swiglu_experts,
    swiglu_prompt,
)

# Where a routed expert runs (ExpertPlan.where):
RESIDENT = "resident"  # on the GPU tier already (a hit, or a resident substitute)
FETCHED = "fetched"  # loaded onto the GPU tier for this layer (a demand fetch), then computed there
STREAMED = "streamed"  # copied for this layer only (not admitted: a scratch buffer, as llama.cpp does)
CPU = "cpu"  # computed on the CPU from the quantized weights, beside the GPU's work (Fiddler)

Rows = dict[int, tuple[torch.Tensor, torch.Tensor]]  # expert → (token indices [n] int64, router weights [n] float32)


def rows_by_expert(ids: torch.Tensor, weights: torch.Tensor) -> Rows:
    """ids, weights [T, k] (host; id −1 = dropped slot) → expert → (token indices, router weights).
    One token: in slot order (the order the decode kernels sum in); more: by expert id. The one
    place tokens are grouped by expert."""
    T = ids.shape[0]
    if T == 1:  # an expert in two slots (no policy does this) runs once with the summed weight
        tok = torch.zeros(1, dtype=torch.long)
        rows: Rows = {}
        for j, e in enumerate(ids[0].tolist()):
            if e >= 0:
                w = weights[0, j : j + 1]
                rows[e] = (tok, rows[e][1] + w if e in rows else w)
        return rows
    rows = {}
    flat, flat_w = ids.reshape(-1), weights.reshape(-1)
    token_of = torch.arange(T).repeat_interleave(ids.shape[1])  # token of each (t, slot)
    for e in torch.unique(flat).tolist():
        if e >= 0:
            sel = (flat == e).nonzero().squeeze(1)
            rows[e] = (token_of[sel], flat_w[sel])
    return rows


@dataclass(frozen=True)
class DeviceRouting:
    """One decode token with every expert of the layer resident on a Triton tier: compute reads the
    routing on the device (the plan's ids and weights) and the host never sees it (no sync)."""

    addresses: torch.Tensor  # [2, E] int64: each expert's gate_up and down bytes on the device (gpu_tier.py)
    like: ExpertWeights  # any of the layer's experts: the quant types and shapes


@dataclass
class ExpertPlan:
    """Where each routed expert of one layer runs, as residency decided it."""

    layer: int
    ids: torch.Tensor  # [T, k] int64: the expert each slot runs after any substitution (−1: dropped)
    weights: torch.Tensor  # [T, k] float32: its router weight. Both on the host (device plans: the device)
    source: Callable[[int], ExpertWeights]  # expert → the weights compute reads (GPU tier's copy, or the store's)
    where: dict[int, str] = field(default_factory=dict)  # expert → RESIDENT | FETCHED | STREAMED | CPU
    substitutions: dict[str, int] = field(default_factory=dict)  # slots the miss policy changed, by kind
    split: bool = False  # the GPU share is issued on x's device first, the CPU's summed on a host copy
    device: DeviceRouting | None = None  # set: the experts run from the device-side ids
    grouped: Rows | None = None  # rows_by_expert(ids, weights) once made (residency may hand it in)

    @property
    def rows(self) -> Rows:
        """Expert → (token indices, router weights), on the host: one token in slot order, more by id."""
        if self.grouped is None:
            self.grouped = rows_by_expert(self.ids, self.weights)
        return self.grouped

    @property
    def on_cpu(self) -> set[int]:
        """The experts the CPU computes."""
        return {e for e, place in self.where.items() if place == CPU}

    def decode_terms(self) -> tuple[list[int], list[float]]:
        """One token: its experts in slot order and their router weights, as Python values (a
        decode step's tensor ops cost µs each; with the rows grouped already, read from them)."""
        if self.grouped is None:
            ids = self.ids[0].tolist()
            live = [e for e in ids if e >= 0]
            if len(set(live)) == len(live):  # no expert in two slots (rows_by_expert would sum them)
                return live, [w for e, w in zip(ids, self.weights[0].tolist()) if e >= 0]
        rows = self.rows
        return list(rows), [float(rows[e][1][0]) for e in rows]


def run_plan(plan: ExpertPlan, x: torch.Tensor) -> torch.Tensor:
    """Σ over the plan's experts of router weight · expert(x rows): x [T, D] → [T, D]."""
    if plan.device is not None:
        return resident_decode(plan.device.addresses, plan.device.like, x, plan.ids, plan.weights)
    if plan.split or x.device.type != "cpu":
        return _run_split(plan, x)
    # one device: the same sums in the same order wherever residency placed the experts (on the
    # modelled tier placement never changes a bit of the result)
    if x.shape[0] == 1:  # decode: the experts in slot order, gate+up and down batched
        order, coefs = plan.decode_terms()
        if order:
            return swiglu_experts([plan.source(e) for e in order], x, coefs)
    rows = plan.rows
    order = sorted(rows)
    ws = [plan.source(e) for e in order]  # (in the order the loop below read them)
    if x.shape[0] > 1 and ws:  # a prompt: every expert in one C call where they are all plain VNNI experts
        out = swiglu_prompt(ws, x, [rows[e] for e in order])
        if out is not None:
            return out
    out = torch.zeros_like(x)
    for e, wt in zip(order, ws):
        tok, w = rows[e]
        out.index_add_(0, tok, swiglu_expert(wt, x[tok]) * w.unsqueeze(1))
    return out


def _run_split(plan: ExpertPlan, x: torch.Tensor) -> torch.Tensor:
    """A real device: the GPU tier's experts are issued first (asynchronously), then the CPU
    computes its share from the quantized weights while the GPU works (Fiddler), and its sum is
    added on the GPU. Nothing here waits for the GPU: host→device copies come from pinned memory."""
    dev, rows, on_cpu = x.device, plan.rows, plan.on_cpu
    x_host = readback(x)[0] if on_cpu else None  # x is ready: the router readback already synchronised
    gpu = [e for e in sorted(rows) if e not in on_cpu]
    out = torch.zeros_like(x)
    ws = [plan.source(e) for e in gpu]
    if gpu and grouped_ready(ws):  # one launch per matrix for all of them
        out = grouped_swiglu(ws, x, [rows[e] for e in gpu])
    elif gpu:
        counts = [len(rows[e][0]) for e in gpu]
        toks = to_device(torch.cat([rows[e][0] for e in gpu]), dev).split(counts)
        coefs = to_device(torch.cat([rows[e][1] for e in gpu]), dev).split(counts)
        for wt, tok, w in zip(ws, toks, coefs):
            out.index_add_(0, tok, swiglu_expert(wt, x[tok]) * w.unsqueeze(1))
    if on_cpu:
        acc = torch.zeros_like(x_host)
        for e in sorted(on_cpu):
            tok, w = rows[e]
            acc.index_add_(0, tok, swiglu_expert(plan.source(e), x_host[tok]) * w.unsqueeze(1))
        out += to_device(acc, dev)
    return out
