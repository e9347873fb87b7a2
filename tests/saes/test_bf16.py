"""bf16 autocast (`trainer.precision=bf16-mixed`): exact firing counts on every path, the
sparse path on CPU, and values / gradients within a bf16 tolerance of the references.

Counts past 256 are not representable in bf16 (8 significant bits), so any count taken in
bf16 shows up here at batch 4096; 4097 rows all firing would read 4096."""

from __future__ import annotations

import pytest
import torch

from gsae_pl.eval.metrics import FeatureDensity, ReconstructionMetrics
from gsae_pl.losses.base import Objective
from gsae_pl.saes.base import build_sae
from gsae_pl.saes.kernels import SparseCodes
from tests import tiny_run
from tests.conftest import make_cfg

D_IN, D_SAE = 16, 256
# (architecture, kernel, compile) for every path that produces `fired`.
PATHS = [("gated", "reference", "never"), ("gated", "dense", "never"),
         ("gated", "sparse", "never"), ("relu", "reference", "never"),
         ("relu", "dense", "never"), ("prolu", "auto", "never"),
         ("rescale_shift", "dense", "never"), ("rescale_shift-stage2", "dense", "never"),
         ("rescale_shift-stage2", "sparse", "never")]
COMPILED = [("gated", "dense", "always"), ("relu", "dense", "always")]
# bf16 keeps 8 significant bits: one rounding is a relative error of 2^-9, and a few gate
# decisions near the threshold flip against an fp32/fp64 reference. Errors are measured
# as a share of the reference's largest magnitude (tensor-wide), which both stay within.
BF16_TOL = 2e-2


def _sae(arch, kernel, compile_mode, *overrides):
    stage2 = arch.endswith("-stage2")
    arch = arch.removesuffix("-stage2")
    cfg = make_cfg(f"sae.architecture={arch}", f"sae.d_sae={D_SAE}", f"sae.kernel={kernel}",
                   f"sae.compile={compile_mode}", f"loss.aux.enabled={arch == 'gated'}",
                   *overrides)
    sae = build_sae(cfg.sae, D_IN)
    if stage2:
        sae.enter_stage2()
    return cfg, sae


def _nonzero_per_feature(f) -> torch.Tensor:
    """Exact count of non-zero entries per feature, from f itself (dense or SparseCodes)."""
    if isinstance(f, SparseCodes):
        return torch.bincount(f.col[f.values != 0], minlength=D_SAE)
    return (f != 0).sum(0)


def _check_counts(sae, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, enc = sae(x)
    assert not enc.fired.is_floating_point(), enc.fired.dtype  # exact integers
    assert torch.equal(enc.fired, _nonzero_per_feature(enc.f))
    return enc.fired


def _all_fire(sae):
    """Every feature fires on every row of positive inputs: positive encoder, open gates."""
    with torch.no_grad():
        sae.W_enc.abs_()
        for name in ("b_enc", "b_gate", "b_mag"):
            if hasattr(sae, name):
                getattr(sae, name).fill_(100.0)


@pytest.mark.parametrize("arch,kernel,compile_mode", PATHS, ids=lambda p: str(p))
def test_counts_exact_under_bf16_autocast(arch, kernel, compile_mode):
    _, sae = _sae(arch, kernel, compile_mode)
    fired = _check_counts(sae, torch.randn(4096, D_IN))
    assert (fired > 256).any()  # counts bf16 cannot hold: the test can see rounding
    _all_fire(sae)
    fired = _check_counts(sae, torch.rand(4097, D_IN))
    assert torch.equal(fired, torch.full((D_SAE,), 4097))


@pytest.mark.slow
@pytest.mark.parametrize("arch,kernel,compile_mode", COMPILED, ids=lambda p: str(p))
def test_compiled_counts_exact_under_bf16_autocast(arch, kernel, compile_mode):
    test_counts_exact_under_bf16_autocast(arch, kernel, compile_mode)


def test_l0_and_density_exact_under_bf16_autocast():
    _, sae = _sae("gated", "dense", "never")
    x = torch.randn(4096, D_IN)
    recon, density = ReconstructionMetrics(D_IN), FeatureDensity(D_SAE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, enc = sae(x)
        recon.update(x, x_hat, enc.fired)
        density.update(enc.fired, x.shape[0])
    active = int((enc.f != 0).sum())
    assert recon.compute()["l0"].item() == active / 4096
    assert torch.equal(density.compute(), (enc.f != 0).sum(0).double() / 4096)


def test_metrics_add_counts_without_a_bf16_step():
    """Counts that bf16 holds exactly (1..256) but whose total (32896) it does not."""
    fired = torch.arange(1, 257, dtype=torch.bfloat16)
    x = torch.randn(8, 4)
    recon, density = ReconstructionMetrics(4), FeatureDensity(256)
    recon.update(x, x, fired)
    density.update(fired, 8)
    assert recon.compute()["l0"].item() == 32896 / 8
    assert torch.equal(density.compute(), torch.arange(1, 257, dtype=torch.float64) / 8)


def _loss_and_grads(sae, cfg, x, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x_hat, enc = sae(x)
        terms = Objective.from_config(cfg.loss)(x, x_hat, enc, sae, step=10**6)
        loss = sum(terms.values())
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    return x_hat.double(), loss.double(), grads


def _assert_close(actual, expected, name=""):
    err = (actual - expected).abs().max()
    assert err <= BF16_TOL * expected.abs().max().clamp_min(1e-6), (name, float(err))


def _compare_to_reference(kernel, *overrides, reference_dtype=torch.float64):
    """`kernel` under bf16 autocast against plain autograd without it."""
    cfg, sae = _sae("gated", kernel, "never", *overrides)
    with torch.no_grad():  # off the symmetric init, some gates shut, some magnitudes < 0
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = sae.state_dict()
    x = torch.randn(512, D_IN)
    fast = _loss_and_grads(sae, cfg, x, autocast=True)
    ref_cfg, ref = _sae("gated", "reference", "never", *overrides)
    ref.load_state_dict(state)
    ref = ref.to(reference_dtype)
    expected = _loss_and_grads(ref, ref_cfg, x.to(reference_dtype), autocast=False)
    _assert_close(fast[0], expected[0], "x_hat")
    _assert_close(fast[1], expected[1], "loss")
    assert set(fast[2]) == set(expected[2])
    for name in expected[2]:
        _assert_close(fast[2][name], expected[2][name], name)


def test_sparse_path_under_cpu_bf16_autocast_matches_fp32_reference():
    _compare_to_reference("sparse", reference_dtype=torch.float32)


def test_dense_path_bf16_gradients_match_float64_reference():
    _compare_to_reference("dense")


def test_thresholds_stay_fp32_under_autocast():
    """pi_gate = pre + b_gate in fp32: bf16 would round b_gate = -99.9 to -100 (its spacing
    there is 0.5) and shut gates that pre = 100 opens by 0.1."""
    half = D_SAE // 2
    for kernel in ("reference", "dense", "sparse"):
        _, sae = _sae("gated", kernel, "never")
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.W_enc[0, :] = 1.0  # pre = x[:, 0] = 100 for every feature, exact in bf16
            sae.b_gate[:half] = -99.9  # open by 0.1
            sae.b_gate[half:] = -100.1  # shut by 0.1
            sae.b_mag.fill_(1.0)
        x = torch.zeros(4, D_IN)
        x[:, 0] = 100.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, enc = sae(x)
        expected = torch.cat([torch.full((half,), 4), torch.zeros(half, dtype=torch.long)])
        assert torch.equal(enc.fired.long(), expected), kernel


@pytest.mark.slow  # 37 s with a cold inductor cache on the shared 2-core machine
def test_compiled_path_under_autocast_matches_eager():
    """compile=always with a non-default switch: the same values and exact counts as eager."""
    results = []
    x = torch.randn(256, D_IN)
    state = None
    for mode in ("never", "always"):
        cfg, sae = _sae("gated", "dense", mode, "sae.weight_sharing=no_r_mag")
        if state is None:
            state = sae.state_dict()
        sae.load_state_dict(state)
        results.append(_loss_and_grads(sae, cfg, x, autocast=True) + (_fired(sae, x),))
    eager, compiled = results
    _assert_close(compiled[0], eager[0], "x_hat")
    for name in eager[2]:
        _assert_close(compiled[2][name], eager[2][name], name)
    assert torch.equal(compiled[3], eager[3])
    assert not compiled[3].is_floating_point()


def _fired(sae, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return sae(x)[1].fired


SPY = """
import atexit
import gsae_pl.saes.gated as gated
calls = []
_sparse = gated.encode_gated_sparse
def spy(*args):
    calls.append(1)
    return _sparse(*args)
gated.encode_gated_sparse = spy
atexit.register(lambda: print("SPARSE_CALLS", len(calls)))
"""


@pytest.mark.slow
def test_bf16_mixed_fit_with_high_l1_runs_the_sparse_path(tmp_path):
    script = tiny_run.wrapper_script(tmp_path / "spy_fit.py", SPY)
    # A high l1 coefficient at a high learning rate, no warm-up: the share of active
    # (row, feature) pairs falls below SPARSE_CROSSOVER within ~6 of the 20 steps.
    done = tiny_run.fit_process(tmp_path, "bf16", "trainer.precision=bf16-mixed",
                                "loss.l1_coefficient=1", "optim.lr=0.1",
                                "optim.warmup_steps=0", "trainer.max_steps=20",
                                "sae.architecture=gated", "sae.kernel=auto", script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    sparse_calls = int(done.stdout.split("SPARSE_CALLS")[-1].split()[0])
    assert sparse_calls > 0  # the auto kernel did switch to the sparse path
    assert tiny_run.metrics(tmp_path, "bf16")  # a finished run writes its metrics
