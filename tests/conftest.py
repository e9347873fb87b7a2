"""Shared test helpers: small configs built from the real schema, so tests follow it."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from gsae_pl.config import Config, check, migrate


def make_cfg(*overrides: str):
    """The schema's defaults plus dotted overrides, validated like a loaded config."""
    # Synthetic data unless a test names another source: the default (tiny_lm) builds an LM.
    dotlist = ["data.source=synthetic", *overrides]
    cfg = OmegaConf.structured(Config)
    for item in dotlist:  # one at a time: the last wins, under an old key name or its new one
        tree = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.merge(cfg, migrate(tree, "the overrides"))  # config.ALIASES
    check(cfg)
    return cfg


def _share_the_cores() -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker's torch takes
    its share of the cores instead of all of them: oversubscribed threads run slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
