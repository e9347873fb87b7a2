"""Where gsae_pl keeps what it builds once per machine: the tiny LM, converted local models,
activation caches (`$GSAE_PL_CACHE`, default ~/.cache/gsae_pl)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("GSAE_PL_CACHE") or Path.home() / ".cache" / "gsae_pl")
