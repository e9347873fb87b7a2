"""Which rows of SmolLM2's residual stream are outliers (issue 29, item 1): their tokens,
their positions in the context and the layer at which they first appear.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smollm2_outliers.py [--contexts 384]

Needs `make smollm2`. The model, text, context length and BOS handling are those of
configs/data/smollm2.yaml, through gsae_pl's own source (build_lm_source): held-out windows
of 128 tokens starting with <|endoftext|>, spread over all the held-out files as loss
recovered reads them. One forward per batch of windows records every layer's
blocks.L.hook_resid_post row norms (and stops after the last block: no logits).

A row is an outlier at a layer when its norm exceeds REFERENCE_RATIO (10) times that
layer's median non-BOS row norm: gsae_pl/data/outliers.py's rule, with the median of the
held-out rows themselves. BOS rows (each window's first position and the document
separators inside windows, which are the same token) are not SAE rows (data.exclude_bos):
they are reported apart, never counted in the medians or the shares.

Writes benchmarks/results/smollm2_outliers.json and prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsae_pl import allocator  # noqa: E402
from gsae_pl.data.outliers import REFERENCE_RATIO, threshold  # noqa: E402

PRESET = ROOT / "configs/data/smollm2.yaml"
OUT = ROOT / "benchmarks/results/smollm2_outliers.json"
TOP_TOKENS = 15
EXAMPLES = 8
CONTEXT_BEFORE = 6  # tokens shown before an example outlier


# ---- the LM pass ------------------------------------------------------------------------
def build_source(contexts: int):
    """gsae_pl's SmolLM2 source from the preset, so the model, text, windows and BOS rule
    are the data source's own; small eval.rows: only the held-out windows are wanted."""
    from gsae_pl.config import load_config
    from gsae_pl.data.transformer_lens import build_lm_source

    cfg = load_config(PRESET, ["trainer.accelerator=cpu", "eval.rows=256",
                               f"eval.loss_recovered.contexts={contexts}"])
    return build_lm_source(cfg)


def site_layer(hook: str) -> int:
    """The block of a blocks.L.hook_resid_post site (the preset's is block 14)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if match is None:
        raise SystemExit(f"the site {hook} is not a resid_post hook: no layer to compare")
    return int(match.group(1))


@torch.no_grad()
def layer_norms(source, tokens: Tensor) -> Tensor:
    """float64 [n_layers, B, T]: every block's resid_post row norms, a batch of
    data.lm_batch_size windows per forward, as the source batches them."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    n_layers = source.bridge.cfg.n_layers

    def record(norms: list, layer: int):
        def hook(act: Tensor, hook) -> None:
            # float64 norms of the float32 rows, as data/outliers.py computes them
            norms[layer] = act.flatten(2).double().norm(dim=-1).cpu()
            if layer == n_layers - 1:  # nothing after the last block is needed
                raise StopAtLayerException(act)
        return hook

    out = []
    for batch in tokens.split(source.lm_batch_size):
        norms: list[Tensor | None] = [None] * n_layers
        hooks = [(f"blocks.{i}.hook_resid_post", record(norms, i)) for i in range(n_layers)]
        source.bridge.run_with_hooks(batch.to(source.device), fwd_hooks=hooks)
        out.append(torch.stack(norms))
    return torch.cat(out, dim=1)


# ---- the analysis (pure functions of norms and tokens: tests/data/test_outliers_report.py)
def flag_outliers(norms: Tensor, ratio: float = REFERENCE_RATIO) -> tuple[Tensor, Tensor]:
    """norms [L, N] of non-BOS rows -> (each layer's median norm [L], outlier flags [L, N]).
    torch's median is the lower one for even N, as data/outliers.median_norm's."""
    medians = norms.median(dim=1).values
    limits = torch.tensor([threshold(ratio, float(m)) for m in medians], dtype=norms.dtype)
    return medians, norms > limits[:, None]


def norm_shares(norms: Tensor, flags: Tensor) -> dict:
    """The flagged rows' share of the rows and of the summed squared norm (one layer):
    the squared norm is what the SAE's MSE, FVU and the normalisation scalar weigh."""
    squared = norms.pow(2)
    return {"rows": int(flags.numel()), "outliers": int(flags.sum()),
            "share_of_rows": float(flags.double().mean()),
            "share_of_squared_norm": float(squared[flags].sum() / squared.sum())}


def onset_layers(flags: Tensor) -> Tensor:
    """int [N]: the first layer at which each row is flagged, -1 where it never is."""
    first = flags.int().argmax(dim=0)  # argmax of a 0/1 column: its first 1
    return torch.where(flags.any(dim=0), first, torch.full_like(first, -1))


def positions(keep: Tensor) -> tuple[Tensor, Tensor]:
    """[B, T] each position's index in its window, and its distance from the last BOS
    position at or before it (1 = the first token of a document or of the window): windows
    pack documents, so a separator inside a window starts a new document."""
    index = torch.arange(keep.shape[1]).expand_as(keep)
    last_bos = torch.where(~keep, index, torch.zeros_like(index)).cummax(dim=1).values
    return index, index - last_bos


def position_bin(p: int) -> str:
    """1..8 one by one (where outliers crowd), then power-of-two ranges 9-16, 17-32, ..."""
    if p <= 8:
        return str(p)
    hi = 1 << (p - 1).bit_length()
    return f"{hi // 2 + 1}-{hi}"


def position_histogram(flagged: Tensor, every: Tensor) -> dict:
    """Outliers per position bin, beside every row's share of that bin: position 1 holds
    1/127 of the rows, so a count means little without the base rate."""
    counts = Counter(position_bin(int(p)) for p in flagged)
    base = Counter(position_bin(int(p)) for p in every)
    order = sorted(base, key=lambda b: int(b.split("-")[0]))
    return {b: {"outliers": counts.get(b, 0),
                "share_of_outliers": counts.get(b, 0) / max(len(flagged), 1),
                "share_of_rows": base[b] / len(every)} for b in order}


def token_table(flagged_ids: Tensor, all_ids: Tensor, first_ids: Tensor,
                decode: Callable[[int], str], top: int = TOP_TOKENS) -> list[dict]:
    """The most common outlier tokens: count, share of the outliers, and how often the
    token is an outlier wherever it occurs and where it is the first token after a BOS
    (`first_ids`): 1.0 says always, a small rate only in some contexts."""
    everywhere, first = Counter(all_ids.tolist()), Counter(first_ids.tolist())
    n = max(len(flagged_ids), 1)
    return [{"token": decode(t), "id": t, "count": c, "share_of_outliers": c / n,
             "occurrences": everywhere[t], "outlier_rate": c / everywhere[t],
             "first_after_bos": first[t],
             "outlier_rate_first_after_bos": c / first[t] if first[t] else None}
            for t, c in Counter(flagged_ids.tolist()).most_common(top)]


def per_layer(norms: Tensor, medians: Tensor, flags: Tensor, site_flags: Tensor,
              first: Tensor) -> list[dict]:
    """Per layer: its median norm, its own outliers' shares and how many of them are the
    first token after a BOS (`first` [N]), and for the site's outliers the share already
    (still) flagged there and their median norm over the typical rows' (those not flagged
    at the site) median norm."""
    rows = []
    for layer in range(norms.shape[0]):
        shares = norm_shares(norms[layer], flags[layer])
        typical = norms[layer][~site_flags].median()
        ratio = norms[layer][site_flags].median() / typical if site_flags.any() else None
        rows.append({"layer": layer, "median_norm": float(medians[layer]),
                     "share_of_rows": shares["share_of_rows"],
                     "share_of_squared_norm": shares["share_of_squared_norm"],
                     "outliers_first_after_bos": float(first[flags[layer]].double().mean())
                     if flags[layer].any() else None,
                     "site_outliers_flagged": float(flags[layer][site_flags].double().mean())
                     if site_flags.any() else None,
                     "median_ratio_outlier_typical": None if ratio is None else float(ratio)})
    return rows


def bos_report(bos_norms: Tensor, medians: Tensor, site: int, bos_first: Tensor,
               ratio: float = REFERENCE_RATIO) -> dict:
    """BOS rows [L, M] against the non-BOS medians: how far above them they sit, per layer
    and at the site, split into window starts and separators inside windows."""
    over = bos_norms / medians[:, None]
    at_site = over[site]
    return {"rows": int(bos_norms.shape[1]), "window_starts": int(bos_first.sum()),
            "separators_inside_windows": int((~bos_first).sum()),
            "share_above_ratio_at_site": float((at_site > ratio).double().mean()),
            "median_ratio_to_nonbos_median_at_site": float(at_site.median()),
            "median_ratio_window_start_at_site": float(at_site[bos_first].median()),
            "median_ratio_separator_at_site": float(at_site[~bos_first].median())
            if (~bos_first).any() else None,
            "onset_histogram": dict(sorted(Counter(
                onset_layers(over > ratio).tolist()).items())),
            "median_ratio_per_layer": [float(r) for r in over.median(dim=1).values]}


def examples(tokens: Tensor, where: Tensor, onset: Tensor, ratio: Tensor,
             decode: Callable[[int], str], n: int = EXAMPLES) -> list[dict]:
    """The first site outlier of each of the `n` most common outlier tokens, with the
    tokens before it: what the token is doing where it becomes an outlier."""
    seen, out = set(), []
    order = Counter(tokens[where[:, 0], where[:, 1]].tolist())
    wanted = {t for t, _ in order.most_common(n)}
    for k, (b, t) in enumerate(where.tolist()):
        token = int(tokens[b, t])
        if token in wanted and token not in seen:
            seen.add(token)
            before = tokens[b, max(t - CONTEXT_BEFORE, 0):t].tolist()
            out.append({"token": decode(token), "window": b, "position": t,
                        "before": [decode(i) for i in before], "onset_layer": int(onset[k]),
                        "ratio_to_median_at_site": float(ratio[k])})
    return out


def analyse(norms: Tensor, tokens: Tensor, keep: Tensor, site: int,
            decode: Callable[[int], str], ratio: float = REFERENCE_RATIO) -> dict:
    """All figures from norms [L, B, T], tokens [B, T] and the non-BOS mask [B, T]."""
    rows = norms[:, keep]  # [L, N]: the SAE's rows
    medians, flags = flag_outliers(rows, ratio)
    site_flags = flags[site]
    onset = onset_layers(flags[:, site_flags])
    index, since_bos = positions(keep)
    ids, first = tokens[keep], since_bos[keep] == 1
    where = keep.nonzero()[site_flags]  # (window, position) of each site outlier
    return {
        "ratio": ratio, "site_layer": site, "n_layers": int(norms.shape[0]),
        "site": norm_shares(rows[site], site_flags),
        "tokens": token_table(ids[site_flags], ids, ids[first], decode),
        "first_after_bos": {"rows": int(first.sum()),
                            "outliers": int((first & site_flags).sum())},
        "position_in_window": position_histogram(index[keep][site_flags], index[keep]),
        "tokens_since_bos": position_histogram(since_bos[keep][site_flags], since_bos[keep]),
        "onset_histogram": dict(sorted(Counter(onset.tolist()).items())),
        "per_layer": per_layer(rows, medians, flags, site_flags, first),
        "bos": bos_report(norms[:, ~keep], medians, site, index[~keep] == 0, ratio),
        "examples": examples(tokens, where, onset, rows[site][site_flags] / medians[site],
                             decode),
    }


# ---- output ---------------------------------------------------------------------------
def summary(result: dict) -> str:
    """A few lines for a person; the JSON holds the rest."""
    s, site = result["analysis"], result["analysis"]["site"]
    bos = s["bos"]
    top = ", ".join(f"{t['token']!r} {t['count']} ({t['share_of_outliers']:.0%})"
                    for t in s["tokens"][:6])
    since = s["tokens_since_bos"].get("1", {"outliers": 0})
    first = s["first_after_bos"]
    layer = s["per_layer"]
    lines = [
        f"{result['hook']}: {result['contexts']} held-out windows x {result['context']} "
        f"tokens in {result['lm_pass_s']} s",
        f"non-BOS rows above {s['ratio']:g}x the median norm: {site['outliers']} of "
        f"{site['rows']} ({site['share_of_rows']:.3%}), holding "
        f"{site['share_of_squared_norm']:.1%} of the squared norm",
        f"tokens: {top}",
        f"first token after a BOS: {since['outliers']} of the {site['outliers']} outliers; "
        f"{first['outliers']} of the {first['rows']} rows that are first after a BOS",
        "position in window: " + ", ".join(f"{b}: {h['outliers']}" for b, h in
                                            s["position_in_window"].items() if h["outliers"]),
        f"layer onset: {s['onset_histogram']}",
        "median ratio outlier/typical by layer: " + " ".join(
            f"{r['layer']}:{r['median_ratio_outlier_typical']:.0f}" for r in layer
            if r["median_ratio_outlier_typical"] is not None),
        f"BOS rows: {bos['rows']}, median {bos['median_ratio_to_nonbos_median_at_site']:.0f}x "
        f"the non-BOS median at the site, onset {bos['onset_histogram']}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=384,
                        help="held-out windows of 128 tokens (default 384: 49,152 tokens)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    allocator.configure()  # as every gsae_pl command and benchmark does
    start = time.perf_counter()
    source = build_source(args.contexts)
    site = site_layer(source.hook)
    tokens = source.heldout_tokens(args.contexts)
    built = time.perf_counter()
    norms = layer_norms(source, tokens)
    lm_pass = time.perf_counter() - built
    tokenizer = source.bridge.tokenizer
    analysis = analyse(norms, tokens, source.keep_mask(tokens), site,
                       lambda t: tokenizer.decode([t]))
    result = {"model": source.model_name, "hook": source.hook, "contexts": args.contexts,
              "context": int(tokens.shape[1]), "tokens": int(tokens.numel()),
              "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
              "source_build_s": round(built - start, 1), "lm_pass_s": round(lm_pass, 1),
              "total_s": round(time.perf_counter() - start, 1), "analysis": analysis}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
