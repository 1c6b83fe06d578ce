"""The C signatures of what our C libraries export, one line each, and `declare` to set them on a
loaded library (ctypes needs them: without argtypes a float or a 64-bit int is passed wrongly).

A signature is the return type, a space, then one letter per argument: p pointer, i int, l int64,
f float, z size_t; v (return only) void. csrc/vnni.c exports lm_NAME, csrc/ggml_driver.c lg_NAME,
csrc/ggml_graph.c lgg_NAME.
"""

from __future__ import annotations

import ctypes

_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64, "f": ctypes.c_float, "z": ctypes.c_size_t}

# The decode helpers both libraries export with one signature (csrc/common.h holds their bodies):
# the AVX-512 ones as lm_NAME, the portable ones (any CPU) as lg_NAME.
DECODE_HELPERS = {
    "route": "v piipiiifpppi",  # x, T, D, W, E, k, norm, scale, ids, wts, scratch, nthreads
    "rms_norm": "v ppiipfi",  # x, y, rows, n, w, eps, nthreads
    "qk_norm_rope": "v piiiiippfippii",  # buf, rows, stride, nh, nq, d, qw, kw, eps, n_rot, cos, sin, neox, nthreads
    # qkv, kc, vc, cap, pos, nq, nkv, d, dv, scale, n_swa, sinks, out, scores, nthreads
    "attn_decode": "v pppiiiiiifipppi",
}

# csrc/vnni.c's own (lm_NAME)
VNNI = {
    # x, T, K, N, codes, nibble, scale, zero, offset, G, y, nthreads, high, hbits, r16, ablock, kd, kdmin, kmode
    "qmatmul": "i piiipippiipipiiippi",
    "qmatvec_multi": "i ippipii",  # E, descs, x, x_stride, y, y_stride, nthreads
    # K, N, codes, nibble, scale, zero, offset, G, out, nthreads, high, hbits, r16, kd, kdmin, kmode
    "dequant_f32": "v iipippiipipiippi",
    "swiglu_decode": "i ippppppi",  # E, gate_up descs, down descs, x, coef, h, y, nthreads
    # E, gate_up descs, down descs, x, rows (int64), offsets [E + 1] (int), coefs, out, nthreads
    "swiglu_prefill": "i ipppppppi",
    "r16_rows": "v ppip",  # desc, ids, T, out
    "repack_r16": "i ipiipppiipp",  # qtype, raw, N, K, codes, scale, zero, nthreads, kmode, kd, kdmin
    "decode_layers": "i ippppiippppi",  # n, layers, x, kcs, vcs, cap, pos, cos, sin, ids, wts, nthreads
    # n, layers, x, kcs, vcs, cap, pos, cos, sin, ids, wts, uses, out_rms, eps, head desc, logits, nthreads
    "decode_token": "i ippppiippppppfppi",
    "phase_seconds": "v p",  # out [len(fused_decode.PHASES)] float64
}

# csrc/ggml_driver.c's own (lg_NAME)
GGML_DRIVER = {
    "matmul": "i ipiplpli",  # nseg, segs, T, x, ldx, y, ldy, nthreads
    # E, gate, up, down, x, coef, gate biases, up biases, down biases (arrays of E pointers, or NULL), act, y, nthreads
    "moe_decode": "i ippppppppipi",
    "set_schedule": "v ii",  # kind, chunk
    "rows": "v plppilp",  # data, row_bytes, to_float, ids, T, K, out
    "to_float": "v plpllpi",  # data, row_bytes, to_float, N, K, out, nthreads
    # proj, conv_state, conv_w, conv_dim, d_conv, n_k_heads, n_v_heads, d_k, d_v, dt_bias, a, norm_w, eps,
    # S, out, scratch, T, nthreads
    "deltanet_step": "v pppiiiiiipppfpppii",
}

# csrc/ggml_graph.c's (lgg_NAME)
GGML_GRAPH = {
    "matmul": "i iplllippi",  # type, w, N, K, row_bytes, T, x, y, nthreads
}


def declare(lib: ctypes.CDLL, signatures: dict[str, str], prefix: str) -> None:
    """Set restype and argtypes of lib's `prefix + name` for each signature."""
    for name, sig in signatures.items():
        ret, args = sig.split(" ")
        f = getattr(lib, prefix + name)
        f.restype = None if ret == "v" else _TYPES[ret]
        f.argtypes = [_TYPES[c] for c in args]
