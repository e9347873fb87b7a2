"""The learned per-feature biases' distributions (docs/method.md sec. 6), a Lightning callback.

ProLU's author found his learned biases 80-99% negative: a negative gate bias is a positive
firing threshold, the job the gated SAE's b_gate and JumpReLU's threshold do. So for each
per-feature bias or threshold vector the architecture declares (`SAE.bias_parameters`,
gsae_pl/saes/base.py; default the "zero" entries of its `resample_roles`), this logs
- every `log.histogram_every_n_steps` training steps, the histogram `bias/<name>` of its
  d_sae values and the scalar `bias_negative_fraction/<name>` (share of entries < 0);
- at every held-out evaluation, `val/bias_negative_fraction/<name>`, so the final weights'
  fraction lands in metrics.json as `bias_negative_fraction/<name>`.
The values are the parameters as stored (a threshold is positive where a bias would be
negative). They are the same on every process: no reduction.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def bias_parameters(sae) -> dict[str, Tensor]:
    """Name -> the per-feature bias / threshold vector, as the architecture declares them."""
    names = sae.bias_parameters
    if names is None:
        names = [name for name, role in sae.resample_roles.items() if role == "zero"]
    return {name: getattr(sae, name).detach() for name in names}


def negative_fractions(sae) -> dict[str, Tensor]:
    """`bias_negative_fraction/<name>` -> the share of its entries below zero (float64)."""
    return {f"bias_negative_fraction/{name}": (value < 0).double().mean()
            for name, value in bias_parameters(sae).items()}


class BiasHistograms(L.Callback):
    def __init__(self, every_n_steps: int):
        self.every_n_steps = int(every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:  # counts this batch's step already
            return
        step = pl_module._log_step()  # the x-axis of the module's other window metrics
        experiment = getattr(pl_module.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            for name, value in bias_parameters(pl_module.sae).items():
                experiment.add_histogram(f"bias/{name}", value.float().cpu(), step)
        pl_module._write(negative_fractions(pl_module.sae))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Logged like the evaluators' metrics (SAEModule.on_validation_epoch_end), so fit
        # reads it back with them into metrics.json.
        pl_module.log_dict({f"val/{k}": v.to(torch.float64)
                            for k, v in negative_fractions(pl_module.sae).items()})
