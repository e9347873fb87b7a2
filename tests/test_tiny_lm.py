"""The embedded tiny LM: built offline under $GSAE_PL_CACHE, deterministic, loadable by
TransformerBridge. A miniature recipe keeps this fast; the real one is timed in
benchmarks/RESULTS.md."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gsae_pl.tiny_lm import Recipe, ensure_tiny_lm, model_dir

MINI = Recipe(vocab_size=300, d_model=16, n_head=2, n_ctx=32, steps=4, batch_size=4,
              max_corpus_chars=150_000)


@pytest.mark.slow
def test_build_is_deterministic_cached_and_loads_through_the_bridge(tmp_path, monkeypatch):
    from transformer_lens import TransformerBridge

    dirs = []
    for name in ("a", "b"):
        monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path / name))
        dirs.append(ensure_tiny_lm(MINI, progress=False))
        assert dirs[-1] == model_dir(MINI) and str(dirs[-1]).startswith(str(tmp_path / name))
    weights = [load_file(d / "model.safetensors") for d in dirs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (dirs[0] / "tokenizer.json").read_text() == (dirs[1] / "tokenizer.json").read_text()
    report = json.loads((dirs[0] / "tiny_lm.json").read_text())
    assert report["heldout_ce"] > 0 and report["unigram_entropy"] > 0
    stamp = (dirs[1] / "tiny_lm.json").stat().st_mtime_ns
    assert ensure_tiny_lm(MINI, progress=False) == dirs[1]  # reused, not rebuilt
    assert (dirs[1] / "tiny_lm.json").stat().st_mtime_ns == stamp
    bridge = TransformerBridge.boot_transformers(str(dirs[1]), device="cpu")
    assert "blocks.0.mlp.hook_post" in bridge.hook_dict
    assert sum(1 for _ in open(dirs[1] / "corpus.jsonl")) > 3
