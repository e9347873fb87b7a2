"""The LM source: hook capture, stop-at-layer, BOS exclusion, disjoint DDP shards, bad input.

A tiny random GPT-2 and text written here (tests/data/lm_fixtures.py): no downloads.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from gsae_pl.data.base import train_stream
from gsae_pl.data.buffer import shuffled_batches
from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.errors import UserError
from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return write_tiny_gpt2(root / "model"), write_text(root / "corpus")


@pytest.fixture(scope="module")
def source(lm_files):
    return build_lm_source(lm_cfg(*lm_files))


def _hf_model(source):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(source.model_name).eval()


def test_hook_capture_matches_a_manual_forward(source, lm_files):
    tokens = source.heldout[:3]
    hf = _hf_model(source)
    captured = []
    handle = hf.transformer.h[0].mlp.act.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    handle.remove()
    torch.testing.assert_close(source.activations(tokens), captured[0])
    resid = build_lm_source(lm_cfg(*lm_files, "data.hook=blocks.0.hook_resid_post"))
    torch.testing.assert_close(resid.activations(tokens), hidden[1])  # after block 0


def test_stopping_at_the_hook_equals_the_full_forward_and_skips_later_blocks(source):
    tokens = source.heldout[:2]
    with torch.no_grad():
        _, cache = source.bridge.run_with_cache(tokens, names_filter=source.hook)
    later = []
    source.bridge.hook_dict["blocks.1.hook_in"].add_hook(lambda act, hook: later.append(1))
    try:
        stopped = source.activations(tokens)
        assert later == []  # nothing after the site ran
        with torch.no_grad():
            source.bridge(tokens)
        assert later  # while a full forward does reach block 1
    finally:
        source.bridge.reset_hooks()
    torch.testing.assert_close(stopped, cache[source.hook])


def test_bos_positions_are_left_out_by_default(source, lm_files):
    tokens = source.heldout[:4].clone()
    tokens[1, 5] = source.bos_id  # a BOS inside a window (a document boundary)
    rows = source.rows(tokens)
    act = source.activations(tokens)
    keep = tokens != source.bos_id
    assert not keep[:, 0].any() and rows.shape[0] == int(keep.sum())
    torch.testing.assert_close(rows, act[keep])
    everything = build_lm_source(lm_cfg(*lm_files, "data.exclude_bos=false"))
    assert everything.rows(tokens).shape[0] == tokens.numel()


def test_train_batches_split_the_global_batch_and_are_finite(source):
    batches = train_stream(source, 32, 1, 2)
    first = next(batches)
    assert first.shape == (16, source.d_in) and torch.isfinite(first).all()
    assert source.eval_rows(64).shape == (64, source.d_in)


def test_ddp_processes_read_disjoint_documents(tmp_path, lm_files):
    # Pre-tokenized documents, each made of its own token id: a window names its documents.
    docs = [{"tokens": [10 + i] * 7} for i in range(60)]
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    src = build_lm_source(lm_cfg(lm_files[0], path, "data.column=tokens", "eval.rows=16",
                                 "eval.loss_recovered.contexts=2"))
    seen = []
    for part in [src.heldout] + [_one_epoch(src, rank) for rank in range(2)]:
        seen.append(set(part.flatten().tolist()) - {src.bos_id, src.text.separator})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(seen[1] | seen[2]) > 40  # between them the processes read the rest


def _one_epoch(src, rank):
    from datasets.distributed import split_dataset_by_node

    shard = split_dataset_by_node(src.text.dataset.skip(src.heldout_docs), rank, 2)
    return torch.stack([w for _, w in src.text._pack(src.text._token_lists(iter(shard)))])


def _numbered_chunks(row: int):
    """Chunks of 10 rows, chunk i filled with i, from global row `row` (a multiple of 10)."""
    return (torch.full((10, 1), float(i)) for i in range(row // 10, 40))


def _generator_of(block):
    return torch.Generator().manual_seed(block)


def test_shuffle_buffer_keeps_every_row_and_mixes_chunks():
    batches = list(shuffled_batches(_numbered_chunks, capacity=100, batch_size=10,
                                    generator_of=_generator_of))
    counts = Counter(torch.cat(batches).flatten().tolist())
    assert max(counts.values()) <= 10  # no row twice: each chunk held 10 copies of its id
    assert sum(counts.values()) >= 400 - 100  # at most one buffer's worth is still held
    assert len(set(batches[0].flatten().tolist())) > 3  # one batch mixes many chunks
    for start in (4, 10, 27):  # a restart rebuilds only the block holding its first batch
        again = list(shuffled_batches(_numbered_chunks, 100, 10, _generator_of, start))
        assert all(torch.equal(a, b) for a, b in zip(again, batches[start:], strict=True))


@pytest.mark.parametrize("overrides,needle", [
    (["data.hook=blocks.0.mlp.hook_pots"], "close valid ones: blocks.0.mlp.hook_post"),
    (["data.model=no/such/model/x"], "data.source=tiny_lm"),
    (["data.column=body"], "no column 'body'"),
    (["eval.rows=100000"], "too short"),
])
def test_bad_input_is_one_line(lm_files, overrides, needle):
    with pytest.raises(UserError) as info:
        build_lm_source(lm_cfg(*lm_files, *overrides))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_empty_dataset_and_nan_activations_are_refused(tmp_path, source, lm_files):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="too short"):
        build_lm_source(lm_cfg(lm_files[0], empty))
    tokens = source.heldout[:1]
    original = source.activations
    source.activations = lambda t: original(t) * float("nan")
    try:
        with pytest.raises(UserError, match="NaN or Inf"):
            source.rows(tokens)
    finally:
        del source.activations


def test_legacy_neelnanda_repos_go_through_the_legacy_loader(lm_files, monkeypatch):
    """GELU-1L's path, offline: NeelNanda/* names are booted by TL 4's legacy loader, whose
    bridge (a TL-native model) is stood in for by a random one of the same kind."""
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native import boot as boot_native
    from transformers import AutoTokenizer

    from gsae_pl.eval import lm_eval

    tokenizer = AutoTokenizer.from_pretrained(lm_files[0])
    config = TransformerBridgeConfig(
        d_model=32, n_layers=1, d_mlp=128, d_head=8, n_heads=4, n_ctx=32,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", architecture="TransformerLensNative")
    asked = []

    def fake_legacy(name, device=None, dtype=None):
        asked.append(name)
        return boot_native(config, tokenizer=tokenizer, device=device, dtype=dtype)

    monkeypatch.setattr(TransformerBridge, "boot_tl_legacy", staticmethod(fake_legacy))
    src = build_lm_source(lm_cfg("NeelNanda/GELU_1L_fake", lm_files[1]))
    assert asked == ["NeelNanda/GELU_1L_fake"] and src.d_in == 128
    tokens = src.heldout[:2]
    with torch.no_grad():
        _, cache = src.bridge.run_with_cache(tokens, names_filter=src.hook)
    torch.testing.assert_close(src.activations(tokens), cache[src.hook])
    sums = lm_eval.ce_sums(src, src.heldout_tokens(2), lambda x: x.clone())
    assert lm_eval.loss_recovered(sums)["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_an_unreachable_hub_dataset_names_the_offline_option(lm_files, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFound)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        build_lm_source(lm_cfg(lm_files[0], "someone/corpus"))
    message = str(info.value)
    assert "Couldn't reach" in message and "data.source=tiny_lm" in message
    assert "\n" not in message


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_a_resumed_stream_gives_the_uninterrupted_batches_bit_for_bit(tmp_path, lm_files,
                                                                      rank, world):
    """Batch k is a pure function of (seed, k) and the text: a run resumed at step k reads
    exactly what the uninterrupted run read from step k on (per process under DDP), across
    shuffle-buffer blocks, mid-block, and into the second epoch of the text."""
    text = write_text(tmp_path / "short", n_docs=40)  # ~2200 rows an epoch: 90 batches wrap
    src = build_lm_source(lm_cfg(lm_files[0], text, "data.buffer_size=96"))  # 3 batches/block
    whole = [b for _, b in zip(range(90), train_stream(src, 32, rank, world))]
    for start in (1, 3, 7, 29, 86):
        resumed = train_stream(src, 32, rank, world, start_step=start)
        for k in range(start, min(start + 4, len(whole))):
            assert torch.equal(next(resumed), whole[k]), (start, k)
