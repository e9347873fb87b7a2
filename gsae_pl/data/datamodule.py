"""One DataModule over any `ActivationSource`: it owns sharding, batching and held-out rows.

Sources are built in `__init__`, not in `setup`, on purpose: a bad data file must be refused
before the run directory exists (nothing half-written), and every process builds the same
source deterministically, so there is no one-time download step to put in `prepare_data`.

`data.batch_size` is the GLOBAL batch of one optimiser step: each of W processes gets
batch_size // W rows of it (data/base.py), so a W-process run follows the 1-process one.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from gsae_pl.data.base import ActivationSource, check_split
from gsae_pl.data.file import FileSource
from gsae_pl.data.synthetic import SyntheticSource
from gsae_pl.errors import UserError
from gsae_pl.writable import check_writable_dir


def describe(cfg) -> str:
    """The data source, as a message names it."""
    data = cfg.data
    if data.source == "file":
        return f"data file {data.path}"
    if data.source == "transformer_lens":
        return f"{data.model} at {data.hook}"
    return f"data.source={data.source}" + (f" at {data.hook}" if data.source == "tiny_lm" else "")


def build_source(cfg) -> ActivationSource:
    """The source named by `data.source`; `cfg` is the whole run config."""
    data = cfg.data
    if data.source == "synthetic":
        return SyntheticSource(data.synthetic)
    if data.source in ("tiny_lm", "transformer_lens"):
        from gsae_pl.data.cached import build_cached_or_lm_source, read_metadata

        # Before the LM runs: a cache folder that cannot be written would otherwise fail
        # after the first shard's worth of LM passes. A complete cache is only read.
        if data.cache and data.cache_dir and read_metadata(data.cache_dir) is None:
            check_writable_dir(data.cache_dir, "data.cache_dir")

        return build_cached_or_lm_source(cfg)
    return FileSource(data.path, seed=cfg.seed, holdout_rows=cfg.eval.rows,
                      min_train_rows=data.batch_size)


class _BatchStream(IterableDataset):
    def __init__(self, source: ActivationSource, batch_size: int, rank: int, world: int,
                 start_step: int):
        self.args = (source, batch_size, rank, world, start_step)

    def __iter__(self):
        source, batch_size, rank, world, start_step = self.args
        return source.train_batches(batch_size, rank, world, start_step=start_step)


class SAEDataModule(L.LightningDataModule):
    def __init__(self, cfg):
        super().__init__()
        self.batch_size = cfg.data.batch_size
        self.eval_rows = cfg.eval.rows
        self.source = build_source(cfg)
        self.d_in = self.source.d_in
        if self.d_in == 1 and cfg.sae.unit_norm_decoder:
            # The only unit vectors in R^1 are +-1: projected onto the sphere's tangent, every
            # decoder gradient is zero, so W_dec never moves (FVU 58-904 in issue 12).
            raise UserError(f"the activations of {describe(cfg)} have width d_in=1, and a "
                            "unit-norm decoder of width 1 cannot learn: set "
                            "sae.unit_norm_decoder=false")
        # Drawn now, not when fit asks, so that data with nothing to normalise is refused
        # before anything is written; fit then reads the same rows (sample_rows).
        self._sample = self._first_rows(cfg.data.normalize_rows)
        if not bool(self._sample.pow(2).sum(1).mean() > 0):
            raise UserError(f"the first {len(self._sample)} rows of {describe(cfg)} are all "
                            "zero (mean squared norm 0): nothing to normalise or learn; check "
                            "the activations")

    def check_world(self, world_size: int) -> None:
        """Refuse a global batch that does not split evenly, before anything is written."""
        check_split(self.batch_size, 0, world_size)

    def setup(self, stage: str) -> None:
        # LM sources run their model on this process's device (each DDP process has one).
        if hasattr(self.source, "set_device"):
            self.source.set_device(self.trainer.strategy.root_device)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        start = self.trainer.global_step if self.trainer else 0
        stream = _BatchStream(self.source, self.batch_size, rank, world, start)
        return DataLoader(stream, batch_size=None)  # the source already yields batches

    def val_dataloader(self) -> DataLoader:
        # Each process scores a disjoint share; the sum-reduced metrics add the shares up.
        rank, world = self._rank_world()
        rows = self.source.eval_rows(self.eval_rows)[rank::world]
        return DataLoader(list(rows.split(self.batch_size)), batch_size=None)

    def sample_rows(self, n_rows: int) -> Tensor:
        """The first `n_rows` rows of the global training stream: the same on every
        process and for every process count, so estimates made from it (normalisation
        scalar, b_dec init) agree across DDP ranks and with a 1-process run."""
        if n_rows <= len(self._sample):  # drawn at construction (an LM source is slow)
            return self._sample[:n_rows].clone()
        return self._first_rows(n_rows)

    def _first_rows(self, n_rows: int) -> Tensor:
        batches = self.source.train_batches(self.batch_size, 0, 1, start_step=0)
        needed = -(-n_rows // self.batch_size)
        return torch.cat(list(itertools.islice(batches, needed)))[:n_rows]
