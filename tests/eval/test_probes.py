"""Linear probes on latents and raw rows: the logistic regression, the top-k selection, the
balanced split and Python-token labels by hand; then through real fits (synthetic, and a
tiny LM over Python text written here)."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from gsae_pl.data.code_labels import (
    AMBIGUOUS,
    CATEGORIES,
    OTHER,
    char_categories,
    labelled_windows,
    narrow_document,
    token_labels,
)
from gsae_pl.eval.probes import (
    MIN_PER_CLASS,
    _provider,
    balanced_split,
    fit_logistic,
    probe_accuracy,
    top_k_by_mean_difference,
)
from gsae_pl.fit import main
from tests.data.lm_fixtures import write_tiny_gpt2
from tests.tiny_run import BASE, args, metrics

CAT = {name: i for i, name in enumerate(CATEGORIES)}


def test_the_probe_separates_a_linearly_separable_set():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    y = torch.arange(200) < 100
    x[:, 0] = torch.where(y, x[:, 0].abs() + 1, -x[:, 0].abs() - 1)  # a margin of 2 on x_0
    assert probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0


def test_the_l2_strength_is_c_equal_one_on_the_summed_loss():
    """x = +1 (positive), -1 (negative): b = 0 by symmetry, and the minimum of
    2 log(1 + exp(-w)) + w^2 / 2 solves w = 2 / (1 + exp(w)), w = 0.6749... (a mean loss
    would give w = 1 / (1 + exp(w)), 0.4015...)."""
    lo, hi = 0.0, 2.0
    for _ in range(60):  # bisection for the root, by hand
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 2 / (1 + math.exp(mid)) else (lo, mid)
    w, b = fit_logistic(torch.tensor([[1.0], [-1.0]]), torch.tensor([True, False]))
    assert w.item() == pytest.approx(lo, abs=1e-5) and b.item() == pytest.approx(0, abs=1e-5)


def test_top_k_ranks_columns_by_class_mean_difference():
    x = torch.tensor([[1.0, 0.0, 5.0, 2.0],
                      [3.0, 0.0, 5.0, 0.0],
                      [0.0, 1.0, 1.0, 0.0]])
    y = torch.tensor([True, True, False])
    # |mean_pos - mean_neg| = |2 - 0|, |0 - 1|, |5 - 1|, |1 - 0| = 2, 1, 4, 1
    assert top_k_by_mean_difference(x, y, 1).tolist() == [2]
    assert top_k_by_mean_difference(x, y, 2).tolist() == [2, 0]
    assert top_k_by_mean_difference(x, y, 3).tolist() == [2, 0, 1]  # a tie: lower index
    assert top_k_by_mean_difference(x, y, 9).tolist() == [2, 0, 1, 3]  # k past the width


def test_the_split_is_balanced_disjoint_and_seeded():
    labels = torch.arange(100) % 4 == 0  # 25 positives, 75 negatives
    train, test = balanced_split(labels, torch.Generator().manual_seed(0))
    assert labels[train].sum() == 12 and (~labels[train]).sum() == 12
    assert labels[test].sum() == 13 and (~labels[test]).sum() == 13
    assert not set(train.tolist()) & set(test.tolist())
    again = balanced_split(labels, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    few = torch.arange(100) < MIN_PER_CLASS - 1
    assert balanced_split(few, torch.Generator().manual_seed(0)) is None


def test_python_token_labels_of_a_hand_written_string():
    src = 'def f(x):\n    return x + 12  # add\ns = "a b"\n'
    chars = char_categories(src)
    at = lambda text: chars[src.index(text)]  # noqa: E731
    assert at("def") == CAT["keyword"] and at("return") == CAT["keyword"]
    assert at("f(") == CAT["name"] and at("(x") == CAT["operator"] and at("12") == CAT["number"]
    assert at("# add") == CAT["comment"] and at('"a b"') == CAT["string"]
    assert chars[src.index(" b")] == CAT["string"]  # whitespace inside a string is string
    assert chars[src.index("    return")] == -1  # indentation: no category
    # LM tokens by their character spans:
    spans = {" return": CAT["keyword"], "):": CAT["operator"], "\n    ": OTHER,
             "12  # add": AMBIGUOUS, 'x + 1': AMBIGUOUS, '"a b"': CAT["string"]}
    offsets = [(src.index(t), src.index(t) + len(t)) for t in spans]
    assert token_labels(chars, offsets) == list(spans.values())
    assert char_categories("def f(:\n") is None  # not Python: no labels


def test_windows_start_at_bos_and_labels_follow_the_tokens(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_gpt2(tmp_path))
    bos = tokenizer.bos_token_id
    texts = [code_document(i) for i in range(3)] + ["not ( python"]
    windows, labels = labelled_windows(texts, tokenizer, bos, 16, n_tokens=60)
    assert windows.shape == labels.shape and windows.shape[1] == 16
    assert (windows[:, 0] == bos).all() and (labels[:, 0] == AMBIGUOUS).all()
    assert 45 <= int((windows[:, 1:] != bos).sum()) <= 60  # 20 per Python document
    for token, label in zip(windows.flatten().tolist(), labels.flatten().tolist()):
        text = tokenizer.decode([token])
        if text.strip() in ("=", "+", "(", ")", ":"):
            assert label == CAT["operator"]
        if text.strip() == "return":
            assert label == CAT["keyword"]


def test_the_narrow_file_is_the_first_with_every_kind_of_token(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_gpt2(tmp_path))
    strings = "s = 'a' 'b'\n" * 60  # the longest: strings, names, operators only
    code = "if x > 1: return 'a'  # c\n" * 12  # every kind, 12 times
    assert narrow_document([strings, "x = (\n", code], tokenizer, 1000) == [code]
    assert narrow_document([code[:100], strings, "x = (\n"], tokenizer, 1000) == [strings]
    assert narrow_document(["x = (\n"], tokenizer, 1000) == []  # not Python


def test_an_activation_cache_probes_through_its_lm():
    lm = SimpleNamespace(probe_sets=lambda n: {})
    assert _provider(SimpleNamespace(lm=lm)) is lm
    assert _provider(SimpleNamespace(lm=None)) is None


@pytest.mark.slow
def test_a_synthetic_fit_writes_probe_metrics_only_when_enabled(tmp_path):
    assert main(args(tmp_path, "on", "eval.probes.enabled=true", "eval.probes.rows=2048")) == 0
    written = metrics(tmp_path, "on")
    for task in ("feature_frequent", "feature_rare"):
        names = ["acc_all", "acc_raw", *[f"acc{raw}_top{k}" for raw in ("", "_raw")
                                         for k in (1, 2, 5)]]
        assert all(0.5 <= written[f"probe/{task}/{n}"] <= 1 for n in names)
        assert 1 <= written[f"probe/{task}/latents_firing"] <= 32  # sae.d_sae
        assert written[f"probe/{task}/rows"] % 2 == 0  # as many positives as negatives
    assert main(args(tmp_path, "off")) == 0
    assert not [k for k in metrics(tmp_path, "off") if k.startswith("probe/")]


def code_document(i: int) -> str:
    rng = random.Random(i)
    lines = [f"def f{i}(x, y):", f'    """Add {rng.randint(0, 99)} things."""']
    for j in range(rng.randint(3, 8)):
        op = rng.choice("+-*")
        lines.append(f"    x = x {op} y * {rng.randint(0, 999)}  # step {j}")
    lines += ["    if x > y:", "        return 'big'", "    return x", ""]
    return "\n".join(lines)


@pytest.mark.slow
def test_an_lm_fit_over_python_text_probes_token_kinds(tmp_path):
    model = write_tiny_gpt2(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": code_document(i)}) + "\n"
                              for i in range(200)))
    assert main(["--config", BASE, f"output.dir={tmp_path}", "output.name=run",
                 "data.source=transformer_lens", f"data.model={model}",
                 f"data.dataset={corpus}", "data.context_size=16", "data.buffer_size=256",
                 "data.batch_size=32", "data.lm_batch_size=8", "data.normalize_rows=64",
                 "eval.rows=256", "eval.loss_recovered.contexts=4", "eval.every_n_steps=10",
                 "trainer.max_steps=10", "log.every_n_steps=5", "sae.d_sae=64",
                 "log.histogram_every_n_steps=10", "checkpoint.every_n_steps=10",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                 "eval.probes.enabled=true", "eval.probes.rows=600"]) == 0
    written = metrics(tmp_path, "run")
    for task in ("file_operator", "all_operator", "all_name", "all_number", "all_comment"):
        assert 0.5 <= written[f"probe/{task}/acc_all"] <= 1
        assert 0.5 <= written[f"probe/{task}/acc_raw_top5"] <= 1
        assert written[f"probe/{task}/latents_firing"] >= 1
