"""SmolLM2-135M activation extraction and spliced-CE speed (issue 13), a few windows each.

    .venv/bin/python benchmarks/smollm2.py [--windows 8] [--layers 2 14 27] [--repeats 3]

Needs `make smollm2` (the first run converts the model into $GSAE_PL_CACHE). Measures, on
the held-out windows of configs/data/smollm2.yaml (context 128):
  1. tokens/s of activation extraction at blocks.L.hook_resid_post for an early, a middle
     and a late L: gsae_pl's path (TransformerBridge.run_with_hooks, stopped at the hook)
     against a plain Hugging Face forward stopped by a hook on layer L's output, and the
     largest difference between their activations;
  2. tokens/s of a full forward with the loss: bridge against plain HF (the bridge's own
     overhead), and of gsae_pl's spliced-CE evaluation (lm_eval.ce_sums: clean, spliced and
     zero-ablated passes, counted per held-out token), and of the same with CE clean and
     zero-ablated already kept, as in a suite (the spliced pass only);
  3. held-out CE with windows starting with <|endoftext|> (gsae_pl's choice) and with the
     instruct GGUF's BOS, <|im_start|>.
Best of --repeats after a warm-up call, with gsae_pl's allocator settings. Prints one
JSON object, with the load average: on a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsae_pl import allocator  # noqa: E402
from gsae_pl.config import load_config  # noqa: E402
from gsae_pl.data.transformer_lens import build_lm_source  # noqa: E402
from gsae_pl.eval.lm_eval import ce_sums  # noqa: E402


class _Stop(Exception):
    pass


def best_seconds(runs: dict, repeats: int) -> dict:
    """Best of `repeats` seconds for each of `runs`, taken in turn within each repeat so
    they share the machine's load, after one untimed call each: a first call pays one-off
    costs (fresh memory for the [B, T, 49152] logits, first use of a hook)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def hf_activation(hf, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer`'s output (the residual stream after it) from a plain HF forward that
    stops there."""
    captured = []

    def stop(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = hf.model.layers[layer].register_forward_hook(stop)
    try:
        hf(tokens)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def hf_ce(hf, tokens: torch.Tensor) -> float:
    return float(hf(tokens, labels=tokens).loss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 14, 27])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    allocator.configure()  # as every gsae_pl command does (gsae_pl/allocator.py)
    start = time.perf_counter()
    cfg = load_config(ROOT / "configs/data/smollm2.yaml",
                      ["trainer.accelerator=cpu", f"eval.loss_recovered.contexts={args.windows}",
                       "eval.rows=256"])
    source = build_lm_source(cfg)
    result = {"load_avg_start": os.getloadavg(), "torch_threads": torch.get_num_threads(),
              "source_build_s": round(time.perf_counter() - start, 1),
              "model_dir": source.model_name}
    hf = AutoModelForCausalLM.from_pretrained(source.model_name).eval()
    tokens = source.heldout_tokens(args.windows)
    n = tokens.numel()
    result.update(windows=args.windows, context=tokens.shape[1], tokens=n)
    for layer in args.layers:
        source.hook = f"blocks.{layer}.hook_resid_post"
        diff = (source.activations(tokens) - hf_activation(hf, tokens, layer)).abs().max()
        best = best_seconds({"bridge": lambda: source.activations(tokens),
                             "hf": lambda layer=layer: hf_activation(hf, tokens, layer)},
                            args.repeats)
        result[f"layer_{layer}"] = {"bridge_stop_tok_s": round(n / best["bridge"]),
                                    "hf_stop_tok_s": round(n / best["hf"]),
                                    "max_abs_diff": float(diff)}
    source.hook = cfg.data.hook
    with torch.no_grad():
        best = best_seconds({"bridge": lambda: source.bridge(tokens, return_type="loss"),
                             "hf": lambda: hf_ce(hf, tokens),
                             "ce_sums": lambda: ce_sums(source, tokens, lambda rows: rows)},
                            args.repeats)
        bridge_ce = float(source.bridge(tokens, return_type="loss"))
        # As inside a suite: CE clean and zero-ablated kept from the warm-up call, so each
        # timed call runs the spliced pass only (lm_eval._reference_ce).
        with tempfile.TemporaryDirectory() as folder:
            source.reference_dir = Path(folder)
            kept = best_seconds({"ce_sums": lambda: ce_sums(source, tokens, lambda rows: rows)},
                                args.repeats)
            source.reference_dir = None
    chat_bos = tokens.clone()
    chat_bos[:, 0] = source.bridge.tokenizer.convert_tokens_to_ids("<|im_start|>")
    result.update(
        full_forward_loss={"bridge_tok_s": round(n / best["bridge"]),
                           "hf_tok_s": round(n / best["hf"])},
        spliced_ce_eval={"hook": cfg.data.hook, "heldout_tok_s": round(n / best["ce_sums"]),
                         "passes": 3},
        spliced_ce_eval_reference_kept={"heldout_tok_s": round(n / kept["ce_sums"]),
                                        "passes": 1},
        heldout_ce={"endoftext_bos_hf": round(hf_ce(hf, tokens), 4),
                    "endoftext_bos_bridge": round(bridge_ce, 4),
                    "im_start_bos_hf": round(hf_ce(hf, chat_bos), 4)},
        load_avg_end=os.getloadavg(), total_s=round(time.perf_counter() - start, 1))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
