"""Activations saved on disk as one [N, d_in] float array: .npy, .safetensors or .pt.

The array is read lazily (memory-mapped or sliced), so a file bigger than RAM works: only
the rows of the current batch are touched. The LAST `holdout_rows` rows are the held-out
set (docs/method.md sec. 6: evaluate on rows training never sees); the rest are shuffled afresh
each epoch. Everything is checked when the source is built, so a bad file fails at once
with one line instead of as a NaN loss hours into a run.

The same scan that looks for NaN and Inf digests the rows (blake2b of their values as
stored, little-endian, row after row), so a run records what it trained on and a resume
refuses a file whose contents changed (gsae_pl/run/inputs.py). Decision: the whole file,
not a sample of rows: the scan reads every row anyway, so the digest costs no extra read,
and a sample would miss an edit to the rows it skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from gsae_pl.data.base import SOURCES, epoch_batches
from gsae_pl.errors import UserError
from gsae_pl.seeds import stream_seed

SUFFIXES = (".npy", ".safetensors", ".pt")
_SCAN_ROWS = 65536  # rows per chunk of the NaN/Inf scan: bounded memory on a big memmap
FLOAT32_MAX = float(np.finfo(np.float32).max)  # training computes in float32


def _as_tensor(rows: Any) -> Tensor:
    """float32 torch copy of rows read from any of the three backends."""
    # Always a copy: callers may edit batches in place, which must not reach the mapped file.
    if isinstance(rows, np.ndarray):
        return torch.from_numpy(np.array(rows, dtype=np.float32))
    return rows.to(torch.float32, copy=True)


def _open_npy(path: Path) -> tuple[Any, str]:
    # Without this, np.load treats a non-.npy file as a pickle and advises allow_pickle.
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise ValueError("no .npy header")
    arr = np.load(path, mmap_mode="r")  # allow_pickle=False: object arrays are refused
    floating = np.issubdtype(arr.dtype, np.floating)
    return arr, str(arr.dtype) if floating else f"non-float {arr.dtype}"


def _open_safetensors(path: Path) -> tuple[Any, str]:
    handle = safe_open(str(path), framework="pt")
    names = list(handle.keys())
    if len(names) != 1 and "activations" not in names:
        raise UserError(f"{path} holds tensors {names}: keep one, or name it 'activations'")
    sliced = handle.get_slice(names[0] if len(names) == 1 else "activations")
    dtype = sliced.get_dtype()  # e.g. F32, BF16, I64; get_slice supports index lists
    return sliced, dtype if dtype.startswith(("F", "BF")) else f"non-float {dtype}"


def _open_pt(path: Path) -> tuple[Any, str]:
    obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    if isinstance(obj, dict) and "activations" in obj:
        obj = obj["activations"]
    if not isinstance(obj, Tensor):
        raise UserError(f"{path} holds a {type(obj).__name__}: save a tensor, or a dict "
                        "with an 'activations' tensor")
    name = str(obj.dtype).removeprefix("torch.")
    return obj, name if obj.is_floating_point() else f"non-float {name}"


_OPENERS = {".npy": _open_npy, ".safetensors": _open_safetensors, ".pt": _open_pt}


def _open(path: Path) -> tuple[Any, str]:
    """The lazily read array and its dtype name ('non-float ...' when not floating)."""
    if not path.is_file():
        raise UserError(f"data file {path} not found: check data.path")
    if path.suffix not in _OPENERS:
        raise UserError(f"data file {path} has suffix {path.suffix!r}: supported are "
                        f"{', '.join(SUFFIXES)}")
    try:
        return _OPENERS[path.suffix](path)
    except UserError:
        raise
    except Exception as err:  # each backend has its own error types for a damaged file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read {path} as {path.suffix} ({reason}): is the file "
                        "complete and in that format?") from None


def _bad_rows(block: Any) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows holding NaN or Inf, and of the finite rows holding a value beyond
    float32's range (float64 data only), in the block's own dtype (converted first, such a
    value would read as Inf)."""
    if isinstance(block, Tensor):
        finite = torch.isfinite(block)
        big = finite & (block.abs() > FLOAT32_MAX) if block.dtype == torch.float64 else None
        finite, big = finite.numpy(), None if big is None else big.numpy()
    else:
        finite = np.isfinite(block)
        big = finite & (np.abs(block) > FLOAT32_MAX) if block.dtype.itemsize > 4 else None
    bad = np.flatnonzero(~finite.all(axis=1))
    return bad, np.flatnonzero(big.any(axis=1)) if big is not None else bad[:0]


def _stored_bytes(block: Any) -> bytes:
    """The block's values as stored, C order, little-endian: the same rows give the same
    bytes whatever the file's layout (Fortran order, big-endian) or format."""
    if isinstance(block, Tensor):
        return block.contiguous().view(torch.uint8).numpy().tobytes()
    block = np.asarray(block)
    return np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes()


class FileSource:
    """An ActivationSource (see base.py) over an [N, d_in] array in a file."""

    true_features = None
    lm = None  # no LM behind these rows

    def __init__(self, path: str, seed: int, holdout_rows: int, min_train_rows: int):
        self.path, self.seed, self.holdout_rows = Path(path), int(seed), int(holdout_rows)
        self._rows, self.dtype = _open(self.path)
        shape = tuple(self._rows.get_shape() if hasattr(self._rows, "get_shape")
                      else self._rows.shape)
        if len(shape) != 2:
            raise UserError(f"data file {path} holds an array of shape {list(shape)}: "
                            "expected [N, d_in] (one activation vector per row)")
        if self.dtype.startswith("non-float"):
            raise UserError(f"data file {path} has dtype {self.dtype.split()[-1]}: save "
                            "activations as floats (float16/bfloat16/float32/float64)")
        self.n_rows, self.d_in = shape
        if self.d_in == 0:
            raise UserError(f"data file {path} holds {self.n_rows} rows of width 0 (shape "
                            f"{list(shape)}): save one activation vector per row")
        needed = self.holdout_rows + int(min_train_rows)
        if self.n_rows < needed:
            raise UserError(f"data file {path} has {self.n_rows} rows but {needed} are needed "
                            f"({self.holdout_rows} held out + {min_train_rows} to train on): "
                            "lower eval.rows or data.batch_size")
        self._check_finite()
        self.n_train = self.n_rows - self.holdout_rows

    def _check_finite(self) -> None:
        """Refuse NaN, Inf and values float32 cannot hold, naming the first bad row; digest
        the rows on the way (module docstring)."""
        digest = blake2b(digest_size=16)
        for start in range(0, self.n_rows, _SCAN_ROWS):
            block = self._rows[start:start + _SCAN_ROWS]
            digest.update(_stored_bytes(block))
            non_finite, too_big = _bad_rows(block)
            if len(non_finite) and not (len(too_big) and too_big[0] < non_finite[0]):
                raise UserError(f"data file {self.path} has NaN or Inf in row "
                                f"{start + int(non_finite[0])}: clean or regenerate the "
                                "activations")
            if len(too_big):
                row = int(too_big[0])
                largest = float(np.abs(np.asarray(block[row], dtype=np.float64)).max())
                raise UserError(f"data file {self.path} has a value of {largest:.4g} in row "
                                f"{start + row}, beyond float32's range (largest "
                                f"{FLOAT32_MAX:.4g}), which training computes in: rescale "
                                "the activations")
        self.blake2b = digest.hexdigest()

    def global_batches(self, batch_size: int, start_step: int) -> Iterator[Tensor]:
        per_epoch = self.n_train // batch_size  # global batches; a partial last one is dropped
        if per_epoch == 0:
            raise UserError(f"data file {self.path} has {self.n_train} training rows, fewer "
                            f"than one batch of {batch_size}: lower data.batch_size or eval.rows")

        def batches_of(epoch: int, first: int) -> Iterator[Tensor]:
            order = self._permutation(epoch)
            for k in range(first, per_epoch):
                # Sorted reads walk the memmap forwards: far fewer page faults than random.
                idx = order[k * batch_size:(k + 1) * batch_size].sort().values
                yield _as_tensor(self._rows[idx.numpy()])

        return epoch_batches(per_epoch, start_step, batches_of)

    def _permutation(self, epoch: int) -> Tensor:
        gen = torch.Generator()
        gen.manual_seed(stream_seed(self.seed, "file-epoch", epoch))
        return torch.randperm(self.n_train, generator=gen)

    def eval_rows(self, n_rows: int) -> Tensor:
        if n_rows > self.holdout_rows:
            raise UserError(f"asked for {n_rows} held-out rows but only {self.holdout_rows} "
                            "were held out: lower eval.rows")
        return _as_tensor(self._rows[self.n_train:self.n_train + n_rows])

    def describe(self) -> dict:
        return {"source": "file", "path": str(self.path), "rows": self.n_rows,
                "d_in": self.d_in, "dtype": self.dtype}

    def fingerprint(self) -> dict:
        """What a resume checks the file against (gsae_pl/run/inputs.py)."""
        return {"file": str(self.path), "rows": self.n_rows, "d_in": self.d_in,
                "dtype": self.dtype, "blake2b": self.blake2b}


@SOURCES.register("file")
def build(cfg) -> FileSource:
    return FileSource(cfg.data.path, seed=cfg.seed, holdout_rows=cfg.eval.rows,
                      min_train_rows=cfg.data.batch_size)
