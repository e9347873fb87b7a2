"""`python -m gsae_pl.cache --config FILE [key=value ...]`: write the activation cache of a
run config ahead of its runs (gsae_pl/data/cache.py), or say that it is already there."""

from __future__ import annotations

import argparse
import sys

import torch

from gsae_pl.cli import ArgumentParser, add_config_arguments, parse_config_arguments, run_main
from gsae_pl.config import load_config
from gsae_pl.data.cache import cache_dir, ensure_cache
from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.cache", description=__doc__)
    add_config_arguments(parser)
    return parse_config_arguments(parser, argv)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.data.source not in ("tiny_lm", "transformer_lens"):
        raise UserError(f"data.source={cfg.data.source} is read directly, not cached: the "
                        "cache is for data.source=tiny_lm or transformer_lens")
    lm = build_lm_source(cfg)
    directory = cache_dir(lm, cfg)
    meta, wrote = ensure_cache(lm, directory, cfg)
    if not wrote:
        print(f"{directory}: already holds this cache ({meta['rows']} rows); reusing it")
        return 0
    gb = meta["rows"] * meta["d_in"] * torch.finfo(getattr(torch, meta["dtype"])).bits / 8e9
    print(f"{directory}: {meta['rows']} rows x {meta['d_in']} ({gb:.2f} GB) in "
          f"{meta['seconds']} s; norm_scale {meta['normalisation']['norm_scale']:.4g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
