"""Dead-feature resampling (docs/method.md sec. 4): the lr schedule at hand-picked steps, a
dead feature revived (and only it), the loss^2 draw from a pool of distinct rows, the window,
evaluation before the revival, resume inside a resample, and a real run that uses it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gsae_pl.errors import UserError
from gsae_pl.resample_schedule import lr_multiplier
from gsae_pl.run import resample
from gsae_pl.run.resample import Resampler, choose_rows, resample_dead
from gsae_pl.saes.base import build_sae
from tests.conftest import make_cfg

SCHEDULE = ("resample.enabled=true", "resample.every_n_steps=2000", "resample.max_resamples=2",
            "resample.window_steps=500", "resample.lr_drop=0.1", "resample.lr_return_steps=1000",
            "trainer.max_steps=8000")  # the last resample (4000) has room to return


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
    from gsae_pl.run.module import SAEModule
    off = make_cfg("resample.enabled=false", "resample.every_n_steps=2000").resample
    assert all(lr_multiplier(s, off) == 1.0 for s in (0, 2000, 2500))
    cfg = make_cfg(*SCHEDULE, "optim.warmup_steps=4", "sae.d_sae=8")
    module = SAEModule(dict(cfg), d_in=4)
    lam = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [lam(s) for s in (0, 3, 2000, 2500, 3000)] == pytest.approx([0.25, 1, 0.1, 0.55, 1])


def test_choose_rows_draws_by_squared_loss_squared():
    x = torch.arange(8.0).reshape(4, 2)
    x_hat = x + torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2 ** 0.5, 0.0]])
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
        axis = resample.feature_axes(sae).get(name)
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
                           loggers=[], callbacks=[], is_global_zero=True, world_size=1)


def _run_callback(callback, sae, adam, module, steps, fired_of, batch_of):
    """Drive the callback like Lightning: batch start at global_step s - 1, end at s."""
    for step in steps:
        batch = batch_of(step)
        callback.on_train_batch_start(_fake_trainer(sae, adam, step - 1), module, batch,
                                      step)
        callback.on_train_batch_end(_fake_trainer(sae, adam, step), module,
                                    {"fired": fired_of(step)}, batch, step)


def test_only_features_dead_over_the_window_are_resampled():
    cfg = make_cfg("resample.enabled=true", "resample.every_n_steps=10",
                   "resample.window_steps=3")
    sae, adam = _trained("relu", ())
    module = SimpleNamespace(sae=sae, device=torch.device("cpu"), norm_scale=torch.tensor(1.0))
    callback = Resampler(cfg.resample, d_sae=6, seed=0)
    before = sae.W_dec.detach().clone()
    batch = torch.randn(16, 4)
    def fired_of(step):
        fired = torch.zeros(6, dtype=torch.long)
        fired[0] = 1  # fires throughout
        fired[1] = int(step < 8)  # fires only before the window (steps 8, 9, 10)
        fired[2] = int(step == 9)  # fires once inside it
        return fired

    _run_callback(callback, sae, adam, module, range(1, 12), fired_of, lambda s: batch)
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
    real_revive, real_start = resample.revive, Resampler.on_train_batch_start
    monkeypatch.setattr(resample, "revive",
                        lambda sae, opt, dead, rows, *a: seen.append((int(dead.sum()), len(rows)))
                        or real_revive(sae, opt, dead, rows, *a))

    def record_lr(self, trainer, *rest):  # the lr the coming step (index global_step) uses
        lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        real_start(self, trainer, *rest)

    monkeypatch.setattr(Resampler, "on_train_batch_start", record_lr)
    # Small batches, a wide SAE, a strong L1 and a 2-step window: some features are dead.
    extra = ("resample.enabled=true", "resample.every_n_steps=10", "resample.window_steps=2",
             "resample.max_resamples=2", "resample.lr_return_steps=4", "optim.warmup_steps=0",
             "trainer.max_steps=25", "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128",
             "loss.l1_coefficient=20.0")
    assert main(args(tmp_path, "run", *extra)) == 0
    # 2 resamples; the pool is the window's 2 steps of 16 rows, so at most 32 revived.
    assert len(seen) == 2 and all(0 < revived <= min(dead, 32) for dead, revived in seen)
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
    a.pool = [torch.randn(4, 3), torch.randn(4, 3)]
    a.pending = {"dead": torch.tensor([True] + [False] * 5), "rows": torch.randn(1, 3)}
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.fired, a.fired)
    assert all(torch.equal(x, y) for x, y in zip(b.pool, a.pool, strict=True))
    assert all(torch.equal(b.pending[k], v) for k, v in a.pending.items())
    b.load_state_dict({"fired": a.fired})  # a checkpoint from before the pool existed
    assert b.pool == [] and b.pending is None


@pytest.mark.slow
def test_ddp_run_with_resampling_follows_one_process(tmp_path):
    """2 processes (gloo) resample the same features from the same global rows as 1."""
    from tests.run.test_ddp import scalars
    from tests.tiny_run import fit_process, metrics

    extra = ("resample.enabled=true", "resample.every_n_steps=10", "resample.window_steps=2",
             "resample.max_resamples=2", "resample.lr_return_steps=4", "optim.warmup_steps=0",
             "trainer.max_steps=25", "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128",
             "loss.l1_coefficient=20.0")
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


# ---- issue 11, defect 1: no two resampled features share a direction -------------------
def _distinct_rows(rows: torch.Tensor) -> int:
    return torch.unique(rows, dim=0).shape[0]


def _resampled(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (after != before).any(dim=1)


def test_more_dead_features_than_rows_never_share_a_direction():
    """300 dead features from a 128-row batch: duplicates would get identical gradients from
    every term and stay duplicates forever, so only as many features as there are distinct
    rows are revived, each from its own row; the others stay dead for the next resample."""
    sae = build_sae(make_cfg("sae.architecture=relu", "sae.d_sae=320",
                             "loss.aux.enabled=false").sae, 16)
    adam = torch.optim.Adam(sae.parameters())
    dead = torch.zeros(320, dtype=torch.bool)
    dead[:300] = True
    before = sae.W_dec.detach().clone()
    revived = resample_dead(sae, adam, dead, torch.randn(128, 16) * 3,
                            torch.Generator().manual_seed(0), 0.2)
    changed = _resampled(before, sae.W_dec.detach())
    assert _distinct_rows(sae.W_dec.detach()[changed]) == int(changed.sum())
    assert revived == int(changed.sum()) == 128 and not changed[~dead].any()


def test_repeated_rows_give_one_feature_each():
    """Activation data repeats rows (e.g. one token after BOS): a row drawn twice would make
    two identical features, so each distinct row is a candidate once."""
    sae = build_sae(make_cfg("sae.architecture=relu", "sae.d_sae=64",
                             "loss.aux.enabled=false").sae, 8)
    adam = torch.optim.Adam(sae.parameters())
    dead = torch.ones(64, dtype=torch.bool)
    dead[:14] = False  # 50 dead
    rows = torch.randn(64, 8) * 3
    x = torch.cat([rows, rows])[torch.randperm(128)]  # 64 distinct rows, each twice
    before = sae.W_dec.detach().clone()
    revived = resample_dead(sae, adam, dead, x, torch.Generator().manual_seed(0), 0.2)
    changed = _resampled(before, sae.W_dec.detach())
    assert _distinct_rows(sae.W_dec.detach()[changed]) == int(changed.sum()) == revived == 50


def test_pool_holds_enough_rows_for_every_feature_to_be_dead():
    """Paper-scale shape (more features than batch rows): 300 of 320 features dead, 128 rows
    a step. The rows come from a pool over the window's last steps, so all 300 are revived,
    no two alike; the revival happens at the start of the next batch."""
    cfg = make_cfg("resample.enabled=true", "resample.every_n_steps=10",
                   "resample.window_steps=8", "resample.lr_return_steps=1")
    sae = build_sae(make_cfg("sae.architecture=relu", "sae.d_sae=320",
                             "loss.aux.enabled=false").sae, 16)
    adam = torch.optim.Adam(sae.parameters())
    module = SimpleNamespace(sae=sae, device=torch.device("cpu"), norm_scale=torch.tensor(1.0))
    callback = Resampler(cfg.resample, d_sae=320, seed=0)
    alive = torch.zeros(320, dtype=torch.long)
    alive[300:] = 1
    batches = {s: torch.randn(128, 16) * 3 for s in range(1, 12)}
    before = sae.W_dec.detach().clone()
    _run_callback(callback, sae, adam, module, range(1, 11), lambda s: alive, batches.get)
    assert torch.equal(sae.W_dec.detach(), before)  # nothing changes before the next batch
    _run_callback(callback, sae, adam, module, [11], lambda s: alive, batches.get)
    changed = _resampled(before, sae.W_dec.detach())
    assert changed.tolist() == [True] * 300 + [False] * 20
    assert _distinct_rows(sae.W_dec.detach()[changed]) == 300
    pooled = torch.cat([batches[s] for s in range(6, 11)])  # ceil(2 * 320 / 128) = 5 steps
    unit = (pooled - sae.b_dec.detach())
    unit = unit / unit.norm(dim=1, keepdim=True)
    assert all(torch.isclose(unit, row, atol=1e-6).all(dim=1).any()
               for row in sae.W_dec.detach()[changed])


# ---- issue 11, defect 2: a held-out evaluation at a resample step sees the weights before it
EVAL_AT_RESAMPLE = ("resample.every_n_steps=10", "resample.window_steps=2",
                    "resample.max_resamples=1", "resample.lr_return_steps=5",
                    "optim.warmup_steps=0", "trainer.max_steps=20", "eval.every_n_steps=10",
                    "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128",
                    "loss.l1_coefficient=20.0", "sae.kernel=dense")


def _val_metrics_by_step(monkeypatch) -> dict:
    from gsae_pl.run.module import SAEModule
    from gsae_pl.run.train import held_out

    seen = {}

    def record(self):  # once the evaluation's logged metrics have reached Lightning
        seen[self.global_step] = held_out(self.trainer.callback_metrics)

    monkeypatch.setattr(SAEModule, "on_validation_end", record)
    return seen


def test_evaluation_at_a_resample_step_sees_the_weights_before_it(tmp_path, monkeypatch):
    """Steps 1..10 train the same with or without the resample after step 10 (the lr drop
    starts at step 11), so the evaluation at step 10 must read the same either way: it
    measures what training produced, not freshly re-initialised features."""
    from gsae_pl.fit import main
    from tests.tiny_run import args

    seen = _val_metrics_by_step(monkeypatch)
    revived = []
    real = resample.revive
    monkeypatch.setattr(resample, "revive",
                        lambda sae, opt, dead, rows, *a: revived.append(rows.shape[0]) or
                        real(sae, opt, dead, rows, *a))
    assert main(args(tmp_path, "on", "resample.enabled=true", *EVAL_AT_RESAMPLE)) == 0
    with_resample = dict(seen)
    seen.clear()
    assert main(args(tmp_path, "off", "resample.enabled=false", *EVAL_AT_RESAMPLE)) == 0
    assert sorted(with_resample) == sorted(seen) == [10, 20]
    for key, value in seen[10].items():
        assert with_resample[10][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert revived and revived[0] > 0  # a real resample happened after step 10
    assert with_resample[20]["l0"] != pytest.approx(seen[20]["l0"], rel=1e-3)  # it did act


RESAMPLE_AT_CHECKPOINT = ("resample.enabled=true", "resample.every_n_steps=10",
                          "resample.window_steps=6", "resample.max_resamples=2",
                          "resample.lr_return_steps=5", "optim.warmup_steps=0",
                          "trainer.max_steps=30", "checkpoint.every_n_steps=5",
                          "optim.lr=0.05", "data.batch_size=16", "sae.d_sae=128",
                          "loss.l1_coefficient=20.0", "sae.kernel=dense")
KILL_AFTER_STEP = """
from gsae_pl.run import faults
_end = faults.NonFiniteMonitor.on_train_batch_end
def _end_then_die(self, trainer, *rest):
    _end(self, trainer, *rest)
    if trainer.global_step == {}:
        os.kill(os.getpid(), signal.SIGKILL)
faults.NonFiniteMonitor.on_train_batch_end = _end_then_die
"""


@pytest.fixture(scope="module")
def uninterrupted_resampling_run(tmp_path_factory):
    from tests.tiny_run import fit_process

    out = tmp_path_factory.mktemp("whole")
    whole = fit_process(out, "whole", *RESAMPLE_AT_CHECKPOINT)
    assert whole.returncode == 0, whole.stderr[-2000:]
    return out / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("kill_step,resume_step,pending,pooled_steps", [
    (13, 10, True, 0),  # saved at a resample step: rows drawn, features not yet revived
    (18, 15, False, 1),  # saved while the pool for step 20 fills (6 pool steps: 15..20)
])
def test_resume_inside_a_resample_matches_the_uninterrupted_run(
        tmp_path, kill_step, resume_step, pending, pooled_steps, uninterrupted_resampling_run):
    """Killed after `kill_step`, the rerun resumes from the checkpoint at `resume_step`,
    which holds the pending draw or the partial pool, and ends with the uninterrupted run's
    weights and metrics."""
    import signal

    from tests.run.test_resume import assert_same_metrics
    from tests.tiny_run import fit_process, metrics, wrapper_script

    die = wrapper_script(tmp_path / "die.py", KILL_AFTER_STEP.format(kill_step))
    killed = fit_process(tmp_path, "run", *RESAMPLE_AT_CHECKPOINT, script=die)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / f"step{resume_step}.ckpt",
                       weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("Resampler"))
    assert (state["pending"] is not None) == pending and len(state["pool"]) == pooled_steps
    resumed = fit_process(tmp_path, "run", *RESAMPLE_AT_CHECKPOINT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step {resume_step}" in resumed.stdout
    whole = uninterrupted_resampling_run
    assert_same_metrics(metrics(tmp_path, "run"), metrics(whole.parent, whole.name))
    weights = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for run in (whole, tmp_path / "run")]
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
