"""Text for language-model sources: documents from `datasets`, packed into BOS windows.

`data.dataset` is a hub name (streamed, never downloaded whole) or a local .txt / .jsonl /
.parquet file or a folder of them. Documents are tokenized (or taken as they are, when
`data.column` already holds token ids), joined with a separator token, and cut into
windows of `context_size` tokens that each start with BOS, the TransformerLens
`tokenize_and_concatenate` convention (`pack_windows`, which the tiny LM's own training
windows use too: data/tiny_lm.py).

Held-out text (docs/method.md: evaluate on held-out tokens) is either a dataset of its own
(`data.source=tiny_lm` on its own corpus: the files the tiny LM never trained on, so loss
recovered is not measured on the LM's training text) or, for any other dataset, the
first documents of the stream: just enough of them to fill the held-out windows, the same
on every process, and training reads the rest. Under DDP each process reads a disjoint
shard of the training documents (`split_dataset_by_node`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from gsae_pl.errors import UserError

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_DOCS_PER_TOKENIZER_CALL = 64  # batched fast-tokenizer calls, a few documents at a time


def open_dataset(name: str, split: str):
    """A streaming `datasets.IterableDataset` over local files or a hub dataset."""
    import datasets

    path = Path(name).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() \
            else [path]
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise UserError(f"data.dataset={name}: expected .txt, .jsonl or .parquet files "
                            "of one kind (a file, or a folder of them)")
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files],
                                     split="train", streaming=True)
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, unknown name, gated repo: each its own type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot open data.dataset={name} (split {split}): not a local file "
                        f"and the hub did not answer ({reason}); offline, use "
                        "data.source=tiny_lm or a local .txt/.jsonl/.parquet file") from None


class TextWindows:
    """Token windows [context_size] with BOS first, from one dataset column."""

    def __init__(self, dataset, column: str, tokenizer, context_size: int, name: str,
                 heldout_dataset=None):
        self.dataset, self.column, self.tokenizer = dataset, column, tokenizer
        self.heldout_dataset = heldout_dataset  # None: held-out text is the stream's front
        self.context_size, self.name = int(context_size), name
        self.bos_id = tokenizer.bos_token_id
        if self.bos_id is None:
            raise UserError(f"the tokenizer of data.model has no BOS token; windows of "
                            f"{name} need one to start with")
        eos = tokenizer.eos_token_id
        self.separator = self.bos_id if eos is None else eos  # between packed documents

    def heldout(self, n_windows: int) -> tuple[Tensor, int]:
        """The first `n_windows` held-out windows [n, T] and the number of documents of
        the training dataset they used up (0 when the held-out text is its own dataset)."""
        separate = self.heldout_dataset is not None
        used, windows = 0, []
        stream = self._token_lists(iter(self.heldout_dataset if separate else self.dataset))
        for used, window in self._pack(stream):
            windows.append(window)
            if len(windows) == n_windows:
                return torch.stack(windows), 0 if separate else used
        what = "its held-out text" if separate else f"data.dataset={self.name}"
        raise UserError(f"{what} is too short: it gives {len(windows)} windows of "
                        f"{self.context_size} tokens, and {n_windows} are needed as held-out "
                        "text alone: use more text, or lower eval.rows / "
                        "eval.loss_recovered.contexts / data.context_size")

    def evaluation_windows(self, n_windows: int) -> tuple[Tensor, Tensor]:
        """`n_windows` held-out windows [n, T] for loss recovered and, per window, the
        document its last token comes from [n] (the standard errors' unit, lm_eval.py).
        From a held-out dataset of its own the windows are spread evenly over all of it, so
        every held-out file counts, not only the first few (the tiny LM's first 256 windows
        gave CE 2.64 against 3.59 over all its held-out files); otherwise they are the
        stream's front, inside the documents `heldout` keeps from training."""
        separate = self.heldout_dataset is not None
        pairs = self._pack(self._token_lists(iter(self.heldout_dataset if separate
                                                  else self.dataset)))
        pairs = list(pairs if separate else itertools.islice(pairs, n_windows))
        if len(pairs) < n_windows:
            what = "its held-out text" if separate else f"data.dataset={self.name}"
            raise UserError(f"{what} gives {len(pairs)} windows of {self.context_size} tokens, "
                            f"fewer than eval.loss_recovered.contexts={n_windows}: lower "
                            "eval.loss_recovered.contexts")
        picked = [pairs[i * len(pairs) // n_windows] for i in range(n_windows)]
        return (torch.stack([window for _, window in picked]),
                torch.tensor([docs - 1 for docs, _ in picked], dtype=torch.long))

    def heldout_texts(self, n_docs: int) -> list[str]:
        """The held-out documents' text: all of a held-out dataset of its own, else the
        stream's first `n_docs` (those `heldout` kept from training); [] when the column
        holds token ids."""
        separate = self.heldout_dataset is not None
        docs = iter(self.heldout_dataset) if separate else itertools.islice(self.dataset,
                                                                             n_docs)
        return [text for row in docs if isinstance(text := row.get(self.column), str)]

    def train(self, skip_docs: int, rank: int, world: int) -> Iterator[Tensor]:
        """Endless windows of this process's shard of the documents after the held-out
        ones; the shard is read again from its start when it runs out (a new epoch)."""
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(self.dataset.skip(skip_docs), rank=rank, world_size=world)
        while True:
            count = 0
            for _, window in self._pack(self._token_lists(iter(shard))):
                count += 1
                yield window
            if count == 0:
                raise UserError(f"data.dataset={self.name} has no text left to train on after "
                                f"the held-out windows (process {rank} of {world}): use more "
                                "text or lower eval.rows / eval.loss_recovered.contexts")

    def _token_lists(self, docs: Iterator[dict]) -> Iterator[list[int]]:
        while batch := list(itertools.islice(docs, _DOCS_PER_TOKENIZER_CALL)):
            if self.column not in batch[0]:
                raise UserError(f"data.dataset={self.name} has no column {self.column!r} "
                                f"(columns: {', '.join(batch[0])}): set data.column")
            values = [row[self.column] for row in batch]
            if isinstance(values[0], str):
                yield from self.tokenizer(values, add_special_tokens=False)["input_ids"]
            else:  # already tokenized
                yield from ([int(t) for t in ids] for ids in values)

    def _pack(self, token_lists: Iterator[list[int]]) -> Iterator[tuple[int, Tensor]]:
        return pack_windows(token_lists, self.context_size, self.bos_id, self.separator)


def pack_windows(token_lists: Iterable[list[int]], context_size: int, bos_id: int,
                 separator: int) -> Iterator[tuple[int, Tensor]]:
    """(documents consumed so far, window) pairs: the documents joined, each followed by
    `separator`, and cut into [context_size] windows of BOS then context_size - 1 tokens of
    the joined stream. The tail of a stream, short of a window, is dropped."""
    body, pending, docs = context_size - 1, [], 0
    for ids in token_lists:
        docs += 1
        pending.extend(ids)
        pending.append(separator)
        n_windows = len(pending) // body
        for i in range(n_windows):
            yield docs, torch.tensor([bos_id, *pending[i * body:(i + 1) * body]],
                                     dtype=torch.long)
        del pending[:n_windows * body]  # once per document: linear in a long document
