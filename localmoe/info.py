"""`localmoe info`: what a model file holds, and how it would fit a GPU budget."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .gguf.file import GGUFModel

# VRAM of the hardware profiles the fit estimate reports (bytes).
FIT_TARGETS = {"8GB GPU": 8 << 30, "24GB GPU": 24 << 30}


def cpu_backends(qtypes: list[str]) -> dict[str, Any]:
    """The CPU backend each quant type runs with on this machine, and why; each kernel's state."""
    from gguf import GGMLQuantizationType

    from .compute.kernels import backend_table, kernel_status, kernel_warnings

    rows = backend_table([GGMLQuantizationType[q] for q in qtypes])
    return {
        "by_type": {r["qtype"]: {"backend": r["backend"], "reason": r["reason"]} for r in rows},
        "kernels": kernel_status(),
        "warnings": kernel_warnings(),
    }


def backend_lines(b: dict[str, Any]) -> list[str]:
    """The text `info` and `run --verbose` print for cpu_backends()."""
    lines = ["cpu backend    " + "; ".join(f"{q}: {v['backend']} ({v['reason']})" for q, v in b["by_type"].items())]
    lines.append("kernels        " + "; ".join(f"{k}: {v}" for k, v in b["kernels"].items()))
    lines += [f"warning: {w} — the slower fallback runs" for w in b["warnings"]]
    return lines


def describe(model: GGUFModel, backends: bool = True) -> dict[str, Any]:
    s = model.spec
    by_type_bytes: Counter[str] = Counter()
    by_type_count: Counter[str] = Counter()
    for t in model.tensors.values():
        by_type_bytes[t.qtype.name] += t.n_bytes
        by_type_count[t.qtype.name] += 1
    expert_bytes, dense_bytes = model.all_expert_bytes(), model.dense_bytes()
    by_layer = [model.expert_bytes(layer) for layer in s.moe_layers]  # mixes such as Q4_K_M vary by layer
    n_experts_total = s.n_expert * len(s.moe_layers)
    per_expert = expert_bytes // n_experts_total
    fit = {}
    for label, vram in FIT_TARGETS.items():
        room = max(0, vram - dense_bytes)
        fit[label] = {
            "budget_bytes": vram,
            "experts_resident": min(n_experts_total, room // per_expert if per_expert else 0),
            "experts_total": n_experts_total,
        }
    return {
        "path": model.path,
        "name": s.name,
        "architecture": s.arch.name,
        "layers": s.n_layer,
        "embedding_length": s.n_embd,
        "vocab_size": s.n_vocab,
        "heads": s.n_head,
        "kv_heads": s.n_head_kv,
        "head_dim": s.head_dim,
        "context_length": s.ctx_train,
        "experts": {
            "count": s.n_expert,
            "used": s.n_expert_used,
            "ffn_length": s.n_ff_exp,
            "shared_ffn_length": s.n_ff_shexp,
            "shared_count": s.n_expert_shared or int(s.n_ff_shexp > 0),
            "normalised_top_k": s.norm_topk,
            "activation": s.arch.expert_act,
            "biases": s.arch.expert_bias,
        },
        "routing": {
            "kind": s.routing,
            "router_bias": s.arch.router_bias,
            "groups": {"count": s.n_expert_groups, "used": s.n_group_used} if s.n_expert_groups > 1 else None,
            "weights_scale": s.expert_weights_scale,
        },
        "attention": _attention(s, model),
        "dense_layers": [layer for layer in range(s.n_layer) if not s.is_moe(layer)],
        "rope": {
            "style": s.arch.rope_style,
            "dims": s.n_rot,
            "scaling": s.rope_scaling,
            "freq_scale": s.rope_freq_scale,
        }
        | ({"original_context": s.yarn_orig_ctx} if s.rope_scaling == "yarn" else {})
        | ({"mrope_sections": list(s.rope_sections)} if s.rope_sections else {}),
        "bytes_per_expert": per_expert,  # mean over layers
        "bytes_per_expert_by_layer": by_layer,
        "expert_bytes": expert_bytes,
        "dense_bytes": dense_bytes,
        "file_bytes": expert_bytes + dense_bytes,
        "quant_mix": {
            k: {"tensors": by_type_count[k], "bytes": v}
            for k, v in sorted(by_type_bytes.items(), key=lambda kv: -kv[1])
        },
        "fit": fit,
        **(
            {
                "cpu": cpu_backends(sorted(by_type_bytes, key=lambda k: -by_type_bytes[k])),
                "host_memory": host_memory(model),
            }
            if backends
            else {}
        ),
    }


def host_memory(model: GGUFModel) -> dict[str, Any]:
    """What the default --host-mem is on this machine now, and what it holds of this model's experts
    (those of a type the VNNI kernel computes; the rest always run in place from the file)."""
    import psutil
    import torch

    from .compute.experts import ExpertStore
    from .runtime import HOST_HEADROOM, default_host_mem

    store = ExpertStore(model, torch.device("cpu"), 0)  # asked which layers it would repack; it holds nothing
    repackable = sum(model.expert_bytes(layer) * model.spec.n_expert for layer in store.repacked_layers())
    available, dense = int(psutil.virtual_memory().available), model.dense_bytes()
    default = default_host_mem(dense, available)
    return {
        "available_bytes": available,
        "dense_bytes": dense,
        "headroom_bytes": HOST_HEADROOM,
        "default_host_mem_bytes": default,
        "repackable_expert_bytes": repackable,
        "repacked_share": min(1.0, default / repackable) if repackable else 0.0,
    }


def host_memory_line(h: dict[str, Any]) -> str:
    """The `info` line for host_memory()."""
    head = (
        f"host memory    --host-mem default {_gib(h['default_host_mem_bytes'])} (RAM available "
        f"{_gib(h['available_bytes'])}"
        f" − dense {_gib(h['dense_bytes'])} − {_gib(h['headroom_bytes'])} headroom): "
    )
    if not h["repackable_expert_bytes"]:
        return head + "no expert is of a type the VNNI kernel computes; all run in place from the file (ggml)"
    if h["repacked_share"] >= 1.0:
        return head + f"all {_gib(h['repackable_expert_bytes'])} of experts repacked at load"
    return head + (
        f"about {h['repacked_share']:.0%} of {_gib(h['repackable_expert_bytes'])} of experts repacked at load, "
        "the rest run in place (ggml)"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _attention(s, model: GGUFModel | None = None) -> dict[str, Any]:
    if s.arch.attention == "mla":
        return {
            "kind": "mla",
            "kv_lora_rank": s.kv_lora_rank,
            "q_lora_rank": s.q_lora_rank,
            "qk_rope_dim": s.n_rot,
            "qk_nope_dim": s.head_dim - s.n_rot,
            "v_head_dim": s.head_dim_v,
        }
    swa = [layer for layer in range(s.n_layer) if s.is_swa(layer)]
    out = {
        "kind": "gqa",
        "sinks": s.arch.sinks,
        "sliding_window": s.n_swa if swa else 0,
        "windowed_layers": swa,
        "biases": s.arch.qkv_bias,
    }
    recurrent = [layer for layer in range(s.n_layer) if s.is_recurrent(layer)]
    if recurrent:  # a hybrid: Gated DeltaNet layers with a fixed-size state, attention on the others
        d = s.deltanet
        out |= {
            "deltanet_layers": recurrent,
            "attention_layers": [i for i in range(s.n_layer) if not s.is_recurrent(i)],
            "deltanet": {
                "key_heads": d.n_k_heads,
                "value_heads": d.n_v_heads,
                "head_dim": d.d_k,
                "conv_kernel": d.d_conv,
                "state_bytes_per_layer": d.state_bytes(),
            },
        }
    if s.arch.swa_shapes:  # windowed and global layers of their own shapes (gemma4)
        from .gguf import names

        rotated = s.n_rot
        if model is not None and model.has(names.ROPE_FREQS):
            # proportional RoPE: pairs with a huge factor stay unrotated
            rotated = 2 * int((model._float(model.view(names.ROPE_FREQS)) < 1e20).sum())
        out["layer_shapes"] = {
            "windowed": {
                "kv_heads": s.n_head_kv_swa,
                "head_dim": s.head_dim_swa,
                "rope_dims": s.n_rot_swa,
                "rope_base": s.rope_base_swa,
            },
            "global": {
                "layers": [layer for layer in range(s.n_layer) if not s.is_swa(layer)],
                "kv_heads": s.n_head_kv,
                "head_dim": s.head_dim,
                "rope_dims": rotated,
                "rope_base": s.rope_base,
            },
        }
        out["final_logit_softcap"] = s.final_logit_softcap
    return out


def _attention_line(a: dict[str, Any]) -> str:
    if a["kind"] == "mla":
        q = f"q_lora {a['q_lora_rank']}" if a["q_lora_rank"] else "no q_lora"
        return (
            f"attention      MLA: kv_lora {a['kv_lora_rank']}, {q}, qk {a['qk_nope_dim']} + rope "
            f"{a['qk_rope_dim']}, v {a['v_head_dim']}"
        )
    line = (
        "attention      GQA" + (", q/k/v biases" if a["biases"] else "") + (", a sink per head" if a["sinks"] else "")
    )
    if a["sliding_window"]:
        n = len(a["windowed_layers"])
        line += (
            f", sliding window {a['sliding_window']} on {n} layer{'s' if n > 1 else ''} "
            f"({_layer_list(a['windowed_layers'])})"
        )
    if "deltanet_layers" in a:
        d, n = a["deltanet"], len(a["deltanet_layers"])
        line = line.replace(
            "attention      GQA", f"attention      GQA with an output gate on {_n_layers(a['attention_layers'])}"
        )
        line += (
            f"\ndeltanet       Gated DeltaNet on {_n_layers(a['deltanet_layers'])}: {d['key_heads']} key "
            f"heads, {d['value_heads']} value heads"
            f" of {d['head_dim']}, conv {d['conv_kernel']}; state {_mib(d['state_bytes_per_layer'])} a layer, "
            f"{_mib(n * d['state_bytes_per_layer'])} in all (fixed, whatever the context)"
        )
    if "layer_shapes" in a:
        w, g = a["layer_shapes"]["windowed"], a["layer_shapes"]["global"]
        parts = (
            [
                (
                    f"windowed: {w['kv_heads']} KV heads of {w['head_dim']}, RoPE base {w['rope_base']:g} on "
                    f"{w['rope_dims']} dims"
                )
            ]
            if a["windowed_layers"]
            else []
        )
        if g["layers"]:
            parts.append(
                f"global ({_layer_list(g['layers'])}): {g['kv_heads']} KV heads of {g['head_dim']}, RoPE base "
                f"{g['rope_base']:g} on {g['rope_dims']} of {g['head_dim']} dims"
            )
        line += "\nlayer pattern  " + "; ".join(parts)
        if a.get("final_logit_softcap"):
            line += (
                f"\nlogits         soft-capped: {a['final_logit_softcap']:g} · tanh(logits / "
                f"{a['final_logit_softcap']:g})"
            )
    return line


def _n_layers(layers: list[int]) -> str:
    """[3, 7] → "2 layers (3, 7)"."""
    return f"{len(layers)} layer{'s' if len(layers) != 1 else ''} ({_layer_list(layers)})"


def _layer_list(layers: list[int]) -> str:
    """[0, 2, 4, ..., 22] → "0, 2, ..., 22"; short lists in full; other long ones cut after five."""
    if len(layers) <= 6:
        return ", ".join(map(str, layers))
    step = layers[1] - layers[0]
    if all(b - a == step for a, b in zip(layers, layers[1:])):
        return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"
    return ", ".join(map(str, layers[:5])) + f", ... ({len(layers)} in all)"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB"


def format_text(d: dict[str, Any]) -> str:
    e = d["experts"]
    lines = [
        f"model          {d['name']}  ({d['path']})",
        f"architecture   {d['architecture']}",
        (
            f"layers         {d['layers']}   hidden {d['embedding_length']}   heads {d['heads']} (kv "
            f"{d['kv_heads']}, dim {d['head_dim']})   vocab {d['vocab_size']}   context {d['context_length']}"
        ),
        f"experts        {e['count']} per layer, top-{e['used']} used, ffn {e['ffn_length']}"
        + (", biases" if e["biases"] else "")
        + (", clamped SwiGLU (gpt-oss)" if e["activation"] == "swiglu_oai" else "")
        + (", GeGLU" if e["activation"] == "geglu" else "")
        + (
            f", {e['shared_count']} shared expert{'s' if e['shared_count'] > 1 else ''} (ffn {e['shared_ffn_length']})"
            if e["shared_ffn_length"]
            else ""
        ),
        f"routing        {d['routing']['kind']}"
        + (" (+ router bias)" if d["routing"]["router_bias"] else "")
        + (
            f", {d['routing']['groups']['used']} of {d['routing']['groups']['count']} expert groups"
            if d["routing"]["groups"]
            else ""
        )
        + (f", weights × {d['routing']['weights_scale']:g}" if d["routing"]["weights_scale"] not in (0.0, 1.0) else ""),
        _attention_line(d["attention"]),
        f"rope           {d['rope']['style']}, {d['rope']['dims']} dims"
        + (f", {d['rope']['scaling']} × {1 / d['rope']['freq_scale']:g}" if d["rope"]["scaling"] != "none" else "")
        + (f" over {d['rope']['original_context']}" if "original_context" in d["rope"] else "")
        + (
            f", interleaved M-RoPE sections {d['rope']['mrope_sections']} (text: one position)"
            if "mrope_sections" in d["rope"]
            else ""
        ),
        *(
            [f"dense layers   {', '.join(map(str, d['dense_layers']))} (a dense FFN, no experts)"]
            if d["dense_layers"]
            else []
        ),
        f"bytes/expert   {_mib(d['bytes_per_expert'])}  ({d['bytes_per_expert']:,} bytes: gate+up+down at rest"
        + (
            f"; {min(d['bytes_per_expert_by_layer']):,}–{max(d['bytes_per_expert_by_layer']):,} by layer)"
            if len(set(d["bytes_per_expert_by_layer"])) > 1
            else ")"
        ),
        f"size           experts {_mib(d['expert_bytes'])} + dense {_mib(d['dense_bytes'])} = {_mib(d['file_bytes'])}",
        "quant mix      "
        + ", ".join(f"{k} {v['tensors']} tensors ({_mib(v['bytes'])})" for k, v in d["quant_mix"].items()),
    ]
    for label, f in d["fit"].items():
        share = f["experts_resident"] / f["experts_total"] if f["experts_total"] else 0.0
        lines.append(
            f"fit {label:<10} {f['experts_resident']:,} of {f['experts_total']:,} experts resident "
            f"({share:.0%}) after the dense weights"
        )
    if "cpu" in d:
        lines += backend_lines(d["cpu"])
    if "host_memory" in d:
        lines.append(host_memory_line(d["host_memory"]))
    return "\n".join(lines)
