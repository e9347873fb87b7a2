"""Loss recovered (PAPER.md sec. 6): splice the SAE into the LM on held-out text.

    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    delta_lm_loss  = CE_spliced - CE_clean

CE_spliced replaces the activation at the SAE's hook by its reconstruction (mapped back to
the raw scale, since the SAE sees x * norm_scale; PAPER.md sec. 4), CE_zero by zeros.
Only the positions the SAE trains on are replaced (BOS left alone when data.exclude_bos):
the SAE never saw BOS activations, and zeroing them would measure the attention sink, not
the site. CE is the mean next-token loss over every predicted token of the windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Per-token CE sums and counts: summed over DDP processes before the ratios are taken.
_SUMS = ("clean", "spliced", "zero")


@torch.no_grad()
def ce_sums(lm, tokens: Tensor, reconstruct: Callable[[Tensor], Tensor]) -> Tensor:
    """[4] float64: summed CE clean, spliced, zero over `tokens`' predictions, and the count.

    `lm` is a TransformerLensSource; `reconstruct` maps raw [n, d_in] rows to raw rows.
    """
    sums = torch.zeros(4, dtype=torch.float64)
    for chunk in tokens.split(lm.lm_batch_size):
        chunk = chunk.to(lm.device)
        keep = lm.keep_mask(chunk)

        def splice(act: Tensor, hook, fill: Callable[[Tensor], Tensor], keep=keep) -> Tensor:
            flat = act.flatten(2)  # [B, T, d_in] view of any hook's shape
            out = flat.clone()
            out[keep] = fill(flat[keep].float()).to(act.dtype)
            return out.view_as(act)

        runs = {"clean": [],
                "spliced": [(lm.hook, lambda a, hook: splice(a, hook, reconstruct))],
                "zero": [(lm.hook, lambda a, hook: splice(a, hook, torch.zeros_like))]}
        for i, name in enumerate(_SUMS):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lm.device.type == "cuda"):
                loss = lm.bridge.run_with_hooks(chunk, fwd_hooks=runs[name], return_type="loss",
                                                loss_per_token=True)
            sums[i] += loss.double().sum().cpu()
        sums[3] += loss.numel()
    return sums


def loss_recovered(sums: Tensor) -> dict[str, float]:
    """The metrics from (possibly process-summed) `ce_sums` output."""
    clean, spliced, zero = (sums[:3] / sums[3]).tolist()
    out = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero": zero,
           "delta_lm_loss": spliced - clean}
    if zero != clean:  # else the site does not matter to the loss: the ratio is undefined
        out["loss_recovered"] = (zero - spliced) / (zero - clean)
    return out
