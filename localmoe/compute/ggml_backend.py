"""ggml's CPU kernels, from the libggml that llama-cpp-python ships, on weights as stored in the file.

`ggml_get_type_traits_cpu(type)` gives, per ggml type, `vec_dot` (a weight row against an
activation row of `vec_dot_type`) and `vec_dot_type`; the `from_float` of `vec_dot_type`'s traits
quantizes the activations. They cover every GGUF quant type on every ISA ggml supports (AVX2,
AVX-512, NEON, ...), chosen by ggml at run time. Calling them per row from Python would be far too
slow, so a small C driver (localmoe/compute/csrc/ggml_driver.c, built on first use like the VNNI kernel)
receives the function pointers and the rows' addresses in the memory-mapped file and splits the
rows across threads: weights are never repacked or copied.

The structs read through ctypes are checked at import against what gguf-py knows of every type
(name, block size, bytes per block); a llama-cpp-python whose ggml has another layout is refused
with one message instead of computing garbage. `ggml()` returns None when the library cannot be
used, and `ggml_error()` says why.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..gguf.qtypes import GGML_TYPES
from . import cbuild, cdecl
from .policy import current

Q = GGMLQuantizationType
DRIVER_SOURCE = "ggml_driver.c"
GRAPH_SOURCE = "ggml_graph.c"
# How the driver shares rows among threads: (omp_sched_t, chunk); 1 = static (contiguous runs of rows
# per thread), 2 = dynamic. Static: the dynamic split measured 1.45x slower (docs/speed.md).
DRIVER_SCHEDULE = (1, 0)
DRIVER_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])  # the second where -march=native is refused
# The quantized types localmoe hands to ggml (gguf/qtypes.py): every type llama.cpp's quantizer makes
# for MoE models. (ggml's enum grows; only types gguf-py and this list both know are looked up, never past its end.)
GGML_COMPUTE_TYPES = GGML_TYPES
_CHECKED = (Q.F32, Q.F16, Q.BF16, Q.Q8_1, Q.Q8_K, *GGML_COMPUTE_TYPES)  # the activation types too
_ACTIVATION_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q8_1, Q.Q8_K}


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _TraitsCPU(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


class LgW(ctypes.Structure):  # lg_w_t in ggml_driver.c: one weight matrix (or segment of rows) in the file
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("vec_dot", ctypes.c_void_p),
        ("from_float", ctypes.c_void_p),
        ("q_row_bytes", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class TypeKernels:
    """What ggml has for one weight type."""

    qtype: GGMLQuantizationType
    block: int  # weights per block
    block_bytes: int
    to_float: int | None  # function addresses
    vec_dot: int | None
    vec_dot_type: GGMLQuantizationType | None
    from_float: int | None  # of vec_dot_type: quantizes activations
    act_block: int = 0  # vec_dot_type's block size and bytes
    act_block_bytes: int = 0

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.block_bytes

    def act_row_bytes(self, k: int) -> int:
        return k // self.act_block * self.act_block_bytes

    @property
    def computes(self) -> bool:
        return bool(self.vec_dot and self.from_float)


class GGML:
    """The loaded libraries: ggml-base, ggml-cpu and our driver."""

    def __init__(self) -> None:
        import llama_cpp

        self.version = getattr(llama_cpp, "__version__", "?")
        libdir = os.path.join(os.path.dirname(os.path.abspath(llama_cpp.__file__)), "lib")
        self.base = _load(libdir, "ggml-base")
        self.cpu = _load(libdir, "ggml-cpu")
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.cpu.ggml_cpu_init.restype = None
        self.cpu.ggml_cpu_init()
        self.base.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.base.ggml_quantize_init.restype = None
        self.base.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.base.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.types = self._read_traits()
        self.driver = _build_driver()
        self.graph, self.graph_error = _build_graph(libdir)
        self._graph_lock = threading.Lock()  # the graph library keeps one thread pool
        d = self.driver
        cdecl.declare(d, cdecl.GGML_DRIVER, "lg_")
        cdecl.declare(d, cdecl.DECODE_HELPERS, "lg_")  # the portable decode helpers: vnni.c's lm_* signatures
        d.lg_set_schedule(*DRIVER_SCHEDULE)

    def _read_traits(self) -> dict[GGMLQuantizationType, TypeKernels]:
        base: dict[GGMLQuantizationType, _Traits] = {}
        for qtype in _CHECKED:
            t = self.base.ggml_get_type_traits(int(qtype)).contents
            # activation-only types (never in files; gguf-py's Q8_1 size is out of date) are checked by name
            want_block, want_bytes = (
                GGML_QUANT_SIZES[qtype] if qtype not in (Q.Q8_1, Q.Q8_K) else (t.blck_size, t.type_size)
            )
            name = (t.type_name or b"").decode(errors="replace")
            if (
                name.lower() != qtype.name.lower()
                or t.blck_size != want_block
                or t.type_size != want_bytes
                or not 0 < t.blck_size <= 1024
            ):
                raise GGMLLayoutError(
                    f"llama-cpp-python {self.version}'s libggml does not have the struct layout localmoe reads "
                    f"(type {int(qtype)} reads as '{name}', {t.blck_size} weights in {t.type_size} bytes; expected "
                    f"'{qtype.name.lower()}', {want_block} in {want_bytes}); install the llama-cpp-python "
                    "version localmoe pins, or set LOCALMOE_KERNEL=vnni or torch"
                )
            base[qtype] = t
        out: dict[GGMLQuantizationType, TypeKernels] = {}
        for qtype, t in base.items():
            c = self.cpu.ggml_get_type_traits_cpu(int(qtype)).contents
            vdt = vdt_traits = None
            if c.vec_dot:
                try:
                    vdt = Q(c.vec_dot_type)
                except ValueError:
                    vdt = None
                if vdt not in _ACTIVATION_TYPES or c.nrows not in (1, 2):
                    raise GGMLLayoutError(
                        f"llama-cpp-python {self.version}'s libggml-cpu does not have the struct layout localmoe reads "
                        f"({qtype.name}: vec_dot_type {c.vec_dot_type}, nrows {c.nrows}); install the "
                        "llama-cpp-python version localmoe pins, or set LOCALMOE_KERNEL=vnni or torch"
                    )
                vdt_traits = self.cpu.ggml_get_type_traits_cpu(int(vdt)).contents
            out[qtype] = TypeKernels(
                qtype,
                int(t.blck_size),
                int(t.type_size),
                t.to_float or None,
                c.vec_dot or None,
                vdt,
                vdt_traits.from_float if vdt_traits is not None and vdt_traits.from_float else None,
                int(base[vdt].blck_size) if vdt is not None else 0,
                int(base[vdt].type_size) if vdt is not None else 0,
            )
        return out

    def kernels(self, qtype: GGMLQuantizationType) -> TypeKernels | None:
        return self.types.get(qtype)

    def computes(self, qtype: GGMLQuantizationType) -> bool:
        k = self.types.get(qtype)
        return qtype in GGML_COMPUTE_TYPES and k is not None and k.computes

    # -- the calls -----------------------------------------------------------------------------
    def weight(self, raw: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int) -> LgW:
        """The descriptor of a [n, k] matrix whose rows are raw's rows (uint8 [n, row bytes], CPU);
        the caller keeps `raw` alive while the descriptor is in use."""
        tk = self.types[qtype]
        if k % tk.block or k % tk.act_block:
            raise ValueError(f"{qtype.name}: rows of {k} weights are not whole blocks")
        stride = raw.stride(0) * raw.element_size() if raw.dim() == 2 and n > 1 else tk.row_bytes(k)
        return LgW(raw.data_ptr(), stride, n, k, tk.vec_dot, tk.from_float, tk.act_row_bytes(k))

    def matmul(self, segs: ctypes.Array, n_total: int, x: torch.Tensor, threads: int) -> torch.Tensor:
        """x [T, K] float32 @ (the segments' rows, concatenated).T → [T, n_total]."""
        x = x.float().contiguous()
        T = x.shape[0]
        y = torch.empty(T, n_total, dtype=torch.float32)
        rc = self.driver.lg_matmul(len(segs), segs, T, x.data_ptr(), x.shape[1], y.data_ptr(), n_total, threads)
        if rc != 0:
            raise MemoryError(
                "lg_matmul could not allocate its scratch buffers"
                if rc == -1
                else "lg_matmul: too many segments or activation types"
            )
        return y

    def graph_matmul(
        self, raw: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, x: torch.Tensor, threads: int
    ) -> torch.Tensor | None:
        """x [T, K] @ W.T through ggml's own graph (ggml_mul_mat on the bytes in place): the
        many-token path; None when the graph library is not available or the rows are not contiguous."""
        if self.graph is None:
            return None
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        stride = raw.stride(0) * raw.element_size() if raw.dim() == 2 and n > 1 else self.types[qtype].row_bytes(k)
        with self._graph_lock:
            rc = self.graph.lgg_matmul(
                int(qtype), raw.data_ptr(), n, k, stride, x.shape[0], x.data_ptr(), y.data_ptr(), threads
            )
        return y if rc == 0 else None

    def moe_decode(
        self,
        gate: ctypes.Array,
        up: ctypes.Array,
        down: ctypes.Array,
        x: torch.Tensor,
        coef: torch.Tensor,
        d_out: int,
        threads: int,
        biases: tuple[ctypes.Array | None, ctypes.Array | None, ctypes.Array | None] = (None, None, None),
        act: int = 0,
    ) -> torch.Tensor:
        """Σ_e coef[e] · (down_e(act(gate_e x + gb_e, up_e x + ub_e)) + db_e) for one row x [1, D] →
        [1, d_out]. biases: arrays of E float32 addresses (gate, up, down; an entry or an array None:
        none), kept alive by the caller; act: ggml_driver.c's ACT_* (kernels.GGML_ACTS)."""
        x = x.float().contiguous()
        y = torch.empty(1, d_out, dtype=torch.float32)
        rc = self.driver.lg_moe_decode(
            len(gate), gate, up, down, x.data_ptr(), coef.data_ptr(), *biases, act, y.data_ptr(), threads
        )
        if rc != 0:
            raise MemoryError(
                "lg_moe_decode could not allocate its scratch buffers"
                if rc == -1
                else "lg_moe_decode: experts of mismatched shapes"
            )
        return y

    def rows(self, raw: torch.Tensor, qtype: GGMLQuantizationType, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a [n, k] matrix (raw: uint8 [n, row bytes]) as float32 [len(ids), k]."""
        tk = self.types[qtype]
        ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
        n = raw.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise IndexError(f"row id out of range for a matrix of {n} rows")
        out = torch.empty(ids.numel(), k, dtype=torch.float32)
        self.driver.lg_rows(raw.data_ptr(), raw.stride(0), tk.to_float, ids.data_ptr(), ids.numel(), k, out.data_ptr())
        return out

    def row_reader(
        self, raw: torch.Tensor, qtype: GGMLQuantizationType, k: int
    ) -> Callable[[ctypes.c_int64, int], None] | None:
        """`rows` for one row without torch (a decode step's embedding): a function writing row
        `id.value` (id a ctypes.c_int64) of a [n, k] matrix (raw: uint8 [n, row bytes], kept alive by
        the caller) as float32 [k] to an address; None where the type has no dequantizer. The
        caller checks the id (the C code does not)."""
        to_float = self.types[qtype].to_float
        if not to_float:
            return None
        addr, stride = raw.data_ptr(), raw.stride(0)
        return lambda row, out: self.driver.lg_rows(addr, stride, to_float, ctypes.byref(row), 1, k, out)

    def to_float(
        self, raw: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, threads: int = 1
    ) -> torch.Tensor:
        """A [n, k] matrix (raw: uint8 [n, row bytes] on the CPU) dequantized by ggml → float32 [n, k]."""
        tk = self.types[qtype]
        if not tk.to_float:
            raise ValueError(f"ggml has no dequantizer for {qtype.name}")
        raw = raw.reshape(n, -1)
        out = torch.empty(n, k, dtype=torch.float32)
        self.driver.lg_to_float(raw.data_ptr(), raw.stride(0), tk.to_float, n, k, out.data_ptr(), threads)
        return out

    def quantize(self, w: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
        """float32 rows [n, k] → qtype's bytes [n, row bytes] with ggml's own quantizer
        (ggml_quantize_chunk; an importance matrix [k] where the type needs one)."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        n, k = w.shape
        tk = self.types[qtype]
        out = np.zeros((n, tk.row_bytes(k)), dtype=np.uint8)
        im = np.ascontiguousarray(imatrix, dtype=np.float32) if imatrix is not None else None
        self.base.ggml_quantize_init(int(qtype))
        written = self.base.ggml_quantize_chunk(
            int(qtype), w.ctypes.data, out.ctypes.data, 0, n, k, im.ctypes.data if im is not None else None
        )
        if written != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
        return out


class GGMLLayoutError(RuntimeError):
    pass


def _load(libdir: str, stem: str) -> ctypes.CDLL:
    exact = os.path.join(libdir, f"lib{stem}.so")
    candidates = (
        [exact]
        if os.path.exists(exact)
        else sorted(
            glob.glob(os.path.join(libdir, f"lib{stem}*.so*"))
            + glob.glob(os.path.join(libdir, f"lib{stem}*.dylib"))
            + glob.glob(os.path.join(libdir, f"{stem}*.dll"))
        )
    )
    if not candidates:
        raise OSError(f"lib{stem} not found in {libdir}")
    return ctypes.CDLL(candidates[0], mode=ctypes.RTLD_GLOBAL)


def _build_driver() -> ctypes.CDLL:
    err: cbuild.BuildError | None = None
    for flags in DRIVER_FLAGS:
        try:
            return cbuild.load(DRIVER_SOURCE, "ggml_driver", flags)
        except cbuild.BuildError as exc:
            err = err or exc
    assert err is not None
    raise err


def _build_graph(libdir: str) -> tuple[ctypes.CDLL | None, str | None]:
    """csrc/ggml_graph.c, compiled against the ggml headers llama-cpp-python installed and linked to
    its libraries: (library, None), or (None, why not) — the per-row driver then does prefill too."""
    import hashlib

    site = os.path.dirname(os.path.dirname(libdir))  # .../site-packages
    inc = next(
        (
            d
            for d in (os.path.join(site, "include"), os.path.join(os.path.dirname(libdir), "include"))
            if os.path.exists(os.path.join(d, "ggml-cpu.h"))
        ),
        None,
    )
    if inc is None:
        return None, "llama-cpp-python installed no ggml headers"
    h = hashlib.sha256()
    for name in ("ggml.h", "ggml-cpu.h", "ggml-backend.h"):
        try:
            with open(os.path.join(inc, name), "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    libs = [f"-L{libdir}", "-lggml-cpu", "-lggml-base", f"-Wl,-rpath,{libdir}"]
    try:
        lib = cbuild.load(GRAPH_SOURCE, "ggml_graph", ["-O2", f"-I{inc}"], libs, key_extra=h.hexdigest())
    except cbuild.BuildError as exc:
        return None, f"kernel build failed: {exc}"
    cdecl.declare(lib, cdecl.GGML_GRAPH, "lgg_")
    return lib, None


_lock = threading.Lock()
_ggml: GGML | None = None
_error: str | None = None


def ggml() -> GGML | None:
    """The ggml backend, loaded once; None when llama-cpp-python or its libggml is missing or of
    another layout, or when the driver does not build (`ggml_error()`). Whether the compute policy
    lets it run is `usable_ggml()`."""
    global _ggml, _error
    with _lock:
        if _ggml is not None or _error is not None:
            return _ggml
        try:
            _ggml = GGML()
        except ImportError:
            _error = "llama-cpp-python is not installed"
        except cbuild.BuildError as exc:
            _error = f"kernel build failed: {exc}"
            import warnings

            warnings.warn(
                f"localmoe: the ggml driver could not be built, using slower kernels: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
        except GGMLLayoutError as exc:
            _error = str(exc)
            import warnings

            warnings.warn(f"localmoe: {exc}", RuntimeWarning, stacklevel=2)
        except (OSError, AttributeError) as exc:
            _error = f"llama-cpp-python's libggml could not be loaded ({exc})"
        return _ggml


def usable_ggml() -> GGML | None:
    """The ggml backend where it loads and the compute policy lets it run (not in vnni or torch mode)."""
    return ggml() if current().allows_ggml else None


def ggml_error() -> str | None:
    """Why ggml's kernels do not run: the compute policy's kernel mode, or why ggml is unavailable."""
    if not current().allows_ggml:
        return f"disabled by LOCALMOE_KERNEL={current().kernel}"
    ggml()
    return _error
