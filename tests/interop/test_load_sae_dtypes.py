"""`load_sae` on weights stored in another float type (SAELens saves bf16 and fp16 SAEs):
they are loaded as float32, the type the file held recorded, and compute what their
values define; a non-float tensor is one line naming the file. docs/faults.md, section 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gsae_pl import load_sae
from gsae_pl.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CFG = {"architecture": "standard", "d_in": 3, "d_sae": 4, "dtype": "bfloat16",
       "apply_b_dec_to_input": True, "normalize_activations": "none"}


def weights(dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (3, 4), "b_enc": (4,), "W_dec": (4, 3), "b_dec": (3,)}
    return {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}


def write(path: Path, params, cfg=CFG) -> Path:
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(params, str(path / "sae_weights.safetensors"))
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_non_float32_weights_load_as_float32_and_compute(tmp_path, dtype):
    params = weights(dtype)
    sae = load_sae(write(tmp_path / "sae", params, {**CFG, "dtype": str(dtype)[6:]}))
    assert sae.stored_dtype == str(dtype).removeprefix("torch.")
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    x = torch.randn(5, 3)
    p = {k: v.float() for k, v in params.items()}  # the file's values, exactly (but f64)
    f = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    torch.testing.assert_close(sae(x), f @ p["W_dec"] + p["b_dec"])
    assert sae(x.bfloat16()).dtype == torch.float32  # a bf16 hook's output works too


def test_float32_weights_record_float32(tmp_path):
    sae = load_sae(write(tmp_path / "sae", weights(torch.float32)))
    assert sae.stored_dtype == "float32"


@pytest.mark.slow
def test_integer_weights_are_refused_in_one_line(tmp_path):
    params = {**weights(torch.float32), "W_dec": torch.zeros(4, 3, dtype=torch.int32)}
    path = write(tmp_path / "sae", params)
    with pytest.raises(UserError, match=r"sae_weights.safetensors: W_dec is int32"):
        load_sae(path)
    code = ("import sys; from gsae_pl.saelens import run_main, load_sae; "
            f"sys.exit(run_main(lambda: load_sae({str(path)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "W_dec is int32" in proc.stderr
