"""Every shipped YAML resolved to its runs' configs, as plain data (the refactor's yardstick).

`python -m tests.data.resolved_configs` rewrites tests/data/resolved_configs.json; the test in
tests/test_resolved_configs.py compares today's resolution with that file.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from gsae_pl.config import load_config
from gsae_pl.suite.spec import is_suite_file, load_suite

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("resolved_configs.json")


def shipped_files() -> list[Path]:
    return sorted([*ROOT.glob("ablations/*.yaml"), *ROOT.glob("configs/**/*.yaml")])


def resolve_all() -> dict[str, dict]:
    """file (relative) -> run name -> resolved config (a run config is one run, named '')."""
    out: dict[str, dict] = {}
    for path in shipped_files():
        rel = str(path.relative_to(ROOT))
        if is_suite_file(path):
            out[rel] = {run.name: OmegaConf.to_container(run.cfg) for run in load_suite(path).runs}
        else:
            out[rel] = {"": OmegaConf.to_container(load_config(path))}
    return out


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(resolve_all(), indent=1, sort_keys=True) + "\n")
