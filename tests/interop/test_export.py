"""Export to SAELens's on-disk format and `load_sae`: the round trip on raw activations,
the file layout SAELens reads, and every refusal (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gsae_pl import load_sae
from gsae_pl.errors import UserError
from gsae_pl.fit import main as fit_main
from gsae_pl.run.module import SAEModule
from gsae_pl.saelens import main as export_main
from tests.tiny_run import args

VARIANTS = {"gated": ["sae.weight_sharing=r_mag"], "no_r_mag": ["sae.weight_sharing=no_r_mag"],
            "relu": ["sae.architecture=relu", "loss.aux.enabled=false"],
            "untied": ["sae.weight_sharing=untied"],
            "jumprelu": ["sae.architecture=jumprelu", "loss.aux.enabled=false"],
            # 10 baseline steps, then 10 of rescale & shift: exported as a gated SAE
            "rescale_shift": ["sae.architecture=rescale_shift", "loss.aux.enabled=false",
                              "sae.rescale_shift_steps=10"]}
GATED_PARAMS = {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
STANDARD_PARAMS = {"W_enc", "b_enc", "W_dec", "b_dec"}
JUMPRELU_PARAMS = {*STANDARD_PARAMS, "threshold"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for name, extra in VARIANTS.items():
        # l1 0.01 keeps features alive, so the round trip compares non-trivial codes.
        assert fit_main(args(out, name, "trainer.max_steps=20", "loss.l1_coefficient=0.01",
                             *extra)) == 0
    return out


def trained(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    module = SAEModule(ckpt["hyper_parameters"]["cfg"], ckpt["hyper_parameters"]["d_in"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


@pytest.mark.parametrize("name", ["gated", "no_r_mag", "relu", "rescale_shift", "jumprelu"])
def test_round_trip_on_raw_activations(runs, tmp_path, name):
    assert export_main([str(runs / name), str(tmp_path / "sae")]) == 0
    module, sae = trained(runs / name), load_sae(tmp_path / "sae")
    s = float(module.norm_scale)
    assert s != 1.0  # otherwise the folding would go untested
    x = torch.randn(256, 8).abs() * 3  # raw: the model itself sees x * s
    with torch.no_grad():
        x_hat, enc = module(x)
        f = sae.encode(x)
        assert (enc.f != 0).float().mean() > 0.05  # live features
        torch.testing.assert_close(f, enc.f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f), x_hat / s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), x_hat / s, rtol=1e-5, atol=1e-5)
    # The files hold exactly what load_sae serves, and folding back gives the trained weights.
    stored = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(stored[k], getattr(sae, k)) for k in stored)
    torch.testing.assert_close(stored["W_dec"] * s, module.sae.W_dec.detach())
    torch.testing.assert_close(stored["W_enc"] / s, module.sae.W_enc.detach())
    if name == "jumprelu":  # the pre-activations are unchanged by the folding: so is theta
        assert torch.equal(stored["threshold"], module.sae.threshold.detach())


@pytest.mark.parametrize("name", ["gated", "relu", "jumprelu"])
def test_saelens_layout(runs, tmp_path, name):
    assert export_main([str(runs / name), str(tmp_path / "sae")]) == 0
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    params = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    expected = {"gated": GATED_PARAMS, "relu": STANDARD_PARAMS, "jumprelu": JUMPRELU_PARAMS}
    assert set(params) == expected[name] and all(v.dtype == torch.float32
                                                 for v in params.values())
    assert params["W_enc"].shape == (8, 32) and params["W_dec"].shape == (32, 8)
    assert cfg["architecture"] == {"gated": "gated", "relu": "standard",
                                   "jumprelu": "jumprelu"}[name]
    assert "k" not in cfg  # a topk field only
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (8, 32, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["gsae_pl"]["step"] == 20 and cfg["gsae_pl"]["norm_scale_folded"] > 0
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json",
                                                                    "sae_weights.safetensors"]


def refused(argv, tmp_path, capsys, needle):
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_untied_encoders_refused_and_nothing_written(runs, tmp_path, capsys):
    refused([str(runs / "untied"), str(tmp_path / "sae")], tmp_path, capsys,
            "weight_sharing=untied has its own W_mag")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_inputs(runs, tmp_path, capsys):
    refused([str(tmp_path / "nope"), str(tmp_path / "a")], tmp_path, capsys, "not found")
    refused([str(runs / "gated")], tmp_path, capsys, "required: out_dir")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    # not an export of gsae_pl's: refused even with --force (tests/run/test_destructive_paths.py)
    refused([str(runs / "gated"), str(tmp_path / "full"), "--force"], tmp_path, capsys,
            "not an export")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert export_main([str(runs / "gated"), str(tmp_path / "sae")]) == 0
    refused([str(runs / "gated"), str(tmp_path / "sae")], tmp_path, capsys, "--force")
    assert export_main([str(runs / "gated"), str(tmp_path / "sae"), "--force"]) == 0


def test_unfinished_run_needs_a_flag(runs, tmp_path, capsys):
    import shutil

    shutil.copytree(runs / "gated", tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink()
    refused([str(tmp_path / "run"), str(tmp_path / "a")], tmp_path, capsys, "not finished")
    assert export_main([str(tmp_path / "run"), str(tmp_path / "a"), "--allow-unfinished"]) == 0


def test_load_sae_refuses_what_it_cannot_read(runs, tmp_path):
    with pytest.raises(UserError, match="no cfg.json"):
        load_sae(tmp_path)
    assert export_main([str(runs / "gated"), str(tmp_path / "sae")]) == 0
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(UserError, match="architecture 'transcoder'"):
        load_sae(tmp_path / "sae")
    cfg_path.write_text(json.dumps(cfg))
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    params = load_file(str(weights))
    save_file({**params, "W_dec": params["W_dec"][:5]}, str(weights))
    with pytest.raises(UserError, match=r"W_dec has shape \[5, 8\]"):
        load_sae(tmp_path / "sae")
    del params["r_mag"]
    save_file(params, str(weights))
    with pytest.raises(UserError, match="missing: \\['r_mag'\\]"):
        load_sae(tmp_path / "sae")


def test_architectures_without_a_saelens_form_are_refused():
    from gsae_pl.saelens import saelens_params

    with pytest.raises(UserError, match="sae.architecture=prolu has no SAELens equivalent"):
        saelens_params({"sae": {"architecture": "prolu"}}, {})


# A topk SAE as SAELens 6.54 writes it (the topk architecture itself is another file's):
# d_in = 2, d_sae = 4, W_enc = [[1, 0, -1, 2], [0, 1, 1, -1]], b_enc = [0, 0, 0, -10],
# b_dec = 0, W_dec = the 4 x 2 matrix below, k = 2. For x = [[3, 1], [-1, -2]]:
#   z = [[3, 1, -2, 5 - 10], [-1, -2, -1, 0 - 10]] = [[3, 1, -2, -5], [-1, -2, -1, -10]]
#   top 2 of row 0: 3, 1; of row 1: the two -1s, which ReLU zeroes (SAELens applies ReLU
#   after the top-k): f = [[3, 1, 0, 0], [0, 0, 0, 0]].
TOPK = {"W_enc": torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, -1.0]]),
        "b_enc": torch.tensor([0.0, 0.0, 0.0, -10.0]), "b_dec": torch.zeros(2),
        "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])}
TOPK_CFG = {"architecture": "topk", "d_in": 2, "d_sae": 4, "k": 2, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
            "metadata": {}}


def write_sae(path, cfg, params):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(params, str(path / "sae_weights.safetensors"))
    return path


def test_topk_round_trip_on_hand_set_weights(tmp_path):
    sae = load_sae(write_sae(tmp_path / "sae", TOPK_CFG, TOPK))
    x = torch.tensor([[3.0, 1.0], [-1.0, -2.0]])
    f = sae.encode(x)
    assert torch.equal(f, torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(sae(x), torch.tensor([[3.0, 1.0], [0.0, 0.0]]))


def test_jumprelu_form_on_hand_set_weights(tmp_path):
    """SAELens's JumpReLU: ReLU(z) * 1[z > threshold], z as for topk above."""
    params = {**TOPK, "threshold": torch.tensor([2.0, 1.0, -1.5, 0.5])}
    cfg = {**TOPK_CFG, "architecture": "jumprelu"}
    del cfg["k"], cfg["rescale_acts_by_decoder_norm"]
    sae = load_sae(write_sae(tmp_path / "sae", cfg, params))
    f = sae.encode(torch.tensor([[3.0, 1.0], [-1.0, -2.0]]))
    # row 0: 3 > 2 fires, 1 > 1 does not (strict); row 1: -1 > -1.5 at feature 2, but
    # ReLU(-1) = 0 (z * H(z - threshold) would give -1: equal for thresholds >= 0 only)
    assert torch.equal(f, torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_check_params_refuses_the_new_forms_mismatches(tmp_path):
    jumprelu_cfg = {**TOPK_CFG, "architecture": "jumprelu"}
    write_sae(tmp_path / "j", jumprelu_cfg, TOPK)
    with pytest.raises(UserError, match=r"missing: \['threshold'\]"):
        load_sae(tmp_path / "j")
    write_sae(tmp_path / "t", TOPK_CFG, {**TOPK, "threshold": torch.zeros(4)})
    with pytest.raises(UserError, match=r"unexpected: \['threshold'\]"):
        load_sae(tmp_path / "t")
    write_sae(tmp_path / "short", jumprelu_cfg, {**TOPK, "threshold": torch.zeros(3)})
    with pytest.raises(UserError, match=r"threshold has shape \[3\], cfg.json implies \[4\]"):
        load_sae(tmp_path / "short")
    for i, k in enumerate([None, 0, 5, 2.0, True]):
        cfg = {key: value for key, value in TOPK_CFG.items() if key != "k"}
        if k is not None:
            cfg["k"] = k
        write_sae(tmp_path / f"k{i}", cfg, TOPK)
        with pytest.raises(UserError, match="architecture 'topk' needs k, an integer from 1 "
                                            "to d_sae=4"):
            load_sae(tmp_path / f"k{i}")


def test_an_architecture_adds_its_forms_cfg_fields(runs, tmp_path, monkeypatch):
    """`saelens_cfg` (saes/base.py): how a topk architecture puts its k into cfg.json."""
    from gsae_pl.saes.relu import ReLUSAE

    monkeypatch.setattr(ReLUSAE, "saelens_cfg", classmethod(lambda cls, sae_cfg: {"k": 3}))
    assert export_main([str(runs / "relu"), str(tmp_path / "sae")]) == 0
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["k"] == 3 and cfg["architecture"] == "standard"
