"""`python -m gsae_pl.inspect`: the one-pass top-k is the brute-force top-k, density by
hand, promoted tokens are W_dec row @ W_U's top tokens, the page is one escaped static file
with the token highlighted, the TensorBoard texts, and bad input is one line, exit 2."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from gsae_pl.fit import main as fit
from gsae_pl.inspect import load_sae, main, read_finished_run
from gsae_pl.inspect_html import Context, Inspection, Latent, markdown, page, visible
from gsae_pl.inspect_latents import (
    RunningTopK,
    most_active,
    promoted_tokens,
    residual_directions,
    scan,
)
from gsae_pl.run.datamodule import build_source
from gsae_pl.run.run_dir import remove_run_outputs
from tests.data.lm_fixtures import write_text, write_tiny_gpt2
from tests.tiny_run import ROOT, args

# ---- the running top-k and the density, on codes made up here -------------------------


def test_running_top_k_equals_brute_force_top_k_over_uneven_batches():
    torch.manual_seed(0)
    f = torch.relu(torch.randn(1000, 50) - 1.0)  # sparse, continuous: no ties but zeros
    best = scan(lambda x: x, iter(f.split(137)), k=7, d_sae=50)  # the last batch is short
    values, rows = f.topk(7, dim=0)
    for latent in range(50):
        fired = values[:, latent] > 0
        want = list(zip(values[fired, latent].tolist(), rows[fired, latent].tolist()))
        assert best.top(latent) == want


def test_density_and_top_rows_by_hand():
    best = RunningTopK(k=2, d_sae=3)
    best.update(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))
    best.update(torch.tensor([[3.0, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    # latent 0 fires on rows 1 and 2 of 4, latent 1 on rows 0 and 2, latent 2 on none
    assert best.density().tolist() == [0.5, 0.5, 0.0]
    assert best.top(0) == [(3.0, 2), (1.0, 1)]
    assert best.top(1) == [(2.0, 0), (0.5, 2)]
    assert best.top(2) == []  # never fired: no contexts, not k rows of zeros
    assert most_active(torch.tensor([0.1, 0.5, 0.5, 0.0]), 3) == [1, 2, 0]


# ---- the page and the texts ------------------------------------------------------------

HOSTILE = '<script>alert("x")</script>'


def _view(tokens) -> Inspection:
    context = Context(2.5, "window 0, token 1", tokens, focus=1)
    latent = Latent(7, 0.25, 4, [context], promoted=[(HOSTILE, 0.5), (" cat", 0.25)])
    return Inspection(run=f"run{HOSTILE}", step=10, facts=[("data", HOSTILE)], rows=16,
                      chosen="Latents 7", latents=[latent], promoted_note="W_dec row @ W_U")


def test_the_page_is_one_static_file_escaping_text_and_highlighting_the_token():
    text = page(_view(["the", f" {HOSTILE}", "\n|x"]))
    assert "<script" not in text and html.escape(HOSTILE) in text
    # nothing fetched or run: no script, link, image, frame or URL
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b|src=|url\(|https?:",
                         text, re.I)
    assert f'<mark class="tok"> {html.escape(HOSTILE)}</mark>' in text
    assert text.count("<mark") == 1
    assert '<span class="tok">\u21b5|x</span>' in text  # the newline made visible


def test_the_tensorboard_text_escapes_markdown_and_bolds_the_token():
    text = markdown(_view(["a|b", " cat", "<b>"]).latents[0], _view([]))
    assert "<script" not in text and "<b>" not in text and "&lt;b&gt;" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.count(" | ") == 3  # a token's | does not split the table's row
    assert r"a\|b **cat**" in row


# ---- a real run, in a real process -----------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    assert fit(args(out, "run")) == 0
    return out / "run"


def _events_texts(run: Path) -> dict[str, str]:
    (events,) = run.glob("events.out.tfevents.*.inspect")
    return {v.tag.removesuffix("/text_summary"): v.tensor.string_val[0].decode()
            for e in EventFileLoader(str(events)).Load() for v in e.summary.value}


def test_inspect_a_synthetic_run(synthetic_run):
    assert main([str(synthetic_run), "--n", "5", "--k", "3"]) == 0
    text = (synthetic_run / "inspect/latents.html").read_text()
    # the page's top rows are the brute-force top rows of the SAE's codes on eval.rows
    cfg, weights, _ = read_finished_run(synthetic_run)
    sae, scale = load_sae(cfg, weights)
    with torch.no_grad():
        f = sae.encode(build_source(cfg).eval_rows(cfg.eval.rows) * scale).f
    density = (f > 0).double().mean(0)
    latents = [int(m) for m in re.findall(r'<section id="latent-(\d+)"', text)]
    assert latents == most_active(density, 5)
    for latent in latents:
        values, rows = f[:, latent].topk(3)
        section = text.split(f'<section id="latent-{latent}">')[1].split("</section>")[0]
        assert re.findall(r"held-out row (\d+)", section) == [str(r) for r in rows.tolist()]
        assert f"({int((f[:, latent] > 0).sum()):,} of {cfg.eval.rows:,})" in section
    texts = _events_texts(synthetic_run)
    assert sorted(texts) == ["inspect/00_about"] + [f"inspect/{r:02d}_latent_{i}"
                                                    for r, i in enumerate(latents, 1)]
    # a second look replaces the page and the texts whole: one event file of them
    assert main([str(synthetic_run), "--latents", "3,1"]) == 0
    assert sorted(_events_texts(synthetic_run)) == ["inspect/00_about", "inspect/01_latent_3",
                                                    "inspect/02_latent_1"]
    assert "latent-5" not in (synthetic_run / "inspect/latents.html").read_text()


def test_fit_force_removes_the_page_of_the_sae_it_replaces(synthetic_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    assert main([str(run), "--n", "2"]) == 0
    remove_run_outputs(run)  # what fit --force deletes first
    assert not (run / "inspect").exists() and not list(run.glob("*.inspect"))


@pytest.mark.parametrize("argv,needle", [
    (["--n", "0"], "--n 0: the number of latents must be at least 1"),
    (["--k", "-1"], "--k -1: the number of top activations must be at least 1"),
    (["--latents", "3,x"], "give most-active, or latent indices"),
    (["--latents", "3,32"], "latent 32 is out of range"),
    (["--latents", "-1"], "latent -1 is out of range"),
])
def test_bad_arguments_are_one_line_exit_2_nothing_written(synthetic_run, tmp_path, capsys,
                                                           argv, needle):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run, ignore=shutil.ignore_patterns("inspect", "*.inspect"))
    assert main([str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (run / "inspect").exists() and not list(run.glob("*.inspect"))


def test_what_is_not_a_finished_run_is_refused(synthetic_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(synthetic_run, unfinished)
    (unfinished / "metrics.json").unlink()
    for run, needle in [(tmp_path / "missing", "not found"),
                        (tmp_path / "empty", "is not a run folder"),
                        (unfinished, "has not finished (no metrics.json)")]:
        assert main([str(run)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


@pytest.mark.slow
def test_as_a_process(synthetic_run, tmp_path):
    def inspect(run, *argv):
        return subprocess.run([sys.executable, "-m", "gsae_pl.inspect", str(run), *argv],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    proc = inspect(run, "--n", "2")
    assert proc.returncode == 0 and (run / "inspect/latents.html").is_file(), proc.stderr
    assert f"wrote {run / 'inspect/latents.html'} (2 latents)" in proc.stdout
    (run / "metrics.json").unlink()
    proc = inspect(run)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "has not finished" in proc.stderr


# ---- a language-model run --------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_lm")
    model, corpus = write_tiny_gpt2(root / "model"), write_text(root / "corpus", n_docs=300)
    assert fit(["--config", str(ROOT / "configs/base.yaml"), "data.source=transformer_lens",
                f"data.model={model}", f"data.dataset={corpus}", "data.context_size=16",
                "data.buffer_size=256", "data.batch_size=32", "data.lm_batch_size=8",
                "data.normalize_rows=64", "eval.rows=64", "eval.loss_recovered.contexts=4",
                "eval.every_n_steps=10", "trainer.max_steps=10", "log.every_n_steps=5",
                "checkpoint.every_n_steps=10", "sae.d_sae=64", "resample.enabled=false",
                "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                f"output.dir={root}", "output.name=run"]) == 0
    return root / "run"


@pytest.mark.slow
def test_inspect_an_lm_run_decodes_highlights_and_promotes(lm_run):
    assert main([str(lm_run), "--latents", "5,9", "--k", "4"]) == 0
    text = (lm_run / "inspect/latents.html").read_text()
    cfg, weights, _ = read_finished_run(lm_run)
    sae, scale = load_sae(cfg, weights)
    lm = build_source(cfg).lm
    tokenizer = lm.bridge.tokenizer

    def as_text(token):  # a byte-level piece that is no whole character: its token name
        text = tokenizer.decode([token])
        return tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text

    # promoted tokens: the raw-unit decoder row through the MLP's W_out, then W_U
    direction = weights["sae.W_dec"][[5, 9]] / scale
    logits = direction @ lm.bridge.blocks[0].mlp.W_out.detach() @ lm.bridge.W_U.detach()
    for latent, row in zip((5, 9), logits):
        section = text.split(f'<section id="latent-{latent}">')[1].split("</section>")[0]
        shown = re.findall(r'<tr><td><span class="tok">(.*?)</span></td>'
                           r'<td class="num">([-+][\d.e-]+)</td></tr>', section)
        want = row.topk(10)
        assert [float(v) for _, v in shown] == pytest.approx(want.values.tolist(), rel=1e-3)
        assert [html.unescape(t) for t, _ in shown] == [visible(as_text(t))
                                                       for t in want.indices.tolist()]
        # each top context highlights one token: the one at the row's position
        marks = re.findall(r'<mark class="tok">(.*?)</mark>', section)
        places = re.findall(r"window (\d+), token (\d+)", section)
        assert len(marks) == len(places) > 0
        for mark, (window, position) in zip(marks, places):
            token = int(lm.heldout[int(window)][int(position)])
            assert html.unescape(mark) == visible(as_text(token))
    assert "&lt;|endoftext|&gt;" in text and "<|endoftext|>" not in text


def test_promoted_tokens_are_the_decoder_row_through_the_unembedding(tmp_path):
    from gsae_pl.data.transformer_lens import load_lm

    bridge = load_lm(str(write_tiny_gpt2(tmp_path / "model")))
    torch.manual_seed(0)
    rows = torch.randn(3, bridge.cfg.d_model)
    values, ids = promoted_tokens(residual_directions(bridge, "blocks.1.hook_resid_post",
                                                      rows), bridge.W_U, 10)
    want = (rows.double() @ bridge.W_U.detach().double()).topk(10, dim=1)
    assert torch.equal(ids, want.indices) and torch.allclose(values, want.values)
    neurons = torch.randn(3, bridge.blocks[0].mlp.W_out.shape[0])
    through = residual_directions(bridge, "blocks.0.mlp.hook_post", neurons)
    assert torch.allclose(through, neurons @ bridge.blocks[0].mlp.W_out.detach())
    assert residual_directions(bridge, "blocks.0.attn.hook_z", rows) is None
