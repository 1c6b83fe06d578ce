"""End-to-end smoke test of the demo-model recipe (models/train_demo_moe.py).

Runs every step of the recipe on a tiny synthetic three-domain corpus (English,
German, Python; no apt, no Debian text files) with a tiny model and a few
training steps, then checks that llama.cpp loads the GGUF and gives finite logits.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path


import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "models" / "train_demo_moe.py"

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A penny saved is a penny earned.",
    "He who laughs last laughs best.",
    "All that glitters is not gold.",
    "The early bird catches the worm.",
    "Actions speak louder than words.",
]
GERMAN = [
    "Der frühe Vogel fängt den Wurm.",
    "Übung macht den Meister.",
    "Wer zuletzt lacht, lacht am besten.",
    "Müßiggang ist aller Laster Anfang.",
    "Ein Spatz in der Hand ist besser als eine Taube auf dem Dach.",
    "Ende gut, alles gut.",
]
PYTHON = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\npath = os.path.join('a', 'b')\n",
    "if value is None:\n    raise ValueError('no value')\n",
]


def write_corpus(directory: Path, n_docs: int = 120) -> None:
    """<domain>.txt files in fortune format: documents separated by '%' lines."""
    rng = random.Random(0)
    for name, pool, sep in (("english", ENGLISH, " "), ("german", GERMAN, " "), ("python", PYTHON, "\n")):
        docs = [sep.join(rng.choice(pool) for _ in range(rng.randint(3, 6))) for _ in range(n_docs)]
        (directory / f"{name}.txt").write_text("\n%\n".join(docs) + "\n", encoding="utf-8")


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_demo_moe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_recipe_end_to_end_tiny(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus)
    out = tmp_path / "tiny.gguf"
    cmd = [
        sys.executable,
        str(RECIPE),
        "all",
        "--corpus-dir",
        str(corpus),
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--vocab-size",
        "320",
        "--n-embd",
        "64",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-kv-head",
        "1",
        "--head-dim",
        "32",
        "--n-expert",
        "4",
        "--n-expert-used",
        "2",
        "--expert-ffn",
        "32",
        "--ctx",
        "64",
        "--batch",
        "4",
        "--steps",
        "4",
        "--minutes",
        "0",
        "--eval-windows",
        "2",
        "--log-every",
        "2",
        "--threads",
        "2",
        "--upcycle-frac",
        "0.5",
        "--upcycle-groups",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 0

    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert set(report["domains"]) == {"english", "german", "python"}
    for d in report["domains"].values():
        assert math.isfinite(d["ppl_llama_cpp"]) and math.isfinite(d["ppl_torch"])
        assert abs(d["ppl_rel_diff_llama_vs_torch"]) < 0.01
    assert report["tokenizer_parity"]["mismatches"] == 0
    # half the steps trained a dense model, upcycled into 2 replicas of each of 2 FFN segments
    up = report["upcycle"]
    assert up["moe_from_step"] == 2 and up["groups"] == 2
    assert up["replica_weight_cosine"] > 0.9 > abs(up["other_weight_cosine"])  # two steps cannot undo a copy

    # llama.cpp loads the file and produces finite logits for every position
    recipe = load_recipe()
    llm = recipe.open_llama(out, n_ctx=64, n_batch=64, logits_all=True, n_threads=2)
    ids = llm.tokenize("Übung macht den Meister.\ndef add(a, b):".encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)])
    assert logits.shape == (len(ids), report["config"]["vocab_size"])
    assert np.isfinite(logits).all()
