"""The embedded tiny LM: built offline under $GSAE_PL_CACHE, deterministic, loadable by
TransformerBridge. A miniature recipe keeps this fast; the real one is timed in
benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from gsae_pl.data.tiny_lm import Recipe, ensure_tiny_lm, model_dir, pack

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
    texts = [{json.loads(line)["text"] for line in open(dirs[1] / name)}
             for name in ("corpus.jsonl", "heldout.jsonl")]
    assert len(texts[0]) > 3 and texts[1] and not texts[0] & texts[1]  # LM train / held out


def test_sae_heldout_text_is_text_the_lm_never_trained_on(tmp_path, monkeypatch):
    """Loss recovered and the eval rows must not be measured on the LM's training text;
    the SAE's own training windows stay off the held-out documents too."""
    import itertools

    from gsae_pl.data.transformer_lens import build_lm_source
    from tests.conftest import make_cfg
    from tests.data.lm_fixtures import doc_ids, fake_stdlib_docs, write_fake_tiny_lm

    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path))
    _, lm_train, lm_heldout = write_fake_tiny_lm(fake_stdlib_docs())
    assert lm_heldout and lm_train
    src = build_lm_source(make_cfg("data.source=tiny_lm", "data.context_size=16",
                                   "eval.rows=256", "eval.loss_recovered.contexts=4",
                                   "data.buffer_size=256", "data.batch_size=32"))
    tok = src.bridge.tokenizer
    heldout = doc_ids(tok, src.heldout)
    assert heldout and heldout <= lm_heldout
    assert doc_ids(tok, src.heldout_tokens(4)) <= lm_heldout
    train = doc_ids(tok, itertools.islice(src.text.train(src.heldout_docs, 0, 1), 400))
    assert train and not train & heldout


def test_loss_recovered_windows_spread_over_every_heldout_file(tmp_path, monkeypatch):
    """The windows of loss recovered are spread evenly over all the held-out text (not its
    first files), and each carries the document its last token comes from."""
    import json
    import re

    from gsae_pl.data.transformer_lens import build_lm_source
    from tests.conftest import make_cfg
    from tests.data.lm_fixtures import doc_ids, fake_stdlib_docs, write_fake_tiny_lm

    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path))
    model_dir, _, _ = write_fake_tiny_lm(fake_stdlib_docs())
    src = build_lm_source(make_cfg("data.source=tiny_lm", "data.context_size=16",
                                   "eval.rows=64", "eval.loss_recovered.contexts=6",
                                   "data.buffer_size=256", "data.batch_size=32"))
    text = src.text
    every = [w for _, w in text._pack(text._token_lists(iter(text.heldout_dataset)))]
    tokens, documents = src.heldout_windows(6)
    assert len(every) > 12
    for i, window in enumerate(tokens):
        assert torch.equal(window, every[i * len(every) // 6])
    names = [re.findall(r"doc(\d{3})", json.loads(line)["text"])[0]
             for line in (model_dir / "heldout.jsonl").read_text().splitlines()]
    tok = src.bridge.tokenizer
    for window, document in zip(tokens, documents.tolist()):
        assert int(names[document]) in doc_ids(tok, window[None])
    assert documents.tolist() == sorted(documents.tolist()) and documents[-1] > documents[0]
    assert torch.equal(src.heldout_tokens(6), tokens)


def test_training_windows_are_the_text_packers_with_bos_between_documents():
    """One packer (data/text.py) for the SAE's text and the LM's own training windows, which
    must stay those the cached model was trained on: BOS + 127 tokens of the documents
    joined by BOS, the tail dropped."""
    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randint(0, 300))] for _ in range(60)]
    flat = [t for ids in docs for t in (*ids, 0)]
    n = len(flat) // 127
    expected = torch.cat([torch.zeros(n, 1, dtype=torch.long),
                          torch.tensor(flat[:n * 127]).view(n, 127)], dim=1)
    assert torch.equal(pack(docs, 128, bos_id=0), expected)
    assert pack([[1, 2]], 128, bos_id=0).shape == (0, 128)


@pytest.mark.slow
def test_the_build_reports_every_phase(tmp_path, monkeypatch, capsys):
    """Each phase of the build speaks once it runs longer than $GSAE_PL_PROGRESS_EVERY
    seconds (10 by default; 0 here, so every phase does): the first build took 311 s with
    no output."""
    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path))
    monkeypatch.setenv("GSAE_PL_PROGRESS_EVERY", "0")
    ensure_tiny_lm(MINI)
    err = capsys.readouterr().err.splitlines()
    for phase in ("reading the standard library's sources", "training its 300-token BPE "
                  "tokenizer", "tokenizing its corpus", "held-out cross-entropy"):
        assert any(line.startswith(f"tiny LM: {phase}: done in ") for line in err), phase
    steps = [line for line in err if line.startswith("tiny LM: training: ")]
    assert steps[0].startswith("tiny LM: training: 1/4 steps (25%) | ") and "ETA" in steps[0]
    assert steps[-1].startswith("tiny LM: training: 4 steps in ")


def test_heldout_rows_spread_over_every_heldout_file_like_loss_recovered(tmp_path,
                                                                          monkeypatch):
    """The held-out rows of every metric come from windows spread evenly over all the
    held-out text (TextWindows.evaluation_windows, loss recovered's rule), evenly over
    their kept positions, and each row carries its window's document."""
    from gsae_pl.data.transformer_lens import build_lm_source
    from tests.conftest import make_cfg
    from tests.data.lm_fixtures import fake_stdlib_docs, write_fake_tiny_lm

    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path))
    write_fake_tiny_lm(fake_stdlib_docs())
    src = build_lm_source(make_cfg("data.source=tiny_lm", "data.context_size=16",
                                   "eval.rows=64", "eval.loss_recovered.contexts=6",
                                   "data.buffer_size=256", "data.batch_size=32"))
    tokens, documents = src.heldout_windows(7)  # ceil(1.25 * 64 / 15) + 1 windows
    _, every = src.heldout_windows(40)
    assert documents[-1] >= every[-6]  # reaches the held-out text's last files, not its front
    keep = src.keep_mask(tokens)
    pick = torch.arange(64) * int(keep.sum()) // 64
    assert torch.equal(src.eval_rows(64), src.rows(tokens).cpu()[pick])
    row_documents = src.eval_documents(64)
    assert torch.equal(row_documents, documents[:, None].expand_as(keep)[keep][pick])
    assert set(row_documents.tolist()) == set(documents.tolist())  # every window's document
