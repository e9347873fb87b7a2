"""Labels of an LM's tokens on Python source, from Python's own `tokenize`, for the linear
probes of gsae_pl/eval/probes.py (docs/method.md sec. 6).

Each character of a document gets the category of the Python token it lies in: `string`
(string literals and docstrings), `comment`, `keyword` (`keyword.iskeyword`), `name` (any
other identifier), `number`, `operator`; characters outside such tokens (whitespace,
newlines, indentation) get none. An LM token, a span of characters (the tokenizer's offsets
mapping), then takes
- the one category its characters have, whitespace aside (`" return"` is a keyword);
- OTHER when none of them has one (a run of spaces, a newline): a negative of every task;
- AMBIGUOUS when they have several (`"):"` is an operator, but `'("'` spans an operator and
  a string): decision, left out of every task, since a label must be the token's own.
A document that is not valid Python (tokenize fails) gives no tokens.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from collections.abc import Callable

import torch
from torch import Tensor

CATEGORIES = ("string", "comment", "keyword", "name", "number", "operator")
OTHER, AMBIGUOUS = len(CATEGORIES), -1
NARROW_MIN_TOKENS = 10  # of each category in the narrow slice's file: a probe task's minimum
_BY_TYPE = {tokenize.STRING: "string", tokenize.COMMENT: "comment",
            tokenize.NUMBER: "number", tokenize.OP: "operator"}
# Python 3.12 splits f-strings into pieces: each is still inside a string.
_BY_TYPE.update({getattr(tokenize, t): "string" for t in
                 ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, t)})


def _category(token: tokenize.TokenInfo) -> int | None:
    if token.type == tokenize.NAME:
        return CATEGORIES.index("keyword" if keyword.iskeyword(token.string) else "name")
    name = _BY_TYPE.get(token.type)
    return None if name is None else CATEGORIES.index(name)


def char_categories(text: str) -> list[int] | None:
    """Per character, the index in CATEGORIES of the Python token holding it, or -1 (none);
    None when `text` is not valid Python."""
    # tokenize's rows are the lines readline gives (split at "\n" only), columns in chars.
    line_start = [0] + [m.end() for m in re.finditer("\n", text)]
    labels = [-1] * len(text)
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            category = _category(token)
            if category is not None:
                start = line_start[token.start[0] - 1] + token.start[1]
                end = line_start[token.end[0] - 1] + token.end[1]
                labels[start:end] = [category] * (end - start)
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return None
    return labels


def token_labels(chars: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    """Per LM token (its [start, end) character span), its category, OTHER or AMBIGUOUS."""
    out = []
    for start, end in offsets:
        found = set(chars[start:end]) - {-1}
        out.append(OTHER if not found else found.pop() if len(found) == 1 else AMBIGUOUS)
    return out


def labelled_windows(texts: list[str], tokenizer, bos_id: int, context_size: int,
                     n_tokens: int) -> tuple[Tensor, Tensor] | None:
    """Windows [n, context_size] of BOS then tokens of one document (padded with BOS) and
    each position's label [n, context_size] (AMBIGUOUS for BOS and padding), about
    `n_tokens` tokens in all, an equal share from the middle of each document that is
    valid Python. None when there are none (no text, not Python, a slow tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):  # only fast tokenizers give offsets
        return None
    body = context_size - 1
    share = -(-n_tokens // max(1, len(texts)))
    windows, labels = [], []
    for text in texts:
        chars = char_categories(text)
        if chars is None:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, found = enc["input_ids"], token_labels(chars, enc["offset_mapping"])
        first = max(0, (len(ids) - share) // 2)  # the middle: not only licence headers
        for at in range(first, min(len(ids), first + share), body):
            stop = min(at + body, first + share, len(ids))
            pad = body - (stop - at)
            windows.append([bos_id, *ids[at:stop], *[bos_id] * pad])
            labels.append([AMBIGUOUS, *found[at:stop], *[AMBIGUOUS] * pad])
    if not windows:
        return None
    return torch.tensor(windows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def narrow_document(texts: list[str], tokenizer, n_tokens: int) -> list[str]:
    """[the first document whose `labelled_windows` give every category at least
    NARROW_MIN_TOKENS tokens], else [the longest valid-Python one] ([] for none). Not
    simply the longest: in the standard library that is pydoc_data/topics.py, one dict of
    strings, and a codec's table holds little but strings and comments."""
    longest = None
    for text in texts:
        made = labelled_windows([text], tokenizer, 0, n_tokens + 1, n_tokens)
        if made is None:
            continue
        counts = torch.bincount(made[1][made[1] >= 0], minlength=OTHER + 1)
        if (counts[:OTHER] >= NARROW_MIN_TOKENS).all():
            return [text]
        longest = text if longest is None or len(text) > len(longest) else longest
    return [] if longest is None else [longest]


def code_probe_sets(texts: list[str], tokenizer, bos_id: int, context_size: int,
                    n_tokens: int, activations: Callable[[Tensor], Tensor]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """`<slice>_<category>` -> (activations [n, d_in] of the labelled tokens, whether each is
    of the category [n]). Slices: `file`, one document (a narrow set: `narrow_document`),
    and `all`, an equal share of every document (a broad one); `n_tokens` tokens each.
    `activations` maps windows [B, T] to [B, T, d_in]."""
    slices = {"file": narrow_document(texts, tokenizer, n_tokens), "all": texts}
    sets = {}
    for name, docs in slices.items():
        made = labelled_windows(docs, tokenizer, bos_id, context_size, n_tokens)
        if made is None:
            continue
        windows, labels = made
        keep = labels != AMBIGUOUS
        rows, kept = activations(windows)[keep].cpu(), labels[keep]
        for index, category in enumerate(CATEGORIES):
            sets[f"{name}_{category}"] = (rows, kept == index)
    return sets
