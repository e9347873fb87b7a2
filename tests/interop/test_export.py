"""Export to SAELens's on-disk format and `load_sae`: the round trip on raw activations,
the file layout SAELens reads, and every refusal (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gsae_pl import load_sae
from gsae_pl.errors import UserError
from gsae_pl.run.module import SAEModule
from gsae_pl.run.train import main as fit_main
from gsae_pl.saelens import main as export_main
from tests.tiny_run import args

VARIANTS = {"gated": ["sae.weight_sharing=r_mag"], "no_r_mag": ["sae.weight_sharing=no_r_mag"],
            "relu": ["sae.architecture=relu", "loss.aux.enabled=false"],
            "untied": ["sae.weight_sharing=untied"],
            # 10 baseline steps, then 10 of rescale & shift: exported as a gated SAE
            "rescale_shift": ["sae.architecture=rescale_shift", "loss.aux.enabled=false",
                              "sae.rescale_shift_steps=10"]}
GATED_PARAMS = {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
STANDARD_PARAMS = {"W_enc", "b_enc", "W_dec", "b_dec"}


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


@pytest.mark.parametrize("name", ["gated", "no_r_mag", "relu", "rescale_shift"])
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


@pytest.mark.parametrize("name", ["gated", "relu"])
def test_saelens_layout(runs, tmp_path, name):
    assert export_main([str(runs / name), str(tmp_path / "sae")]) == 0
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    params = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    expected = GATED_PARAMS if name == "gated" else STANDARD_PARAMS
    assert set(params) == expected and all(v.dtype == torch.float32 for v in params.values())
    assert params["W_enc"].shape == (8, 32) and params["W_dec"].shape == (32, 8)
    assert cfg["architecture"] == {"gated": "gated", "relu": "standard"}[name]
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
    refused([str(runs / "gated"), str(tmp_path / "full")], tmp_path, capsys, "--force")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert export_main([str(runs / "gated"), str(tmp_path / "full"), "--force"]) == 0
    assert not (tmp_path / "full" / "x").exists()


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
    cfg_path.write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(UserError, match="architecture 'topk'"):
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
