"""The small protocol every activation source meets, and the one place that splits its
batches over processes.

A source knows its width, yields the GLOBAL training stream from any step, and hands out a
fixed set of held-out rows that training never sees (docs/method.md sec. 6: evaluate on
held-out tokens). Splitting a global batch over processes, the conditions on that split and
where a resumed run starts are `train_stream`'s, here, for every source; the DataModule owns
normalisation and the loaders.

A source is one file in this package that registers a builder under its `data.source`
name: `@SOURCES.register("name")` on `def build(cfg) -> ActivationSource` (`cfg` is the
whole run config). The choice list config_checks.py checks `data.source` against is read
from the same registry. A builder with settings of its own names their dataclass in
`build.Settings`: the config gets the block `data.<name>` (data/synthetic.py does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.ranges import NON_NEGATIVE, POSITIVE, choices
from gsae_pl.registry import Registry

# data.source name -> build(cfg) -> ActivationSource; filled by this package's modules.
SOURCES: Registry[Callable[[Any], ActivationSource]] = Registry(
    "data.source", "gsae_pl.data", order=("tiny_lm", "transformer_lens", "synthetic", "file"))


@dataclass
class DataConfig:
    """The `data:` fields every source shares; a source's own block joins them
    (`build.Settings`, above)."""

    # tiny_lm | transformer_lens | synthetic | file | any registered name
    source: str = field(default="tiny_lm", metadata=choices(SOURCES.names))
    path: Optional[str] = None  # file: .npy | .safetensors | .pt array [N, d_in]
    batch_size: int = field(default=1024, metadata=POSITIVE)
    normalize: bool = True  # scale x by one scalar so E||x||^2 = d_in (docs/method.md sec. 4)
    normalize_rows: int = field(default=16384, metadata=POSITIVE)
    # Language-model sources (tiny_lm, transformer_lens): data/transformer_lens.py.
    model: Optional[str] = None  # transformer_lens: hub name or local HF model directory
    hook: str = "blocks.0.mlp.hook_post"  # the SAE site: a TransformerLens hook name
    # the LM's weights
    dtype: str = field(default="float32", metadata=choices("float32", "bfloat16", "float16"))
    dataset: Optional[str] = None  # hub name (streamed) or local .txt/.jsonl/.parquet
    split: str = "train"
    column: str = "text"  # text, or token ids (a pre-tokenized dataset)
    context_size: int = 128  # tokens per window, BOS first
    exclude_bos: bool = True  # leave BOS positions out of the SAE's rows
    buffer_size: int = field(default=131072, metadata=POSITIVE)  # shuffle buffer, in rows
    lm_batch_size: int = field(default=32, metadata=POSITIVE)  # windows per LM forward pass
    cache: bool = False  # train from a disk cache of the activations (data/cache.py)
    cache_dir: Optional[str] = None  # null: $GSAE_PL_CACHE/activations/<key>
    cache_rows: Optional[int] = None  # null: trainer.max_steps * data.batch_size
    # float16: half the bytes, results moved (benchmarks/RESULTS.md)
    cache_dtype: str = field(default="float32", metadata=choices("float32", "float16"))
    # Rows whose norm exceeds this multiple of the median norm (of the normalisation
    # sample) are left out of training, the normalisation and the held-out metrics; 0: off
    # (data/outliers.py, docs/method.md sec. 6).
    outlier_norm_ratio: float = field(default=0.0, metadata=NON_NEGATIVE)


class LanguageModel(Protocol):
    """The LM behind a source's rows (data/transformer_lens.py): loss recovered splices the
    SAE into it at `hook` on held-out windows (gsae_pl/eval/lm_eval.py), the DataModule moves it
    to each process's device, provenance hashes its weights."""

    model_name: str
    bridge: Any  # the TransformerBridge
    hook: str
    device: torch.device
    lm_batch_size: int
    reference_dir: Path | None  # where CE clean / zero-ablated are kept (data/cache.py)

    def heldout_windows(self, n_windows: int) -> tuple[Tensor, Tensor]: ...

    def keep_mask(self, tokens: Tensor) -> Tensor: ...

    def set_device(self, device: torch.device) -> None: ...

    def describe(self) -> dict: ...


class ActivationSource(Protocol):
    d_in: int
    # Unit rows [n_features, d_in] when the ground truth is known (synthetic data), else None.
    true_features: Tensor | None
    # The LM that made the rows, for loss recovered; None for rows with no LM behind them.
    lm: LanguageModel | None

    def global_batches(self, batch_size: int, start_step: int) -> Iterator[Tensor]:
        """Endless float32 [batch_size, d_in] global batches from batch `start_step` on.

        Global batch k depends only on the config and k, so a run restarted at step k sees
        the batches it would have seen, and every process count sees the same rows at each
        step (`train_stream` deals them out). Skipping to `start_step` should not make the
        skipped batches.
        """
        ...

    def eval_rows(self, n_rows: int) -> Tensor:
        """A fixed float32 [n_rows, d_in] held-out set, disjoint from the training rows."""
        ...

    def describe(self) -> dict:
        """What made these activations: logged and stored beside the run."""
        ...

    # Optional: `eval_documents(n)`, the held-out document of each row of `eval_rows(n)`
    # (int64 [n]), the standard errors' sampling unit (gsae_pl/eval/document_stats.py). An
    # LM source has it (data/transformer_lens.py); without it `heldout_documents` takes
    # blocks of ROWS_PER_DOCUMENT consecutive held-out rows.

    # Optional: `prepare()`, making what the source needs on first use (an activation
    # cache: data/cache.py) before any rows are read; the DataModule's prepare_data calls it.
    # Optional: `probe_sets(n)`, labelled held-out rows for the linear probes (task ->
    # (rows [m, d_in], bool labels [m]); gsae_pl/eval/probes.py), which run only on sources
    # that have it (synthetic.py, transformer_lens.py).


# Synthetic and file sources have no documents: their held-out rows are grouped in blocks of
# this many consecutive rows. Synthetic rows are independent, so the blocks give the plain
# row-level error; a file's rows are usually in the order they were written (a document's
# tokens together), so blocks keep most of a document's rows in one cluster. Decision: 256
# rows, two 128-token windows' worth, so 16,384 rows make 64 clusters.
ROWS_PER_DOCUMENT = 256


def heldout_documents(source: ActivationSource | None, n_rows: int) -> Tensor:
    """int64 [n_rows]: the document of each row of `source.eval_rows(n_rows)`, from the
    source's `eval_documents` where it has one, else blocks of ROWS_PER_DOCUMENT rows."""
    if source is not None and hasattr(source, "eval_documents"):
        return source.eval_documents(n_rows)
    return torch.arange(n_rows, dtype=torch.long, device="cpu") // ROWS_PER_DOCUMENT


class PerProcessSource(Protocol):
    """An ActivationSource with `process_batches` in place of `global_batches`, for rows
    too costly for every process to make the whole global batch (an LM:
    data/transformer_lens.py). Each process makes only its own rows, so a W-process run
    does not see a 1-process run's batches; it resumes exactly with the same W."""

    def process_batches(self, batch_size: int, start_step: int, rank: int,
                        world_size: int) -> Iterator[Tensor]:
        """Endless [batch_size, d_in] batches of process `rank` of `world_size`, from
        `start_step` on; `batch_size` is this process's share of the global batch."""
        ...


def check_split(batch_size: int, rank: int, world_size: int) -> None:
    """The conditions on a split of a global batch over processes, for every source."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise UserError(f"data.batch_size={batch_size} is the global batch and must split "
                        f"evenly over {world_size} processes: use a multiple of {world_size}")


def train_stream(source: ActivationSource, batch_size: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0) -> Iterator[Tensor]:
    """Process `rank`'s endless [batch_size // world_size, d_in] batches from `start_step`.

    `batch_size` is the GLOBAL batch of one optimiser step. Process `rank` takes rows
    rank::world_size of global batch k, so DDP's average of the per-process mean losses is
    the full batch's mean loss (docs/method.md sec. 4), and W processes follow 1.
    """
    check_split(batch_size, rank, world_size)
    if hasattr(source, "process_batches"):
        return source.process_batches(batch_size // world_size, start_step, rank, world_size)
    # Every process makes the whole global batch and keeps its share: W times the (cheap)
    # reading or sampling, bought for identical 1- and W-process trajectories.
    return (batch[rank::world_size].contiguous()
            for batch in source.global_batches(batch_size, start_step))


def epoch_batches(per_epoch: int, start_step: int,
                  batches_of: Callable[[int, int], Iterator[Tensor]]) -> Iterator[Tensor]:
    """Endless batches of a source read in epochs of `per_epoch` global batches, from
    `start_step` on: `batches_of(epoch, k)` gives the epoch's batches from its k-th. A
    resumed run starts inside its epoch without making the batches before it."""
    epoch, k = divmod(int(start_step), per_epoch)
    while True:
        yield from batches_of(epoch, k)
        epoch, k = epoch + 1, 0
