"""A tiny randomly initialised GPT-2 and text written by the test: no downloads, ~1 s."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from gsae_pl.tiny_lm import Recipe, new_model, train_tokenizer

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
                    "eval.lm_contexts=4", "data.buffer_size=256", "data.batch_size=32",
                    "data.lm_batch_size=8", *overrides)
