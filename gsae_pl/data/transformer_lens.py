"""Activations of a language model at one hook, through TransformerLens 4's TransformerBridge.

`data.source=transformer_lens` loads `data.model` (hub name or local HF directory) with
`TransformerBridge.boot_transformers`; `data.source=tiny_lm` does the same with the model
gsae_pl builds offline (data/tiny_lm.py). Text comes from data/text.py.

The forward pass stops at the hook: a hook on `data.hook` captures the activation and
raises TransformerLens's own `StopAtLayerException`, which the bridge catches and returns,
so nothing after the site runs (not even the rest of its block). It runs under no_grad in
eval mode, in bf16 autocast on GPU. BOS positions are left out of the rows by default:
their norms are outliers that would dominate the SAE's loss (NOTES.md, known traps).

Batch k of a process is a pure function of (seed, rank, world size, k) and the text: a
run resumed at step k rebuilds the shuffle-buffer block holding step k (data/buffer.py),
tokenising the text before it to find where the block starts without running the LM on
it, and continues with exactly the batches of an uninterrupted run.

Under DDP each process reads its own text shard and yields batch_size / W rows of its own
(`process_batches`, data/base.py: PerProcessSource), so (unlike synthetic and file data) a
W-process run does not see a 1-process run's batches; it does resume exactly, with the
same number of processes.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gsae_pl.data.buffer import shuffled_batches
from gsae_pl.data.text import TextWindows, open_dataset
from gsae_pl.errors import UserError
from gsae_pl.seeds import stream_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm(name: str, dtype: str = "float32", device: str = "cpu"):
    """A TransformerBridge in eval mode with frozen weights; bad names are one line."""
    from transformer_lens import TransformerBridge
    from transformer_lens.model_bridge.sources.tl_legacy import TL_LEGACY_PREFIXES
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars: noise, not progress
    try:
        if name.startswith(TL_LEGACY_PREFIXES) and not Path(name).exists():
            # NeelNanda/* (GELU-1L, ...) predate the HF format: TL 4's legacy loader.
            bridge = TransformerBridge.boot_tl_legacy(name, device=device, dtype=DTYPES[dtype])
        else:
            bridge = TransformerBridge.boot_transformers(name, device=device,
                                                         dtype=DTYPES[dtype])
    except Exception as err:  # offline, unknown repo, unsupported architecture, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        local = " (no such local directory either)" if not Path(name).exists() else ""
        raise UserError(f"cannot load data.model={name}{local}: {reason}; if this machine is "
                        "offline, use data.source=tiny_lm, which builds a model locally"
                        ) from None
    bridge.eval()
    bridge.requires_grad_(False)
    return bridge


def check_hook(bridge, hook: str) -> None:
    """Refuse an unknown hook, naming close valid ones."""
    if hook not in bridge.hook_dict:
        close = difflib.get_close_matches(hook, list(bridge.hook_dict), n=5, cutoff=0.6)
        hint = f"close valid ones: {', '.join(close)}" if close else \
            "valid ones look like blocks.0.mlp.hook_post, blocks.0.hook_resid_post"
        raise UserError(f"data.hook={hook} is not a hook of this model: {hint}")


def initial_device(cfg) -> torch.device:
    """This process's GPU when the run will use one, so the normalisation sample taken
    before `Trainer.fit` does not run a large LM on the CPU; `set_device` confirms it."""
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class TransformerLensSource:
    """An ActivationSource (see base.py) over an LM's activations at `data.hook`."""

    true_features = None
    reference_dir: Path | None = None  # where lm_eval keeps CE clean / zero (data/cache.py)

    def __init__(self, cfg, model: str, dataset: str, kind: str = "transformer_lens",
                 heldout_dataset: str | None = None):
        data = cfg.data
        self.kind, self.model_name, self.dataset_name = kind, model, dataset
        self.heldout_dataset_name = heldout_dataset
        self.hook, self.dtype, self.seed = data.hook, data.dtype, int(cfg.seed)
        self.exclude_bos, self.buffer_size = bool(data.exclude_bos), int(data.buffer_size)
        self.lm_batch_size, self.settings = int(data.lm_batch_size), data
        self.device = initial_device(cfg)
        self.bridge = load_lm(model, data.dtype, str(self.device))
        check_hook(self.bridge, self.hook)
        heldout_text = open_dataset(heldout_dataset, data.split) if heldout_dataset else None
        self.text = TextWindows(open_dataset(dataset, data.split), data.column,
                                self.bridge.tokenizer, data.context_size, dataset,
                                heldout_dataset=heldout_text)
        self.bos_id = self.text.bos_id
        # Enough held-out windows for eval.rows rows (a margin for BOS tokens inside
        # windows) and for the loss-recovered windows; both are spread over them (or over
        # a held-out dataset of its own: `_eval_windows`).
        n_windows = max(math.ceil(1.25 * cfg.eval.rows / (data.context_size - 1)) + 1,
                        int(cfg.eval.loss_recovered.contexts))
        self.heldout, self.heldout_docs = self.text.heldout(n_windows)
        self._eval_rows: dict[int, Tensor] = {}
        self._evaluation_windows: dict[int, tuple[Tensor, Tensor]] = {}
        self.d_in = int(self.activations(self.heldout[:1]).shape[-1])

    @property
    def lm(self) -> TransformerLensSource:
        """The LM behind the rows (the cache's source has one too): loss recovered uses it."""
        return self

    def set_device(self, device: torch.device) -> None:
        """Put the LM on this process's device (the DataModule calls it in `setup`)."""
        self.device = torch.device(device)
        self.bridge.to(self.device)

    # ---- activations ---------------------------------------------------------------
    @torch.no_grad()
    def activations(self, tokens: Tensor) -> Tensor:
        """float32 [B, T, d_in] activations at the hook; the forward pass stops there."""
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def capture_and_stop(act: Tensor, hook) -> None:
            raise StopAtLayerException(act)

        tokens = tokens.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            act = self.bridge.run_with_hooks(tokens, fwd_hooks=[(self.hook, capture_and_stop)])
        return act.flatten(2).float()  # [B, T, heads, d_head] sites become [B, T, d_in]

    def keep_mask(self, tokens: Tensor) -> Tensor:
        """[B, T] True where a position becomes an SAE row (BOS positions left out)."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_bos:
            keep &= tokens != self.bos_id
            keep[:, 0] = False  # the window's first position, BOS by construction
        return keep

    def rows(self, tokens: Tensor) -> Tensor:
        """The kept positions' activations as float32 [n, d_in], checked for NaN/Inf."""
        act = self.activations(tokens)
        rows = act[self.keep_mask(tokens).to(act.device)]
        if not torch.isfinite(rows).all():
            raise UserError(f"data.model={self.model_name} gave NaN or Inf activations at "
                            f"{self.hook}: try data.dtype=float32, or another hook")
        return rows

    def row_chunks(self, windows: Iterator[Tensor], skip_rows: int = 0) -> Iterator[Tensor]:
        """Rows of consecutive LM batches of `data.lm_batch_size` windows, from row
        `skip_rows` on. The batches are cut from the first window whatever `skip_rows` is,
        so a row is computed in the same batch, hence to the same bits, either way."""
        while True:
            batch = [w for _, w in zip(range(self.lm_batch_size), windows)]
            if not batch:
                return
            tokens = torch.stack(batch)
            if skip_rows:  # count the batch's rows from its tokens: no LM forward pass
                n_rows = int(self.keep_mask(tokens).sum())
                if n_rows <= skip_rows:
                    skip_rows -= n_rows
                    continue
            yield self.rows(tokens)[skip_rows:]
            skip_rows = 0

    # ---- the ActivationSource protocol (data/base.py: PerProcessSource) -----------
    def process_batches(self, batch_size: int, start_step: int, rank: int,
                        world_size: int) -> Iterator[Tensor]:
        def chunks_from(row: int) -> Iterator[Tensor]:
            windows = self.text.train(self.heldout_docs, rank, world_size)
            return self.row_chunks(windows, skip_rows=row)

        def generator_of(block: int) -> torch.Generator:
            return torch.Generator().manual_seed(stream_seed(self.seed, f"lm-buffer-{rank}",
                                                             block))

        return shuffled_batches(chunks_from, self.buffer_size, batch_size, generator_of,
                                start_batch=start_step)

    def eval_rows(self, n_rows: int) -> Tensor:
        """`n_rows` held-out rows spread evenly over all held-out documents: the kept
        positions of `_eval_windows`, every (total / n_rows)-th of them."""
        if n_rows not in self._eval_rows:
            tokens, _ = self._eval_windows(n_rows)
            rows = torch.cat(list(self.row_chunks(iter(tokens)))).cpu()
            self._eval_rows[n_rows] = rows[self._row_pick(n_rows, self.keep_mask(tokens))]
        return self._eval_rows[n_rows]

    def eval_documents(self, n_rows: int) -> Tensor:
        """int64 [n_rows]: the held-out document of each row of `eval_rows(n_rows)` (that of
        its window, as for loss recovered); from the tokens alone, without the LM."""
        tokens, documents = self._eval_windows(n_rows)
        keep = self.keep_mask(tokens)
        return documents[:, None].expand_as(keep)[keep][self._row_pick(n_rows, keep)]

    def _eval_windows(self, n_rows: int) -> tuple[Tensor, Tensor]:
        """The windows held-out rows come from and their documents, by loss recovered's
        rule (TextWindows.evaluation_windows): spread evenly over a held-out dataset of its
        own, else over all the windows held out at the stream's front, not the first of
        them. Enough windows for `n_rows` rows, with a margin for BOS tokens inside."""
        wanted = math.ceil(1.25 * n_rows / (self.text.context_size - 1)) + 1
        if self.heldout_dataset_name is not None:
            return self.heldout_windows(wanted)
        tokens, documents = self.heldout_windows(len(self.heldout))
        pick = torch.arange(min(wanted, len(tokens))) * len(tokens) // min(wanted, len(tokens))
        return tokens[pick], documents[pick]

    @staticmethod
    def _row_pick(n_rows: int, keep: Tensor) -> Tensor:
        """Indices of `n_rows` rows spread evenly over the `keep.sum()` kept positions."""
        total = int(keep.sum())
        if total < n_rows:
            raise UserError(f"the held-out text gave {total} rows, fewer than "
                            f"eval.rows={n_rows}: lower eval.rows")
        return torch.arange(n_rows) * total // n_rows

    def heldout_windows(self, n_windows: int) -> tuple[Tensor, Tensor]:
        """Held-out windows [n, T] for loss recovered (never trained on) and each one's
        document [n] (TextWindows.evaluation_windows); made once per size."""
        if self.heldout_dataset_name is None and n_windows > len(self.heldout):
            # the stream's front: more windows than held out would be training text
            raise ValueError(f"{n_windows} evaluation windows asked for, {len(self.heldout)} "
                             "held out (eval.loss_recovered.contexts sets how many)")
        if n_windows not in self._evaluation_windows:
            self._evaluation_windows[n_windows] = self.text.evaluation_windows(n_windows)
        return self._evaluation_windows[n_windows]

    def heldout_tokens(self, n_windows: int) -> Tensor:
        """The windows of `heldout_windows` alone."""
        return self.heldout_windows(n_windows)[0]

    def probe_sets(self, n_tokens: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Held-out tokens labelled from Python's `tokenize`, for the linear probes
        (gsae_pl/eval/probes.py): `<slice>_<category>` -> (activations [n, d_in], whether
        each token is of the category [n]); data/code_labels.py. {} for text that is not
        Python."""
        from gsae_pl.data.code_labels import code_probe_sets

        texts = self.text.heldout_texts(self.heldout_docs)
        return code_probe_sets(texts, self.bridge.tokenizer, self.bos_id,
                               self.text.context_size, n_tokens,
                               lambda w: torch.cat([self.activations(c).cpu() for c in
                                                    w.split(self.lm_batch_size)]))

    def describe(self) -> dict:
        """What made these activations; also the key of a disk cache (data/cache.py)."""
        data = self.settings
        model = str(Path(self.model_name).resolve()) if Path(self.model_name).exists() \
            else self.model_name
        return {"source": self.kind, "model": model, "hook": self.hook,
                "dataset": self.dataset_name, "split": data.split, "column": data.column,
                "context_size": int(data.context_size), "exclude_bos": self.exclude_bos,
                "dtype": self.dtype, "heldout_windows": len(self.heldout), "d_in": self.d_in,
                # Only when set, so the keys of caches made before it existed still match.
                **({"heldout_dataset": self.heldout_dataset_name}
                   if self.heldout_dataset_name else {})}


def build_lm_source(cfg) -> TransformerLensSource:
    """`data.source` tiny_lm or transformer_lens, from the run config, uncached."""
    if cfg.data.source == "tiny_lm":
        from gsae_pl.data.tiny_lm import CORPUS, HELDOUT, ensure_tiny_lm

        model_dir = ensure_tiny_lm()
        if cfg.data.dataset:  # the user's own text: held out at its front, as for any dataset
            return TransformerLensSource(cfg, str(model_dir), cfg.data.dataset, kind="tiny_lm")
        # The LM's own corpus: held-out windows only from files the LM never trained on.
        return TransformerLensSource(cfg, str(model_dir), str(model_dir / CORPUS),
                                     kind="tiny_lm", heldout_dataset=str(model_dir / HELDOUT))
    # A named local model (data/local_models.py) becomes its converted directory.
    from gsae_pl.data.local_models import resolve

    model, dataset, heldout = resolve(cfg.data.model, cfg.data.dataset)
    return TransformerLensSource(cfg, model, dataset, heldout_dataset=heldout)
