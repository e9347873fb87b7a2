"""Baseline + rescale & shift (docs/method.md sec. 3 item 4): stage 1 is the baseline, the switch
leaves the output unchanged, stage 2 moves only r_mag and b_mag, a resume keeps the stage,
and the config refuses what would break the two stages."""

from __future__ import annotations

import shutil

import pytest
import torch

from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.fit import main as fit_main
from gsae_pl.run.module import SAEModule
from gsae_pl.saelens import saelens_params
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.relu import ReLUSAE
from gsae_pl.saes.rescale_shift import RescaleShiftSAE
from tests.conftest import make_cfg
from tests.tiny_run import BASE, args, fit_process

RS = ["sae.architecture=rescale_shift", "loss.aux.enabled=false"]
FROZEN_IN_STAGE2 = ("W_enc", "b_gate", "W_dec", "b_dec")


def _sae(kernel="auto", d_in=6, d_sae=10) -> RescaleShiftSAE:
    sae = build_sae(make_cfg(*RS, f"sae.d_sae={d_sae}", f"sae.kernel={kernel}").sae, d_in)
    with torch.no_grad():  # off the symmetric init (r_mag, b_mag too: the switch must reset)
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return sae


def _relu_twin(sae: RescaleShiftSAE) -> ReLUSAE:
    relu = ReLUSAE(sae.d_in, sae.d_sae, kernel=sae.kernel)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(relu, name).copy_(getattr(sae, name))
        relu.b_enc.copy_(sae.b_gate)
    return relu


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_stage1_is_the_relu_baseline(kernel):
    sae = _sae(kernel)
    relu = _relu_twin(sae)
    x = torch.randn(64, 6)
    x_hat, enc = sae(x)
    x_hat_relu, enc_relu = relu(x)
    assert torch.equal(x_hat, x_hat_relu) and torch.equal(enc.f, enc_relu.f)
    assert enc.gate_acts is enc.f  # the L1 penalty falls on f, as for the baseline
    assert 0 < (enc.f > 0).float().mean() < 1
    # The same gradients too: stage 1 trains exactly the baseline.
    (x_hat.pow(2).sum() + enc.f.sum()).backward()
    (x_hat_relu.pow(2).sum() + enc_relu.f.sum()).backward()
    torch.testing.assert_close(sae.b_gate.grad, relu.b_enc.grad)
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(relu, name).grad)
    assert sae.r_mag.grad is None and sae.b_mag.grad is None  # not read in stage 1


def test_hand_set_switch():
    """d_in = d_sae = 2, identity weights: pre-activations are x - b_dec + b_gate."""
    sae = RescaleShiftSAE(2, 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.5, -1.0]))
        sae.b_mag.fill_(7.0)  # garbage the switch must overwrite
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    # ReLU([[1.5, 1.0], [-0.5, -0.5]]) = [[1.5, 1.0], [0, 0]]
    expected = torch.tensor([[1.5, 1.0], [0.0, 0.0]])
    assert torch.equal(sae.encode(x).f, expected)
    sae.enter_stage2()
    assert sae.b_mag.tolist() == [0.5, -1.0] and sae.r_mag.tolist() == [0.0, 0.0]
    assert torch.equal(sae.encode(x).f, expected)
    with torch.no_grad():  # stage 2: exp(r_mag) rescales, b_mag shifts, the gate stays
        sae.r_mag.copy_(torch.log(torch.tensor([2.0, 1.0])))
        sae.b_mag.copy_(torch.tensor([0.0, 3.0]))
    # gate [[1, 1], [0, 0]]; pi_mag = [[1*2 + 0, 2 + 3], ...] -> [[2, 5], [0, 0]]
    assert torch.allclose(sae.encode(x).f, torch.tensor([[2.0, 5.0], [0.0, 0.0]]))


@pytest.mark.parametrize("kernel", ["dense", "reference", "sparse"])
def test_entering_stage2_leaves_the_output_unchanged(kernel):
    sae = _sae(kernel)
    x = torch.randn(64, 6)
    with torch.no_grad():
        before, enc_before = sae(x)
    assert set(map(id, sae.frozen_parameters())) == {id(sae.r_mag), id(sae.b_mag)}
    sae.enter_stage2()
    assert bool(sae.in_stage2) and torch.equal(sae.b_mag, sae.b_gate)
    assert torch.equal(sae.r_mag, torch.zeros(10))
    assert {id(p) for p in sae.frozen_parameters()} == {id(getattr(sae, n))
                                                         for n in FROZEN_IN_STAGE2}
    with torch.no_grad():
        after, enc_after = sae(x)
    f_after = enc_after.f.csr().to_dense() if kernel == "sparse" else enc_after.f
    if kernel == "sparse":  # the sparse path computes pi_mag as (pi_gate - b_gate) + b_mag
        torch.testing.assert_close(after, before)
        torch.testing.assert_close(f_after, enc_before.f)
    else:  # 1[p > 0] * ReLU(p * exp(0) + 0) is ReLU(p) bit for bit
        assert torch.equal(after, before) and torch.equal(f_after, enc_before.f)
    with torch.no_grad():  # a second call (every later step) must not reset again
        sae.b_mag.add_(1.0)
    sae.enter_stage2()
    assert torch.equal(sae.b_mag, sae.b_gate + 1.0)


def test_stage2_sparsity_reaches_no_learnt_parameter():
    """The L1 term reads ReLU(pi_gate), i.e. only frozen parameters: r_mag and b_mag learn
    from reconstruction alone."""
    sae = _sae("reference")
    sae.enter_stage2()
    enc = sae.encode(torch.randn(64, 6))
    grads = torch.autograd.grad(enc.gate_acts.sum(), [sae.r_mag, sae.b_mag], allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(enc.f.sum(), [sae.r_mag, sae.b_mag])
    assert all(g.abs().sum() > 0 for g in grads)


# ---- a real run: 20 baseline steps, then 10 of rescale & shift ------------------------------
RUN = [*RS, "trainer.max_steps=30", "sae.rescale_shift_steps=10", "checkpoint.every_n_steps=5",
       "checkpoint.keep=10", "eval.every_n_steps=30", "loss.l1_coefficient=0.01"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run's directory, and per step the parameters that got no gradient in backward."""
    out = tmp_path_factory.mktemp("rescale_shift")
    missing = {}

    def record(self):
        missing[self.global_step] = [n for n, p in self.sae.named_parameters() if p.grad is None]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SAEModule, "on_after_backward", record, raising=False)
        assert fit_main(args(out, "run", *RUN)) == 0
    return out / "run", missing


def _state(run_dir, name):
    ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=False)
    return {k.removeprefix("sae."): v for k, v in ckpt["state_dict"].items()}


def test_every_parameter_gets_a_gradient_in_backward(run):
    """DDP (find_unused_parameters=False) needs one for every parameter in both stages."""
    _, missing = run
    assert sorted(missing) == list(range(30)) and not any(missing.values()), missing


def test_stage1_trains_the_baseline_and_leaves_r_mag_b_mag_at_init(run):
    run_dir, _ = run
    s5, s20 = _state(run_dir, "step5.ckpt"), _state(run_dir, "step20.ckpt")
    for state in (s5, s20):
        assert not state["in_stage2"]
        assert torch.equal(state["r_mag"], torch.zeros(32))
        assert torch.equal(state["b_mag"], torch.zeros(32))
    for name in FROZEN_IN_STAGE2:
        assert not torch.equal(s5[name], s20[name]), name


def test_stage2_moves_only_r_mag_and_b_mag(run):
    run_dir, _ = run
    switch = _state(run_dir, "step20.ckpt")  # the last stage-1 step: the weights at the switch
    for name in ("step25.ckpt", "last.ckpt"):
        state = _state(run_dir, name)
        assert state["in_stage2"]
        for frozen in FROZEN_IN_STAGE2:
            assert torch.equal(state[frozen], switch[frozen]), (name, frozen)
    final = _state(run_dir, "last.ckpt")
    assert (final["r_mag"] != 0).float().mean() > 0.5
    assert (final["b_mag"] != switch["b_gate"]).float().mean() > 0.5


def test_resume_inside_stage2_keeps_the_stage(run, tmp_path, capsys):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("metrics.json", "checkpoints/last.ckpt", "checkpoints/step30.ckpt"):
        (copy / name).unlink()
    assert fit_main(args(tmp_path, "run", *RUN)) == 0
    assert "from step 25" in capsys.readouterr().out
    resumed, whole = _state(copy, "last.ckpt"), _state(run_dir, "last.ckpt")
    assert resumed["in_stage2"]
    for name in FROZEN_IN_STAGE2:
        assert torch.equal(resumed[name], whole[name]), name
    # A resume that re-entered stage 2 would restart b_mag at b_gate and r_mag at 0.
    torch.testing.assert_close(resumed["r_mag"], whole["r_mag"])
    torch.testing.assert_close(resumed["b_mag"], whole["b_mag"])


@pytest.mark.slow
def test_ddp_run_keeps_the_baseline_frozen(tmp_path):
    """Lightning's DDP (find_unused_parameters=False) needs a gradient for every parameter in
    both stages: without the zero-gradient anchor it stops at the first step."""
    ddp = fit_process(tmp_path, "run", *RUN, "trainer.devices=2", "trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    switch, final = _state(tmp_path / "run", "step20.ckpt"), _state(tmp_path / "run", "last.ckpt")
    assert final["in_stage2"] and not torch.equal(final["b_mag"], switch["b_mag"])
    for name in FROZEN_IN_STAGE2:
        assert torch.equal(final[name], switch[name]), name


def test_loading_a_stage2_state_dict_restores_the_stage():
    sae = _sae()
    sae.enter_stage2()
    with torch.no_grad():
        sae.b_mag.add_(1.0)
    other = _sae()
    other.load_state_dict(sae.state_dict())
    assert other.stage2 and torch.equal(other.b_mag, sae.b_gate + 1.0)
    other.begin_step(step=3000, max_steps=4000)  # already in stage 2: nothing is reset
    assert torch.equal(other.b_mag, sae.b_gate + 1.0)


def test_stage1_checkpoint_is_not_exported():
    with pytest.raises(UserError, match="still in stage 1"):
        saelens_params({"sae": {"architecture": "rescale_shift"}},
                       {"sae.in_stage2": torch.tensor(False)})


# ---- config ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    ([*RS, "sae.rescale_shift_steps=0"], "sae.rescale_shift_steps=0 must lie strictly between"),
    ([*RS, "sae.rescale_shift_steps=4000"], "and trainer.max_steps=4000"),
    (["sae.architecture=rescale_shift"], "loss.aux needs a gate"),
    ([*RS, "sae.weight_sharing=untied"], "set sae.weight_sharing=r_mag"),
    # resamples after steps 1000 ... 4000; stage 2 starts at 4000 - 1000
    ([*RS, "resample.enabled=true", "resample.every_n_steps=1000", "resample.window_steps=500"],
     "resample at step 4000 falls inside stage 2, which starts at step 3000"),
])
def test_bad_configs_are_refused(overrides, needle):
    with pytest.raises(UserError) as info:
        load_config(BASE, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("resample", [
    ["resample.every_n_steps=1000", "resample.max_resamples=3"],  # last one just before
    ["resample.every_n_steps=1500"],  # 1500, 3000; 4500 and 6000 never happen
])
def test_resampling_before_stage2_is_accepted(resample):
    load_config(BASE, [*RS, "resample.enabled=true", "resample.window_steps=500", *resample])
