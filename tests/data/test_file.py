"""FileSource: the three formats, the epoch/rank/holdout split, and every bad-input case."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gsae_pl.data.base import train_stream
from gsae_pl.data.file import FileSource
from gsae_pl.errors import UserError


def rows(n=60, d=4):
    # Row i is constant i, so a batch tells exactly which rows it holds.
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()


def write(path, data, fmt):
    if fmt == "npy":
        np.save(path, data.numpy() if isinstance(data, torch.Tensor) else data)
    elif fmt == "safetensors":
        save_file(data if isinstance(data, dict) else {"x": data}, str(path))
    else:
        torch.save(data, path)
    return str(path)


@pytest.fixture
def source(tmp_path):
    # 60 rows: 48 to train on (8 global batches of 6), the last 12 held out.
    return FileSource(write(tmp_path / "a.npy", rows(), "npy"), seed=0, holdout_rows=12,
                      min_train_rows=12)


def indices(batch):
    return batch[:, 0].long().tolist()


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "pt"])
def test_formats_round_trip(tmp_path, fmt):
    data = torch.randn(50, 3, dtype=torch.float64)
    src = FileSource(write(tmp_path / f"a.{fmt}", data, fmt), 0, 10, 8)
    assert (src.d_in, src.n_rows, src.true_features) == (3, 50, None)
    assert torch.equal(src.eval_rows(10), data[40:].float())
    assert src.eval_rows(4).dtype == torch.float32
    batch = next(train_stream(src, 8, 0, 1))
    assert batch.dtype == torch.float32
    # Every training row is some row of the file's first 40, bit for bit.
    assert all((data[:40].float() == r).all(1).any() for r in batch)
    assert src.describe() == {"source": "file", "path": str(tmp_path / f"a.{fmt}"),
                              "rows": 50, "d_in": 3, "dtype": src.dtype}


def test_safetensors_picks_activations_of_several(tmp_path):
    path = write(tmp_path / "a.safetensors",
                 {"activations": rows(30), "tokens": torch.zeros(30, 2)}, "safetensors")
    assert torch.equal(FileSource(path, 0, 5, 5).eval_rows(5), rows(30)[25:])


def test_pt_dict_with_activations(tmp_path):
    path = write(tmp_path / "a.pt", {"activations": rows(30).half(), "meta": 1}, "pt")
    src = FileSource(path, 0, 5, 5)
    assert torch.equal(src.eval_rows(5), rows(30)[25:]) and src.dtype == "float16"


def test_each_epoch_is_a_permutation_split_across_ranks(source):
    streams = [train_stream(source, 6, rank, 2) for rank in range(2)]
    for _epoch in range(3):
        seen = [sum((indices(next(s)) for _ in range(8)), []) for s in streams]
        assert not set(seen[0]) & set(seen[1])  # ranks' shares are disjoint
        assert sorted(seen[0] + seen[1]) == list(range(48))  # all training rows, once
    assert seen != [sorted(s) for s in seen]  # shuffled, not file order


def test_ranks_take_rows_r_mod_w_of_the_one_process_batch(source):
    whole = train_stream(source, 6, 0, 1, start_step=7)  # crosses into the second epoch
    shares = [train_stream(source, 6, rank, 3, start_step=7) for rank in range(3)]
    for _ in range(3):
        batch = next(whole)
        for rank, share in enumerate(shares):
            assert torch.equal(next(share), batch[rank::3])


def test_epochs_differ_and_batches_are_sorted(source):
    it = train_stream(source, 6, 0, 1)
    epochs = [[indices(next(it)) for _ in range(8)] for _ in range(2)]
    assert epochs[0] != epochs[1]
    assert all(b == sorted(b) for b in epochs[0])


def test_holdout_rows_never_trained_on(source):
    it = train_stream(source, 6, 1, 3)
    assert max(max(indices(next(it))) for _ in range(40)) < 48


def test_start_step_skips_ahead(source):
    full = [next(it) for it in [train_stream(source, 6, 1, 2)] for _ in range(11)]
    resumed = train_stream(source, 6, 1, 2, start_step=6)  # mid second epoch
    assert all(torch.equal(next(resumed), full[k]) for k in range(6, 11))


def test_same_seed_same_stream_other_seed_differs(tmp_path, source):
    other = FileSource(str(source.path), seed=1, holdout_rows=12, min_train_rows=12)
    again = FileSource(str(source.path), seed=0, holdout_rows=12, min_train_rows=12)
    first = next(train_stream(source, 6, 0, 1))
    assert torch.equal(first, next(train_stream(again, 6, 0, 1)))
    assert not torch.equal(first, next(train_stream(other, 6, 0, 1)))


def test_eval_rows_too_many_and_batch_too_big(source):
    with pytest.raises(UserError, match="held out"):
        source.eval_rows(13)
    with pytest.raises(UserError, match="batch_size"):
        train_stream(source, 50, 0, 2)
    with pytest.raises(UserError, match="multiple of 4"):
        train_stream(source, 6, 0, 4)


def bad(tmp_path, name, data, fmt):
    return write(tmp_path / name, data, fmt)


@pytest.mark.parametrize("make_path, message", [
    (lambda p: str(p / "missing.npy"), "not found"),
    (lambda p: bad(p, "a.csv", rows(), "pt"), "supported are .npy, .safetensors, .pt"),
    (lambda p: (p / "a.npy").write_bytes(b"garbage") and str(p / "a.npy"), "no .npy header"),
    (lambda p: (p / "a.pt").write_bytes(b"garbage") and str(p / "a.pt"), "cannot read"),
    (lambda p: (p / "a.safetensors").write_bytes(b"garbage") and str(p / "a.safetensors"),
     "cannot read"),
    (lambda p: bad(p, "a.npy", np.zeros((4, 5, 6), np.float32), "npy"),
     r"shape \[4, 5, 6\].*\[N, d_in\]"),
    (lambda p: bad(p, "a.safetensors", torch.zeros(60), "safetensors"), r"shape \[60\]"),
    (lambda p: bad(p, "a.npy", np.zeros((60, 4), np.int32), "npy"), "dtype int32"),
    (lambda p: bad(p, "a.pt", torch.zeros(60, 4, dtype=torch.int64), "pt"), "dtype int64"),
    (lambda p: bad(p, "a.safetensors", {"a": rows(), "b": rows()}, "safetensors"),
     "activations"),
    (lambda p: bad(p, "a.pt", {"weights": rows()}, "pt"), "activations"),
    (lambda p: bad(p, "a.npy", rows(20), "npy"), "has 20 rows but 24 are needed"),
])
def test_bad_input_is_a_one_line_user_error(tmp_path, make_path, message):
    with pytest.raises(UserError, match=message) as err:
        FileSource(make_path(tmp_path), seed=0, holdout_rows=12, min_train_rows=12)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_names_first_bad_row(tmp_path, monkeypatch, value):
    import gsae_pl.data.file as file_module

    monkeypatch.setattr(file_module, "_SCAN_ROWS", 16)  # make the row fall in a later chunk
    data = rows()
    data[37, 2] = value
    data[50, 0] = value
    with pytest.raises(UserError, match="NaN or Inf in row 37"):
        FileSource(write(tmp_path / "a.npy", data, "npy"), 0, 12, 12)
