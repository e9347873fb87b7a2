"""Dead-feature resampling (PAPER.md sec. 4): the lr schedule at hand-picked steps, a dead
feature revived (and only it), the loss^2 draw, the window, and a real run that uses it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gsae_pl import resample
from gsae_pl.errors import UserError
from gsae_pl.resample import Resampler, choose_rows, lr_multiplier, resample_dead
from gsae_pl.saes import build_sae
from tests.conftest import make_cfg

SCHEDULE = ("resample.enabled=true", "resample.every_n_steps=2000", "resample.max_resamples=2",
            "resample.window_steps=500", "resample.lr_drop=0.1", "resample.lr_return_steps=1000")


@pytest.mark.parametrize("step,expected", [
    (0, 1.0), (1999, 1.0),  # before the first resample
    (2000, 0.1),  # the step right after it: dropped to 0.1x
    (2250, 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2),  # a quarter of the way back
    (2500, 0.55),  # half-way: the cosine's midpoint
    (3000, 1.0), (3999, 1.0),  # returned after lr_return_steps
    (4000, 0.1), (4500, 0.55),  # the second (and last) resample
    (6000, 1.0), (6500, 1.0),  # max_resamples=2: no third one
])
def test_lr_multiplier_at_hand_picked_steps(step, expected):
    assert lr_multiplier(step, make_cfg(*SCHEDULE).resample) == pytest.approx(expected)


def test_lr_multiplier_is_one_when_off_and_composes_with_warmup():
    from gsae_pl.module import SAEModule
    off = make_cfg("resample.enabled=false", "resample.every_n_steps=2000").resample
    assert all(lr_multiplier(s, off) == 1.0 for s in (0, 2000, 2500))
    cfg = make_cfg(*SCHEDULE, "optim.warmup_steps=4", "sae.d_sae=8")
    module = SAEModule(dict(cfg), d_in=4)
    lam = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [lam(s) for s in (0, 3, 2000, 2500, 3000)] == pytest.approx([0.25, 1, 0.1, 0.55, 1])


def test_choose_rows_draws_by_squared_loss_squared():
    x = torch.zeros(4, 2)
    x_hat = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2 ** 0.5, 0.0]])
    # squared errors 0, 1, 0, 2: weights 0, 1, 0, 4 -> rows 1 and 3 with p = 0.2 and 0.8
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_rows(x, x_hat, 1, g) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {1, 3}
    assert (draws == 3).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert sorted(choose_rows(x, x_hat, 2, g).tolist()) == [1, 3]  # without replacement


ARCHS = [("relu", ()), ("gated", ()), ("gated", ("sae.weight_sharing=untied",)),
         ("prolu", ())]


def _trained(arch, extra, d_in=4, d_sae=6):
    cfg = make_cfg(f"sae.architecture={arch}", f"sae.d_sae={d_sae}",
                   f"loss.aux.enabled={arch == 'gated'}", *extra)
    sae = build_sae(cfg.sae, d_in)
    with torch.no_grad():  # non-zero biases and r_mag, so zeroing them shows
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adam = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for _ in range(2):  # populate Adam's moments
        x = torch.randn(16, d_in)
        x_hat, _ = sae(x)
        adam.zero_grad()
        ((x - x_hat) ** 2).mean().backward()
        adam.step()
    return sae, adam


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_dead_feature_is_revived_and_alive_ones_untouched(arch, extra):
    sae, adam = _trained(arch, extra)
    dead = torch.tensor([False, True, False, False, True, False])
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in adam.state[p].items()} for n, p in
               sae.named_parameters()}
    x = torch.randn(32, 4) * 3
    resample_dead(sae, adam, dead, x, torch.Generator().manual_seed(0), encoder_scale=0.2)
    params = dict(sae.named_parameters())
    W_dec = params["W_dec"].detach()
    assert torch.allclose(W_dec[dead].norm(dim=1), torch.ones(2))
    unit_inputs = x - sae.b_dec.detach()
    unit_inputs = unit_inputs / unit_inputs.norm(dim=1, keepdim=True)
    for row in W_dec[dead]:  # each new row is the unit (x - b_dec) of a batch row
        assert torch.isclose(unit_inputs, row, atol=1e-6).all(dim=1).any()
    for name in ("W_enc", "W_mag"):
        if name in params:
            W = params[name].detach()
            norm = 0.2 * before[name][:, ~dead].norm(dim=0).mean()
            assert torch.allclose(W[:, dead].t(), W_dec[dead] * norm, atol=1e-6), name
    for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
        if name in params:
            assert torch.equal(params[name].detach()[dead], torch.zeros(2)), name
    for name, p in params.items():
        axis = resample.FEATURE_AXIS.get(name)
        if axis is None:  # b_dec: not a feature's parameter
            assert torch.equal(p.detach(), before[name])
            continue
        alive = (~dead).nonzero().squeeze(1)
        assert torch.equal(p.detach().index_select(axis, alive),
                           before[name].index_select(axis, alive)), name
        for key in ("exp_avg", "exp_avg_sq") if moments[name] else ():  # b_gate: no grad yet
            state = adam.state[p][key]
            assert state.index_select(axis, dead.nonzero().squeeze(1)).abs().max() == 0
            assert torch.equal(state.index_select(axis, alive),
                               moments[name][key].index_select(axis, alive))


def test_same_generator_seed_same_resample():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        sae, adam = _trained("gated", ())
        resample_dead(sae, adam, torch.tensor([True] + [False] * 5), torch.randn(32, 4),
                      torch.Generator().manual_seed(7), 0.2)
        results.append(sae.W_dec.detach().clone())
    assert torch.equal(*results)


def _fake_trainer(sae, adam, step):
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t, all_gather=lambda t: t)
    return SimpleNamespace(global_step=step, strategy=strategy, optimizers=[adam], logger=None,
                           is_global_zero=True)


def test_only_features_dead_over_the_window_are_resampled():
    cfg = make_cfg("resample.enabled=true", "resample.every_n_steps=10",
                   "resample.window_steps=3")
    sae, adam = _trained("relu", ())
    module = SimpleNamespace(sae=sae, device=torch.device("cpu"), norm_scale=torch.tensor(1.0))
    callback = Resampler(cfg.resample, d_sae=6, seed=0)
    before = sae.W_dec.detach().clone()
    batch = torch.randn(16, 4)
    for step in range(1, 11):
        fired = torch.zeros(6, dtype=torch.long)
        fired[0] = 1  # fires throughout
        fired[1] = int(step < 8)  # fires only before the window (steps 8, 9, 10)
        fired[2] = int(step == 9)  # fires once inside it
        callback.on_train_batch_end(_fake_trainer(sae, adam, step), module, {"fired": fired},
                                    batch, step)
    changed = (sae.W_dec.detach() != before).any(dim=1)
    assert changed.tolist() == [False, True, False, True, True, True]
    assert callback.fired.sum() == 0  # the window restarts


@pytest.mark.parametrize("overrides,needle", [
    (["resample.every_n_steps=10", "resample.window_steps=20"],
     "resample.window_steps=20 must be <= resample.every_n_steps=10"),
    (["resample.lr_drop=1.5"], "resample.lr_drop=1.5 must lie in [0, 1]"),
    (["resample.lr_return_steps=0"], "resample.lr_return_steps=0 must be > 0"),
])
def test_bad_resample_settings_are_refused(overrides, needle):
    with pytest.raises(UserError) as info:
        make_cfg("resample.enabled=true", *overrides)
    assert needle in str(info.value)


def test_a_real_run_resamples_on_schedule(tmp_path, monkeypatch):
    """fit with resampling on: resamples after steps 10 and 20, and the lr of the step after
    each is 0.1x (warm-up off)."""
    from gsae_pl.fit import main
    from tests.tiny_run import args

    seen, lrs = [], {}
    real = resample.resample_dead
    monkeypatch.setattr(resample, "resample_dead",
                        lambda sae, opt, dead, *a: seen.append(int(dead.sum())) or
                        real(sae, opt, dead, *a))
    def record_lr(self, trainer, *_):  # the lr the coming step (index global_step) uses
        lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    monkeypatch.setattr(Resampler, "on_train_batch_start", record_lr, raising=False)
    # Small batches, a wide SAE, a strong L1 and a 2-step window: some features are dead.
    extra = ("resample.enabled=true", "resample.every_n_steps=10", "resample.window_steps=2",
             "resample.max_resamples=2", "resample.lr_return_steps=4", "optim.warmup_steps=0",
             "trainer.max_steps=25", "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128",
             "loss.l1_coefficient=20.0")
    assert main(args(tmp_path, "run", *extra)) == 0
    assert len(seen) == 2 and min(seen) > 0
    assert lrs[9] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.005)
    assert lrs[12] == pytest.approx(0.0275) and lrs[14] == pytest.approx(0.05)
    assert lrs[20] == pytest.approx(0.005)


def test_global_batch_restores_the_one_process_row_order():
    rows = torch.arange(12.0).reshape(6, 2)  # global rows 0..5; rank r holds rows r::2
    gathered = torch.stack([rows[0::2], rows[1::2]])
    assert torch.equal(resample.global_batch(gathered, rows[0::2]), rows)
    assert torch.equal(resample.global_batch(rows, rows), rows)  # one process


def test_resampler_state_round_trips():
    cfg = make_cfg("resample.enabled=true", "resample.every_n_steps=10", "resample.window_steps=5")
    a, b = Resampler(cfg.resample, 6, 0), Resampler(cfg.resample, 6, 0)
    a.fired += torch.tensor([0, 1, 2, 0, 0, 3])
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.fired, a.fired)


@pytest.mark.slow
def test_ddp_run_with_resampling_follows_one_process(tmp_path):
    """2 processes (gloo) resample the same features from the same global rows as 1."""
    from tests.test_ddp import scalars
    from tests.tiny_run import fit_process, metrics

    extra = ("resample.enabled=true", "resample.every_n_steps=10", "resample.window_steps=2",
             "resample.max_resamples=2", "optim.warmup_steps=0", "trainer.max_steps=25",
             "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128", "loss.l1_coefficient=20.0")
    assert fit_process(tmp_path, "one", *extra).returncode == 0
    two = fit_process(tmp_path, "two", *extra, "trainer.devices=2", "trainer.strategy=ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    dead = scalars(tmp_path / "one", "resample/dead_fraction")
    assert len(dead) == 2 and min(v for _, v in dead) > 0
    assert dead == scalars(tmp_path / "two", "resample/dead_fraction")
    weights = [torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False)
               ["state_dict"] for n in ("one", "two")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5)
    a, b = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in a), (a, b)


def test_checkpoint_saves_the_counts_of_every_process():
    """Process 0 writes the checkpoint, so it must hold what any process saw fire."""
    cfg = make_cfg("resample.enabled=true")
    callback = Resampler(cfg.resample, d_sae=3, seed=0)
    callback.fired = torch.tensor([0, 2, 0])  # this process: feature 1 only
    other_process = torch.tensor([0, 0, 5])  # the other one saw feature 2 fire

    class _Strategy:
        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            return tensor + other_process

    checkpoint = {"callbacks": {}}
    callback.on_save_checkpoint(SimpleNamespace(strategy=_Strategy()), None, checkpoint)
    saved = checkpoint["callbacks"][callback.state_key]["fired"]
    assert saved.tolist() == [0, 2, 5]  # feature 0 alone is dead everywhere
    fresh = Resampler(cfg.resample, d_sae=3, seed=0)
    fresh.load_state_dict(checkpoint["callbacks"][callback.state_key])
    assert (fresh.fired == 0).tolist() == [True, False, False]
