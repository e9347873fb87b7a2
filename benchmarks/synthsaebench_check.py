"""Cross-check the synthsaebench source and its metrics against SAELens 6.54.12 itself.

    python benchmarks/synthsaebench_check.py --saelens-python .venv-saelens/bin/python
    make synthsaebench-check   # builds .venv-saelens (as make saelens-check), runs this

SAELens 6 needs transformer-lens < 4, so it runs in its own venv, through a subprocess.
(a) SAELens builds and saves a small SyntheticModel with SynthSAEBench-16k's rules (1024
    features in 64 dimensions, 8 trees); gsae_pl builds the same config from the same seed
    (the tensors are compared) and loads SAELens's directory (data.synthsaebench.model_dir).
    Both sample ROWS rows; per feature, the firing rates are compared by a two-sample z-test
    and the mean magnitudes of the active entries by Welch's z; every feature must have
    |z| < Z_MAX (Bonferroni over the features: a false alarm once in ~1600 runs). Both
    sides must show no mutually exclusive siblings co-firing and no child without its parent.
(b) For each architecture with a SAELens form, a tiny SAE is trained on that model
    (`python -m gsae_pl.fit`, data.synthsaebench.model_dir) and exported
    (`python -m gsae_pl.export`); SAELens's `eval_sae_on_synthetic_data` then scores the
    exported SAE on the very held-out rows and true activations gsae_pl scored (a generator
    and a feature dictionary that replay them), and each metric is compared with the run's
    metrics.json: |difference| <= TOLERANCE.
Writes benchmarks/results/synthsaebench_check.txt (naming the commit); exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from gsae_pl.data.synthsaebench import SynthSAEBenchConfig, SynthSAEBenchSource
from gsae_pl.fit import main as fit_main
from gsae_pl.run.provenance import code_state
from gsae_pl.saelens import main as export_main

ROOT = Path(__file__).resolve().parents[1]
# SynthSAEBench-16k's rules at a size that builds and samples in seconds on a CPU.
SMALL = {"n_features": 1024, "d_in": 64, "hierarchy_roots": 8, "branching": 4, "depth": 3,
         "mutually_exclusive_portion": 1.0, "compensate_probabilities": True,
         "scale_children_by_parent": True, "zipf_exponent": 0.5, "p_max": 0.4,
         "p_min": 5e-4, "correlation_rank": 25, "correlation_scale": 0.1,
         "mean_magnitude_start": 5.0, "mean_magnitude_end": 4.0, "std_magnitude_mean": 0.5,
         "std_magnitude_std": 0.5, "bias_norm": 0.5, "orthogonalize_steps": 100,
         "orthogonalize_lr": 3e-4, "seed": 42}
ROWS, BATCH = 200_000, 4096
Z_MAX = 5.0
TOLERANCE = 1e-6
EVAL_ROWS = 8192
FIT = ["trainer.max_steps=300", "data.batch_size=256", f"eval.rows={EVAL_ROWS}",
       "eval.every_n_steps=300", "checkpoint.every_n_steps=300", "data.normalize_rows=1024",
       "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "sae.d_sae=256",
       "resample.enabled=false", "data.source=synthsaebench"]
CASES = {  # case -> (YAML under ablations/, overrides): those with a SAELens form asked for
    "gated": ("gated.yaml", ["loss.sparsity.coefficient=0.01"]),
    "relu": ("baseline.yaml", ["loss.sparsity.coefficient=0.01"]),
    "jumprelu": ("jumprelu.yaml", ["loss.sparsity.coefficient=0.01"]),
    "batchtopk": ("batchtopk.yaml", ["sae.k=12"]),  # as SAELens: a jumprelu SAE
    "matryoshka_batchtopk": ("matryoshka_batchtopk.yaml", ["sae.k=12"]),
}
# SAELens's result field -> gsae_pl's metric
METRICS = {"mcc": "synth_mcc", "uniqueness": "synth_uniqueness",
           "classification.precision": "synth_precision",
           "classification.recall": "synth_recall", "classification.f1_score": "synth_f1",
           "classification.accuracy": "synth_accuracy",
           "explained_variance": "synth_explained_variance", "sae_l0": "synth_l0",
           "true_l0": "synth_true_l0", "dead_latents": "synth_dead_latents",
           "shrinkage": "synth_shrinkage"}

# Runs in the SAELens venv. argv: mode, work dir, then the settings as JSON.
SAELENS_SIDE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import sae_lens
mode, work, s = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])

def stats(c, tree):
    on = c > 0
    out = {"count": on.sum(0).double(), "sum": c.sum(0).double(),
           "sumsq": c.double().pow(2).sum(0),
           "rows": torch.tensor([float(len(c))], dtype=torch.float64)}
    out["me_cofire"] = torch.tensor([float(sum(int((on[:, k].sum(1) > 1).sum())
                                        for _, k, me in tree if me))], dtype=torch.float64)
    out["orphans"] = torch.tensor([float(sum(int((on[:, k].any(1) & ~on[:, p]).sum())
                                      for p, k, _ in tree))], dtype=torch.float64)
    return out

def edges(roots):
    stack, out = list(roots), []
    while stack:
        n = stack.pop()
        if n.children:
            out.append((n.feature_index, [c.feature_index for c in n.children],
                        n.mutually_exclusive_children))
        stack += list(n.children)
    return out

if mode == "build":
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    from sae_lens.synthetic.synthetic_model import (LowRankCorrelationConfig,
                                                    OrthogonalizationConfig)
    from sae_lens.synthetic.hierarchy import HierarchyConfig
    from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.firing_magnitudes import (LinearMagnitudeConfig,
                                                      FoldedNormalMagnitudeConfig)
    cfg = SyntheticModelConfig(
        num_features=s["n_features"], hidden_dim=s["d_in"],
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=s["zipf_exponent"], max_prob=s["p_max"], min_prob=s["p_min"]),
        hierarchy=HierarchyConfig(
            total_root_nodes=s["hierarchy_roots"], branching_factor=s["branching"],
            max_depth=s["depth"], mutually_exclusive_portion=s["mutually_exclusive_portion"],
            compensate_probabilities=s["compensate_probabilities"],
            scale_children_by_parent=s["scale_children_by_parent"]),
        orthogonalization=OrthogonalizationConfig(num_steps=s["orthogonalize_steps"],
                                                  lr=s["orthogonalize_lr"]),
        correlation=LowRankCorrelationConfig(rank=s["correlation_rank"],
                                             correlation_scale=s["correlation_scale"]),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=s["mean_magnitude_start"],
                                                     end=s["mean_magnitude_end"]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=s["std_magnitude_mean"],
                                                          std=s["std_magnitude_std"]),
        bias=s["bias_norm"], seed=s["seed"])
    import time
    t0 = time.time()
    model = SyntheticModel(cfg)
    model.save(work / "model")
    print("built in", round(time.time() - t0, 1), "s", file=sys.stderr)
    tree = edges(model.hierarchy.roots)
    torch.manual_seed(1)
    total = None
    for _ in range(s["rows"] // s["batch"]):
        got = stats(model.activation_generator.sample(s["batch"]), tree)
        total = got if total is None else {k: total[k] + got[k] for k in got}
    save_file(total, str(work / "saelens_stats.safetensors"))
    print(json.dumps({"sae_lens": sae_lens.__version__}))
else:
    from torch import nn
    from sae_lens import SAE
    from sae_lens.synthetic.evals import eval_sae_on_synthetic_data
    data = load_file(str(work / "heldout.safetensors"))
    W = load_file(str(work / "model" / "synthetic_model.safetensors"))["feature_vectors"]

    class Replay(nn.Module):
        # the held-out rows gsae_pl scored, in order: feature_dict(c) returns their x
        def __init__(self):
            super().__init__()
            self.feature_vectors, self.at = W, 0
        def forward(self, c):
            x = data["x"][self.at:self.at + len(c)]
            self.at += len(c)
            return x

    class Truth:
        def __init__(self):
            self.at = 0
        def sample(self, n):
            c = data["c"][self.at:self.at + n]
            self.at += n
            return c

    out = {"sae_lens": sae_lens.__version__}
    for case in s["cases"]:
        sae = SAE.load_from_disk(str(work / case / "sae"), device="cpu")
        res = eval_sae_on_synthetic_data(sae, Replay(), Truth(), num_samples=len(data["x"]),
                                         batch_size=1024)
        d = res.to_dict()
        out[case] = {**{k: v for k, v in d.items() if k != "classification"},
                     **{f"classification.{k}": v for k, v in d["classification"].items()}}
    print(json.dumps(out))
"""


def saelens(python: str, mode: str, work: Path, settings: dict) -> dict:
    done = subprocess.run([python, "-c", SAELENS_SIDE, mode, str(work), json.dumps(settings)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the SAELens side failed ({mode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def source(**overrides) -> SynthSAEBenchSource:
    return SynthSAEBenchSource(OmegaConf.merge(OmegaConf.structured(SynthSAEBenchConfig),
                                               SMALL, overrides))


def our_stats(src: SynthSAEBenchSource) -> dict:
    count, total = torch.zeros(src.n_features, dtype=torch.float64), None
    total = {"count": count, "sum": count.clone(), "sumsq": count.clone(),
             "rows": torch.zeros(1, dtype=torch.float64),
             "me_cofire": torch.zeros(1, dtype=torch.float64),
             "orphans": torch.zeros(1, dtype=torch.float64)}
    tree = [(p, k, me) for p, k, me in edges(src.model.roots)]
    for k in range(ROWS // BATCH):
        _, (rows, cols, vals) = src.sample(BATCH, src.generator("check", k))
        c = torch.zeros(BATCH, src.n_features)
        c[rows, cols] = vals
        on = c > 0
        total["count"] += on.sum(0)
        total["sum"] += c.sum(0).double()
        total["sumsq"] += c.double().pow(2).sum(0)
        total["rows"] += BATCH
        total["me_cofire"] += sum(int((on[:, kids].sum(1) > 1).sum()) for _, kids, me in tree
                                  if me)
        total["orphans"] += sum(int((on[:, kids].any(1) & ~on[:, p]).sum())
                                for p, kids, _ in tree)
    return total


def edges(roots: list[dict]) -> list[tuple[int, list[int], bool]]:
    stack, out = list(roots), []
    while stack:
        node = stack.pop()
        if node["children"]:
            out.append((node["feature_index"], [c["feature_index"] for c in node["children"]],
                        bool(node["mutually_exclusive_children"])))
        stack += node["children"]
    return out


def compare_stats(ours: dict, theirs: dict, lines: list[str]) -> bool:
    n1, n2 = float(ours["rows"]), float(theirs["rows"])
    p1, p2 = ours["count"] / n1, theirs["count"] / n2
    pooled = (ours["count"] + theirs["count"]) / (n1 + n2)
    se = (pooled * (1 - pooled) * (1 / n1 + 1 / n2)).sqrt()
    z_rate = torch.where(se > 0, (p1 - p2) / se.clamp(min=1e-300), 0.0)
    # the mean magnitude of the active entries, Welch's z, where both sides have 30+
    m1, m2 = (d["sum"] / d["count"].clamp(min=1) for d in (ours, theirs))
    v1, v2 = (d["sumsq"] / d["count"].clamp(min=1) - m ** 2 for d, m in ((ours, m1),
                                                                          (theirs, m2)))
    enough = (ours["count"] >= 30) & (theirs["count"] >= 30)
    se_m = (v1 / ours["count"].clamp(min=1) + v2 / theirs["count"].clamp(min=1)).sqrt()
    z_mag = torch.where(enough & (se_m > 0), (m1 - m2) / se_m.clamp(min=1e-300), 0.0)
    s1, s2 = v1.clamp(min=0).sqrt(), v2.clamp(min=0).sqrt()
    lines += [f"(a) firing: {n1:.0f} rows each side; per-feature rate z: max |z| "
              f"{z_rate.abs().max():.2f} (feature {int(z_rate.abs().argmax())}), "
              f"|z| > 3 on {int((z_rate.abs() > 3).sum())} of {len(z_rate)} features "
              f"(~{0.0027 * len(z_rate):.1f} expected by chance); limit |z| < {Z_MAX}",
              f"    true L0: ours {float(ours['count'].sum()) / n1:.4f}, SAELens "
              f"{float(theirs['count'].sum()) / n2:.4f}",
              f"    magnitude of active entries, per feature ({int(enough.sum())} features "
              f"with 30+ on both sides): max Welch |z| {z_mag.abs().max():.2f}; mean over "
              f"them of the means: ours {float(m1[enough].mean()):.4f}, SAELens "
              f"{float(m2[enough].mean()):.4f}; of the stds: ours {float(s1[enough].mean()):.4f}"
              f", SAELens {float(s2[enough].mean()):.4f}",
              f"    ME siblings co-firing: ours {int(ours['me_cofire'])}, SAELens "
              f"{int(theirs['me_cofire'])}; children active without their parent: ours "
              f"{int(ours['orphans'])}, SAELens {int(theirs['orphans'])}"]
    return bool(z_rate.abs().max() < Z_MAX and z_mag.abs().max() < Z_MAX
                and not any(int(d[k]) for d in (ours, theirs) for k in ("me_cofire", "orphans")))


def compare_build(model_dir: Path, lines: list[str]) -> bool:
    theirs = load_file(str(model_dir / "synthetic_model.safetensors"))
    ours = source().model
    pairs = {"feature_vectors": ours.W, "bias": ours.bias, "firing_probabilities": ours.p,
             "correlation_factor": ours.factor}
    diffs = {k: float((v - theirs[k]).abs().max()) for k, v in pairs.items()}
    lines.append("(a) gsae_pl's build of the same config vs SAELens's saved model, max |diff|: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return max(diffs.values()) < 1e-4


def train(work: Path, model_dir: Path, case: str, yaml_name: str, extra: list[str]) -> dict:
    runs = work / "runs"
    args = ["--config", str(ROOT / "ablations" / yaml_name), f"output.dir={runs}",
            f"output.name={case}", f"data.synthsaebench.model_dir={model_dir}", *FIT, *extra]
    if fit_main(args) != 0 or export_main([str(runs / case), str(work / case / "sae")]) != 0:
        raise SystemExit(f"{case}: the fit or its export failed")
    return json.loads((runs / case / "metrics.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saelens-python", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/synthsaebench_check.txt")
    args = parser.parse_args()
    code = code_state(ROOT)
    lines = [f"synthsaebench_check on commit {code['commit']} (dirty: {code['dirty']}), "
             f"model: {json.dumps(SMALL)}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        version = saelens(args.saelens_python, "build", work,
                          {**SMALL, "rows": ROWS, "batch": BATCH})["sae_lens"]
        lines.insert(1, f"SAELens {version}")
        ok = compare_build(work / "model", lines)
        loaded = source(model_dir=str(work / "model"))
        ok &= compare_stats(our_stats(loaded), load_file(str(work / "saelens_stats.safetensors")),
                            lines)
        save_file({"x": loaded.eval_rows(EVAL_ROWS),
                   "c": loaded.eval_features(EVAL_ROWS).to_dense()},
                  str(work / "heldout.safetensors"))
        cases = args.cases.split(",")
        ours = {case: train(work, work / "model", case, *CASES[case]) for case in cases}
        theirs = saelens(args.saelens_python, "eval", work, {"cases": cases})
        lines.append(f"(b) {EVAL_ROWS} held-out rows; |gsae_pl - SAELens| per metric, "
                     f"tolerance {TOLERANCE:g}")
        for case in cases:
            diffs = {name: abs(ours[case][name] - theirs[case][field])
                     for field, name in METRICS.items()}
            worst = max(diffs, key=diffs.get)
            same = diffs[worst] <= TOLERANCE
            ok &= same
            lines.append(f"    {case:22s} L0 {ours[case]['synth_l0']:7.2f} MCC "
                         f"{ours[case]['synth_mcc']:.4f} F1 {ours[case]['synth_f1']:.4f} "
                         f"EV {ours[case]['synth_explained_variance']:.4f}  max |diff| "
                         f"{diffs[worst]:.1e} ({worst})  {'same' if same else 'DIFFERENT'}")
            lines += [f"        {k}: gsae_pl {ours[case][k]!r} SAELens {theirs[case][f]!r}"
                      for f, k in METRICS.items() if diffs[k] > TOLERANCE]
    lines.append("PASS" if ok else "FAIL")
    print("\n".join(lines))
    args.out.write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
