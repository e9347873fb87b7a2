"""Time `python -m gsae_pl.inspect` on an SAE with 16,384 latents, on CPU.

    python benchmarks/inspect_speed.py [--d-sae 16384] [--rows 16384] [--out FILE]

Trains a short run of a d_sae-wide gated SAE (`python -m gsae_pl.fit`, 10 steps: the
weights barely matter, the width does) on the MLP neurons (d_in 256) of a small random
GPT-2 written here (d_model 64, as the embedded tiny LM: no download, no build), with
eval.rows held-out rows of 64-token windows (its n_ctx), then times `python -m gsae_pl.inspect RUN`
at its defaults (the 20 most active latents, top 10 contexts each) as a fresh process:
wall time, the phases it prints (source opened, held-out pass done), its peak resident
memory, and what materialising every activation would have taken instead (rows x d_sae
float32). Writes benchmarks/results/inspect_speed.json (with the machine's load average,
before and after: the 2-core development machine is shared) and prints one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsae_pl.run.provenance import code_state  # noqa: E402
from tests.data.lm_fixtures import write_text, write_tiny_gpt2  # noqa: E402


def fit(work: Path, d_sae: int, rows: int) -> Path:
    model = write_tiny_gpt2(work / "model", d_model=64)  # d_mlp 256: the tiny LM's site width
    corpus = write_text(work / "corpus", n_docs=4000)
    command = [sys.executable, "-m", "gsae_pl.fit", "--config", str(ROOT / "configs/base.yaml"),
               "data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
               "data.context_size=64", "data.buffer_size=4096", "data.batch_size=256",
               "data.normalize_rows=1024", f"eval.rows={rows}", "eval.every_n_steps=10",
               "eval.loss_recovered.contexts=4", "trainer.max_steps=10", "log.every_n_steps=5",
               "log.histogram_every_n_steps=10", "checkpoint.every_n_steps=10",
               f"sae.d_sae={d_sae}", "sae.compile=never", "resample.enabled=false",
               "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
               f"output.dir={work}", "output.name=run"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"fit failed:\n{proc.stderr[-3000:]}")
    return work / "run"


def time_inspect(run: Path) -> dict:
    command = [sys.executable, "-m", "gsae_pl.inspect", str(run)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"inspect failed:\n{proc.stderr[-3000:]}")
    # "inspect: <phase> (<seconds since it began> s)" lines on stderr
    phases = {m.group(1): float(m.group(2))
              for m in re.finditer(r"inspect: (.+?) \(([\d.]+) s\)", proc.stderr)}
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": "python -m gsae_pl.inspect RUN", "wall_s": round(wall, 2),
            "phases_s": phases, "peak_rss_mib": round(peak_kib / 1024), "stdout": proc.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inspect_speed.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run = fit(Path(tmp), args.d_sae, args.rows)
        result = _timed_in_child(run)
    load_after = os.getloadavg()
    results = {
        "d_sae": args.d_sae, "d_in": 256, "held_out_rows": args.rows, "latents_shown": 20,
        "k": 10, **result,
        "all_activations_would_be_mib": round(args.rows * args.d_sae * 4 / 2**20),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "load_avg_1m_before_after": [round(load_before[0], 2),
                                                 round(load_after[0], 2)]},
        "torch": torch.__version__, "code": code_state(ROOT),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"inspect, d_sae {args.d_sae}, {args.rows} held-out rows: {result['wall_s']} s wall "
          f"(held-out pass done at {result['phases_s'].get('held-out pass done')} s), peak "
          f"{result['peak_rss_mib']} MiB; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    return 0


def _timed_in_child(run: Path) -> dict:
    """time_inspect in a fresh Python process, whose only child is inspect (so its
    RUSAGE_CHILDREN peak is inspect's, not fit's)."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.inspect_speed import time_inspect; "
            "print(json.dumps(time_inspect(Path(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(run)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


if __name__ == "__main__":
    sys.exit(main())
