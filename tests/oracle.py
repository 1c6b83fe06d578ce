"""llama.cpp as the reference: logits for every position of token-id prompts."""

from __future__ import annotations

import numpy as np

from localmoe.llama_ref import plain_cpu_buffers


def llama_logits(path: str, prompts: list[list[int]], f16_kv: bool = False) -> np.ndarray:
    """Concatenated logits (sum of prompt lengths, n_vocab) from llama.cpp, one fresh context per prompt."""
    import llama_cpp

    kv = {} if f16_kv else {"type_k": 0, "type_v": 0}  # 0 = GGML_TYPE_F32
    n = max(len(p) for p in prompts)
    with plain_cpu_buffers():
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=max(64, n), n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=2, **kv
        )
    try:
        out = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return np.concatenate(out)
    finally:
        llm.close()


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative error ‖a−b‖/‖b‖, share of positions whose top-1 token agrees)."""
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    return rel, agree
