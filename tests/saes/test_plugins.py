"""An architecture and a loss term are one new file each: a plug-in written here (an
architecture file dropped into gsae_pl.saes' search path, a term registered by the test)
configures, trains, resamples and exports with no edit elsewhere in gsae_pl/. Also: saved
configs with the keys of before the sparsity block moved still resume and export."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import gsae_pl.saes
from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.fit import main as fit_main
from gsae_pl.losses.base import LOSS_TERMS, Objective, TermConfig, TermSpec
from gsae_pl.run.checkpointing import check_same_run, finished_run_changes
from gsae_pl.run.module import SAEModule
from gsae_pl.run.resample import resample_dead
from gsae_pl.saelens import export
from gsae_pl.saes.base import ARCHITECTURES, build_sae
from tests.conftest import make_cfg
from tests.tiny_run import BASE, args

ARCH_FILE = '''"""A ReLU SAE whose features carry a learnt output scale (a test plug-in)."""
from dataclasses import dataclass, field

import torch
from torch import nn

from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.base import SAE, Encoding


@dataclass
class ScaledConfig:
    scale_init: float = field(default=1.0, metadata={"range": "positive"})


@ARCHITECTURES.register("scaled_relu")
class ScaledReLUSAE(SAE):
    Config = ScaledConfig
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero"}

    def __init__(self, d_in, d_sae, unit_norm_decoder=True, scale_init=1.0):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.scale = nn.Parameter(torch.full((d_sae,), float(scale_init)))

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        f = torch.relu(pre) * self.scale
        return Encoding(f=f, gate_acts=f, fired=(f != 0).sum(0), pre_acts=pre)
'''


@pytest.fixture
def scaled_relu(tmp_path, monkeypatch):
    """The architecture file above, found by the registry like a file of gsae_pl/saes/."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scaled_relu.py").write_text(ARCH_FILE)
    # The package's own files first: imported once, they would not register again in the
    # entries restored after the test.
    ARCHITECTURES.names()
    monkeypatch.setattr(gsae_pl.saes, "__path__", [*gsae_pl.saes.__path__, str(folder)])
    monkeypatch.setattr(ARCHITECTURES, "_entries", dict(ARCHITECTURES._entries))
    monkeypatch.setattr(ARCHITECTURES, "_loaded", False)  # the next lookup imports the file
    yield "scaled_relu"
    sys.modules.pop("gsae_pl.saes.scaled_relu", None)


SCALED = ["sae.architecture=scaled_relu", "sae.scale_init=2.0", "loss.aux.enabled=false"]


def test_a_new_architecture_file_configures_trains_resamples_and_is_refused_at_export(
        scaled_relu, tmp_path):
    cfg = load_config(BASE, [*SCALED, "data.source=synthetic"])
    assert cfg.sae.scale_init == 2.0 and "scaled_relu" in ARCHITECTURES.names()
    with pytest.raises(UserError, match="sae.scale_init=0.0 must be > 0"):
        load_config(BASE, [*SCALED[:1], "sae.scale_init=0", "loss.aux.enabled=false"])
    with pytest.raises(UserError, match="loss.aux needs a gate"):
        load_config(BASE, SCALED[:2])
    sae = build_sae(cfg.sae, 4)
    assert torch.equal(sae.scale, torch.full((cfg.sae.d_sae,), 2.0))

    adam = torch.optim.Adam(sae.parameters())
    x = torch.randn(16, 4)
    ((x - sae(x)[0]) ** 2).mean().backward()
    adam.step()
    dead = torch.zeros(cfg.sae.d_sae, dtype=torch.bool)
    dead[:2] = True
    assert resample_dead(sae, adam, dead, x, torch.Generator().manual_seed(0), 0.2) == 2
    assert torch.equal(sae.b_enc.detach()[:2], torch.zeros(2))
    assert torch.allclose(sae.W_dec.detach()[:2].norm(dim=1), torch.ones(2))

    out = tmp_path / "runs"
    assert fit_main(args(out, "scaled", *SCALED, "trainer.max_steps=20")) == 0
    with pytest.raises(UserError, match="sae.architecture=scaled_relu has no SAELens"):
        export(out / "scaled", tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_two_architectures_share_a_field_only_as_one_setting(monkeypatch):
    from gsae_pl.config import sae_schema
    from gsae_pl.saes.base import SAE

    @dataclass
    class Other:
        weight_sharing: str = "untied"  # gated's field, another default

    ARCHITECTURES.names()
    monkeypatch.setattr(ARCHITECTURES, "_entries", dict(ARCHITECTURES._entries))
    ARCHITECTURES.register("other")(type("OtherSAE", (SAE,), {"Config": Other}))
    with pytest.raises(RuntimeError, match="sae.architecture=other declares sae.weight_sharing"):
        sae_schema()


# ---- a loss term reading pi_gate, which the fast kernels do not return ----------------
@dataclass
class GateSigmoidConfig(TermConfig):
    enabled: bool = False
    temperature: float = 1.0


def gate_sigmoid(block):
    return lambda x, x_hat, enc, sae: torch.sigmoid(enc.pre_acts / block.temperature).sum(1).mean()


@pytest.fixture
def gate_term(monkeypatch):
    LOSS_TERMS.names()  # the package's own terms first
    monkeypatch.setattr(LOSS_TERMS, "_entries", dict(LOSS_TERMS._entries))
    LOSS_TERMS.register("gate_sigmoid")(TermSpec(config=GateSigmoidConfig, build=gate_sigmoid,
                                                 reads=("pre_acts",)))
    return ["loss.gate_sigmoid.enabled=true", "loss.gate_sigmoid.temperature=0.5",
            "loss.gate_sigmoid.coefficient=0.3"]


def _grads(cfg, state, x):
    objective = Objective.from_config(cfg.loss)
    sae = build_sae(cfg.sae, x.shape[1], reads=objective.reads).double()
    sae.load_state_dict(state)
    x_hat, enc = sae(x)
    terms = objective(x, x_hat, enc, sae, step=0)
    sum(terms.values()).backward()
    return terms, {n: p.grad for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["gated", "relu", "rescale_shift"])
@pytest.mark.parametrize("kernel", ["auto", "dense", "sparse"])
def test_a_term_reading_pi_gate_gets_the_reference_gradient_on_every_kernel(gate_term, kernel,
                                                                            arch):
    common = [f"sae.architecture={arch}", "sae.d_sae=24", *gate_term,
              f"loss.aux.enabled={arch == 'gated'}"]
    state = build_sae(make_cfg(*common).sae, 6).double().state_dict()
    x = torch.randn(32, 6, dtype=torch.float64) * 2
    terms, grads = _grads(make_cfg(*common, f"sae.kernel={kernel}"), state, x)
    want_terms, want = _grads(make_cfg(*common, "sae.kernel=reference"), state, x)
    assert "gate_sigmoid" in terms
    for name in want_terms:
        assert torch.equal(terms[name], want_terms[name]), name
    for name in want:
        assert torch.equal(grads[name], want[name]) if want[name] is not None \
            else grads[name] is None, name


def test_the_fast_paths_stay_when_no_term_reads_beyond_them(gate_term):
    cfg = make_cfg("sae.kernel=sparse")
    module = SAEModule(OmegaConf.to_container(cfg), d_in=6)
    assert module.objective.reads == ("gate_acts",) and not module.sae.reference_only
    module = SAEModule(OmegaConf.to_container(make_cfg("sae.kernel=sparse", *gate_term)), 6)
    assert "pre_acts" in module.objective.reads and module.sae.reference_only
    assert module.sae.path_for(torch.zeros(2, 6)) == "reference"


def test_the_term_trains_in_a_run(gate_term, tmp_path):
    assert fit_main(args(tmp_path, "run", *gate_term, "sae.kernel=sparse",
                         "trainer.max_steps=10")) == 0


def test_a_term_reading_what_the_architecture_lacks_is_refused(monkeypatch):
    LOSS_TERMS.names()
    monkeypatch.setattr(LOSS_TERMS, "_entries", dict(LOSS_TERMS._entries))
    LOSS_TERMS.register("mag_penalty")(TermSpec(config=TermConfig, reads=("pi_mag",),
                                                build=lambda block: None))
    make_cfg("loss.aux.enabled=false", "sae.architecture=prolu")  # prolu fills pi_mag
    with pytest.raises(UserError, match="loss.mag_penalty reads pi_mag, which "
                                        "sae.architecture=relu does not compute"):
        make_cfg("sae.architecture=relu", "loss.aux.enabled=false")


# ---- saved configs with the old keys (config.ALIASES) ---------------------------------
OVERRIDES = ["sae.d_sae=12", "loss.l1_coefficient=0.3", "loss.l1_warmup_steps=5"]


def _old_keys(cfg) -> dict:
    """`cfg` as a run saved before the sparsity coefficient moved into its block."""
    tree = OmegaConf.to_container(cfg)
    for term in tree["loss"].values():
        term.pop("warmup_steps")  # no term had one but the sparsity term's l1_warmup_steps
    tree["loss"]["l1_coefficient"] = tree["loss"]["sparsity"].pop("coefficient")
    tree["loss"]["l1_warmup_steps"] = 5
    return tree


def test_an_old_keyed_saved_run_resumes_and_exports(tmp_path):
    cfg = make_cfg(*OVERRIDES)
    assert cfg.loss.sparsity.coefficient == 0.3 and cfg.loss.sparsity.warmup_steps == 5
    old = _old_keys(cfg)
    module = SAEModule(old, d_in=8)  # as Lightning rebuilds it from a checkpoint
    assert module.objective.coefficients(10**6)["sparsity"] == 0.3
    assert module.objective.coefficients(0)["sparsity"] == 0.3 / 5
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 7, "hyper_parameters": {"cfg": old, "d_in": 8},
                "state_dict": module.state_dict()}, ckpt)
    check_same_run(ckpt, cfg)  # the same run under its new key names: no refusal
    with pytest.raises(UserError, match="loss.sparsity.coefficient"):
        check_same_run(ckpt, make_cfg(*OVERRIDES, "loss.sparsity.coefficient=0.4"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert finished_run_changes(run_dir, cfg) == []
    out = export(run_dir, tmp_path / "sae", allow_unfinished=True)
    saved = yaml.safe_load((out / "cfg.json").read_text())["gsae_pl"]["config"]
    assert saved["loss"]["sparsity"]["coefficient"] == 0.3 and "l1_coefficient" not in saved["loss"]


def test_architectures_contribute_their_callbacks_after_the_resampler():
    staged = SAEModule(OmegaConf.to_container(make_cfg(
        "sae.architecture=rescale_shift", "loss.aux.enabled=false", "resample.enabled=false",
        "trainer.max_steps=20", "sae.rescale_shift_steps=10")), d_in=4)
    # the architecture's own, then the bias histograms every run gets
    assert [type(cb).__name__ for cb in staged.configure_callbacks()] == [
        "RescaleShiftStage", "BiasHistograms"]
    gated = SAEModule(OmegaConf.to_container(make_cfg()), d_in=4)
    assert [type(cb).__name__ for cb in gated.configure_callbacks()] == [
        "Resampler", "BiasHistograms"]
