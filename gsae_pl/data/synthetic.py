"""Synthetic activations built from known features, to check that an SAE recovers them.

Each row is a sparse non-negative combination of `n_features` random unit directions in
R^d_in (more features than dimensions is allowed: superposition). Feature firing rates
follow a power law, optionally with groups of features that tend to fire together.
docs/method.md sec. 6 scores recovery with `mmcs` and `fraction_recovered`, defined below.

Every global batch comes from its own generator, seeded from (seed, stream, index), so
batch k is a pure function of the config: a restarted run sees exactly the batches it
would have seen, and no two steps or the held-out rows share a stream (data/base.py deals
each global batch out to the processes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae_pl.data.base import SOURCES
from gsae_pl.errors import UserError
from gsae_pl.ranges import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL
from gsae_pl.seeds import stream_seed


# Held-out rows are made in fixed-size chunks so eval_rows(n) is a prefix of eval_rows(m > n).
@dataclass
class SyntheticConfig:
    """The block `data.synthetic`: sparse non-negative mixtures of known unit directions."""

    seed: int = 0  # the data's own seed: true features and the sample stream
    d_in: int = field(default=64, metadata=POSITIVE)
    n_features: int = field(default=256, metadata=POSITIVE)
    avg_active: float = field(default=5.0, metadata=POSITIVE)
    frequency_exponent: float = field(default=1.0, metadata=NON_NEGATIVE)
    min_frequency_ratio: float = field(default=0.02, metadata=UNIT_INTERVAL)
    magnitude_noise: float = field(default=0.25, metadata=NON_NEGATIVE)
    correlated_groups: int = field(default=0, metadata=NON_NEGATIVE)
    group_size: int = field(default=4, metadata=POSITIVE)
    co_fire_prob: float = field(default=0.8, metadata=UNIT_INTERVAL)


_EVAL_CHUNK = 4096


def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(stream_seed(seed, stream, index))
    return gen


def power_law_frequencies(n_features: int, exponent: float, min_ratio: float,
                          avg_active: float) -> Tensor:
    """Firing probabilities p_i ∝ (i+1)^-exponent, floored, summing to avg_active, <= 1.

    The floor keeps the rarest features frequent enough to be learnable. Scaling then
    clipping at 1 would lose mass, so this water-fills: the k most frequent features are
    pinned at 1 and the rest scaled to carry the remaining avg_active - k exactly.
    """
    if avg_active > n_features:
        raise UserError(f"data.synthetic.avg_active={avg_active} exceeds n_features="
                        f"{n_features}: lower avg_active or raise n_features")
    p = torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent
    p = p.clamp(min=min_ratio * p.max())  # still non-increasing, which the fill relies on
    k = torch.arange(n_features, dtype=torch.float64)
    suffix = p.flip(0).cumsum(0).flip(0)  # suffix[k] = sum(p[k:])
    scale = (avg_active - k) / suffix
    pinned = int((p * scale > 1 + 1e-12).int().argmin())  # first k where nothing overflows
    out = torch.where(k < pinned, torch.ones_like(p), p * scale[pinned])
    return out.float()


class SyntheticSource:
    """An ActivationSource (see base.py) whose true features are known."""

    lm = None  # no LM behind these rows

    def __init__(self, cfg: SyntheticConfig):
        names = [f.name for f in dataclasses.fields(SyntheticConfig)]
        self.settings = {name: getattr(cfg, name) for name in names}
        self.seed = int(cfg.seed)
        self.d_in = int(cfg.d_in)
        self.n_features = int(cfg.n_features)
        self.magnitude_noise = float(cfg.magnitude_noise)
        self.groups, self.group_size = int(cfg.correlated_groups), int(cfg.group_size)
        self.co_fire_prob = float(cfg.co_fire_prob)
        if self.groups * self.group_size > self.n_features:
            raise UserError("data.synthetic.correlated_groups * group_size exceeds n_features: "
                            "use fewer or smaller groups")
        gen = _generator(self.seed, "features", 0)
        self.true_features = F.normalize(torch.randn(self.n_features, self.d_in, generator=gen),
                                         dim=1)
        # Base rates: members of correlated groups fire more often than this (co-firing).
        self.frequencies = power_law_frequencies(self.n_features, cfg.frequency_exponent,
                                                 cfg.min_frequency_ratio, cfg.avg_active)
        self._eval = torch.empty(0, self.d_in)

    def sample(self, n_rows: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Rows x [n_rows, d_in] and their coefficients c [n_rows, n_features]: x = c @ W."""
        fired = torch.rand(n_rows, self.n_features, generator=gen) < self.frequencies
        fired = self._co_fire(fired, gen)
        # Draw magnitudes only for the few active entries: ~100x fewer normals than dense.
        rows, cols = fired.nonzero(as_tuple=True)
        mags = (1 + self.magnitude_noise * torch.randn(rows.numel(), generator=gen)).abs()
        coeff = torch.zeros(n_rows, self.n_features)
        coeff[rows, cols] = mags
        return coeff @ self.true_features, coeff

    def _co_fire(self, fired: Tensor, gen: torch.Generator) -> Tensor:
        """When any member of a group fires, each other member joins with co_fire_prob."""
        width = self.groups * self.group_size
        if width == 0:
            return fired
        block = fired[:, :width].view(-1, self.groups, self.group_size)
        join = torch.rand(block.shape, generator=gen) < self.co_fire_prob
        fired[:, :width] = (block | (block.any(-1, keepdim=True) & join)).flatten(1)
        return fired

    def global_batches(self, batch_size: int, start_step: int) -> Iterator[Tensor]:
        step = int(start_step)
        while True:
            yield self.sample(batch_size, _generator(self.seed, "train", step))[0]
            step += 1

    def eval_rows(self, n_rows: int) -> Tensor:
        """The first n_rows of the held-out stream; a copy, so callers may edit it."""
        while len(self._eval) < n_rows:
            chunk = len(self._eval) // _EVAL_CHUNK
            rows, _ = self.sample(_EVAL_CHUNK, _generator(self.seed, "eval", chunk))
            self._eval = torch.cat([self._eval, rows])
        return self._eval[:n_rows].clone()

    def probe_sets(self, n_rows: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Held-out rows (a stream of their own) labelled by whether a true feature fired,
        for the linear probes (gsae_pl/eval/probes.py): `feature_frequent`, the most
        frequent feature that fires on at most half the rows (so both classes are large),
        and `feature_rare`, the least frequent one."""
        rows, coeff = self.sample(n_rows, _generator(self.seed, "probe", 0))
        p = self.frequencies
        frequent = int(torch.where(p <= 0.5, p, -1.0).argmax())
        return {"feature_frequent": (rows, coeff[:, frequent] > 0),
                "feature_rare": (rows, coeff[:, int(p.argmin())] > 0)}

    def describe(self) -> dict:
        return {"source": "synthetic", **self.settings}


@SOURCES.register("synthetic")
def build(cfg) -> SyntheticSource:
    return SyntheticSource(cfg.data.synthetic)


build.Settings = SyntheticConfig  # its block of the config: data.synthetic


def _max_cosine(true_features: Tensor, W_dec: Tensor) -> Tensor:
    """For each true feature, its best cosine with any decoder row (one matmul)."""
    with torch.no_grad():
        true_FD = F.normalize(true_features.detach().float().to(W_dec.device), dim=1)
        dec_SD = F.normalize(W_dec.detach().float(), dim=1)
        return (true_FD @ dec_SD.T).max(dim=1).values


def mmcs(true_features: Tensor, W_dec: Tensor) -> float:
    """Mean over true features of the max cosine similarity with any decoder row."""
    return float(_max_cosine(true_features, W_dec).mean())


def fraction_recovered(true_features: Tensor, W_dec: Tensor, threshold: float = 0.9) -> float:
    """Share of true features that some decoder row matches with cosine > threshold."""
    return float((_max_cosine(true_features, W_dec) > threshold).float().mean())
