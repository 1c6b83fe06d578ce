"""Reading a MoE GGUF file: validation, hyperparameters (ModelSpec) and zero-copy tensor views.

The file is memory-mapped by gguf.GGUFReader; nothing is copied until a tensor is dequantized.
Expert `e` of layer `l` is row `e` of blk.l.ffn_{gate,up,down}_exps.weight, which for a quantized
tensor is a contiguous byte range — `expert_raw` returns a numpy view of exactly those bytes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from . import names
from .. import archs
from ..archs import common as arch_common
from ..archs.common import ArchSpec, DeltaNetShape
from ..errors import LocalMoEError
from .blocks import FLOAT_TYPES, QUANT_TYPES

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
    # -- what differs between architectures (defaults: a plain GQA MoE of the first four) --------
    routing: str = "softmax_topk"  # one of arch.routings, chosen by the file (archs/common.py)
    n_expert_groups: int = 0  # > 1: experts in groups, only the n_group_used best groups compete
    n_group_used: int = 0
    n_dense_lead: int = 0  # the first n_dense_lead blocks have a dense FFN and no experts
    n_ff_dense: int = 0  # hidden size of those dense FFNs
    n_expert_shared: int = 0  # shared experts fused into one FFN of n_ff_shexp
    kv_lora_rank: int = 0  # MLA: the compressed KV width (the cache holds kv_lora_rank + n_rot per token)
    q_lora_rank: int = 0  # MLA: 0 → q = wq·h, else q = wq_b·rms(wq_a·h)
    rope_scaling: str = "none"  # none | linear | yarn
    rope_attn_factor: float = 1.0  # the attn_factor ggml's rope receives (YaRN: llama.cpp's cparams.yarn_attn_factor)
    yarn_ext_factor: float = 0.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_orig_ctx: int = 0
    yarn_log_mul: float = 0.0  # mscale_all_dim (llama.cpp's hparams.rope_yarn_log_mul)
    attn_scale: float = 0.0  # softmax scale of q·k; 0 → 1/sqrt(head_dim)
    n_swa: int = 0  # sliding window: a query in an SWA layer sees the n_swa latest positions (itself included)
    swa_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention (empty: none)
    rope_sections: tuple[
        int, ...
    ] = ()  # M-RoPE (qwen35moe): rotated pairs per position axis t, h, w, e (empty: plain RoPE)
    recurrent_layers: tuple[bool, ...] = ()  # per layer: a Gated DeltaNet layer instead of attention (empty: none)
    deltanet: DeltaNetShape | None = None  # the DeltaNet layers' sizes
    # windowed layers of their own shape (gemma4; 0: as the fields above, which then hold the global layers')
    n_head_kv_swa: int = 0
    head_dim_swa: int = 0  # key and value head size of a windowed layer
    n_rot_swa: int = 0
    rope_base_swa: float = 0.0
    embd_scale: float = 1.0  # the embedding rows × this (gemma4: √n_embd)
    final_logit_softcap: float = 0.0  # > 0: logits = c · tanh(logits / c)

    def is_swa(self, layer: int) -> bool:
        """True for a layer whose attention sees only the last n_swa positions."""
        return self.n_swa > 0 and layer < len(self.swa_layers) and self.swa_layers[layer]

    def is_recurrent(self, layer: int) -> bool:
        """True for a layer whose token mixer is a Gated DeltaNet (a fixed-size state, no KV rows)."""
        return layer < len(self.recurrent_layers) and self.recurrent_layers[layer]

    def is_moe(self, layer: int) -> bool:
        """False for a layer without experts (a leading dense layer)."""
        return layer >= self.n_dense_lead

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.n_dense_lead, self.n_layer))

    @property
    def kq_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)


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
            self.tensors[t.name] = TensorView(
                t.name, GGMLQuantizationType(int(t.tensor_type)), shape, t.data, int(t.n_bytes)
            )
        _split_gate_up(self.tensors)
        self.spec = _read_spec(self)
        # next-token-prediction (MTP) blocks past the trunk are skipped, as llama.cpp skips them
        self.tensors = {
            n: t for n, t in self.tensors.items() if (layer := names.layer_of(n)) is None or layer < self.spec.n_layer
        }
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
            raise LocalMoEError(
                f"{self.path}: tensor '{name}' is missing; the file is incomplete or not a {self.spec_arch_name} model"
            ) from None

    def expert_raw(
        self, layer: int, expert: int, part: str
    ) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
        """Zero-copy view of one expert's matrix: (raw data, quant type, logical [rows, cols])."""
        t = self.view(names.blk(layer, part))
        return t.data[expert], t.qtype, t.shape[1:]

    def release(self, arrays: list[np.ndarray]) -> None:
        """Drop the pages of these views of the mapped file from this process (madvise
        MADV_DONTNEED): bytes that have been repacked into RAM are not read again, so they need not
        count in the resident set. The file is mapped read-only: a later read maps them back from
        the page cache or the disk; nothing is lost. No-op where madvise is unavailable."""
        libc = _libc()
        if libc is None:
            return
        page = mmap.PAGESIZE
        for a in arrays:
            start, end = a.ctypes.data, a.ctypes.data + a.nbytes
            lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the range only
            if hi > lo:
                libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)

    def expert_biases(self, layer: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Routed-expert biases of `layer` as float32 (None where the file has none): gate and up
        joined [n_expert, 2·n_ff_exp] (the gate_up matmul's order), and down [n_expert, n_embd]."""
        parts = []
        for stem in names.EXPERT_BIAS_PARTS:
            name = names.blk(layer, stem, names.BIAS)
            parts.append(
                None if name not in self.tensors else self._float(self.tensors[name]).reshape(self.spec.n_expert, -1)
            )
        gate, up, down = parts
        if (gate is None) != (up is None):
            raise LocalMoEError(
                f"{self.path}: layer {layer} has a bias on only one of the experts' gate and up matrices; the "
                "file is inconsistent"
            )
        return (None if gate is None else np.concatenate([gate, up], axis=1)), down

    @staticmethod
    def _float(t: TensorView) -> np.ndarray:
        from .blocks import to_torch

        return to_torch(t.data, t.qtype, t.shape).numpy()

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of `layer` at rest (gate + up + down, quantized); 0 for a layer
        without experts."""
        if not self.spec.is_moe(layer):
            return 0
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
        required_of = getattr(archs.module_for(spec.arch.name), "required_tensors", arch_common.required_tensors)
        required = [names.TOKEN_EMBD, names.OUTPUT_NORM]
        for layer in range(spec.n_layer):
            # a stem (ATTN_Q: its weight) or (stem, kind) for another kind, e.g. (ATTN_OUT, BIAS)
            required += [
                names.blk(layer, *s) if isinstance(s, tuple) else names.blk(layer, s) for s in required_of(spec, layer)
            ]
        missing = [n for n in required if n not in self.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LocalMoEError(
                f"{self.path}: required tensor '{missing[0]}' is missing{more}; the file is incomplete or was "
                "converted for another architecture"
            )
        # a bias or sink the architecture does not declare would be silently dropped
        undeclared = (
            []
            if spec.arch.qkv_bias
            else [
                (names.ATTN_Q, "an attention bias"),
                (names.ATTN_K, "an attention bias"),
                (names.ATTN_V, "an attention bias"),
                (names.ATTN_OUT, "an attention bias"),
            ]
        )
        undeclared += [] if spec.arch.router_bias else [(names.FFN_GATE_INP, "a router bias")]
        undeclared += [] if spec.arch.expert_bias else [(p, "an expert bias") for p in names.EXPERT_BIAS_PARTS]
        for t in self.tensors:
            for stem, what in undeclared:
                if names.split(t)[1:] == (stem, names.BIAS):
                    raise LocalMoEError(
                        f"{self.path}: tensor '{t}' is {what}, which localmoe's {spec.arch.name} does not implement"
                    )
            if not spec.arch.sinks and names.split(t)[1:] == (names.ATTN_SINKS, names.WEIGHT):
                raise LocalMoEError(
                    f"{self.path}: tensor '{t}' holds attention sinks, which localmoe's {spec.arch.name} does "
                    "not implement"
                )
        for t in self.tensors.values():
            if t.qtype not in SUPPORTED_QTYPES:
                supported = ", ".join(q.name for q in sorted(SUPPORTED_QTYPES))
                raise LocalMoEError(
                    f"{self.path}: tensor '{t.name}' has quant type {t.qtype.name}, which localmoe does not "
                    f"support; re-quantize to one of {supported}"
                )
        if not spec.moe_layers:
            raise LocalMoEError(
                f"{self.path}: every layer is dense (leading_dense_block_count {spec.n_dense_lead} of "
                f"{spec.n_layer}); localmoe runs MoE models only"
            )
        gate = self.view(names.blk(spec.moe_layers[0], names.FFN_GATE_EXPS))
        if gate.shape != (spec.n_expert, spec.n_ff_exp, spec.n_embd):
            raise LocalMoEError(
                f"{self.path}: expert tensor shape {gate.shape} does not match metadata ({spec.n_expert}, "
                f"{spec.n_ff_exp}, {spec.n_embd}); the file is inconsistent"
            )


def _split_gate_up(tensors: dict[str, TensorView]) -> None:
    """A fused ffn_gate_up_exps [E, 2·F, D] becomes the two tensors every other file has, as views
    of its bytes: ffn_gate_exps = rows [0, F) of each expert, ffn_up_exps = rows [F, 2F) (llama.cpp's
    build_moe_ffn takes the gate from the first half). Each expert's half is one contiguous byte
    range, as in a file that stores them apart, so the expert store, the GPU tier and the byte
    counts read them unchanged."""
    for name in [n for n in tensors if names.split(n)[1:] == (names.FFN_GATE_UP_EXPS, names.WEIGHT)]:
        t = tensors.pop(name)
        layer = names.layer_of(name)
        if len(t.shape) != 3 or t.shape[1] % 2:
            raise LocalMoEError(
                f"tensor '{name}' has shape {t.shape}; a fused gate|up expert tensor is [experts, 2·ffn, embd]"
            )
        E, F2, D = t.shape
        F = F2 // 2
        for stem, rows in ((names.FFN_GATE_EXPS, slice(0, F)), (names.FFN_UP_EXPS, slice(F, F2))):
            half = names.blk(layer, stem)
            if half in tensors:
                raise LocalMoEError(f"tensor '{half}' is in the file beside '{name}'; the file is inconsistent")
            tensors[half] = TensorView(half, t.qtype, (E, F, D), t.data[:, rows], t.n_bytes // 2)


_LIBC: list = []


def _libc():
    """libc through ctypes (for madvise), or None off Linux/glibc-like systems."""
    if not _LIBC:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            _LIBC.append(lib if hasattr(mmap, "MADV_DONTNEED") else None)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


class _Reader(GGUFReader):
    """gguf-py's reader, minus the per-element parse of big metadata arrays. GGUFReader walks an
    array one element at a time through numpy memmap slices (≈ 25 µs each): the 201,088 tokens and
    ~446k merges of an o200k or Qwen vocabulary cost 5–10 s of every load. localmoe reads scalars
    and strings only (the tokenizer is llama.cpp's, which reads the vocabulary itself), so arrays
    longer than LAZY_ARRAY are only measured, and read as [] through `meta`."""

    LAZY_ARRAY = 4096

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        from gguf import GGUFValueType

        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n, itype = int(alen[0]), GGUFValueType(int(raw_itype[0]))
        if n <= self.LAZY_ARRAY or itype == GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        offs = orig_offs + 12
        if itype == GGUFValueType.STRING:  # each element: u64 length, then its bytes
            buf = memoryview(self.data)
            order = sys.byteorder if self.byte_order == "I" else ("big" if sys.byteorder == "little" else "little")
            for _ in range(n):
                offs += 8 + int.from_bytes(buf[offs : offs + 8], order)
        else:
            offs += n * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
        return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]


def _open_reader(path: str) -> GGUFReader:
    if not os.path.exists(path):
        raise LocalMoEError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise LocalMoEError(f"{path} is a directory; pass the path of a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LocalMoEError(
            f"{path} is not a GGUF file (no GGUF magic); convert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    try:
        reader = _Reader(path, "r")
    except Exception as exc:  # the reader raises many types on damaged files
        raise LocalMoEError(
            f"{path} is damaged or truncated ({type(exc).__name__}: {exc}); re-download or re-convert it"
        ) from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise LocalMoEError(
                f"{path} is truncated: tensor '{t.name}' ends past the end of the file ({size} bytes); re-download it"
            )
    return reader


def _read_spec(m: GGUFModel) -> ModelSpec:
    arch_name = m.spec_arch_name
    if not arch_name:
        raise LocalMoEError(f"{m.path}: no general.architecture key; the file is not a model GGUF")
    module = archs.module_for(arch_name)
    n_expert = int(m.meta(names.arch_key(arch_name, names.EXPERT_COUNT), 0) or 0)
    if module is None:
        raise LocalMoEError(
            f"{m.path}: architecture '{arch_name}' is not supported; localmoe runs MoE models of these "
            f"architectures: {archs.supported_list()}"
        )
    arch: ArchSpec = module.ARCH
    if n_expert <= 0:
        raise LocalMoEError(
            f"{m.path}: '{arch_name}' model has no experts (dense model); localmoe runs MoE models only "
            f"({archs.supported_list()} with expert_count > 0) — use llama.cpp for dense models"
        )

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
    if isinstance(n_head_kv, list):  # per-layer list: one value, or (gemma4) one per kind of layer, read by read_args
        if len(set(n_head_kv)) != 1 and not arch.swa_shapes:
            raise LocalMoEError(f"{m.path}: per-layer KV head counts are not supported")
        n_head_kv = n_head_kv[0]
    head_dim = int(opt(names.KEY_LENGTH, n_embd // n_head))
    n_ff_exp = opt(names.EXPERT_FFN_LENGTH, None)
    if n_ff_exp is None:  # llama.cpp's fallback: n_ff / n_expert_used
        n_ff_exp = int(need(names.FEED_FORWARD_LENGTH)) // int(need(names.EXPERT_USED_COUNT))
    scaling = str(opt(names.ROPE_SCALING_TYPE, "none"))
    if scaling not in arch.rope_scalings:
        raise LocalMoEError(
            f"{m.path}: rope scaling '{scaling}' is not supported for {arch_name} ({', '.join(arch.rope_scalings)})"
        )
    factor = float(opt(names.ROPE_SCALING_FACTOR, 0.0) or 0.0)
    embd = m.tensors.get(names.TOKEN_EMBD)
    n_vocab = embd.shape[0] if embd is not None else 0
    fields: dict[str, Any] = dict(
        arch=arch,
        name=str(m.meta(names.MODEL_NAME, os.path.basename(m.path))),
        n_layer=int(need(names.BLOCK_COUNT))
        - int(opt(names.NEXTN_PREDICT_LAYERS, 0) or 0),  # trunk only: MTP layers are skipped
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_head=n_head,
        n_head_kv=int(n_head_kv),
        head_dim=head_dim,
        head_dim_v=int(opt(names.VALUE_LENGTH, head_dim)),
        n_rot=int(opt(names.ROPE_DIMENSION_COUNT, head_dim)),
        rope_base=float(opt(names.ROPE_FREQ_BASE, 10000.0)),
        rope_freq_scale=1.0 / factor if scaling in ("linear", "yarn") and factor > 0 else 1.0,
        rope_scaling=scaling,
        rms_eps=float(opt(names.RMS_EPS, 1e-6)),
        n_expert=n_expert,
        n_expert_used=int(need(names.EXPERT_USED_COUNT)),
        n_ff_exp=int(n_ff_exp),
        n_ff_shexp=0,
        norm_topk=bool(opt(names.EXPERT_WEIGHTS_NORM, arch.norm_topk)),
        expert_weights_scale=float(opt(names.EXPERT_WEIGHTS_SCALE, 0.0)),
        ctx_train=int(opt(names.CONTEXT_LENGTH, 4096)),
        n_expert_groups=int(opt(names.EXPERT_GROUP_COUNT, 0) or 0),
        n_group_used=int(opt(names.EXPERT_GROUP_USED_COUNT, 0) or 0),
    )
    if scaling == "yarn":
        fs = fields["rope_freq_scale"]
        fields.update(
            yarn_ext_factor=float(opt(names.ROPE_YARN_EXT_FACTOR, 1.0)) if fs != 1.0 else 0.0,
            yarn_beta_fast=float(opt(names.ROPE_YARN_BETA_FAST, 32.0)),
            yarn_beta_slow=float(opt(names.ROPE_YARN_BETA_SLOW, 1.0)),
            yarn_orig_ctx=int(opt(names.ROPE_ORIG_CTX, 0) or fields["ctx_train"]),
            yarn_log_mul=float(opt(names.ROPE_YARN_LOG_MUL, 0.0) or 0.0),
        )
    fields.update(module.read_args(opt, lambda name: m.tensors[name].shape if name in m.tensors else None))
    if fields["rope_scaling"] == "yarn" and fields["yarn_ext_factor"] != 0.0 and "rope_attn_factor" not in fields:
        fields["rope_attn_factor"] = arch_common.yarn_attn_factor(
            arch_name, fields["rope_freq_scale"], fields["yarn_log_mul"], float(opt(names.ROPE_ATTN_FACTOR, 1.0))
        )
    else:
        fields.setdefault("rope_attn_factor", float(opt(names.ROPE_ATTN_FACTOR, 1.0)))
    spec = ModelSpec(**fields)
    if hasattr(module, "attn_scale"):
        spec = dataclasses.replace(spec, attn_scale=module.attn_scale(spec))
    if spec.routing not in arch.routings:
        raise LocalMoEError(
            f"{m.path}: routing '{spec.routing}' is not one {arch_name} implements ({', '.join(arch.routings)})"
        )
    if spec.n_expert_groups > 1 and (
        spec.n_expert % spec.n_expert_groups or not 0 < spec.n_group_used <= spec.n_expert_groups
    ):
        raise LocalMoEError(
            f"{m.path}: {spec.n_expert} experts do not split into {spec.n_expert_groups} groups with "
            f"{spec.n_group_used} used"
        )
    if spec.n_dense_lead and not arch.dense_leading:
        raise LocalMoEError(f"{m.path}: leading dense layers are not part of {arch_name}")
    return spec
