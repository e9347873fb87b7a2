"""Baseline + rescale & shift (docs/method.md sec. 3 item 4, paper sec. 5.2): two stages, one run.

Stage 1 trains a baseline ReLU SAE. Its encoder is stored as the gate (W_enc, b_gate):
    f = ReLU((x - b_dec) @ W_enc + b_gate)          (the L1 penalty falls on f, as baseline)
Stage 2, the last `rescale_shift_steps` steps, freezes all of it and learns only r_mag and
b_mag on its frozen pre-activations: the gated SAE with weight sharing (eq. 7),
    f_tilde = 1[pi_gate > 0] * ReLU((x - b_dec) @ W_enc * exp(r_mag) + b_mag)
so the gate is the frozen baseline encoder and the result is one gated r_mag SAE.

At the switch b_mag := b_gate and r_mag := 0, so pi_mag = pi_gate and the output is the
baseline's exactly: 1[p > 0] * ReLU(p) = ReLU(p). The stage is a buffer, so checkpoints
carry it and a run resumes inside either stage. Freezing is done by SAEModule through
`frozen_parameters` (gradients dropped before Adam), not by `requires_grad`, so DDP
(find_unused_parameters=False) keeps one fixed set of parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gsae_pl.saes.base import Encoding
from gsae_pl.saes.gated import GatedSAE
from gsae_pl.saes.relu import encode_relu


class RescaleShiftSAE(GatedSAE):
    has_gate = False  # no aux term: stage 1 is the baseline, stage 2 learns no gate

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", compile_mode: str = "never",
                 rescale_shift_steps: int = 1000, **_):
        super().__init__(d_in, d_sae, unit_norm_decoder, weight_sharing="r_mag", kernel=kernel,
                         compile_mode=compile_mode)
        self.rescale_shift_steps = rescale_shift_steps
        self.register_buffer("in_stage2", torch.tensor(False))
        # A host-side copy of the buffer, so `encode` branches without a device sync per
        # step; it follows the buffer whenever a state dict (a checkpoint) is loaded.
        self.stage2 = False
        self.register_load_state_dict_post_hook(_sync_stage)

    def begin_step(self, step: int, max_steps: int) -> None:
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
        return encode_relu(x, self.W_enc, self.b_dec, self.b_gate, self.kernel,
                           self.compile_mode)

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        # Rows are unit norm already; dividing by a norm that rounds to 1 - 1 ulp would
        # still move the frozen decoder's bits.
        if not self.stage2:
            super().renormalise_decoder()


def _sync_stage(module: RescaleShiftSAE, _incompatible_keys) -> None:
    module.stage2 = bool(module.in_stage2)
