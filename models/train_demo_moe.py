#!/usr/bin/env python3
"""Recipe for localmoe's bundled demo model: a small Mixture-of-Experts LM.

Trains a qwen3moe-style model from scratch on the CPU with PyTorch, on
freely licensed text from Debian packages (KJV Bible, English and German
fortune cookies, the Python standard library), and exports it as a Q8_0
GGUF file that llama.cpp and localmoe can both run.

Steps (``all`` runs them in order; each one reuses what earlier runs left in
--work-dir, and ``train`` resumes from the last checkpoint):

    prepare   collect the corpus, split 5% of each domain off for evaluation
    tokenize  train a byte-level BPE (GPT-2 pre-tokenizer) and encode the data
    train     train the model (wall-clock budget --minutes, or --steps)
    export    write the GGUF (Q8_0 weights, F32 norms and routers)
    samples   write the text samples localmoe ships beside the model: models/demo-heldout.txt
              (held-out documents) and localmoe/data/calibration.txt (training documents), the
              default texts of `localmoe eval` and `localmoe calibrate` (Debian corpus only)
    eval      perplexity per domain from llama.cpp and PyTorch, unigram
              baseline, expert usage per domain, tokenizer parity, samples

Example (the shipped model):

    python models/train_demo_moe.py all --minutes 65

Training-only dependencies: torch, gguf, tokenizers, numpy; the eval step
also needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REWARM_STEPS = 20  # learning-rate warm-up after upcycling (fresh Adam moments)
EVAL_EVERY = 20  # document i of a domain is held out when i % EVAL_EVERY == EVAL_EVERY // 2 (5%)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stamp(obj) -> str:
    """Short hash of a JSON-able object; used to decide whether cached files are still valid."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# ascii-art / asciiart are pictures, not text; startrek was dropped by the filter the shipped model
# was trained with, and stays out so that the recipe reproduces that corpus exactly.
SKIP_FORTUNE_FILES = {"ascii-art", "asciiart", "startrek"}
APT_PACKAGES = ["bible-kjv", "bible-kjv-text", "fortunes", "fortunes-de"]


def apt_install(packages: list[str]) -> None:
    log(f"installing Debian packages {' '.join(packages)} (apt-get) ...")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    try:  # a fresh machine has no package lists yet: update them first
        subprocess.run([*sudo, "apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *packages],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(
            f"error: could not install {' '.join(packages)} ({exc}).\n"
            f"Install them yourself (apt-get update && apt-get install -y {' '.join(packages)}) "
            "or pass --corpus-dir with your own <domain>.txt files."
        )


def ensure_debian_text() -> None:
    have_bible = shutil.which("bible") and Path("/usr/lib/bible.data").exists()
    have_en = (FORTUNE_DIR / "cookie").exists()
    have_de = (FORTUNE_DIR / "de" / "zitate").exists()
    if not (have_bible and have_en and have_de):
        apt_install(APT_PACKAGES)


def read_fortune_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip("\n") for d in re.split(r"^%\s*$", text, flags=re.M) if d.strip()]


def fortune_docs(directory: Path) -> list[str]:
    """All fortunes of one directory (regular text files; no .dat index, no ASCII art)."""
    docs: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        if path.name in SKIP_FORTUNE_FILES:
            continue
        docs += read_fortune_file(path)
    return docs


def bible_docs() -> list[str]:
    """One document per chapter: 'Genesis 1' then one '<verse> <text>' line per verse."""
    out = subprocess.run(
        ["bible", "-l0", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout
    docs, cur = [], []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line[0].isdigit() or re.fullmatch(r"\d? ?[A-Za-z ]+ \d+", line):  # chapter header
            if cur:
                docs.append("\n".join(cur))
            cur = [line]
        else:
            cur.append(line)
    if cur:
        docs.append("\n".join(cur))
    return docs


def python_docs(max_chars: int) -> list[str]:
    """Top-level blocks (module header, each def/class) of the interpreter's own stdlib modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        # split before a top-level def/class/decorator that follows a blank line
        blocks = re.split(r"\n\n+(?=(?:def |class |async def |@))", text)
        for block in blocks:
            block = block.strip("\n")
            if len(block) < 40:
                continue
            docs.append(block)
            total += len(block)
        if total >= max_chars:
            break
    return docs


def cap_docs(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def collect_corpus(args) -> dict[str, list[str]]:
    """domain -> ordered list of documents."""
    if args.corpus_dir:
        # <domain>.txt files; documents separated by lines holding only '%' (fortune format)
        files = sorted(Path(args.corpus_dir).glob("*.txt"))
        if not files:
            sys.exit(f"error: no *.txt files in {args.corpus_dir}")
        return {f.stem: cap_docs(read_fortune_file(f), args.max_chars) for f in files}
    ensure_debian_text()
    return {
        "bible": cap_docs(bible_docs(), args.max_chars),
        "fortunes-en": cap_docs(fortune_docs(FORTUNE_DIR), args.max_chars),
        "fortunes-de": cap_docs(fortune_docs(FORTUNE_DIR / "de"), args.max_chars),
        "python": python_docs(args.max_chars),
    }


def split_docs(docs: list[str]) -> tuple[list[str], list[str]]:
    """Deterministic ~5% hold-out: every EVAL_EVERY-th document."""
    train = [d for i, d in enumerate(docs) if i % EVAL_EVERY != EVAL_EVERY // 2]
    held = [d for i, d in enumerate(docs) if i % EVAL_EVERY == EVAL_EVERY // 2]
    return train, held


SAMPLE_CHARS = 5500  # characters per domain in the shipped text samples


def domain_sample(docs: list[str], chars: int) -> str:
    """Documents in corpus order, about `chars` characters: whole ones while they fit, the one
    that does not fit cut at its last line break within the budget."""
    out, total = [], 0
    for d in docs:
        room = chars - total
        if room <= 0:
            break
        if len(d) > room:
            d = d[: d.rfind("\n", 0, room)] if "\n" in d[:room] else ""
        if d:
            out.append(d)
            total += len(d) + 2
    return "\n\n".join(out)


def step_samples(args, corpus: dict) -> None:
    """The held-out and calibration samples shipped with the model (deterministic: the first
    documents of each domain's held-out and training split). Only for the Debian corpus, so a test
    run on its own corpus never overwrites the shipped files."""
    if args.corpus_dir:
        return
    for path, split in (
        (HERE / "demo-heldout.txt", "eval"),
        (HERE.parent / "localmoe" / "data" / "calibration.txt", "train"),
    ):
        text = "\n\n".join(domain_sample(v[split], SAMPLE_CHARS) for v in corpus["domains"].values()) + "\n"
        path.write_text(text, encoding="utf-8")
        log(f"samples: wrote {path} ({len(text)} characters of {split} documents)")


def step_prepare(args) -> dict:
    path = Path(args.work_dir) / "corpus.json"
    key = stamp({"corpus_dir": args.corpus_dir, "max_chars": args.max_chars})
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("stamp") == key:
            log(f"prepare: reusing {path}")
            return data
    corpus = collect_corpus(args)
    data = {"stamp": key, "domains": {}}
    for name, docs in corpus.items():
        train, held = split_docs(docs)
        data["domains"][name] = {"train": train, "eval": held}
        log(f"prepare: {name:12s} {len(docs):6d} docs {sum(map(len, docs)) / 1e6:6.2f} M chars ({len(held)} held out)")
    path.write_text(json.dumps(data, ensure_ascii=False))
    return data


# --------------------------------------------------------------------------------------
# Chat samples: a short user turn naming/starting a passage, the assistant continues it
# --------------------------------------------------------------------------------------


def chat(user: str, assistant: str) -> str:
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


def first_words(text: str, rng: random.Random) -> tuple[str, str]:
    """Split text after a few words: (start, rest)."""
    words = text.split(" ")
    if len(words) < 4:
        return "", text
    k = rng.randint(2, min(8, len(words) - 2))
    return " ".join(words[:k]), " ".join(words[k:])


def bible_chat(chapter: str, rng: random.Random) -> str:
    header, *lines = chapter.split("\n")
    if not lines:
        return chat("Quote the Bible.", chapter)
    if rng.random() < 0.3:  # name a chapter -> its first verses
        return chat(f"Quote the Bible: {header}", "\n".join(lines[:4]))
    verses = [line.split(" ", 1)[-1] for line in lines]  # drop the verse numbers
    j = rng.randrange(len(verses))
    following = verses[j + 1 : j + 4]
    start, rest = first_words(verses[j], rng)
    if start and rng.random() < 0.5:  # start of a verse -> its rest and the next two verses
        return chat(f"Continue this Bible verse: {start}", " ".join([rest, *following[:2]]))
    # a whole verse -> the next verses
    return chat(f"Continue this Bible verse: {verses[j]}", "\n".join(following) or verses[j])


def chat_sample(domain: str, doc: str, rng: random.Random) -> str:
    """Chat-wrapped copy of a training document, in the domain's style."""
    if domain == "bible":
        return bible_chat(doc, rng)
    if domain == "fortunes-en":
        start, rest = first_words(doc, rng)
        if start and rng.random() < 0.3:
            return chat(f"Continue this saying: {start}", rest)
        return chat(
            rng.choice(
                [
                    "Tell me a fortune.",
                    "Give me a quote.",
                    "Tell me something wise.",
                    "Tell me a joke.",
                    "Fortune cookie, please.",
                ]
            ),
            doc,
        )
    if domain == "fortunes-de":
        start, rest = first_words(doc, rng)
        if start and rng.random() < 0.3:
            return chat(f"Setze diesen Spruch fort: {start}", rest)
        return chat(
            rng.choice(
                [
                    "Erzähl mir ein Sprichwort.",
                    "Erzähl mir einen Witz.",
                    "Sag mir ein Zitat.",
                    "Hast du einen Spruch für mich?",
                    "Erzähl mir etwas Lustiges.",
                ]
            ),
            doc,
        )
    if domain == "python":
        first, _, _ = doc.partition("\n")
        if first.startswith(("def ", "class ", "async def ", "@")):
            return chat(f"Write Python code: {first}", doc[:2000])
        return chat("Write a Python module header.", doc[:2000])
    start, rest = first_words(doc, rng)
    return chat(f"Continue this text: {start}", rest) if start else chat("Say something.", doc)


# --------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE, GPT-2 pre-tokenizer regex = llama.cpp pre "gpt-2")
# --------------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(path))
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def tokenizer_vocab(path: Path) -> tuple[list[str], list[str]]:
    """(tokens ordered by id, merges as 'a b' strings) in GPT-2 byte-to-unicode form."""
    spec = json.loads(path.read_text())
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def step_tokenize(args, corpus: dict) -> dict:
    """Train the tokenizer and encode: train stream (plain docs + chat samples), eval windows."""
    work = Path(args.work_dir)
    key = stamp(
        {
            "corpus": corpus["stamp"],
            "vocab": args.vocab_size,
            "chat_frac": args.chat_frac,
            "ctx": args.ctx,
            "eval_windows": args.eval_windows,
            "seed": args.seed,
        }
    )
    meta_path, tok_path, data_path = work / "tokens.json", work / "tokenizer.json", work / "tokens.npz"
    if meta_path.exists() and data_path.exists() and json.loads(meta_path.read_text()).get("stamp") == key:
        log(f"tokenize: reusing {data_path}")
        return json.loads(meta_path.read_text())
    domains = corpus["domains"]
    all_train = [d for v in domains.values() for d in v["train"]]
    t0 = time.time()
    tok = train_tokenizer(all_train, args.vocab_size, tok_path)
    eos = tok.token_to_id(EOS)
    log(f"tokenize: trained BPE with {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s")

    rng = random.Random(args.seed)
    samples: list[str] = []
    n_chat = 0
    for name, v in domains.items():
        for doc in v["train"]:
            samples.append(doc + EOS)
            if rng.random() < args.chat_frac:
                samples.append(chat_sample(name, doc, rng) + EOS)
                n_chat += 1
    rng.shuffle(samples)
    train_ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(samples)])
    # unigram counts only over plain training documents (what the baseline is fitted on)
    plain = tok.encode_batch([d + EOS for v in domains.values() for d in v["train"]])
    unigram = np.bincount(np.concatenate([e.ids for e in plain]), minlength=tok.get_vocab_size())

    arrays = {"train": train_ids, "unigram": unigram.astype(np.int64)}
    info = {
        "stamp": key,
        "vocab_size": tok.get_vocab_size(),
        "eos": eos,
        "bos": eos,
        "im_start": tok.token_to_id(IM_START),
        "im_end": tok.token_to_id(IM_END),
        "train_tokens": int(len(train_ids)),
        "chat_samples": n_chat,
        "domains": {},
    }
    for name, v in domains.items():
        held = np.concatenate(
            [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch([d + EOS for d in v["eval"]])]
        )
        n_win = min(args.eval_windows, len(held) // args.ctx)
        if n_win == 0:
            sys.exit(f"error: domain {name} has too little held-out text ({len(held)} tokens) for one window")
        arrays[f"eval_{name}"] = held[: n_win * args.ctx].reshape(n_win, args.ctx)  # [windows, ctx]
        n_train_tok = sum(len(e.ids) for e in tok.encode_batch([d + EOS for d in v["train"]]))
        info["domains"][name] = {
            "train_docs": len(v["train"]),
            "eval_docs": len(v["eval"]),
            "train_tokens": n_train_tok,
            "eval_tokens": int(len(held)),
            "eval_windows": n_win,
            "train_chars": sum(map(len, v["train"])),
        }
        log(
            f"tokenize: {name:12s} train {n_train_tok / 1e6:.2f} M tokens, "
            f"{sum(map(len, v['train'])) / max(n_train_tok, 1):.2f} chars/token, {n_win} eval windows"
        )
    np.savez(data_path, **arrays)
    meta_path.write_text(json.dumps(info, indent=1))
    log(f"tokenize: train stream {len(train_ids) / 1e6:.2f} M tokens ({n_chat} chat samples)")
    return info


# --------------------------------------------------------------------------------------
# Model (qwen3moe semantics, exactly what llama.cpp computes)
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 64
    n_expert: int = 32
    n_expert_used: int = 4
    expert_ffn: int = 128
    ctx: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-6


def build_model(cfg: ModelConfig):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def rms_norm(x, w):
        # x: [..., d]; w: [d]
        return F.rms_norm(x, (x.shape[-1],), w, cfg.eps)

    def rope_tables(T: int, device):
        # cos/sin: [T, head_dim/2]; NEOX style pairs (i, i + head_dim/2)
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / cfg.head_dim)
        ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
        return ang.cos().float(), ang.sin().float()

    def apply_rope(x, cos, sin):
        # x: [B, H, T, head_dim]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            D, hd, E, Fd = cfg.n_embd, cfg.head_dim, cfg.n_expert, cfg.expert_ffn
            self.attn_norm = nn.Parameter(torch.ones(D))
            self.wq = nn.Linear(D, cfg.n_head * hd, bias=False)
            self.wk = nn.Linear(D, cfg.n_kv_head * hd, bias=False)
            self.wv = nn.Linear(D, cfg.n_kv_head * hd, bias=False)
            self.wo = nn.Linear(cfg.n_head * hd, D, bias=False)
            self.q_norm = nn.Parameter(torch.ones(hd))
            self.k_norm = nn.Parameter(torch.ones(hd))
            self.ffn_norm = nn.Parameter(torch.ones(D))
            self.router = nn.Linear(D, E, bias=False)  # ffn_gate_inp [E, D]
            self.w_gate = nn.Parameter(torch.empty(E, Fd, D))  # ffn_gate_exps [E, F, D]
            self.w_up = nn.Parameter(torch.empty(E, Fd, D))  # ffn_up_exps   [E, F, D]
            self.w_down = nn.Parameter(torch.empty(E, D, Fd))  # ffn_down_exps [E, D, F]

        def attention(self, x, cos, sin):
            B, T, _ = x.shape
            hd = cfg.head_dim
            h = rms_norm(x, self.attn_norm)
            q = self.wq(h).view(B, T, cfg.n_head, hd)
            k = self.wk(h).view(B, T, cfg.n_kv_head, hd)
            v = self.wv(h).view(B, T, cfg.n_kv_head, hd)
            q = apply_rope(rms_norm(q, self.q_norm).transpose(1, 2), cos, sin)  # [B, H, T, hd]
            k = apply_rope(rms_norm(k, self.k_norm).transpose(1, 2), cos, sin)
            v = v.transpose(1, 2)
            rep = cfg.n_head // cfg.n_kv_head  # query head h uses kv head h // rep (llama.cpp GQA)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hd)
            return self.wo(o.transpose(1, 2).reshape(B, T, cfg.n_head * hd))

        def moe(self, x, stats):
            B, T, D = x.shape
            h = rms_norm(x, self.ffn_norm).reshape(B * T, D)  # [N, D]
            logits = self.router(h).float()  # [N, E]
            probs = logits.softmax(-1)
            top_p, top_i = probs.topk(cfg.n_expert_used, dim=-1)  # [N, k]
            weights = top_p / top_p.sum(-1, keepdim=True)  # qwen3moe renormalises
            flat_e = top_i.reshape(-1)  # [N*k]
            order = flat_e.argsort(stable=True)
            counts = torch.bincount(flat_e, minlength=cfg.n_expert)
            tok_idx = order // cfg.n_expert_used  # token of each sorted assignment
            w_sorted = weights.reshape(-1)[order]
            out = torch.zeros_like(h)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                idx = tok_idx[start : start + n]
                xe = h[idx]  # [n, D]
                ye = (F.silu(xe @ self.w_gate[e].T) * (xe @ self.w_up[e].T)) @ self.w_down[e].T
                out.index_add_(0, idx, ye * w_sorted[start : start + n, None])
                start += n
            if stats is not None:
                N = h.shape[0]
                frac = counts.float() / (N * cfg.n_expert_used)  # share of assignments per expert
                stats["aux"] = stats.get("aux", 0.0) + cfg.n_expert * (frac * probs.mean(0)).sum()
                stats["z"] = stats.get("z", 0.0) + logits.logsumexp(-1).pow(2).mean()
                stats.setdefault("counts", []).append(counts.detach())
                if "top_i" in stats:
                    stats["top_i"].append(top_i.detach().view(B, T, -1))
            return out.view(B, T, D)

        def forward(self, x, cos, sin, stats):
            x = x + self.attention(x, cos, sin)
            return x + self.moe(x, stats)

    class MoELM(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # tied with the output head
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.out_norm = nn.Parameter(torch.ones(cfg.n_embd))
            self.reset_parameters()

        def reset_parameters(self):
            std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
            nn.init.normal_(self.embed.weight, std=std)
            for b in self.blocks:
                for lin in (b.wq, b.wk, b.wv, b.router):
                    nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(b.wo.weight, std=out_std)
                nn.init.normal_(b.w_gate, std=std)
                nn.init.normal_(b.w_up, std=std)
                nn.init.normal_(b.w_down, std=out_std)

        def forward(self, ids, stats=None):
            # ids: [B, T] int64 -> logits [B, T, V] float32
            cos, sin = rope_tables(ids.shape[1], ids.device)
            x = self.embed(ids)
            for b in self.blocks:
                x = b(x, cos, sin, stats)
            return rms_norm(x, self.out_norm) @ self.embed.weight.T

    return MoELM()


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token), tied embeddings counted once."""
    D, hd, E, Fd, L = cfg.n_embd, cfg.head_dim, cfg.n_expert, cfg.expert_ffn, cfg.n_layer
    attn = D * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head) + 2 * hd + D
    per_expert = 3 * D * Fd
    total = cfg.vocab_size * D + D + L * (attn + D + E * D + E * per_expert)
    active = cfg.vocab_size * D + D + L * (attn + D + E * D + cfg.n_expert_used * per_expert)
    return total, active


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def model_config(args, tokens: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=tokens["vocab_size"],
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        head_dim=args.head_dim,
        n_expert=args.n_expert,
        n_expert_used=args.n_expert_used,
        expert_ffn=args.expert_ffn,
        ctx=args.ctx,
    )


def lr_at(progress: float, args) -> float:
    """Linear warm-up over the first args.warmup steps' worth of progress, then cosine to 10%."""
    warm = args.warmup_frac
    if progress < warm:
        return args.lr * max(progress / warm, 0.02)
    p = min((progress - warm) / max(1 - warm, 1e-9), 1.0)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class CpuMonitor:
    """Estimates how many CPU cores other processes keep busy, from /proc/stat and our own CPU time.

    Used to drop to fewer torch threads while the machine is shared: with 2 threads on 2 busy cores
    every one of the thousands of small parallel regions of a step waits for both threads to be
    scheduled, and we saw training slow down 20x; one thread degrades gracefully instead.
    """

    def __init__(self):
        self.prev = self.sample()

    @staticmethod
    def sample():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        busy_s = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.monotonic(), busy_s, own.user + own.system

    def others(self) -> float:
        """Cores used by other processes since the last call."""
        cur, prev = self.sample(), self.prev
        self.prev = cur
        if cur is None or prev is None or cur[0] <= prev[0]:
            return 0.0
        return max(0.0, ((cur[1] - prev[1]) - (cur[2] - prev[2])) / (cur[0] - prev[0]))


class ThreadGovernor:
    """Chooses 1 or --threads torch threads, step by step.

    Uses all threads while they pay off; falls back to one thread as soon as a step takes 1.5x as long
    as a typical one-thread step, or while other processes use more than 0.7 of a core, and probes the
    full thread count again later (after 20, 40, 80, ... steps, once the others use < 0.3 of a core).
    It starts with one thread and probes the full count after 20 steps.
    """

    def __init__(self, max_threads: int):
        self.n, self.max = 1, max_threads  # start with one thread: it is never pathological
        self.monitor = CpuMonitor()
        self.others = 0.0  # EMA of cores used by other processes
        self.step_s: dict[int, float] = {}  # EMA of step time (s) per thread count
        self.backoff, self.next_probe, self.since_switch = 20, 20, 0

    def update(self, step: int, dt: float) -> int | None:
        """Record a step of dt seconds; return the new thread count when it should change."""
        self.others = 0.7 * self.others + 0.3 * self.monitor.others()
        prev = self.step_s.get(self.n)
        self.step_s[self.n] = dt if prev is None else 0.9 * prev + 0.1 * dt
        self.since_switch += 1
        if self.n > 1:
            one = self.step_s.get(1)
            if (one is not None and dt > 1.5 * one) or self.others > 0.7:
                self.backoff = 20 if self.since_switch > 100 else min(2 * self.backoff, 640)
                self.next_probe = step + self.backoff
                return self._switch(1)
        elif self.max > 1 and step >= self.next_probe and self.others < 0.3:
            return self._switch(self.max)
        return None

    def _switch(self, n: int) -> int:
        self.n, self.since_switch = n, 0
        return n


def dense_config(cfg: ModelConfig, groups: int) -> ModelConfig:
    """The dense model the MoE is upcycled from: one always-used FFN of `groups` segments, each as
    wide as an expert (an MoE with a single expert, so one model class serves both phases)."""
    from dataclasses import replace

    return replace(cfg, n_expert=1, n_expert_used=1, expert_ffn=groups * cfg.expert_ffn)


def expert_group(e: int, groups: int) -> int:
    """The dense FFN segment expert e was copied from: experts g, g + G, g + 2G, ... are replicas."""
    return e % groups


def upcycle(dense, cfg: ModelConfig, groups: int, seed: int):
    """Sparse upcycling, fine-grained (as Qwen1.5-MoE was made from a dense model): the dense FFN's
    intermediate dimension is cut into `groups` segments of cfg.expert_ffn; expert e starts as a copy
    of segment e % groups, so each segment has n_expert / groups replicas. The down projection is
    scaled by `groups`: with k slots of renormalised weight 1/k each drawing a segment at random,
    the MoE output starts equal to the dense FFN's on average (exactly so when the k slots hold the
    k = groups distinct segments). Everything else is copied;
    the router starts fresh (its noise decides which replica a token meets, so replicas see
    different tokens and drift apart: that is where specialisation and the redundancy come from)."""
    import torch

    torch.manual_seed(seed + 1)
    moe = build_model(cfg)
    F_e = cfg.expert_ffn
    src = dict(dense.named_parameters())
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".w_" not in name and ".router." not in name:
                p.copy_(src[name])
        for bd, bm in zip(dense.blocks, moe.blocks):
            for e in range(cfg.n_expert):
                seg = slice(expert_group(e, groups) * F_e, (expert_group(e, groups) + 1) * F_e)
                bm.w_gate[e].copy_(bd.w_gate[0, seg])
                bm.w_up[e].copy_(bd.w_up[0, seg])
                bm.w_down[e].copy_(bd.w_down[0][:, seg] * groups)
    return moe


def make_optimizer(model, args):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def carry_optimizer_state(old_opt, old_model, new_opt, new_model) -> None:
    """Adam moments of the parameters upcycling copied unchanged (attention, norms, embeddings)."""
    old = dict(old_model.named_parameters())
    for name, p in new_model.named_parameters():
        q = old.get(name)
        if q is not None and q.shape == p.shape and q in old_opt.state:
            new_opt.state[p] = {k: v.clone() for k, v in old_opt.state[q].items()}


def replica_similarity(model, groups: int) -> tuple[float, float]:
    """Mean cosine of the experts' flattened weights (gate, up, down) between replicas of the same
    segment, and between experts of different segments, over all layers."""
    import torch

    same, other = [], []
    with torch.no_grad():
        for b in model.blocks:
            E = b.w_gate.shape[0]
            if E < 2:
                return float("nan"), float("nan")
            w = torch.cat([b.w_gate.reshape(E, -1), b.w_up.reshape(E, -1), b.w_down.transpose(1, 2).reshape(E, -1)], 1)
            w = torch.nn.functional.normalize(w, dim=1)
            cos = w @ w.T
            g = torch.tensor([expert_group(e, groups) for e in range(E)])
            sib = (g[:, None] == g[None, :]) & ~torch.eye(E, dtype=torch.bool)
            diff = g[:, None] != g[None, :]
            same.append(cos[sib].mean().item() if sib.any() else float("nan"))
            other.append(cos[diff].mean().item() if diff.any() else float("nan"))
    return float(np.mean(same)), float(np.mean(other))


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), **state}, tmp)
    os.replace(tmp, path)


def step_train(args, tokens: dict) -> dict:
    """Train for --minutes / --steps. With --upcycle-frac F > 0 the first F of the budget trains a
    dense model (FFN of --upcycle-groups expert-sized segments), which is then upcycled into the
    MoE (see `upcycle`) and trained on; the learning-rate schedule runs over the whole budget."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    cfg = model_config(args, tokens)
    upcycling = args.upcycle_frac > 0
    run_key = stamp(
        {
            "cfg": asdict(cfg),
            "data": tokens["stamp"],
            "lr": args.lr,
            "batch": args.batch,
            "aux": args.aux_coef,
            "z": args.z_coef,
            "seed": args.seed,
            **({"upcycle": [args.upcycle_frac, args.upcycle_groups]} if upcycling else {}),
        }
    )
    total, active = count_params(cfg)
    log(f"train: model {asdict(cfg)}")
    log(f"train: {total / 1e6:.2f} M parameters ({active / 1e6:.2f} M active per token)")
    if upcycling:
        log(
            f"train: the first {args.upcycle_frac:.0%} of the budget trains a dense model with an FFN of "
            f"{args.upcycle_groups} x {cfg.expert_ffn}, then upcycles it into {cfg.n_expert} experts "
            f"({cfg.n_expert // args.upcycle_groups} replicas of each segment)"
        )
    dense_cfg = dense_config(cfg, args.upcycle_groups) if upcycling else None

    ckpt_path = work / "ckpt.pt"
    state = {
        "step": 0,
        "elapsed_s": 0.0,
        "run_key": run_key,
        "cfg": asdict(dense_cfg or cfg),
        "history": [],
        "phase": "dense" if upcycling else "moe",
        "moe_from_step": 0,
        "upcycle": [args.upcycle_frac, args.upcycle_groups] if upcycling else None,
    }
    rng = np.random.default_rng(args.seed)
    ck = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("run_key") != run_key:
            log(
                f"train: WARNING {ckpt_path} belongs to a different configuration; starting over "
                "(it will be overwritten)"
            )
            ck = None
    if ck is not None:
        state = {k: ck[k] for k in ("step", "elapsed_s", "run_key", "cfg", "history")}
        state["phase"], state["moe_from_step"] = ck.get("phase", "moe"), ck.get("moe_from_step", 0)
        state["upcycle"] = ck.get("upcycle", [args.upcycle_frac, args.upcycle_groups] if upcycling else None)
    model = build_model(ModelConfig(**state["cfg"]))
    opt = make_optimizer(model, args)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["rng"]
        log(
            f"train: resumed from {ckpt_path} at step {state['step']} ({state['phase']} phase, "
            f"{state['elapsed_s'] / 60:.1f} min trained)"
        )

    data = np.load(work / "tokens.npz")
    stream = torch.from_numpy(data["train"].astype(np.int64))
    budget_s, max_steps = args.minutes * 60.0, args.steps
    T, B = cfg.ctx, args.batch

    def progress() -> float:
        fr = [state["elapsed_s"] / budget_s] if budget_s > 0 else []
        fr += [state["step"] / max_steps] if max_steps > 0 else []
        return max(fr) if fr else 1.0

    last_ckpt, t_log, tok_log = time.time(), time.time(), 0
    governor = ThreadGovernor(args.threads)
    if args.adapt_threads:
        torch.set_num_threads(governor.n)
    model.train()
    while progress() < 1.0:
        if state["phase"] == "dense" and progress() >= args.upcycle_frac:
            moe = upcycle(model, cfg, args.upcycle_groups, args.seed)
            moe_opt = make_optimizer(moe, args)
            carry_optimizer_state(opt, model, moe_opt, moe)
            model, opt = moe.train(), moe_opt
            state.update(phase="moe", moe_from_step=state["step"], cfg=asdict(cfg))
            log(
                f"train: upcycled the dense model into {cfg.n_expert} experts at step {state['step']} "
                f"({state['elapsed_s'] / 60:.1f} min)"
            )
        t0 = time.time()
        # the upcycled experts and the new router start with fresh Adam moments: warm them up again
        rewarm = (
            min(1.0, (state["step"] - state["moe_from_step"] + 1) / REWARM_STEPS) if state["moe_from_step"] else 1.0
        )
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(), args) * rewarm
        off = torch.from_numpy(rng.integers(0, len(stream) - T - 1, size=B))
        idx = off[:, None] + torch.arange(T + 1)[None, :]
        batch = stream[idx]  # [B, T+1]
        stats: dict = {}
        logits = model(batch[:, :-1], stats)  # [B, T, V]
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        aux, z = stats["aux"] / cfg.n_layer, stats["z"] / cfg.n_layer
        loss = ce + (args.aux_coef * aux + args.z_coef * z if state["phase"] == "moe" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        dt = time.time() - t0
        state["elapsed_s"] += dt
        new_threads = governor.update(state["step"], dt) if args.adapt_threads else None
        if new_threads is not None:
            torch.set_num_threads(new_threads)
            log(f"train: using {new_threads} thread(s) (step {dt:.1f} s, others use {governor.others:.1f} cores)")
        tok_log += B * T
        if state["step"] % args.log_every == 0 or progress() >= 1.0:
            counts = torch.stack(stats["counts"]).float()  # [L, E]
            max_share = (counts / counts.sum(1, keepdim=True)).max().item()
            tps = tok_log / (time.time() - t_log)
            left = state["elapsed_s"] * (1 - progress()) / max(progress(), 1e-9)  # seconds
            extra = ""
            if upcycling and state["phase"] == "moe":
                same, other = replica_similarity(model, args.upcycle_groups)
                extra = f" | replica cos {same:.2f} (others {other:.2f})"
            log(
                f"step {state['step']:6d} | {state['phase']} | ce {ce.item():.3f} | aux {aux.item():.3f} | z "
                f"{z.item():.2f} "
                f"| max expert share {max_share:.2f} | lr {opt.param_groups[0]['lr']:.2e} | {tps:,.0f} tok/s "
                f"| {state['elapsed_s'] / 60:.1f} min | ETA {left / 60:.1f} min{extra}"
            )
            state["history"].append([state["step"], round(state["elapsed_s"], 1), round(ce.item(), 4)])
            t_log, tok_log = time.time(), 0
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, {**state, "rng": rng.bit_generator.state})
            last_ckpt = time.time()
            log(f"train: checkpoint saved ({ckpt_path})")
    if state["phase"] != "moe":
        sys.exit("error: the training budget ended before the dense model was upcycled; lower --upcycle-frac")
    save_checkpoint(ckpt_path, model, opt, {**state, "rng": rng.bit_generator.state})
    log(
        f"train: done, {state['step']} steps, {state['elapsed_s'] / 60:.1f} min, "
        f"{state['step'] * B * T / 1e6:.1f} M tokens seen"
    )
    return state


def load_trained(work: Path):
    import torch

    ck = torch.load(work / "ckpt.pt", map_location="cpu", weights_only=False)
    cfg = ModelConfig(**ck["cfg"])
    model = build_model(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg, ck


# --------------------------------------------------------------------------------------
# GGUF export
# --------------------------------------------------------------------------------------


def gguf_tensors(model) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array [out, in] like torch Linear.weight, keep_f32)."""
    f = lambda t: t.detach().float().numpy()
    emb = f(model.embed.weight)
    out = [
        ("token_embd.weight", emb, False),
        ("output_norm.weight", f(model.out_norm), True),
        ("output.weight", emb, False),
    ]  # tied in training, written twice for simple loaders
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", f(b.attn_norm), True),
            (p + "attn_q.weight", f(b.wq.weight), False),
            (p + "attn_k.weight", f(b.wk.weight), False),
            (p + "attn_v.weight", f(b.wv.weight), False),
            (p + "attn_output.weight", f(b.wo.weight), False),
            (p + "attn_q_norm.weight", f(b.q_norm), True),
            (p + "attn_k_norm.weight", f(b.k_norm), True),
            (p + "ffn_norm.weight", f(b.ffn_norm), True),
            (p + "ffn_gate_inp.weight", f(b.router.weight), True),
            (p + "ffn_gate_exps.weight", f(b.w_gate), False),
            (p + "ffn_up_exps.weight", f(b.w_up), False),
            (p + "ffn_down_exps.weight", f(b.w_down), False),
        ]
    return out


def step_export(args, tokens: dict) -> Path:
    import gguf
    from gguf.quants import quantize

    work, out_path = Path(args.work_dir), Path(args.out)
    model, cfg, ck = load_trained(work)
    tok_list, merges = tokenizer_vocab(work / "tokenizer.json")
    specials = {tokens["eos"], tokens["im_start"], tokens["im_end"]}
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(tok_list))]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "qwen3moe")
    w.add_name(args.name)
    w.add_description("localmoe demo MoE, trained from scratch by models/train_demo_moe.py")
    w.add_context_length(cfg.ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.expert_ffn)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.expert_ffn)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if args.outtype == "q8_0" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok_list)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens["bos"])
    w.add_eos_token_id(tokens["eos"])
    w.add_eot_token_id(tokens["im_end"])
    w.add_pad_token_id(tokens["eos"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, arr, keep_f32 in gguf_tensors(model):
        if keep_f32 or args.outtype == "f32" or arr.shape[-1] % 32 != 0:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            q = quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log(f"export: wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB)")
    return out_path


def model_from_gguf(path: Path, cfg: ModelConfig):
    """PyTorch model with the (dequantized) weights of a GGUF written by step_export."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model = build_model(cfg)
    reader = GGUFReader(str(path))
    arrays = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}
    with torch.no_grad():
        targets = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.out_norm}
        for i, b in enumerate(model.blocks):
            p = f"blk.{i}."
            targets.update(
                {
                    p + "attn_norm.weight": b.attn_norm,
                    p + "attn_q.weight": b.wq.weight,
                    p + "attn_k.weight": b.wk.weight,
                    p + "attn_v.weight": b.wv.weight,
                    p + "attn_output.weight": b.wo.weight,
                    p + "attn_q_norm.weight": b.q_norm,
                    p + "attn_k_norm.weight": b.k_norm,
                    p + "ffn_norm.weight": b.ffn_norm,
                    p + "ffn_gate_inp.weight": b.router.weight,
                    p + "ffn_gate_exps.weight": b.w_gate,
                    p + "ffn_up_exps.weight": b.w_up,
                    p + "ffn_down_exps.weight": b.w_down,
                }
            )
        for name, param in targets.items():
            param.copy_(torch.from_numpy(np.array(arrays[name], dtype=np.float32).reshape(param.shape)))
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def open_llama(path: Path, **kwargs):
    """llama.cpp on its plain CPU buffers (localmoe.llama_ref says why: the extra buffer types
    crashed batched Q8_0 decoding on an AMX-capable machine, and the plain path is the reference)."""
    from llama_cpp import Llama

    from localmoe.llama_ref import plain_cpu_buffers

    with plain_cpu_buffers():
        return Llama(str(path), verbose=False, **kwargs)


def torch_eval(model, windows: np.ndarray, n_expert: int):
    """Mean CE (nats/token) over next-token targets of each window, and routing counts [L, E]."""
    import torch
    import torch.nn.functional as F

    ce_sum, n, counts = 0.0, 0, None
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(w.astype(np.int64))[None]
            stats: dict = {}
            logits = model(ids, stats)[0]
            ce_sum += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            n += len(w) - 1
            c = torch.stack(stats["counts"]).numpy()  # [L, E]
            counts = c if counts is None else counts + c
    return ce_sum / n, counts


def llama_eval(llm, windows: np.ndarray) -> float:
    """Same quantity as torch_eval, computed by llama.cpp (logits_all=True)."""
    ce_sum, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)  # [T, V]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce_sum += -logp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    return ce_sum / n


def localmoe_eval(path: Path, windows: np.ndarray) -> float | None:
    """Same quantity as llama_eval, computed by localmoe (the runtime this model ships with), or
    None when localmoe is not installed (the recipe itself does not need it)."""
    try:
        import localmoe
    except ImportError:
        return None
    ce_sum, n = 0.0, 0
    with localmoe.load(str(path), device="cpu") as rt:
        for w in windows:
            logits = rt.logits([int(t) for t in w]).astype(np.float64)  # [T, V]
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            ce_sum += -logp[np.arange(len(w) - 1), w[1:]].sum()
            n += len(w) - 1
    return ce_sum / n


def unigram_ce(counts: np.ndarray, windows: np.ndarray) -> float:
    """CE of an add-one smoothed unigram model over the same targets."""
    p = (counts + 1) / (counts.sum() + len(counts))
    targets = windows[:, 1:].reshape(-1)
    return float(-np.log(p[targets]).mean())


def tokenizer_parity(llm, tok, texts: list[str]) -> dict:
    """Compare llama.cpp's tokenization with the trainer's on each text."""
    bad = []
    for t in texts:
        ours = tok.encode(t).ids
        theirs = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        if list(ours) != list(theirs):
            bad.append(t[:60])
    return {"checked": len(texts), "mismatches": len(bad), "examples": bad[:5]}


def generate_samples(llm, ctx: int) -> list[dict]:
    out, n_new = [], min(64, ctx // 2)
    for prompt in [
        "In the beginning God",
        "And Jesus said unto them,",
        "def read_config(path):\n",
        "import os\n\n\nclass",
        "Der Mensch ist",
        "Wer zuletzt lacht,",
        "A fool and his money",
        "Computers are",
    ]:
        r = llm.create_completion(prompt, max_tokens=n_new, temperature=0.0)
        out.append({"prompt": prompt, "mode": "greedy", "text": r["choices"][0]["text"]})
    for user in [
        "Continue this Bible verse: And God said",
        "Tell me a fortune.",
        "Erzähl mir ein Sprichwort.",
        "Write Python code: def fibonacci(n):",
    ]:
        r = llm.create_chat_completion(
            [{"role": "user", "content": user}], max_tokens=n_new, temperature=0.7, top_p=0.9, seed=1
        )
        out.append({"prompt": user, "mode": "chat, T=0.7", "text": r["choices"][0]["message"]["content"]})
    return out


def usage_table(counts: dict[str, np.ndarray], layers: list[int], k: int) -> tuple[list[str], dict]:
    """Markdown rows: per layer and domain, the top-3 experts with their share of assignments."""
    domains = list(counts)
    rows = [
        "| layer | " + " | ".join(domains) + " | top-1 distinct | max share (all domains) |",
        "|---|" + "---|" * len(domains) + "---|---|",
    ]
    summary = {"layers_with_distinct_top1": 0, "max_share": 0.0}
    n_layer = next(iter(counts.values())).shape[0]
    for l in range(n_layer):
        cells, tops = [], []
        for d in domains:
            c = counts[d][l] / counts[d][l].sum()
            top = np.argsort(-c)[:3]
            tops.append(int(top[0]))
            cells.append(" ".join(f"e{e} {c[e]:.0%}" for e in top))
        total = sum(counts[d][l] for d in domains)
        share = float((total / total.sum()).max())
        distinct = len(set(tops))
        summary["layers_with_distinct_top1"] += distinct > 1
        summary["max_share"] = max(summary["max_share"], share)
        summary["max_token_share"] = min(1.0, summary["max_share"] * k)  # tokens that use that expert
        if l in layers:
            rows.append(f"| {l} | " + " | ".join(cells) + f" | {distinct} of {len(domains)} | {share:.0%} |")
    summary["n_layer"] = n_layer
    return rows, summary


def step_eval(args, tokens: dict, corpus: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    work, gguf_path = Path(args.work_dir), Path(args.out)
    model, cfg, ck = load_trained(work)
    data = np.load(work / "tokens.npz")
    tok = load_tokenizer(work / "tokenizer.json")
    llm = open_llama(
        gguf_path, n_ctx=cfg.ctx, n_batch=cfg.ctx, n_ubatch=cfg.ctx, logits_all=True, n_threads=args.threads, seed=1
    )
    gmodel = model_from_gguf(gguf_path, cfg)

    report = {
        "gguf": str(gguf_path),
        "gguf_mb": round(gguf_path.stat().st_size / 1e6, 2),
        "params": count_params(cfg)[0],
        "active_params": count_params(cfg)[1],
        "config": asdict(cfg),
        "train_steps": ck["step"],
        "train_minutes": round(ck["elapsed_s"] / 60, 1),
        "domains": {},
    }
    frac, groups = ck.get("upcycle") or (args.upcycle_frac, args.upcycle_groups)
    if ck.get("moe_from_step") and cfg.n_expert > groups:  # upcycled, with replicas
        same, other = replica_similarity(model, groups)
        report["upcycle"] = {
            "frac": frac,
            "groups": groups,
            "moe_from_step": ck["moe_from_step"],
            "replica_weight_cosine": same,
            "other_weight_cosine": other,
        }
    counts_by_domain = {}
    for name in tokens["domains"]:
        windows = data[f"eval_{name}"]
        ce_torch, counts = torch_eval(model, windows, cfg.n_expert)
        ce_gguf_torch, _ = torch_eval(gmodel, windows, cfg.n_expert)
        ce_llama = llama_eval(llm, windows)
        ce_ours = localmoe_eval(gguf_path, windows)
        ce_uni = unigram_ce(data["unigram"], windows)
        counts_by_domain[name] = counts
        report["domains"][name] = {
            "eval_tokens": int(windows[:, 1:].size),
            "ppl_torch": math.exp(ce_torch),
            "ppl_torch_from_gguf": math.exp(ce_gguf_torch),
            "ppl_llama_cpp": math.exp(ce_llama),
            "ce_torch": ce_torch,
            "ce_llama_cpp": ce_llama,
            "ce_unigram": ce_uni,
            "ce_ratio_vs_unigram": ce_llama / ce_uni,
            "ppl_rel_diff_llama_vs_torch": math.exp(ce_llama - ce_torch) - 1,
        }
        if ce_ours is not None:
            report["domains"][name] |= {
                "ppl_localmoe": math.exp(ce_ours),
                "ce_localmoe": ce_ours,
                "ppl_rel_diff_localmoe_vs_llama": math.exp(ce_ours - ce_llama) - 1,
            }
        log(
            f"eval: {name:12s} ppl llama.cpp {math.exp(ce_llama):8.3f} | torch {math.exp(ce_torch):8.3f} "
            f"| torch(gguf) {math.exp(ce_gguf_torch):8.3f} | CE {ce_llama:.3f} vs unigram {ce_uni:.3f} "
            f"({ce_llama / ce_uni:.0%})"
        )
    rows, summary = usage_table(counts_by_domain, list(range(cfg.n_layer)), cfg.n_expert_used)
    report["expert_usage"] = summary
    report["expert_counts"] = {d: c.tolist() for d, c in counts_by_domain.items()}

    texts = [
        "Grüße aus Köln: Ärger über Öl, Straße, Mädchen, l'été à Noël, déjà vu, garçon, œuvre",
        chat("Erzähl mir ein Sprichwort.", "Wer früh übt, wird ein Meister.") + EOS,
        "def f(x):\n    return {'a': [x ** 2, 3.14e-5]}  # comment\n\n\tif x != 0:\n\t\tpass\n",
        "  multiple   spaces\n\n\n  and\ttabs \r\n end  ",
        "emoji 🙂 and 日本語 and 1234567 numbers",
    ]
    for name, v in corpus["domains"].items():
        texts += v["eval"][:25] + v["train"][:5]
    report["tokenizer_parity"] = tokenizer_parity(open_llama(gguf_path, vocab_only=True), tok, texts)
    log(f"eval: tokenizer parity {report['tokenizer_parity']}")

    gen_llm = open_llama(gguf_path, n_ctx=cfg.ctx, n_threads=args.threads, seed=1)
    report["samples"] = generate_samples(gen_llm, cfg.ctx)
    (work / "report.md").write_text(report_markdown(report, rows, tokens))
    (work / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    log(f"eval: wrote {work / 'report.md'} and report.json")
    print((work / "report.md").read_text())
    return report


def report_markdown(r: dict, usage_rows: list[str], tokens: dict) -> str:
    lines = [
        f"Model: {r['params'] / 1e6:.2f} M parameters ({r['active_params'] / 1e6:.2f} M active per token), "
        f"GGUF {r['gguf_mb']} MB, {r['train_steps']} steps in {r['train_minutes']} min.",
        "",
    ]
    if "upcycle" in r:
        u = r["upcycle"]
        lines += [
            f"Upcycled: dense for steps 1-{u['moe_from_step']}, then {r['config']['n_expert']} experts from "
            f"{u['groups']} FFN segments; mean cosine of the experts' weights after training: "
            f"{u['replica_weight_cosine']:.3f} between replicas of a segment, {u['other_weight_cosine']:.3f} "
            "between experts of different segments.",
            "",
        ]
    lines += [
        "| domain | eval tokens | ppl llama.cpp | ppl localmoe | localmoe vs llama.cpp | ppl PyTorch (f32) | "
        "ppl PyTorch (GGUF weights) | llama.cpp vs PyTorch | CE nats/token | unigram CE | CE / unigram |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, v in r["domains"].items():
        ours = (
            f"{v['ppl_localmoe']:.3f} | {v['ppl_rel_diff_localmoe_vs_llama']:+.2%}"
            if "ppl_localmoe" in v
            else "(not installed) | "
        )
        lines.append(
            f"| {d} | {v['eval_tokens']} | {v['ppl_llama_cpp']:.3f} | {ours} | {v['ppl_torch']:.3f} | "
            f"{v['ppl_torch_from_gguf']:.3f} | {v['ppl_rel_diff_llama_vs_torch']:+.2%} | "
            f"{v['ce_llama_cpp']:.3f} | {v['ce_unigram']:.3f} | {v['ce_ratio_vs_unigram']:.1%} |"
        )
    doms = r["domains"].values()
    ce_all = {k: float(np.mean([v[k] for v in doms])) for k in ("ce_llama_cpp", "ce_torch", "ce_unigram")}
    r["all_domains"] = {**ce_all, "ce_ratio_vs_unigram": ce_all["ce_llama_cpp"] / ce_all["ce_unigram"]}
    ours_all = " | "
    if all("ce_localmoe" in v for v in doms):
        ce_ours = float(np.mean([v["ce_localmoe"] for v in doms]))
        ours_all = f"{math.exp(ce_ours):.3f} | {math.exp(ce_ours - ce_all['ce_llama_cpp']) - 1:+.2%}"
    lines.append(
        f"| all (mean) | {sum(v['eval_tokens'] for v in doms)} | {math.exp(ce_all['ce_llama_cpp']):.3f} | {ours_all} | "
        f"{math.exp(ce_all['ce_torch']):.3f} | | {math.exp(ce_all['ce_llama_cpp'] - ce_all['ce_torch']) - 1:+.2%} | "
        f"{ce_all['ce_llama_cpp']:.3f} | {ce_all['ce_unigram']:.3f} | "
        f"{r['all_domains']['ce_ratio_vs_unigram']:.1%} |"
    )
    u = r["expert_usage"]
    lines += [
        "",
        "Expert usage on the held-out windows (top-3 experts per domain, share of that domain's "
        "assignments in the layer):",
        "",
        *usage_rows,
        "",
        f"Layers whose most-used expert differs between domains: {u['layers_with_distinct_top1']} of "
        f"{u['n_layer']}; largest share of one expert in a layer: {u['max_share']:.0%} of the assignments "
        f"(it is among the top-{r['config']['n_expert_used']} of {u['max_token_share']:.0%} of the tokens).",
        "",
        f"Tokenizer parity (llama.cpp vs trainer): {r['tokenizer_parity']['checked']} texts, "
        f"{r['tokenizer_parity']['mismatches']} mismatches.",
        "",
        "Samples (llama.cpp):",
        "",
    ]
    for s in r["samples"]:
        text = (s["prompt"] if s["mode"] == "greedy" else "") + s["text"]
        lines += [f"* `{s['prompt']!r}` ({s['mode']}):", "", "  ```", *["  " + t for t in text.splitlines()], "  ```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "step", choices=["all", "prepare", "tokenize", "train", "export", "samples", "eval"], nargs="?", default="all"
    )
    ap.add_argument("--work-dir", default=str(HERE / "work"), help="corpus, tokenizer, checkpoints, report")
    ap.add_argument("--out", default=str(HERE / "localmoe-demo-moe.gguf"), help="GGUF file to write")
    ap.add_argument("--name", default="localmoe-demo-moe")
    ap.add_argument("--outtype", choices=["q8_0", "f32"], default="q8_0", help="GGUF weight type")
    ap.add_argument(
        "--corpus-dir",
        default=None,
        help="use <domain>.txt files here (documents separated by '%%' lines) instead of the Debian corpus",
    )
    ap.add_argument("--max-chars", type=int, default=4_500_000, help="cap per domain (characters)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--chat-frac", type=float, default=0.3, help="chat-wrapped copies per training doc")
    ap.add_argument("--eval-windows", type=int, default=24, help="held-out windows per domain")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n-expert", type=int, default=32)
    ap.add_argument("--n-expert-used", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.03)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss coefficient")
    ap.add_argument("--minutes", type=float, default=65.0, help="training wall-clock budget (0: none)")
    ap.add_argument("--steps", type=int, default=0, help="training step budget (0: none)")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (at most)")
    ap.add_argument(
        "--no-adapt-threads",
        dest="adapt_threads",
        action="store_false",
        help="always use --threads, even while other processes keep the CPU busy",
    )
    ap.add_argument(
        "--upcycle-frac",
        type=float,
        default=0.5,
        help="share of the training budget spent on a dense model that is then upcycled "
        "into the MoE (0: train the MoE from scratch)",
    )
    ap.add_argument(
        "--upcycle-groups",
        type=int,
        default=4,
        help="segments of the dense FFN, each expert-sized; every segment becomes n_expert / groups experts",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.upcycle_frac < 1:
        ap.error("--upcycle-frac must be in [0, 1)")
    if args.upcycle_frac > 0:
        if args.upcycle_groups < 1 or args.n_expert % args.upcycle_groups:
            ap.error(f"--upcycle-groups must be a positive divisor of --n-expert ({args.n_expert})")
        if args.steps > 0 and math.ceil(args.upcycle_frac * args.steps) >= args.steps:
            ap.error(f"--steps {args.steps} leaves no step for the MoE after the dense {args.upcycle_frac:.0%}")
    if args.minutes <= 0 and args.steps <= 0:
        ap.error("give --minutes or --steps")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    corpus = step_prepare(args)
    if args.step == "prepare":
        return
    tokens = step_tokenize(args, corpus)
    if args.step in ("all", "train"):
        step_train(args, tokens)
    if args.step in ("all", "export"):
        step_export(args, tokens)
    if args.step in ("all", "samples"):
        step_samples(args, corpus)
    if args.step in ("all", "eval"):
        step_eval(args, tokens, corpus)


if __name__ == "__main__":
    main()
