"""Check that exported SAEs load in SAELens itself and give the same outputs as `load_sae`.

    python benchmarks/saelens_compat.py --saelens-python .venv-saelens/bin/python
    make saelens-check      # builds .venv-saelens (torch 2.13.0, sae-lens 6.54.12), runs this

SAELens 6 requires transformer-lens < 4 while gsae_pl runs on transformer-lens 4, so SAELens
lives in a venv of its own and this script talks to it through a subprocess: it trains one
tiny SAE per exportable architecture here (synthetic data, `python -m gsae_pl.fit`), exports
each (`python -m gsae_pl.export`), records `load_sae`'s codes and reconstructions of raw
inputs, then has SAELens's `SAE.load_from_disk` load the same directories and compute the
same things. Writes benchmarks/results/saelens_compat.json; exits 1 if any case differs.
Not part of `make test` (CI has no SAELens venv); the committed results file names the
commit and the SAELens version it was checked with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from gsae_pl import load_sae
from gsae_pl.fit import main as fit_main
from gsae_pl.run.provenance import code_state
from gsae_pl.saelens import main as export_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.source=synthetic", "trainer.max_steps=60", "data.batch_size=256",
        "eval.rows=512", "eval.every_n_steps=60", "checkpoint.every_n_steps=60",
        "data.normalize_rows=512", "trainer.enable_progress_bar=false",
        "sae.d_sae=64", "data.synthetic.n_features=48", "data.synthetic.d_in=16",
        "resample.enabled=false"]
# case -> (YAML under ablations/, overrides): every architecture with a SAELens form.
CASES = {
    "relu": ("baseline.yaml", ["loss.sparsity.coefficient=0.01"]),
    "gated": ("gated.yaml", ["loss.sparsity.coefficient=0.01"]),
    "gated_no_r_mag": ("no_r_mag.yaml", ["loss.sparsity.coefficient=0.01"]),
    "rescale_shift": ("baseline_rescale_shift.yaml",
                      ["loss.sparsity.coefficient=0.01", "sae.rescale_shift_steps=20"]),
    "gated_no_shift": ("no_shift.yaml", ["loss.sparsity.coefficient=0.01"]),
    "jumprelu": ("jumprelu.yaml", ["loss.sparsity.coefficient=0.01"]),
    "topk": ("topk.yaml", ["sae.k=4"]),
    "batchtopk": ("batchtopk.yaml", ["sae.k=4"]),        # as SAELens: a jumprelu SAE
    "matryoshka_batchtopk": ("matryoshka_batchtopk.yaml", ["sae.k=4"]),  # the same
}
TOLERANCE = 1e-5  # max |difference| relative to the largest |value|, float32 maths

# Runs inside the SAELens venv: argv[1] is the work directory.
SAELENS_SIDE = r"""
import json, sys
from pathlib import Path
import torch
import sae_lens
from safetensors.torch import load_file
from sae_lens import SAE
work = Path(sys.argv[1])
out = {"sae_lens": sae_lens.__version__}
for case in sorted(p.parent.name for p in work.glob("*/inputs.safetensors")):
    sae = SAE.load_from_disk(str(work / case / "sae"), device="cpu")
    ref = load_file(str(work / case / "inputs.safetensors"))
    with torch.no_grad():
        f = sae.encode(ref["x"])
        x_hat = sae.decode(f)
    out[case] = {"class": type(sae).__name__,
                 "f": (f - ref["f"]).abs().max().item() / ref["f"].abs().max().item(),
                 "x_hat": (x_hat - ref["x_hat"]).abs().max().item()
                          / ref["x_hat"].abs().max().item()}
print(json.dumps(out))
"""


def prepare(work: Path, case: str, yaml_name: str, overrides: list[str]) -> None:
    """Train and export one case; record load_sae's outputs on raw inputs."""
    runs = work / "runs"
    args = ["--config", str(ROOT / "ablations" / yaml_name), f"output.dir={runs}",
            f"output.name={case}", *TINY, *overrides]
    if fit_main(args) != 0 or export_main([str(runs / case), str(work / case / "sae")]) != 0:
        raise SystemExit(f"{case}: the tiny fit or its export failed")
    sae = load_sae(work / case / "sae")
    x = torch.randn(512, sae.d_in, generator=torch.Generator().manual_seed(0)).abs() * 3
    with torch.no_grad():
        f = sae.encode(x)
        save_file({"x": x, "f": f.contiguous(), "x_hat": sae.decode(f).contiguous()},
                  str(work / case / "inputs.safetensors"))
    if not (f != 0).any():
        raise SystemExit(f"{case}: no feature fires: the comparison would be vacuous")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saelens-python", required=True,
                        help="a python with sae-lens installed (make saelens-check builds one)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/saelens_compat.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            prepare(work / "cases", case, *CASES[case])
        done = subprocess.run([args.saelens_python, "-c", SAELENS_SIDE, str(work / "cases")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
    found = json.loads(done.stdout.strip().splitlines()[-1])
    results = {"code": code_state(ROOT), "sae_lens": found.pop("sae_lens"),
               "tolerance": TOLERANCE, "cases": found}
    for case, diff in found.items():
        diff["same"] = diff["f"] <= TOLERANCE and diff["x_hat"] <= TOLERANCE
        print(f"{case:28s} {diff['class']:22s} f {diff['f']:.1e}  x_hat {diff['x_hat']:.1e}"
              f"  {'same' if diff['same'] else 'DIFFERENT'}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(d["same"] for d in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
