"""AuxK (docs/method.md sec. 4): its value by hand, its gradient reaching only dead latents,
its dead window, and its refusals: architectures without dead-latent counts, and the L1
family, on which it could train nothing.

Hand-set TopK SAE: d_in = d_sae = 2, W_enc = W_dec = I, biases 0, k = 1, latent 1 dead.
    x = [[2, 1], [0, 3]]: z = x; f = [[2, 0], [0, 3]]; e = x - x_hat = [[0, 1], [0, 0]]
    z_aux (top 1 dead latent per row, ReLU) = [[0, 1], [0, 3]]: e_hat = [[0, 1], [0, 3]]
    mean_rows ||e - e_hat||^2 = (0 + 9) / 2 = 4.5
    mean(e) = [0, 0.5]; mean_rows ||e - mean(e)||^2 = (0.25 + 0.25) / 2 = 0.25
    L_auxk = 4.5 / 0.25 = 18, times alpha = 1/32: 0.5625
"""

from __future__ import annotations

import pytest
import torch

from gsae_pl.errors import UserError
from tests.conftest import make_cfg
from tests.saes.test_topk import build

AUXK = ("loss.auxk.enabled=true", "loss.auxk.dead_tokens=100")


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_the_value_by_hand(kernel):
    sae, objective = build("topk", "sae.d_sae=2", "sae.k=1", f"sae.kernel={kernel}", *AUXK,
                           d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.tokens_since_fired[1] = 100
    sae.eval()  # keeps the hand-set dead count as it is
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    x_hat, enc = sae(x)
    terms = objective(x, x_hat, enc, sae, step=0)
    assert float(terms["auxk"]) == pytest.approx(18 / 32)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_the_gradient_reaches_only_dead_latents(arch, kernel):
    sae, objective = build(arch, "sae.d_sae=24", "sae.k=3", f"sae.kernel={kernel}", *AUXK,
                           "loss.reconstruction.enabled=false", d_in=6)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn(24))
        sae.tokens_since_fired[dead] = 100
    sae.eval()
    x = torch.randn(16, 6)
    x_hat, enc = sae(x)
    objective(x, x_hat, enc, sae, step=10**6)["auxk"].backward()
    alive = ~dead
    assert torch.count_nonzero(sae.W_enc.grad[:, alive]) == 0
    assert torch.count_nonzero(sae.b_enc.grad[alive]) == 0
    assert torch.count_nonzero(sae.W_dec.grad[alive]) == 0
    assert sae.W_enc.grad[:, dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.b_dec.grad.abs().sum() > 0  # through the centring x - b_dec, as decided


def test_no_dead_latent_no_term():
    sae, objective = build("topk", "sae.d_sae=8", "sae.k=2", *AUXK, d_in=4)
    x = torch.randn(5, 4)
    x_hat, enc = sae(x)
    assert float(objective(x, x_hat, enc, sae, step=0)["auxk"]) == 0.0


def test_the_dead_window_counts_training_tokens_since_each_latent_fired():
    """dead_tokens = 12 on batches of 4 rows: a latent missing 3 batches is dead; a fire
    resets it. Latent 1 never fires (its z is the smallest), latent 0 always does."""
    sae, _ = build("topk", "sae.d_sae=2", "sae.k=1", *AUXK, d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    x = torch.ones(4, 2)
    for n, dead_after in enumerate([False, False, True], start=1):
        sae(x)
        assert sae.tokens_since_fired.tolist() == [0, 4 * n]
        assert sae.dead(12).tolist() == [False, dead_after]
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[-1.0, 1.0], [0.0, 0.0]]))  # now latent 1 fires
    sae(x)
    assert sae.tokens_since_fired.tolist() == [4, 0] and not sae.dead(12).any()


def test_k_aux_is_capped_by_the_dead_latents():
    sae, objective = build("topk", "sae.d_sae=8", "sae.k=2", *AUXK, "loss.auxk.k_aux=6",
                           d_in=4)
    with torch.no_grad():
        sae.tokens_since_fired[:2] = 100  # 2 dead < k_aux = 6
    sae.eval()
    x = torch.randn(5, 4)
    x_hat, enc = sae(x)
    assert torch.isfinite(objective(x, x_hat, enc, sae, step=0)["auxk"])


def test_architectures_without_dead_counts_are_refused():
    with pytest.raises(UserError, match="loss.auxk needs the dead-latent counts that "
                                        "sae.architecture=jumprelu does not keep"):
        make_cfg("sae.architecture=jumprelu", "loss.aux.enabled=false", "loss.auxk.enabled=true")


@pytest.mark.parametrize("arch, pre", [("relu", "z"), ("gated", "pi_gate")])
def test_the_l1_family_is_refused_with_the_reason(arch, pre):
    """A ReLU or gated latent fires exactly where its pre-activation is positive, so one dead
    on the batch has pre-activation <= 0 on every row: AuxK's ReLU(TopK(...)) is 0 there and
    so is its gradient. The refusal says so (and points to resampling)."""
    with pytest.raises(UserError, match=f"loss.auxk cannot apply to sae.architecture={arch}: "
                                        f".*only if {pre} <= 0 on every row.*resample"):
        make_cfg(f"sae.architecture={arch}", "loss.aux.enabled=false", "loss.auxk.enabled=true")


def test_auxk_on_relu_dead_latents_would_train_nothing():
    """The reason, computed: AuxK's formula on a ReLU SAE's latents that fired on no row of
    the batch gives every parameter a zero gradient."""
    torch.manual_seed(0)
    sae, _ = build("relu", "sae.d_sae=16", "loss.aux.enabled=false", d_in=4)
    with torch.no_grad():
        sae.b_enc[:8] = -50.0  # latents 0-7 never fire on these rows
    x = torch.randn(32, 4)
    x_hat, enc = sae(x)
    dead = (enc.f != 0).sum(0) == 0
    assert dead[:8].all()
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    columns = torch.topk(z.detach().masked_fill(~dead, -torch.inf), 4, dim=1).indices
    z_aux = torch.relu(z.gather(1, columns))
    e = (x - x_hat).detach()
    e_hat = torch.zeros_like(e).index_add(0, torch.arange(32).repeat_interleave(4),
                                          z_aux.reshape(-1, 1) * sae.W_dec[columns.flatten()])
    (e - e_hat).pow(2).sum(1).mean().backward()
    for name, param in sae.named_parameters():
        assert param.grad is None or not param.grad.any(), name
