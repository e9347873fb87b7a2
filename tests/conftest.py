"""Shared test helpers: small configs built from the real schema, so tests follow it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gsae_pl.config import Config, validate


def make_cfg(*overrides: str):
    """The schema's defaults plus dotted overrides, validated like a loaded config."""
    # Synthetic data unless a test names another source: the default (tiny_lm) builds an LM.
    dotlist = ["data.source=synthetic", *overrides]
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(dotlist))
    validate(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
