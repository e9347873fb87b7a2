"""What `python -m gsae_pl.inspect` measures of a trained SAE's latents (gsae_pl/inspect.py).

- Density: the fraction of held-out rows on which a latent fires (f > 0), the rows the
  run's own metrics come from (`eval.rows`; docs/method.md sec. 6).
- Top-k contexts: the k held-out rows with a latent's largest activations, found in ONE
  pass over the rows for every latent at once (`RunningTopK`): each batch's [B, d_sae]
  codes are merged into the running [k, d_sae] best with one `torch.topk` and dropped, so
  16k latents need k x 16k values in memory, never rows x 16k. On an LM source each row is
  a (window, position) of the held-out text (`lm_rows`), which the page decodes.
- Promoted tokens: the output tokens a latent's decoder direction raises most,
  W_dec[i] / norm_scale (raw-activation units) through the unembedding W_U: the direct
  path to the logits of one unit of activation, with no final LayerNorm and no later
  layers (the logit lens Neuronpedia and SAE-Vis show).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from gsae_pl.errors import UserError

ENCODE_ROWS = 512  # rows encoded at a time: each [512, d_sae] intermediate is 32 MB at 16k


class RunningTopK:
    """The k largest activations of every latent seen so far, and the rows they came from,
    plus how many rows each latent fired on."""

    def __init__(self, k: int, d_sae: int):
        self.k = k
        self.values = torch.empty(0, d_sae)
        self.rows = torch.empty(0, d_sae, dtype=torch.int64)
        self.fired = torch.zeros(d_sae, dtype=torch.int64)
        self.n_rows = 0

    def update(self, f: Tensor) -> None:
        """Merge the codes f [B, d_sae] of the next B rows (numbered on from `n_rows`)."""
        f = f.float()
        # codes are >= 0, so sign() is the fired mask: a float sum ran 2x faster than
        # (f > 0).sum(0)'s bool column reduction at [2048, 16384] (exact below 2^24 rows)
        self.fired += f.sign().sum(0).long()
        kept = len(self.values)
        merged = torch.cat([self.values, f])
        top = merged.topk(min(self.k, len(merged)), dim=0)
        # a winner from the running best keeps its row; one from f is row n_rows + its place
        earlier = self.rows.gather(0, top.indices.clamp(max=max(kept - 1, 0))) if kept \
            else torch.zeros_like(top.indices)
        self.rows = torch.where(top.indices < kept, earlier, self.n_rows + top.indices - kept)
        self.values = top.values
        self.n_rows += len(f)

    def density(self) -> Tensor:
        """[d_sae] the fraction of rows each latent fired on."""
        return self.fired.double() / max(self.n_rows, 1)

    def top(self, latent: int) -> list[tuple[float, int]]:
        """(activation, row) of the latent's largest activations, largest first, only those
        where it fired: a latent that fired on 3 rows has 3."""
        order = self.values[:, latent].argsort(descending=True, stable=True)
        return [(float(self.values[i, latent]), int(self.rows[i, latent])) for i in order
                if self.values[i, latent] > 0]


def scan(encode: Callable[[Tensor], Tensor], chunks: Iterator[Tensor], k: int,
         d_sae: int) -> RunningTopK:
    """One pass over the raw row chunks; `encode` maps raw rows [n, d_in] to codes."""
    best = RunningTopK(k, d_sae)
    with torch.no_grad():
        for chunk in chunks:
            for rows in chunk.split(ENCODE_ROWS):
                best.update(encode(rows))
    return best


def most_active(density: Tensor, n: int) -> list[int]:
    """The n latents that fire on the most held-out rows, densest first (lower index on a
    tie)."""
    order = sorted(range(len(density)), key=lambda i: (-float(density[i]), i))
    return order[:n]


# ---- LM sources: rows with their place in the held-out text -----------------------------
def lm_rows(lm, n_rows: int) -> tuple[Iterator[Tensor], Tensor]:
    """The first `n_rows` held-out rows of an LM source (data/transformer_lens.py), as its
    `eval_rows` makes them (same windows, same LM batches, so the same bits), in chunks,
    and each row's (window, position) [n_rows, 2] in `lm.heldout`."""
    windows = lm.heldout
    places = []
    for start in range(0, len(windows), lm.lm_batch_size):
        keep = lm.keep_mask(windows[start:start + lm.lm_batch_size])
        where = keep.nonzero()  # row-major: the order boolean indexing takes the rows in
        where[:, 0] += start
        places.append(where)
    places = torch.cat(places)[:n_rows]
    if len(places) < n_rows:
        raise UserError(f"the held-out text gave {len(places)} rows, fewer than "
                        f"eval.rows={n_rows}")

    def chunks() -> Iterator[Tensor]:
        left = n_rows
        for chunk in lm.row_chunks(iter(windows)):
            yield chunk[:left].cpu()
            left -= len(chunk[:left])
            if left == 0:
                return

    return chunks(), places


# ---- promoted tokens -------------------------------------------------------------------
_MLP_POST = re.compile(r"blocks\.(\d+)\.mlp\.hook_post")
# Sites in the residual stream's basis (d_model wide): the residual stream itself and what
# the attention and MLP layers add to it.
_RESIDUAL = re.compile(r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_(mlp|attn)_out|"
                       r"(mlp|attn)\.hook_out)")


def residual_directions(bridge, hook: str, directions: Tensor) -> Tensor | None:
    """Raw-unit directions [n, d_in] at `hook` as residual-stream directions [n, d_model]:
    as they are at a residual-stream site, through the layer's W_out from an MLP's neurons
    (mlp.hook_post); None at a site with no such linear path (attention's q, k, v, z, an
    MLP's pre-activations, a LayerNorm's output)."""
    match = _MLP_POST.fullmatch(hook)
    if match:
        W_out = bridge.blocks[int(match.group(1))].mlp.W_out  # [d_mlp, d_model]
        return directions @ W_out.detach().float().cpu()
    if _RESIDUAL.fullmatch(hook):
        return directions
    return None


def promoted_tokens(residual: Tensor, W_U: Tensor, n: int = 10) -> tuple[Tensor, Tensor]:
    """The n largest entries of each row of residual @ W_U [latents, vocab]: (logit
    contributions, token ids), each [latents, n], largest first."""
    logits = residual.double() @ W_U.detach().double().cpu()
    top = logits.topk(min(n, logits.shape[1]), dim=1)
    return top.values, top.indices
