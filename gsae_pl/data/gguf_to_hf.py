"""A llama.cpp GGUF file turned into a plain Hugging Face model directory, offline.

`transformers` reads a GGUF (`from_pretrained(dir, gguf_file=name)`), dequantising it to
float32, but the model it gives keeps a GGUF `quantization_config` and refuses
`save_pretrained`. So the weights move into a plain model built from the same config
without it (strict: every key must match), which saves and loads like any other directory
(`TransformerBridge.boot_transformers`). Nothing is downloaded: local files only.

Two tokenizer corrections, each because the GGUF tokenizer `transformers` builds is not the
one the model was trained with:
- `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer; `transformers` knows some names and
  silently falls back to GPT-2's split for the others. `PRE_TOKENIZERS` restores the ones
  we use (SmolLM's: every digit split off before the GPT-2 split, as llama.cpp's `smollm`).
- `document_token`: the token that starts each window and separates documents
  (data/text.py uses the tokenizer's BOS and EOS). An instruct model's GGUF names its chat
  markers there; raw text wants the pretraining document separator.
"""

from __future__ import annotations

import copy
from pathlib import Path


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])


PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def gguf_metadata(path: Path, key: str):
    """One metadata value of a GGUF file (memory-mapped: the tensors are not read)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None else field.contents()


def load_tokenizer(path: Path, document_token: str | None = None):
    """The GGUF's tokenizer, with the corrections above."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                              local_files_only=True)
    pre = gguf_metadata(path, "tokenizer.ggml.pre")
    if pre in PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    if document_token is not None:
        if document_token not in tokenizer.get_vocab():
            raise ValueError(f"{path.name} has no token {document_token!r}")
        tokenizer.bos_token = tokenizer.eos_token = document_token
    return tokenizer


def plain_model(quantised):
    """The same weights in a model without the GGUF quantization_config, which saves."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), strict=True)  # any key left over: an error
    return plain.eval()


def convert(path: Path, out: Path, document_token: str | None = None) -> dict:
    """Write the GGUF at `path` to `out` as a float32 HF model directory; return facts."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from gsae_pl.progress_lines import phase

    path, out = Path(path), Path(out)
    with phase(f"reading the tokenizer of {path.name}"):
        tokenizer = load_tokenizer(path, document_token)
    with phase(f"dequantising {path.name} to float32"):
        quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32,
                                                         local_files_only=True)
        model = plain_model(quantised)
        del quantised
    if document_token is not None:  # the config says the same as the tokenizer
        model.config.bos_token_id = model.config.eos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    with phase(f"saving the converted model into {out}"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return {"gguf": path.name, "gguf_bytes": path.stat().st_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "document_token": tokenizer.bos_token,
            "pre_tokenizer": gguf_metadata(path, "tokenizer.ggml.pre"),
            "transformers": transformers.__version__}
