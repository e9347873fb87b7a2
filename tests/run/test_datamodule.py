"""The DataModule: held-out rows split across processes, the shared normalisation sample."""

from __future__ import annotations

import itertools

import pytest
import torch

from gsae_pl.data.base import SOURCES, train_stream
from gsae_pl.errors import UserError
from gsae_pl.run.datamodule import SAEDataModule
from tests.conftest import make_cfg


def _dm(*overrides):
    return SAEDataModule(make_cfg("data.batch_size=64", "eval.rows=300",
                                  "data.synthetic.d_in=8", "data.synthetic.n_features=16",
                                  *overrides))


class _FakeTrainer:
    def __init__(self, rank, world):
        self.global_rank, self.world_size, self.global_step = rank, world, 0


def test_val_rows_are_shared_out_disjointly_and_completely():
    dm = _dm()
    everything = dm.source.eval_rows(300)
    shares, documents = [], []
    for rank in range(2):
        dm.trainer = _FakeTrainer(rank, 2)
        batches = list(dm.val_dataloader())  # (rows, each row's document)
        shares.append(torch.cat([rows for rows, _ in batches]))
        documents.append(torch.cat([docs for _, docs in batches]))
    assert shares[0].shape[0] + shares[1].shape[0] == 300
    assert torch.equal(torch.cat(shares).sort(0).values, everything.sort(0).values)
    # synthetic rows: blocks of ROWS_PER_DOCUMENT held-out rows, dealt out with the rows
    assert torch.equal(documents[0], (torch.arange(0, 300, 2) // 256))


def test_sample_rows_is_the_same_for_every_process_and_sized():
    a, b = _dm(), _dm()
    b.trainer = _FakeTrainer(1, 2)
    sample = a.sample_rows(100)
    assert sample.shape == (100, 8) and torch.equal(sample, b.sample_rows(100))


def test_train_loader_differs_by_rank_and_resumes_at_global_step():
    dm = _dm()
    dm.trainer = _FakeTrainer(0, 2)
    first = next(iter(dm.train_dataloader()))
    dm.trainer = _FakeTrainer(1, 2)
    assert not torch.equal(first, next(iter(dm.train_dataloader())))
    dm.trainer = _FakeTrainer(0, 2)
    dm.trainer.global_step = 3
    stream = iter(train_stream(_dm().source, 64, 0, 2))
    for _ in range(3):
        next(stream)
    assert torch.equal(next(iter(dm.train_dataloader())), next(stream))


def test_train_shares_of_two_processes_make_the_one_process_batch():
    dm = _dm()
    dm.trainer = _FakeTrainer(0, 1)
    whole = next(iter(dm.train_dataloader()))
    shares = []
    for rank in range(2):
        dm.trainer = _FakeTrainer(rank, 2)
        shares.append(next(iter(dm.train_dataloader())))
    assert shares[0].shape == (32, 8)
    assert torch.equal(torch.stack(shares, 1).flatten(0, 1), whole)


def test_indivisible_global_batch_is_refused():
    with pytest.raises(UserError, match="multiple of 3"):
        _dm().check_world(3)
    _dm().check_world(2)


class _Counting:
    """A source in a few lines: global batch k holds the rows numbered k*B .. k*B + B-1."""

    d_in, true_features, lm = 2, None, None

    def global_batches(self, batch_size, start_step):
        for k in itertools.count(start_step):
            yield torch.arange(k * batch_size, (k + 1) * batch_size).float()[:, None].repeat(1, 2)

    def eval_rows(self, n_rows):
        return -torch.ones(n_rows, 2)

    def describe(self):
        return {"source": "counting"}


def test_a_registered_source_is_a_choice_and_the_datamodule_splits_and_resumes_it(
        monkeypatch):
    SOURCES.names()  # the built-in sources first, as any lookup loads them
    monkeypatch.setitem(SOURCES._entries, "counting", lambda cfg: _Counting())
    dm = SAEDataModule(make_cfg("data.source=counting", "data.batch_size=4", "eval.rows=8",
                                "data.normalize_rows=6"))
    assert dm.sample_rows(6)[:, 0].tolist() == [0, 1, 2, 3, 4, 5]  # the global stream's
    for rank in range(2):
        dm.trainer = _FakeTrainer(rank, 2)
        dm.trainer.global_step = 3  # a resumed run: its first batch is global batch 3's share
        assert next(iter(dm.train_dataloader()))[:, 0].tolist() == [12 + rank, 14 + rank]
