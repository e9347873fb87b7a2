"""A tiny randomly initialised GPT-2 and text written by the test: no downloads, ~1 s."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from gsae_pl.data.tiny_lm import Recipe, new_model, train_tokenizer

WORDS = ("the cat dog sat on a mat and ran to red blue green house tree over under "
         "def return class import if else for while print value list dict").split()


def write_text(path: Path, n_docs: int = 120, seed: int = 0, suffix: str = ".jsonl") -> Path:
    """`n_docs` random-word documents as .jsonl ({"text": ...}) or .txt (one per line)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            for _ in range(n_docs)]
    path = Path(path).with_suffix(suffix)
    lines = [json.dumps({"text": d}) if suffix == ".jsonl" else d for d in docs]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_gpt2(directory: Path, n_layer: int = 2, d_model: int = 32) -> Path:
    """A saved HF model directory (random weights, BPE tokenizer trained on WORDS)."""
    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    torch.manual_seed(0)
    recipe = Recipe(n_layer=n_layer, d_model=d_model, n_head=2, n_ctx=64)
    model = new_model(len(tokenizer), recipe, tokenizer.bos_token_id).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def lm_cfg(model, dataset, *overrides):
    """A small valid config for data.source=transformer_lens over the files above."""
    from tests.conftest import make_cfg

    return make_cfg("data.source=transformer_lens", f"data.model={model}",
                    f"data.dataset={dataset}", "data.context_size=16", "eval.rows=64",
                    "eval.loss_recovered.contexts=4", "data.buffer_size=256", "data.batch_size=32",
                    "data.lm_batch_size=8", *overrides)


def fake_stdlib_docs(n_docs: int = 200) -> list[tuple[str, str]]:
    """(path, text) documents standing in for the stdlib; document i's text repeats the
    word doc<i>, so any window of it names the document it came from (`doc_ids`)."""
    rng = random.Random(1)
    return [(f"pkg/mod{i:03d}.py", " ".join([f"doc{i:03d}"] * rng.randint(8, 30)))
            for i in range(n_docs)]


def doc_ids(tokenizer, windows) -> set[int]:
    """The documents of `fake_stdlib_docs` that token windows [n, T] hold text of."""
    import re

    return {int(m) for w in windows for m in re.findall(r"doc(\d{3})", tokenizer.decode(w))}


def write_fake_tiny_lm(docs: list[tuple[str, str]]) -> tuple[Path, set[int], set[int]]:
    """A tiny_lm model directory where `ensure_tiny_lm()` looks (under $GSAE_PL_CACHE),
    holding a random GPT-2 and the corpus files the real build writes from `docs`; returns
    it and the indices of the documents the LM trains on and holds out."""
    from gsae_pl.data import tiny_lm

    recipe = tiny_lm.Recipe()
    target = tiny_lm.model_dir(recipe)
    write_tiny_gpt2(target)
    train, heldout = tiny_lm._split(docs, recipe.heldout_fraction, recipe.seed)
    tiny_lm.write_corpus(target, train, heldout, recipe.seed)
    (target / "tiny_lm.json").write_text("{}")
    index = {text: i for i, (_, text) in enumerate(docs)}
    return target, {index[t] for t in train}, {index[t] for t in heldout}
