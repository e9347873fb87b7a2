"""One DataModule over any `ActivationSource`: it owns sharding, batching, resume and
held-out rows.

Sources are built in `__init__`, not in `setup`, on purpose: a bad data file must be refused
before the run directory exists (nothing half-written), and every process builds the same
source deterministically. The one thing made on first use, an activation cache, is written
by `prepare_data`, which `__init__` calls too, since fit's normalisation sample is read from
it before `Trainer.fit` (data/cache.py: who writes, and how the other processes wait).

`data.batch_size` is the GLOBAL batch of one optimiser step: each of W processes gets
batch_size // W rows of it (data/base.py: `train_stream`), so a W-process run follows the
1-process one, and a resumed run starts at its global step.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from gsae_pl.data.base import (
    SOURCES,
    ActivationSource,
    check_split,
    heldout_documents,
    train_stream,
)
from gsae_pl.data.outliers import check_ratio
from gsae_pl.errors import UserError


def describe(cfg) -> str:
    """The data source, as a message names it."""
    data = cfg.data
    if data.source == "file":
        return f"data file {data.path}"
    if data.source == "transformer_lens":
        return f"{data.model} at {data.hook}"
    return f"data.source={data.source}" + (f" at {data.hook}" if data.source == "tiny_lm" else "")


def check_scale(sample: Tensor, cfg) -> None:
    """Refuse a normalisation sample with nothing to learn, or one whose scalar float32
    cannot hold (the module computes it in float64: run/module.py), each named as what it
    is: all zero, too small (e.g. subnormal values), too large."""
    rows = f"the first {len(sample)} rows of {describe(cfg)}"
    largest = float(sample.abs().max()) if sample.numel() else 0.0
    if largest == 0:
        raise UserError(f"{rows} are all zero: nothing to normalise or learn; check the "
                        "activations")
    mean_sq = float(sample.double().pow(2).sum(1).mean())
    scale = (sample.shape[1] / mean_sq) ** 0.5 if mean_sq > 0 else float("inf")
    if not cfg.data.normalize:
        return
    if not scale < torch.finfo(torch.float32).max:
        raise UserError(f"{rows} are too small to normalise in float32 (largest |x| "
                        f"{largest:.4g}, mean squared norm {mean_sq:.4g}): scale the "
                        "activations up, e.g. by 1e20")
    if not scale > torch.finfo(torch.float32).tiny:
        raise UserError(f"{rows} are too large to normalise in float32 (largest |x| "
                        f"{largest:.4g}, mean squared norm {mean_sq:.4g}): scale the "
                        "activations down")


def build_source(cfg) -> ActivationSource:
    """The source named by `data.source` (data/base.py: SOURCES); `cfg` is the run config."""
    return SOURCES[cfg.data.source](cfg)


class _BatchStream(IterableDataset):
    def __init__(self, source: ActivationSource, batch_size: int, rank: int, world: int,
                 start_step: int):
        self.args = (source, batch_size, rank, world, start_step)

    def __iter__(self):
        return train_stream(*self.args)


class SAEDataModule(L.LightningDataModule):
    def __init__(self, cfg):
        super().__init__()
        # One writer for a cache folder that every node reads ($GSAE_PL_CACHE is shared,
        # docs/scaling.md); per node, two nodes would write the same folder at once.
        self.prepare_data_per_node = False
        self.batch_size = cfg.data.batch_size
        self.eval_rows = cfg.eval.rows
        check_ratio(float(cfg.data.outlier_norm_ratio))
        self.source = build_source(cfg)
        self.d_in = self.source.d_in
        if self.d_in == 1 and cfg.sae.unit_norm_decoder:
            # The only unit vectors in R^1 are +-1: projected onto the sphere's tangent, every
            # decoder gradient is zero, so W_dec never moves (FVU 58-904 in issue 12).
            raise UserError(f"the activations of {describe(cfg)} have width d_in=1, and a "
                            "unit-norm decoder of width 1 cannot learn: set "
                            "sae.unit_norm_decoder=false")
        self.prepare_data()  # the sample below may be the cache's rows (module docstring)
        # Drawn now, not when fit asks, so that data with nothing to normalise is refused
        # before anything is written; fit then reads the same rows (sample_rows).
        self._sample = self._first_rows(cfg.data.normalize_rows)
        check_scale(self._sample, cfg)

    def check_world(self, world_size: int) -> None:
        """Refuse a global batch that does not split evenly, before anything is written."""
        check_split(self.batch_size, 0, world_size)

    def prepare_data(self) -> None:
        """Write what the source makes on first use (an activation cache), once."""
        if hasattr(self.source, "prepare"):
            self.source.prepare()

    def setup(self, stage: str) -> None:
        # An LM runs on this process's device (each DDP process has one).
        if self.source.lm is not None:
            self.source.lm.set_device(self.trainer.strategy.root_device)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        start = self.trainer.global_step if self.trainer else 0  # a resumed run's step
        stream = _BatchStream(self.source, self.batch_size, rank, world, start)
        return DataLoader(stream, batch_size=None)  # the stream already yields batches

    def val_dataloader(self) -> DataLoader:
        """Batches of (held-out rows, each row's document): the documents are the standard
        errors' sampling unit (gsae_pl/eval/document_stats.py)."""
        # Each process scores a disjoint share; the sum-reduced metrics add the shares up.
        rank, world = self._rank_world()
        rows = self.source.eval_rows(self.eval_rows)[rank::world]
        documents = heldout_documents(self.source, self.eval_rows)[rank::world]
        return DataLoader(list(zip(rows.split(self.batch_size),
                                   documents.split(self.batch_size))), batch_size=None)

    def sample_rows(self, n_rows: int) -> Tensor:
        """The first `n_rows` rows of the global training stream: the same on every
        process and for every process count, so estimates made from it (normalisation
        scalar, b_dec init) agree across DDP ranks and with a 1-process run."""
        if n_rows <= len(self._sample):  # drawn at construction (an LM source is slow)
            return self._sample[:n_rows].clone()
        return self._first_rows(n_rows)

    def _first_rows(self, n_rows: int) -> Tensor:
        batches = train_stream(self.source, self.batch_size)
        needed = -(-n_rows // self.batch_size)
        return torch.cat(list(itertools.islice(batches, needed)))[:n_rows]
