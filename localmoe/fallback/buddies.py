"""Calibration: expert statistics and the buddy table (BuddyMoE), saved beside the model.

`calibrate(rt, text)` runs the model over calibration text and, per layer, gathers:
  * usage: how often each expert is routed to;
  * co-activation: how often experts i and j are chosen for the same token, and q(j|i);
  * functional similarity: on inputs the router sent to expert i, the cosine between expert j's
    output and expert i's output (mean over up to `samples` inputs per expert);
  * router correlation: Pearson correlation of the router's probabilities for i and j over tokens;
  * the token activating entropy (TAE) distribution, whose low percentile is the layer's τ.
The buddy score of j for i is 0.75·cos(i→j) + 0.25·corr(i,j) (clipped at 0): how well j's
output stands in for i's on i's own inputs, nudged by whether the router treats them alike.

The sidecar (`MODEL.gguf.buddies.json`) records provenance: the model's fingerprint (size and
SHA-256 of its first and last 4 MiB — cheap on 20 GB files, and it covers the header and tensor
table), the calibration text's SHA-256 and name, and the token count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from ..layers.routers import routing_probs
from ..errors import LocalMoEError
from ..compute.experts import swiglu_expert

SIDECAR_SUFFIX = ".buddies.json"
FORMAT = 1
COS_WEIGHT = 0.75  # share of functional similarity in the buddy score (the rest: router correlation)
TAE_PERCENTILE = 15  # τ per layer: tokens with TAE at or below it are never substituted
MAX_BUDDIES = 8


def sidecar_path(model_path: str) -> str:
    return model_path + SIDECAR_SUFFIX


def fingerprint(path: str, chunk: int = 4 << 20) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def builtin_calibration_text() -> str:
    return resources.files("localmoe").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def token_activating_entropy(weights: torch.Tensor) -> torch.Tensor:
    """weights [T, k] router weights of the chosen experts → TAE [T] in [0, 1]: the normalised
    entropy of the renormalised top-k probabilities (0: all on one expert; 1: spread evenly)."""
    p = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    k = weights.shape[-1]
    if k < 2:
        return torch.zeros(weights.shape[0])
    return -(p * p.clamp(min=1e-12).log()).sum(-1) / math.log(k)


@dataclass
class LayerCalibration:
    usage: np.ndarray  # [E] routed uses
    coactivation: np.ndarray  # [E, E] tokens choosing both i and j (diagonal 0)
    similarity: np.ndarray  # [E, E] mean cosine of expert j's output to expert i's, on i's inputs
    router_corr: np.ndarray  # [E, E]
    tae_tau: float
    buddies: dict[int, list[tuple[int, float]]]  # i → [(j, score)], best first


@dataclass
class BuddyTable:
    layers: list[LayerCalibration]
    provenance: dict

    def buddies(self, layer: int, expert: int) -> list[tuple[int, float]]:
        return self.layers[layer].buddies.get(expert, [])

    def similarity_matrix(self, layer: int) -> np.ndarray:
        """[E, E]: row i, how well each expert's output stands in for expert i's."""
        return self.layers[layer].similarity

    def tau(self, layer: int) -> float:
        return self.layers[layer].tae_tau

    # -- the sidecar --------------------------------------------------------------------------
    def save(self, path: str) -> None:
        doc = {
            "localmoe_buddies": FORMAT,
            "provenance": self.provenance,
            "score": f"{COS_WEIGHT}*cosine + {1 - COS_WEIGHT:.2f}*router_correlation, clipped at 0",
            "layers": [
                {
                    "usage": lc.usage.astype(int).tolist(),
                    "coactivation": lc.coactivation.astype(int).tolist(),
                    "similarity": np.round(lc.similarity, 4).tolist(),
                    "router_correlation": np.round(lc.router_corr, 4).tolist(),
                    "tae_tau": round(lc.tae_tau, 5),
                    "buddies": {str(i): [[j, round(s, 4)] for j, s in lst] for i, lst in lc.buddies.items()},
                }
                for lc in self.layers
            ],
        }
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, model_path: str) -> "BuddyTable":
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("localmoe_buddies") != FORMAT:
                raise ValueError("unknown format")
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise LocalMoEError(
                f"{path} is not a readable buddy table ({exc}); re-run `localmoe calibrate {model_path}`"
            ) from None
        want = fingerprint(model_path)
        if doc["provenance"].get("model_fingerprint") != want:
            raise LocalMoEError(
                f"{path} was calibrated for another model file (fingerprint differs); "
                f"re-run `localmoe calibrate {model_path}` or delete the sidecar"
            )
        layers = [
            LayerCalibration(
                usage=np.array(d["usage"]),
                coactivation=np.array(d["coactivation"]),
                similarity=np.array(d["similarity"], dtype=np.float32),
                router_corr=np.array(d["router_correlation"], dtype=np.float32),
                tae_tau=float(d["tae_tau"]),
                buddies={int(i): [(int(j), float(s)) for j, s in lst] for i, lst in d["buddies"].items()},
            )
            for d in doc["layers"]
        ]
        return cls(layers, doc["provenance"])


class _Recorder:
    """Wraps the model's residency during calibration: gathers routing statistics and samples of
    each expert's inputs from each layer's routing, then plans the experts as usual."""

    def __init__(self, inner, model, n_expert: int, samples: int, seed: int):
        self.inner, self.model = inner, model
        L = model.spec.n_layer
        self.E, self.samples = n_expert, samples
        self.usage = np.zeros((L, n_expert))
        self.coact = np.zeros((L, n_expert, n_expert))
        self.p_sum = np.zeros((L, n_expert))
        self.pp_sum = np.zeros((L, n_expert, n_expert))
        self.n_tokens = np.zeros(L)
        self.tae: list[list[np.ndarray]] = [[] for _ in range(L)]
        self.inputs: list[dict[int, list[torch.Tensor]]] = [dict() for _ in range(L)]
        self.rng = np.random.default_rng(seed)
        self.routers: dict[int, _SeenRouter] = {}  # layer → its router while calibrating (calibrate sets them)

    def wants_prediction(self, layer: int, n_tokens: int) -> bool:
        return self.inner.wants_prediction(layer, n_tokens)

    def give_prediction(self, layer: int, ids: torch.Tensor) -> None:
        self.inner.give_prediction(layer, ids)

    def finish(self, plan) -> None:
        self.inner.finish(plan)

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor):
        h = self.routers[layer].last  # what the router read this layer
        self.record(layer, self.model.layers[layer].moe.experts_input(h), ids, weights)
        return self.inner.plan(layer, ids, weights)

    def record(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """One layer's routing: x [T, D] the experts' input, ids and weights [T, k]."""
        E = self.E
        onehot = torch.zeros(ids.shape[0], E).scatter_(1, ids, 1.0).numpy()  # [T, E]
        self.usage[layer] += onehot.sum(0)
        self.coact[layer] += onehot.T @ onehot
        h = self.routers[layer].last  # what the router read (x: what the experts read)
        probs = routing_probs(self.model.router_logits(layer, h), self.model.spec).double().numpy()  # [T, E]
        self.p_sum[layer] += probs.sum(0)
        self.pp_sum[layer] += probs.T @ probs
        self.n_tokens[layer] += ids.shape[0]
        self.tae[layer].append(token_activating_entropy(weights).numpy())
        store = self.inputs[layer]
        for t, row in enumerate(ids.tolist()):
            for e in row:
                bucket = store.setdefault(e, [])
                if len(bucket) < self.samples:
                    bucket.append(x[t].clone())
                elif self.rng.random() < 0.1:  # keep refreshing: later text replaces some samples
                    bucket[self.rng.integers(len(bucket))] = x[t].clone()


class _SeenRouter:
    """A layer's router that keeps its last input (calibrate's routing statistics read the router on
    what it was given, which need not be the experts' input); everything else is the router's."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def __call__(self, spec, h: torch.Tensor):
        self.last = h
        return self.inner(spec, h)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def calibrate(
    rt, text: str, max_tokens: int = 4096, samples: int = 64, window: int = 256, seed: int = 0, progress=None
) -> BuddyTable:
    """Run `rt`'s model over `text` (at most `max_tokens` tokens, in windows) and build the table."""
    ids = rt.tokenize(text)[:max_tokens]
    if len(ids) < 16:
        raise LocalMoEError("the calibration text is too short (fewer than 16 tokens); give a longer --text")
    model = rt.model
    recorder = _Recorder(model.experts, model, rt.spec.n_expert, samples, seed)
    window = min(window, rt.n_ctx)
    previous = model.experts
    model.experts = recorder
    moes = [lw.moe for lw in model.layers if lw.moe is not None]
    for moe in moes:  # the router's own input: it may differ from the experts' (Gemma 4 norms them apart)
        moe.router = _SeenRouter(moe.router)
    recorder.routers = {i: lw.moe.router for i, lw in enumerate(model.layers) if lw.moe is not None}
    try:
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            model.forward(torch.tensor(chunk), rt.new_cache(), all_logits=False)
            if progress:
                progress(min(start + window, len(ids)), len(ids))
    finally:
        model.experts = previous
        for moe in moes:
            moe.router = moe.router.inner
    layers = [_finish_layer(rt, recorder, layer) for layer in range(rt.spec.n_layer)]
    return BuddyTable(
        layers,
        {
            "model_fingerprint": fingerprint(rt.path),
            "model_file": os.path.basename(rt.path),
            "model_size": os.path.getsize(rt.path),
            "tokens": len(ids),
            "samples_per_expert": samples,
        },
    )


@torch.inference_mode()
def _finish_layer(rt, rec: _Recorder, layer: int) -> LayerCalibration:
    E = rec.E
    n = max(rec.n_tokens[layer], 1.0)
    mean = rec.p_sum[layer] / n
    cov = rec.pp_sum[layer] / n - np.outer(mean, mean)
    std = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
    corr = (cov / np.outer(std, std)).astype(np.float32)
    # functional similarity: each expert j on every sampled input, compared with the owner's output
    owners, rows = [], []
    for e, xs in sorted(rec.inputs[layer].items()):
        owners += [e] * len(xs)
        rows += xs
    sim = np.zeros((E, E), dtype=np.float32)
    if rows:
        X = torch.stack(rows)  # [N, D]
        owner = torch.tensor(owners)
        outs = torch.stack([swiglu_expert(rt.store.weights(layer, j), X) for j in range(E)])  # [E, N, D]
        own = outs[owner, torch.arange(len(owners))]  # [N, D]: each input through its own expert
        cos = torch.nn.functional.cosine_similarity(outs, own.unsqueeze(0), dim=-1)  # [E, N]
        for i in range(E):
            mask = owner == i
            if mask.any():
                sim[i] = cos[:, mask].mean(1).numpy()
    score = np.clip(COS_WEIGHT * sim + (1 - COS_WEIGHT) * corr, 0.0, None)
    buddies = {}
    for i in range(E):
        if rec.usage[layer][i] == 0:
            continue
        order = [int(j) for j in np.argsort(-score[i]) if j != i and score[i, j] > 0][:MAX_BUDDIES]
        buddies[i] = [(j, float(score[i, j])) for j in order]
    tae = np.concatenate(rec.tae[layer]) if rec.tae[layer] else np.zeros(1)
    coact = rec.coact[layer].copy()
    np.fill_diagonal(coact, 0)
    return LayerCalibration(
        rec.usage[layer].copy(), coact, sim, corr, float(np.percentile(tae, TAE_PERCENTILE)), buddies
    )
