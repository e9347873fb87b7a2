"""Baseline + rescale & shift (docs/method.md sec. 3 item 4, paper sec. 5.2): two stages, one run.

Stage 1 trains a baseline ReLU SAE. Its encoder is stored as the gate (W_enc, b_gate):
    f = ReLU((x - b_dec) @ W_enc + b_gate)          (the L1 penalty falls on f, as baseline)
Stage 2, the last `rescale_shift_steps` steps, freezes all of it and learns only r_mag and
b_mag on its frozen pre-activations: the gated SAE with weight sharing (eq. 7),
    f_tilde = 1[pi_gate > 0] * ReLU((x - b_dec) @ W_enc * exp(r_mag) + b_mag)
so the gate is the frozen baseline encoder and the result is one gated r_mag SAE.

At the switch b_mag := b_gate and r_mag := 0, so pi_mag = pi_gate and the output is the
baseline's exactly: 1[p > 0] * ReLU(p) = ReLU(p). The stage is a buffer, so checkpoints
carry it and a run resumes inside either stage.

Decision: the stage logic lives in this file. The architecture contributes its own Lightning
callback (`callbacks`, collected generically by SAEModule.configure_callbacks) that calls
`begin_step` before each batch, after the Resampler's revival, as SAEModule's own hook did.
Freezing is generic: SAEModule reads `frozen_parameters` of any SAE and drops their
gradients before Adam (not `requires_grad`, so DDP with find_unused_parameters=False keeps
one fixed set of parameters). A callback over a plain GatedSAE was not chosen: stage 1's
forward must be the baseline's (through a gated forward, the reconstruction gradient would
reach b_mag and r_mag, never b_gate behind the Heaviside gate: not baseline training), and
the stage buffer, the frozen set and the refusal to export a stage 1 checkpoint belong to
the SAE that checkpoints and export see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gsae_pl.errors import UserError
from gsae_pl.saes.base import ARCHITECTURES, FAST_FIELDS, Encoding
from gsae_pl.saes.gated import GatedConfig, GatedSAE
from gsae_pl.saes.relu import encode_relu


@dataclass
class RescaleShiftConfig(GatedConfig):
    # The last this-many steps of trainer.max_steps learn only r_mag and b_mag on the frozen
    # baseline (stage 2, docs/method.md sec. 3 item 4).
    rescale_shift_steps: int = 1000


@ARCHITECTURES.register("rescale_shift")
class RescaleShiftSAE(GatedSAE):
    Config = RescaleShiftConfig
    provides = (*FAST_FIELDS, "pre_acts")  # stage 1's reference path has no pi_mag
    aux_applies = False  # no aux term: stage 1 is the baseline, stage 2 learns no gate

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", compile_mode: str = "never", **own):
        own = self.Config(**own)
        # weight_sharing is r_mag by `check`: stage 2 learns r_mag (eq. 7)
        super().__init__(d_in, d_sae, unit_norm_decoder, kernel=kernel,
                         compile_mode=compile_mode, weight_sharing=own.weight_sharing)
        self.rescale_shift_steps = own.rescale_shift_steps
        self.register_buffer("in_stage2", torch.tensor(False))
        # A host-side copy of the buffer, so `encode` branches without a device sync per
        # step; it follows the buffer whenever a state dict (a checkpoint) is loaded.
        self.stage2 = False
        self.register_load_state_dict_post_hook(_sync_stage)

    def begin_step(self, step: int, max_steps: int) -> None:
        """Called before each training step (`step` optimiser steps done of `max_steps`)."""
        if step >= max_steps - self.rescale_shift_steps:
            self.enter_stage2()

    @torch.no_grad()
    def enter_stage2(self) -> None:
        """Freeze the baseline; on the transition only, start the magnitude path at it."""
        if self.stage2:
            return  # resumed inside stage 2: r_mag and b_mag are the checkpoint's
        self.b_mag.copy_(self.b_gate)
        self.r_mag.zero_()
        self.in_stage2.fill_(True)
        self.stage2 = True

    def frozen_parameters(self) -> list[nn.Parameter]:
        if self.stage2:
            return [self.W_enc, self.b_gate, self.W_dec, self.b_dec]
        return [self.r_mag, self.b_mag]  # not read by the baseline forward

    def encode(self, x: Tensor) -> Encoding:
        if self.stage2:
            return super().encode(x)
        kernel = "reference" if self.reference_only else self.kernel
        return encode_relu(x, self.W_enc, self.b_dec, self.b_gate, kernel, self.compile_mode)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        # Rows are unit norm already; dividing by a norm that rounds to 1 - 1 ulp would
        # still move the frozen decoder's bits.
        if not self.stage2:
            super().after_optimizer_step()


    def callbacks(self, cfg) -> list:
        return [_stage_switch(cfg.trainer.max_steps)]

    @classmethod
    def check(cls, cfg) -> None:
        steps, max_steps = cfg.sae.rescale_shift_steps, cfg.trainer.max_steps
        if not 0 < steps < max_steps:
            raise UserError(f"sae.rescale_shift_steps={steps} must lie strictly between 0 and "
                            f"trainer.max_steps={max_steps}: stage 1 trains the baseline first")
        if cfg.sae.weight_sharing != "r_mag":
            raise UserError(f"sae.architecture=rescale_shift learns r_mag (sec. 3 item 4): set "
                            f"sae.weight_sharing=r_mag, not {cfg.sae.weight_sharing}")
        # A resample at step s runs after the s-th optimiser step, s = max_steps included.
        from gsae_pl.resample_schedule import resample_steps

        done = [step for step in resample_steps(cfg.resample) if step <= max_steps]
        if done and done[-1] > max_steps - steps:
            raise UserError(f"resample at step {done[-1]} falls inside stage 2, which starts at "
                            f"step {max_steps - steps} (trainer.max_steps - "
                            "sae.rescale_shift_steps): resample less often, fewer times, or "
                            "shorten stage 2")

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        if not bool(weights.get("sae.in_stage2", False)):
            raise UserError("this rescale_shift checkpoint is still in stage 1 (a baseline with "
                            "r_mag, b_mag unset): export one taken in stage 2; nothing written")
        return super().saelens_weights(sae_cfg, weights)


def _stage_switch(max_steps: int):
    """The callback that switches the stage before each training batch."""
    from lightning.pytorch import Callback  # here: configs load without Lightning

    class RescaleShiftStage(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            pl_module.sae.begin_step(trainer.global_step, max_steps)

    return RescaleShiftStage()


def _sync_stage(module: RescaleShiftSAE, _incompatible_keys) -> None:
    module.stage2 = bool(module.in_stage2)
