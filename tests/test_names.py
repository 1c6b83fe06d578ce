"""localmoe/gguf/names.py is the one home of GGUF key and tensor names: its names are gguf-py's, and
no other module of the package spells one out (a string literal that is a tensor stem, a key
suffix, or a piece of a tensor's name)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys

from localmoe.gguf import names

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for d in ("localmoe", "tui") for p in (ROOT / d).rglob("*.py") if p != ROOT / "localmoe/gguf/names.py"
)


def _gguf_keys() -> set[str]:
    """Every key gguf-py names, whole and without its "{arch}." prefix."""
    out = set()
    for group in (Keys.General, Keys.LLM, Keys.Attention, Keys.Rope, Keys.SSM, Keys.Tokenizer):
        for value in vars(group).values():
            if isinstance(value, str):
                out |= {value, value.removeprefix("{arch}.")}
    return out


STEMS = {v.removeprefix("blk.{bid}.") for v in TENSOR_NAMES.values()}
KEYS = _gguf_keys()
# pieces of a tensor's name: the layer prefix, a kind suffix
PIECES = re.compile(r"(^|\.)blk\.|\.(weight|bias)$")
# words of a key that are also field names of `localmoe info --json` (its schema, not a GGUF read)
ALLOWED = {"localmoe/info.py": {"embedding_length", "vocab_size", "context_length"}}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name tensors)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def name_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of each string literal in `source` that spells a GGUF name."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            v = node.value
            if v in STEMS or v in KEYS or PIECES.search(v):
                hits.append((node.lineno, v))
    return hits


def test_no_name_literals_outside_the_names_module():
    found = [
        f"{p.relative_to(ROOT)}:{line}: {v!r}"
        for p in SOURCES
        for line, v in name_literals(p.read_text())
        if v not in ALLOWED.get(str(p.relative_to(ROOT)), ())
    ]
    assert not found, "GGUF names spelled outside localmoe/gguf/names.py (add a constant there):\n" + "\n".join(found)


def test_the_check_finds_literals():
    src = 'x = "attn_q"\ny = f"blk.{i}.ffn_up_exps.weight"\nz = get("expert_count")\nw = n.endswith(".bias")\n'
    assert [line for line, _ in name_literals(src)] == [1, 2, 2, 3, 4]
    assert (
        name_literals('def f():\n    """Reads blk.3.attn_q.weight."""\n    return names.blk(3, names.ATTN_Q)\n') == []
    )


def test_names_are_gguf_pys():
    """The constants equal gguf-py's spelling (derived from it, not retyped)."""
    assert names.ATTN_Q == "attn_q" and TENSOR_NAMES[MODEL_TENSOR.ATTN_Q] == "blk.{bid}." + names.ATTN_Q
    assert names.FFN_GATE_EXPS == "ffn_gate_exps" and names.TOKEN_EMBD == "token_embd.weight"
    assert names.arch_key("qwen3moe", names.BLOCK_COUNT) == Keys.LLM.BLOCK_COUNT.format(arch="qwen3moe")
    assert names.NEXTN_EH_PROJ == "nextn.eh_proj"
    constants = {k: v for k, v in vars(names).items() if k.isupper() and not k.startswith("_") and isinstance(v, str)}
    for k, v in constants.items():
        assert v in STEMS or v in KEYS or v in names.KINDS or v.removesuffix("." + names.WEIGHT) in STEMS, k


def test_split_inverts_blk():
    assert names.split(names.blk(3, names.ATTN_Q)) == (3, names.ATTN_Q, names.WEIGHT)
    assert names.split(names.blk(0, names.SSM_DT, names.BIAS)) == (0, names.SSM_DT, names.BIAS)
    assert names.split(names.blk_bare(0, names.SSM_A)) == (0, names.SSM_A, "")
    assert names.split(names.blk(5, names.NEXTN_EH_PROJ)) == (5, names.NEXTN_EH_PROJ, names.WEIGHT)
    assert names.split(names.TOKEN_EMBD) == (None, "token_embd", names.WEIGHT)
    assert names.layer_of(names.OUTPUT) is None and names.layer_of(names.blk(12, names.ATTN_K)) == 12
    assert names.is_expert_tensor(names.blk(1, names.FFN_DOWN_EXPS))
    assert not names.is_expert_tensor(names.blk(1, names.FFN_DOWN_EXPS, names.BIAS))
    assert names.is_expert_bias(names.blk(1, names.FFN_UP_EXPS, names.BIAS))
    assert not names.is_expert_bias(names.blk(1, names.ATTN_Q, names.BIAS))
