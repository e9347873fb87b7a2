"""The embedded default model: a tiny GPT-2 trained offline on the Python standard library.

`data.source=tiny_lm` needs no network: on first use gsae_pl trains a byte-level BPE
tokenizer (`tokenizers`) and a small GPT-2 (`transformers`) on the source files (code and
docstrings) every Python install carries, then saves both as a Hugging Face model
directory, which `TransformerBridge.boot_transformers` loads exactly like a hub model.

The directory lives under the user cache (`$GSAE_PL_CACHE`, default ~/.cache/gsae_pl),
keyed by the recipe and the Python version (the corpus is that version's stdlib), and
appears whole or not at all (built in a temporary directory, then renamed). The build is
deterministic on a given machine: fixed seeds, sorted files, fixed batch order.

Sizing (decision): 2 layers, d_model 64, d_mlp 256, context 128, vocabulary 2048. The
default SAE site is layer 0's MLP neurons (`blocks.0.mlp.hook_post`, d_in 256), the
paper's GELU-1L site in miniature (docs/method.md sec. 3), and small enough that the next
issue's ablation suite of short SAE runs fits on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch

from gsae_pl.cache_root import cache_root
from gsae_pl.data.text import pack_windows
from gsae_pl.io import atomic_write_json, sweep_stale_temporaries
from gsae_pl.progress_lines import ProgressLines, phase

BOS = "<|endoftext|>"  # GPT-2's one special token: BOS, EOS and the document separator
CORPUS = "corpus.jsonl"  # the files the LM trained on: the SAE's training text
HELDOUT = "heldout.jsonl"  # the files it held out: the SAE's held-out text and loss recovered
# What a model directory holds, in its key: a directory made before a change is never read
# as one made after it (2: the held-out files moved out of corpus.jsonl into heldout.jsonl).
LAYOUT = 2


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = 2048
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_ctx: int = 128
    steps: int = 800  # ~4 min on 2 busy cores, ~2 idle (benchmarks/RESULTS.md)
    batch_size: int = 32  # contexts per step
    lr: float = 3e-3
    seed: int = 0
    max_corpus_chars: int = 8_000_000  # keeps tokenizer training and encoding fast
    heldout_fraction: float = 0.05  # files held out to report the LM's CE


def model_dir(recipe: Recipe = Recipe()) -> Path:
    key = json.dumps([dataclasses.asdict(recipe), sys.version_info[:2], LAYOUT],
                     sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return cache_root() / "tiny_lm" / f"gpt2-{recipe.n_layer}l{recipe.d_model}d-{digest}"


def ensure_tiny_lm(recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """The model directory, built first if this machine has none yet."""
    target = model_dir(recipe)
    if (target / "tiny_lm.json").is_file():
        return target
    if target.parent.is_dir():
        sweep_stale_temporaries(target.parent)  # a killed build's folder, if any
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the tiny LM (first use only) into {target}", file=sys.stderr)
    build(tmp, recipe, progress)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def stdlib_documents(max_chars: int) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's own .py files, sorted, tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append((str(rel), text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def _split(docs, fraction: float, seed: int):
    """Held-out files chosen by a hash of the path: stable, independent of file order."""
    def held(rel: str) -> bool:
        h = hashlib.blake2b(f"{seed}/{rel}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") / 2**32 < fraction
    heldout = {r for r, _ in docs if held(r)} or {docs[-1][0]}  # never none (tiny corpora)
    return [t for r, t in docs if r not in heldout], [t for r, t in docs if r in heldout]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=BOS, model_max_length=10**9)


def new_model(vocab_size: int, recipe: Recipe, bos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=recipe.n_ctx, n_embd=recipe.d_model,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=bos_id,
                        eos_token_id=bos_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def pack(token_lists: list[list[int]], n_ctx: int, bos_id: int) -> torch.Tensor:
    """Documents joined by BOS, cut into [n, n_ctx] windows that each start with BOS: the
    packing of the SAE's text (data/text.py), BOS also separating documents as GPT-2's."""
    windows = [window for _, window in pack_windows(token_lists, n_ctx, bos_id, bos_id)]
    return torch.stack(windows) if windows else torch.empty(0, n_ctx, dtype=torch.long)


def build(out: Path, recipe: Recipe, progress: bool = True) -> dict:
    """Train tokenizer and model, save both and the corpus to `out`; return the report."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a `loss_type` notice per model: noise for a user
    threads = torch.get_num_threads()
    # One thread, always: a matmul's float sums depend on how it is split across threads,
    # so a build whose thread count followed the machine's load gave other weights (held-out
    # CE 3.5896508 vs 3.5896472 for the same recipe), and every number downstream moved.
    # One thread is also the fast choice on a busy machine (2 threads measured 4x slower
    # than 1 while another process held a core).
    torch.set_num_threads(1)
    try:
        return _build(out, recipe, progress, start)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, recipe: Recipe, progress: bool, start: float) -> dict:
    # Each phase speaks when it runs longer than a few seconds (gsae_pl/progress_lines.py):
    # the whole build took 100-311 s on 2 busy cores, most of it training.
    with phase("tiny LM: reading the standard library's sources"):
        docs = stdlib_documents(recipe.max_corpus_chars)
    train_docs, heldout_docs = _split(docs, recipe.heldout_fraction, recipe.seed)
    with phase(f"tiny LM: training its {recipe.vocab_size}-token BPE tokenizer"):
        tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    bos = tokenizer.bos_token_id
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    with phase("tiny LM: tokenizing its corpus"):
        train = pack(encode(train_docs), recipe.n_ctx, bos)
        heldout = pack(encode(heldout_docs), recipe.n_ctx, bos)
    model = new_model(len(tokenizer), recipe, bos)
    train_model(model, train, recipe, progress)
    with phase("tiny LM: held-out cross-entropy"):
        heldout_ce = evaluate_ce(model, heldout)
    report = {"heldout_ce": heldout_ce, "unigram_entropy":
              unigram_entropy(heldout), "train_tokens_seen": recipe.steps * recipe.batch_size
              * recipe.n_ctx, "heldout_tokens": heldout.numel(),
              "build_seconds": round(time.perf_counter() - start, 1),
              "recipe": dataclasses.asdict(recipe), "python": sys.version.split()[0]}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_corpus(out, train_docs, heldout_docs, recipe.seed)
    atomic_write_json(out / "tiny_lm.json", report)  # last: its presence means "complete"
    print(f"tiny LM: held-out CE {report['heldout_ce']:.3f} nats/token vs unigram entropy "
          f"{report['unigram_entropy']:.3f}; built in {report['build_seconds']} s",
          file=sys.stderr)
    return report


def write_corpus(out: Path, train_docs: list[str], heldout_docs: list[str], seed: int):
    """The SAE's default text, kept apart as the LM's was: it trains on the LM's training
    files (CORPUS) and is evaluated on the files the LM held out (HELDOUT), so loss
    recovered is measured on text the LM never saw. Each in a fixed shuffled order, so the
    held-out windows, the first of HELDOUT, are not all from one corner of the library."""
    for name, docs in ((CORPUS, list(train_docs)), (HELDOUT, list(heldout_docs))):
        random.Random(seed).shuffle(docs)
        with open(out / name, "w") as fh:
            for text in docs:
                fh.write(json.dumps({"text": text}) + "\n")


def train_model(model, tokens: torch.Tensor, recipe: Recipe, progress: bool) -> None:
    """AdamW with a linear warm-up and cosine decay; batches in a seeded order."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    warmup = max(1, recipe.steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s
                                                                          / recipe.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(recipe.seed)
    order = torch.randint(0, len(tokens), (recipe.steps, recipe.batch_size), generator=gen)
    lines = ProgressLines("tiny LM: training", total=recipe.steps, unit="steps",
                          speak=None if progress else False)
    for idx in order:
        loss = model(tokens[idx], labels=tokens[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lines.update(1)
    lines.close()
    model.eval()


@torch.no_grad()
def evaluate_ce(model, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the windows, BOS targets included."""
    model.eval()
    total, count = 0.0, 0
    for chunk in tokens.split(batch_size):
        n = chunk[:, 1:].numel()
        total += float(model(chunk, labels=chunk).loss) * n
        count += n
    return total / count


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the token frequencies: the CE of the best context-free model."""
    counts = torch.tensor(list(Counter(tokens[:, 1:].flatten().tolist()).values()),
                          dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def main(argv: list[str] | None = None) -> int:
    """`python -m gsae_pl.data.tiny_lm`: build (if needed) and print the model directory."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m gsae_pl.data.tiny_lm",
        description="Build the embedded tiny LM (first use only; a few minutes on 2 cores) "
                    "into $GSAE_PL_CACHE/tiny_lm and print its folder and build report.")
    parser.parse_args(argv)
    path = ensure_tiny_lm()
    print(path)
    print((path / "tiny_lm.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
