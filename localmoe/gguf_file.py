"""Reading a MoE GGUF file: validation, hyperparameters (ModelSpec) and zero-copy tensor views.

The file is memory-mapped by gguf.GGUFReader; nothing is copied until a tensor is dequantized.
Expert `e` of layer `l` is row `e` of blk.l.ffn_{gate,up,down}_exps.weight, which for a quantized
tensor is a contiguous byte range — `expert_raw` returns a numpy view of exactly those bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from . import names
from .arch import ARCHITECTURES, ArchSpec, supported_list
from .errors import LocalMoEError
from .gguf_blocks import FLOAT_TYPES, QUANT_TYPES

Q = GGMLQuantizationType
SUPPORTED_QTYPES: frozenset[GGMLQuantizationType] = FLOAT_TYPES | QUANT_TYPES  # what gguf_blocks reads


@dataclass(frozen=True)
class ModelSpec:
    """Every hyperparameter the forward pass needs, read from the file's metadata."""

    arch: ArchSpec
    name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    head_dim_v: int  # value head size
    n_rot: int  # leading dims of each head that RoPE rotates
    rope_base: float
    rope_freq_scale: float  # 1 / linear rope scaling factor
    rms_eps: float
    n_expert: int
    n_expert_used: int  # top-k
    n_ff_exp: int  # hidden size of one routed expert
    n_ff_shexp: int  # hidden size of the shared expert (0 when there is none)
    norm_topk: bool
    expert_weights_scale: float  # 0 or 1 → no scaling (llama.cpp's convention)
    ctx_train: int


@dataclass(frozen=True)
class TensorView:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in numpy (row-major) order, e.g. [n_expert, n_ff, n_embd]
    data: np.ndarray  # memory-mapped: float array for F32/F16, raw bytes (uint8) for quantized types
    n_bytes: int


class GGUFModel:
    """An opened, validated MoE GGUF file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.reader = _open_reader(self.path)
        self.tensors: dict[str, TensorView] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorView(t.name, GGMLQuantizationType(int(t.tensor_type)), shape, t.data, int(t.n_bytes))
        self.spec = _read_spec(self)
        self._check_tensors()

    # -- metadata ---------------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except Exception:  # a malformed field reads as absent
            return default
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def arch_meta(self, suffix: str, default: Any = None) -> Any:
        return self.meta(names.arch_key(self.spec_arch_name, suffix), default)

    @property
    def spec_arch_name(self) -> str:
        return str(self.meta(names.ARCHITECTURE, ""))

    # -- tensors ----------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def view(self, name: str) -> TensorView:
        try:
            return self.tensors[name]
        except KeyError:
            raise LocalMoEError(f"{self.path}: tensor '{name}' is missing; the file is incomplete or not a {self.spec_arch_name} model") from None

    def expert_raw(self, layer: int, expert: int, part: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
        """Zero-copy view of one expert's matrix: (raw data, quant type, logical [rows, cols])."""
        t = self.view(names.blk(layer, part))
        return t.data[expert], t.qtype, t.shape[1:]

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of `layer` at rest (gate + up + down, quantized)."""
        return sum(self.view(names.blk(layer, p)).n_bytes for p in names.EXPERT_PARTS) // self.spec.n_expert

    def dense_bytes(self) -> int:
        """Bytes at rest of everything that is not a routed expert (placed on the GPU first)."""
        return sum(t.n_bytes for t in self.tensors.values() if not names.is_expert_tensor(t.name))

    def dense_elements(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors.values() if not names.is_expert_tensor(t.name))

    def all_expert_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values() if names.is_expert_tensor(t.name))

    def _check_tensors(self) -> None:
        spec = self.spec
        required = [names.TOKEN_EMBD, names.OUTPUT_NORM]
        for layer in range(spec.n_layer):
            stems = [names.ATTN_NORM, names.ATTN_Q, names.ATTN_K, names.ATTN_V, names.ATTN_OUT, names.FFN_NORM, names.FFN_GATE_INP, *names.EXPERT_PARTS]
            if spec.arch.qk_norm != "none":
                stems += [names.ATTN_Q_NORM, names.ATTN_K_NORM]
            if spec.arch.shared_expert:
                stems += [names.FFN_GATE_INP_SHEXP, names.FFN_GATE_SHEXP, names.FFN_UP_SHEXP, names.FFN_DOWN_SHEXP]
            required += [names.blk(layer, s) for s in stems]
        missing = [n for n in required if n not in self.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LocalMoEError(f"{self.path}: required tensor '{missing[0]}' is missing{more}; the file is incomplete or was converted for another architecture")
        for t in self.tensors.values():
            if t.qtype not in SUPPORTED_QTYPES:
                supported = ", ".join(q.name for q in sorted(SUPPORTED_QTYPES))
                raise LocalMoEError(f"{self.path}: tensor '{t.name}' has quant type {t.qtype.name}, which localmoe does not support; re-quantize to one of {supported}")
        gate = self.view(names.blk(0, names.FFN_GATE_EXPS))
        if gate.shape != (spec.n_expert, spec.n_ff_exp, spec.n_embd):
            raise LocalMoEError(f"{self.path}: expert tensor shape {gate.shape} does not match metadata ({spec.n_expert}, {spec.n_ff_exp}, {spec.n_embd}); the file is inconsistent")


def _open_reader(path: str) -> GGUFReader:
    if not os.path.exists(path):
        raise LocalMoEError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise LocalMoEError(f"{path} is a directory; pass the path of a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LocalMoEError(f"{path} is not a GGUF file (no GGUF magic); convert the model with llama.cpp's convert_hf_to_gguf.py")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises many types on damaged files
        raise LocalMoEError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc}); re-download or re-convert it") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise LocalMoEError(f"{path} is truncated: tensor '{t.name}' ends past the end of the file ({size} bytes); re-download it")
    return reader


def _read_spec(m: GGUFModel) -> ModelSpec:
    arch_name = m.spec_arch_name
    if not arch_name:
        raise LocalMoEError(f"{m.path}: no general.architecture key; the file is not a model GGUF")
    arch = ARCHITECTURES.get(arch_name)
    n_expert = int(m.meta(names.arch_key(arch_name, names.EXPERT_COUNT), 0) or 0)
    if arch is None:
        raise LocalMoEError(f"{m.path}: architecture '{arch_name}' is not supported; localmoe runs MoE models of these architectures: {supported_list()}")
    if n_expert <= 0:
        raise LocalMoEError(f"{m.path}: '{arch_name}' model has no experts (dense model); localmoe runs MoE models only ({supported_list()} with expert_count > 0) — use llama.cpp for dense models")

    def need(suffix: str) -> Any:
        value = m.meta(names.arch_key(arch_name, suffix))
        if value is None:
            raise LocalMoEError(f"{m.path}: metadata key '{arch_name}.{suffix}' is missing; the file is incomplete")
        return value

    def opt(suffix: str, default: Any) -> Any:
        value = m.meta(names.arch_key(arch_name, suffix))
        return default if value is None else value

    n_embd = int(need(names.EMBEDDING_LENGTH))
    n_head = int(need(names.HEAD_COUNT))
    n_head_kv = opt(names.HEAD_COUNT_KV, n_head)
    if isinstance(n_head_kv, list):  # per-layer list: all our architectures use one value
        if len(set(n_head_kv)) != 1:
            raise LocalMoEError(f"{m.path}: per-layer KV head counts are not supported")
        n_head_kv = n_head_kv[0]
    head_dim = int(opt(names.KEY_LENGTH, n_embd // n_head))
    n_ff_exp = opt(names.EXPERT_FFN_LENGTH, None)
    if n_ff_exp is None:  # llama.cpp's fallback: n_ff / n_expert_used
        n_ff_exp = int(need(names.FEED_FORWARD_LENGTH)) // int(need(names.EXPERT_USED_COUNT))
    scaling = str(opt(names.ROPE_SCALING_TYPE, "none"))
    if scaling not in ("none", "linear"):
        raise LocalMoEError(f"{m.path}: rope scaling '{scaling}' is not supported (none, linear)")
    factor = float(opt(names.ROPE_SCALING_FACTOR, 0.0) or 0.0)
    n_ff_shexp = 0
    if arch.shared_expert:
        n_ff_shexp = int(opt(names.EXPERT_SHARED_FFN_LENGTH, 0) or 0)
        if not n_ff_shexp and names.blk(0, names.FFN_GATE_SHEXP) in m.tensors:
            n_ff_shexp = m.tensors[names.blk(0, names.FFN_GATE_SHEXP)].shape[0]
    embd = m.tensors.get(names.TOKEN_EMBD)
    n_vocab = embd.shape[0] if embd is not None else 0
    return ModelSpec(
        arch=arch,
        name=str(m.meta(names.MODEL_NAME, os.path.basename(m.path))),
        n_layer=int(need(names.BLOCK_COUNT)),
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_head=n_head,
        n_head_kv=int(n_head_kv),
        head_dim=head_dim,
        head_dim_v=int(opt(names.VALUE_LENGTH, head_dim)),
        n_rot=int(opt(names.ROPE_DIMENSION_COUNT, head_dim)),
        rope_base=float(opt(names.ROPE_FREQ_BASE, 10000.0)),
        rope_freq_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
        rms_eps=float(opt(names.RMS_EPS, 1e-6)),
        n_expert=n_expert,
        n_expert_used=int(need(names.EXPERT_USED_COUNT)),
        n_ff_exp=int(n_ff_exp),
        n_ff_shexp=n_ff_shexp,
        norm_topk=bool(opt(names.EXPERT_WEIGHTS_NORM, arch.norm_topk)),
        expert_weights_scale=float(opt(names.EXPERT_WEIGHTS_SCALE, 0.0)),
        ctx_train=int(opt(names.CONTEXT_LENGTH, 4096)),
    )
