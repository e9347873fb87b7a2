"""The ablation driver: suite expansion, refusals before anything runs, a 2-variant x
2-point suite end to end on CPU (parallel and DDP), failures recorded, reruns skipping."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from gsae_pl.errors import UserError
from gsae_pl.suite.launcher import main as ablate_main
from gsae_pl.suite.spec import load_suite
from tests.tiny_run import ROOT, TINY, run

ABLATIONS = ROOT / "ablations"
SHARED = {item.split("=")[0]: item.split("=")[1] for item in TINY}
SHARED.update({"trainer.max_steps": 30, "eval.every_n_steps": 30})


def write_suite(tmp_path, variants: dict, **extra) -> str:
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "seeds": [0],
            "overrides": SHARED, "grids": {"gated": [0.01, 0.1], "relu": [0.005, 0.05]},
            "variants": variants, **extra}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def config(name: str) -> str:
    return str(ABLATIONS / f"{name}.yaml")


def ablate(*argv: str, timeout: float = 300):
    return run([sys.executable, "-m", "gsae_pl.ablate", *argv], timeout=timeout)


def test_expansion_names_runs_and_orders_overrides(tmp_path):
    path = write_suite(tmp_path, {
        "gated": {"config": config("gated"), "grid": "gated", "seeds": [0, 1]},
        "baseline": {"config": config("baseline"), "l1_coefficient": [0.02],
                     "overrides": {"sae.d_sae": 48}}})
    suite = load_suite(path, ["sae.d_sae=40"])
    assert [r.name for r in suite.runs] == [
        "gated_l1-0.01_seed0", "gated_l1-0.01_seed1", "gated_l1-0.1_seed0",
        "gated_l1-0.1_seed1", "baseline_l1-0.02_seed0"]
    gated, baseline = suite.runs[0].cfg, suite.runs[-1].cfg
    assert gated.output.variant == "gated" and gated.loss.sparsity.coefficient == 0.01
    assert gated.trainer.max_steps == 30  # the suite's shared overrides
    assert gated.sae.d_sae == 40  # the command line beats the suite
    assert baseline.sae.architecture == "relu"  # the variant's own YAML
    assert baseline.sae.d_sae == 40  # ... and the command line beats the variant too
    assert str(suite.runs[0].run_dir) == str(tmp_path / "out/runs/gated_l1-0.01_seed0")


def test_a_variant_sweeps_any_dotted_key_on_composed_configs_and_presets(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim: {lr: 0.002}\nsae: {d_sae: 24}\n")
    path = write_suite(tmp_path, {
        "gated": {"config": config("gated"), "sweep": {"optim.beta2": [0.99, 0.9]},
                  "presets": ["wide", "deep"]},
        "no_aux": {"config": [config("gated"), config("no_aux")], "grid": "gated",
                   "presets": ["wide"], "overrides": {"sae.d_sae": 40}}},
        configs=[recipe.name], presets={"wide": {"sae.d_sae": 64, "optim.lr": 0.001},
                                        "deep": {"sae.d_sae": 32}})
    suite = load_suite(path)
    assert [r.name for r in suite.runs] == ["gated_beta2-0.99_seed0", "gated_beta2-0.9_seed0",
                                             "no_aux_l1-0.01_seed0", "no_aux_l1-0.1_seed0"]
    gated, no_aux = suite.runs[1].cfg, suite.runs[2].cfg
    assert gated.optim.beta2 == 0.9 and gated.output.sweep == "optim.beta2"
    assert gated.sae.d_sae == 32 and gated.optim.lr == 0.001  # presets in order, last wins
    assert no_aux.sae.d_sae == 40 and not no_aux.loss.aux.enabled  # both YAMLs, then overrides
    assert suite.runs[2].config_paths[0] == recipe  # the suite's configs come first
    bare = load_suite(write_suite(tmp_path, {"gated": {"config": config("gated"), "grid":
                                                       "gated"}}, configs=[recipe.name]))
    # the recipe lands over the variant's base.yaml; the suite's overrides over the recipe
    assert bare.runs[0].cfg.optim.lr == 0.002 and bare.runs[0].cfg.sae.d_sae == 32


@pytest.mark.parametrize("variants, extra, message", [
    ({"nonesuch": {"grid": "gated"}}, {}, "unknown variant"),
    ({"gated": {"config": config("gated"), "l1_coefficient": []}}, {},
     "is empty: list at least one value"),
    ({"gated": {"config": config("gated"), "sweep": {"sae.d_sae": [8], "seed": [1]}}}, {},
     "a sweep names one dotted key"),
    ({"gated": {"config": config("gated"), "sweep": {"seed": [1, 2]}}}, {},
     "seed is set by the suite for each run and cannot be swept"),
    ({"gated": {"config": config("gated"), "sweep": {"sae.d_sae": [8]}}},
     {"overrides": {"sae.d_sae": 4}}, "sae.d_sae is the key this variant sweeps"),
    ({"gated": {"config": config("gated"), "grid": "gated", "presets": ["wide"]}}, {},
     "preset wide is not among the suite's presets"),
    ({"gated": {"config": config("gated"), "grid": "gated"}}, {"configs": ["nonesuch.yaml"]},
     "configs: no file"),
    ({"gated": {"config": config("gated"), "grid": "wide"}}, {}, "not among the suite's grids"),
    ({"gated": {"config": config("gated"), "grid": "gated"}}, {"overrides": {"sae.d_sea": 4}},
     "did you mean sae.d_sae"),
    ({}, {}, "at least one variant"),
    ({"gated": {"config": config("gated"), "grid": "gated", "seeds": []}}, {}, "seeds"),
    ({"gated": {"config": config("gated"), "grid": "gated"}}, {"figures": {"main": ["relu"]}},
     "figure main names relu"),
    # Runs that would share one folder, or land outside runs/:
    ({"gated": {"config": config("gated"), "l1_coefficient": [0.1, 0.10000001]}}, {},
     r"\(variant gated, l1_coefficient 0.1, seed 0\) and \(variant gated, l1_coefficient "
     r"0.10000001, seed 0\) would both be run gated_l1-0.1_seed0"),
    ({"gated": {"config": config("gated"), "grid": "gated", "seeds": [0, 1, 0]}}, {},
     "repeat a seed"),
    ({"gated": {"config": config("gated"), "grid": "gated"}}, {"seeds": [3, 3]}, "repeat a seed"),
    ({"../small": {"config": config("gated"), "grid": "gated"}}, {},
     "variant name '../small' holds a path separator"),
    ({"..": {"config": config("gated"), "grid": "gated"}}, {}, "variant name '..'"),
])
def test_bad_suites_are_refused_with_one_line(tmp_path, variants, extra, message):
    path = write_suite(tmp_path, variants, **extra)
    with pytest.raises(UserError, match=message):
        load_suite(path)


def test_a_variant_named_twice_is_refused_not_silently_dropped(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nvariants:\n"
                    f"  gated: {{config: {config('gated')}, l1_coefficient: [0.1]}}\n"
                    f"  gated: {{config: {config('gated')}, l1_coefficient: [0.2]}}\n")
    with pytest.raises(UserError, match=r"key 'gated' appears twice \(lines 3 and 4\)"):
        load_suite(path)


def test_refusals_exit_2_before_anything_is_written(tmp_path, capsys):
    ok = {"gated": {"config": config("gated"), "grid": "gated"}}
    cases = [
        ["--suite", str(tmp_path / "missing.yaml")],
        ["--suite", write_suite(tmp_path, ok), "--devices", "512"],
        ["--suite", write_suite(tmp_path, ok), "seed=3"],
        # no such YAML beside the suite nor in the project's ablations/
        ["--suite", write_suite(tmp_path, {"nonesuch": {"grid": "gated"}})],
        ["--suite", write_suite(tmp_path, ok), "--output-dir"],  # DIR missing
        ["--suite", str(ABLATIONS / "gated.yaml"), "--dry-run"],  # a variant, not a suite
        # it trained in <output_dir>/small_l1-0.01_seed0, outside runs/
        ["--suite", write_suite(tmp_path, {"../small": {"config": config("gated"),
                                                        "grid": "gated"}})],
    ]
    # The first in a real process (the exit status a shell sees), the rest in this one: each
    # process would spend seconds importing torch to print one line.
    done = ablate(*cases[0], timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), \
        (cases[0], done.stderr)
    for argv in cases[1:]:
        try:
            code = ablate_main(argv)
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, lines)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


def test_a_finished_run_with_another_config_is_refused_not_skipped(tmp_path):
    from omegaconf import OmegaConf

    from gsae_pl.config import to_yaml
    from gsae_pl.suite.launcher import check_finished_match

    path = write_suite(tmp_path, {"gated": {"config": config("gated"), "l1_coefficient": [0.1]}})
    run = load_suite(path).runs[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.json").write_text("{}")
    same = OmegaConf.merge(run.cfg, {"trainer": {"devices": 2, "strategy": "ddp"}})
    (run.run_dir / "config.yaml").write_text(to_yaml(same))
    check_finished_match([run])  # devices and strategy do not change what a run learns
    off = OmegaConf.merge(run.cfg, {"loss": {"orthogonality": {"exponent": 9.0}}})
    assert not run.cfg.loss.orthogonality.enabled
    (run.run_dir / "config.yaml").write_text(to_yaml(off))
    check_finished_match([run])  # nor do the settings of a switched-off block
    (run.run_dir / "config.yaml").write_text(to_yaml(OmegaConf.merge(run.cfg, {
        "optim": {"lr": 1e-4}, "trainer": {"max_steps": 7}})))
    done = ablate("--suite", path, timeout=60)
    assert done.returncode == 2 and "finished with a different config" in done.stderr
    assert "optim.lr" in done.stderr and "trainer.max_steps" in done.stderr


def test_parallel_runs_see_one_gpu_each_and_ddp_runs_see_all(monkeypatch, tmp_path):
    from gsae_pl.suite import launcher as ablate

    path = write_suite(tmp_path, {"gated": {"config": config("gated"), "grid": "gated"}})
    seen = []
    monkeypatch.setattr(ablate.subprocess, "Popen",
                        lambda command, env, **_: seen.append((command, env)))
    for strategy in ("parallel", "ddp"):
        launcher = ablate.Launcher(load_suite(path), "gpu", 2, strategy)
        launcher.logs.mkdir(parents=True, exist_ok=True)
        launcher.start(launcher.suite.runs[0], slot=1, index=1)
    (parallel, p_env), (ddp, d_env) = seen
    assert p_env["CUDA_VISIBLE_DEVICES"] == "1" and "trainer.devices=1" in parallel
    assert "CUDA_VISIBLE_DEVICES" not in d_env or d_env["CUDA_VISIBLE_DEVICES"] != "1"
    assert "trainer.devices=2" in ddp and "trainer.strategy=ddp" in ddp


def test_runs_per_device_shares_each_gpu_among_k_runs(monkeypatch, tmp_path):
    """--devices 2 --runs-per-device 3: six runs at once, slots 0-5 on GPUs 0,1,0,1,0,1,
    each with cores / 6 threads; K > 1 is refused where runs cannot share a device."""
    from gsae_pl.suite import launcher as ablate

    path = write_suite(tmp_path, {"gated": {"config": config("gated"), "grid": "gated"}})
    seen = []
    monkeypatch.setattr(ablate.subprocess, "Popen",
                        lambda command, env, **_: seen.append(env))
    monkeypatch.setattr(ablate.os, "sched_getaffinity", lambda _: set(range(12)))
    launcher = ablate.Launcher(load_suite(path), "gpu", 2, "parallel", per_device=3)
    launcher.logs.mkdir(parents=True, exist_ok=True)
    assert launcher.slots == 6
    for slot in range(6):
        launcher.start(launcher.suite.runs[0], slot=slot, index=1)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in seen] == ["0", "1"] * 3
    assert {env["OMP_NUM_THREADS"] for env in seen} == {"2"}
    suite = load_suite(path)
    monkeypatch.setattr(ablate, "available_devices", lambda accelerator: ("cpu", 2))
    with pytest.raises(UserError, match="--runs-per-device 2: several runs share a device "
                                        "only on GPUs"):
        ablate.check_devices(suite, 1, 2, "parallel")
    monkeypatch.setattr(ablate, "available_devices", lambda accelerator: ("gpu", 2))
    with pytest.raises(UserError, match="--runs-per-device 2"):
        ablate.check_devices(suite, 2, 2, "ddp")
    assert ablate.check_devices(suite, 2, 4, "parallel") == "gpu"
    with pytest.raises(UserError, match="--runs-per-device 0: pass 1 or more"):
        ablate.check_devices(suite, 2, 0, "parallel")


def test_progress_line_after_each_run_with_an_eta(monkeypatch, tmp_path, capsys):
    """4 runs of 100 s (a fake clock: each poll interval is 50 s) on 2 slots, one of them
    finished before: after each run ends, the counts and the ETA from the mean time."""
    from gsae_pl.suite import launcher as ablate

    clock = {"now": 0.0}
    monkeypatch.setattr(ablate.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(ablate.time, "sleep", lambda _: clock.update(now=clock["now"] + 50))

    class Process:  # ends 100 s after it starts
        def __init__(self):
            self.end, self.returncode = clock["now"] + 100, 0

        def poll(self):
            return 0 if clock["now"] >= self.end else None

    path = write_suite(tmp_path, {"gated": {"config": config("gated"),
                                            "l1_coefficient": [0.1, 0.2, 0.3, 0.4, 0.5]}})
    launcher = ablate.Launcher(load_suite(path), "cpu", 2, "parallel")
    monkeypatch.setattr(launcher, "start", lambda run, slot, index: Process())
    monkeypatch.setattr(launcher, "finish", lambda run, code, seconds, index: seconds == 100)
    ablate.run_all(launcher, list(enumerate(launcher.suite.runs, 1))[1:])
    assert capsys.readouterr().out.splitlines() == [
        # t = 100: runs 2 and 3 end; the second still counts as running when the first is
        # read (0 s left of its mean), then 2 left of 100 s each over 2 slots
        "suite: 2 of 5 runs done, 1 running, 2 left; ETA 1 min 40 s (mean 1 min 40 s per run, "
        "2 at a time)",
        "suite: 3 of 5 runs done, 0 running, 2 left; ETA 1 min 40 s (mean 1 min 40 s per run, "
        "2 at a time)",
        "suite: 4 of 5 runs done, 1 running, 0 left; ETA 0 s (mean 1 min 40 s per run, "
        "1 at a time)",
        "suite: 5 of 5 runs done, 0 running, 0 left"]


def test_each_ddp_run_under_torchrun_meets_on_its_own_store(monkeypatch):
    from torch.distributed import TCPStore

    from gsae_pl.suite.rendezvous import RunStores
    from tests.suite.test_multinode import free_port

    for var in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert RunStores().env(3) == {}  # no launcher: Lightning picks a free port itself
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets in its workers
    base = free_port() - 1
    monkeypatch.setenv("MASTER_PORT", str(base))
    stores = RunStores()
    assert stores.env(1) == {"MASTER_PORT": str(base + 1), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    # The first process hosts the run's store: a run's rank connects to it as a client.
    TCPStore("127.0.0.1", base + 1, is_master=False).set("k", "v")
    assert stores.hosted[1].get("k") == b"v"
    monkeypatch.setenv("RANK", "1")  # another node's copy only points its runs there
    other = RunStores()
    assert other.env(2)["MASTER_PORT"] == str(base + 2) and other.hosted == {}


@pytest.mark.slow
def test_two_variants_two_points_end_to_end_then_rerun_skips(tmp_path):
    path = write_suite(tmp_path, {
        "gated": {"config": config("gated"), "grid": "gated"},
        "baseline": {"config": config("baseline"), "grid": "relu"},
        "broken": {"config": config("gated"), "l1_coefficient": [0.1],
                   "overrides": {"optim.lr": 1e30}}}, figures={"main": ["gated", "baseline"]})
    done = ablate("--suite", path, "--devices", "2")
    out = tmp_path / "out"
    assert done.returncode == 3, done.stdout + done.stderr  # one run failed, the rest went on
    assert "1 of 5 runs failed" in done.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["variant"], float(r["value"])) for r in rows) == [
        ("baseline", 0.005), ("baseline", 0.05), ("gated", 0.01), ("gated", 0.1)]
    assert all(int(r["steps"]) == 30 for r in rows)
    failure = json.loads((out / "failed/broken_l1-0.1_seed0.json").read_text())
    assert failure["returncode"] == 3 and failure["error"].startswith("error:")
    assert (out / "report.md").is_file() and (out / "plots/l0_vs_fvu.png").is_file()
    assert (out / "plots/main_l0_vs_fvu.png").is_file()  # the suite's focused figure
    hparams = (out / "runs/gated_l1-0.01_seed0/config.yaml").read_text()
    assert "variant: gated" in hparams

    again = ablate("--suite", path, "--devices", "2", timeout=120)
    assert "4 already finished" in again.stdout, again.stdout
    assert again.returncode == 3  # the broken run was retried, and failed again
    assert again.stdout.count(": done in") == 0


@pytest.mark.slow
def test_ddp_strategy_runs_each_sae_over_both_processes(tmp_path):
    path = write_suite(tmp_path, {"gated": {"config": config("gated"), "l1_coefficient": [0.1]}})
    done = ablate("--suite", path, "--devices", "2", "--strategy", "ddp")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out/logs/gated_l1-0.1_seed0.log").read_text()
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
    # The global batch is split between the processes: the same run as on one process.
    one = write_suite(tmp_path, {"gated": {"config": config("gated"), "l1_coefficient": [0.1]}},
                      output_dir=str(tmp_path / "one"))
    assert ablate("--suite", one, "--devices", "1").returncode == 0
    a, b = (json.loads((tmp_path / d / "runs/gated_l1-0.1_seed0/metrics.json").read_text())
            for d in ("out", "one"))
    for key in ("l0", "fvu", "mse", "relative_reconstruction_bias"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key


def _files_under(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dry_run_lists_each_run_and_its_state_and_writes_nothing(tmp_path):
    """Variants named by their name alone come from the project's ablations/ (the suite
    lives elsewhere); --output-dir moves the suite's folder; --dry-run only prints."""
    from gsae_pl.config import to_yaml

    path = write_suite(tmp_path, {"gated": {"grid": "gated"}, "baseline": {"grid": "relu"}})
    elsewhere = tmp_path / "elsewhere"
    suite = load_suite(path, output_dir=elsewhere)
    assert suite.output_dir == elsewhere and suite.runs[0].run_dir.parent == elsewhere / "runs"
    assert suite.runs[0].cfg.sae.architecture == "gated"  # ablations/gated.yaml
    assert suite.runs[-1].cfg.sae.architecture == "relu"  # ablations/baseline.yaml
    finished, resumable = suite.runs[0].run_dir, suite.runs[1].run_dir
    (finished / "checkpoints").mkdir(parents=True)
    (finished / "config.yaml").write_text(to_yaml(suite.runs[0].cfg))
    (finished / "metrics.json").write_text("{}")
    (resumable / "checkpoints").mkdir(parents=True)
    (resumable / "checkpoints" / "last.ckpt").write_text("x")
    before = _files_under(tmp_path)
    done = ablate("--suite", path, "--output-dir", str(elsewhere), "--dry-run", timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (f"suite t: 4 runs (2 variants), 1 already finished, 3 to run; output "
                        f"in {elsewhere} (dry run: nothing started)")
    assert lines[1].split() == ["gated_l1-0.01_seed0", "gated", "l1=0.01", "seed", "0",
                                "finished:", "skipped"]
    assert lines[2].split()[:3] == ["gated_l1-0.1_seed0", "gated", "l1=0.1"]
    assert lines[2].endswith("unfinished: resumes from its checkpoint")
    assert lines[3].endswith("to train") and lines[4].startswith("  baseline_l1-0.05_seed0")
    assert len(lines) == 5
    assert _files_under(tmp_path) == before  # no log, no suite.yaml copy, no report


def test_a_suite_elsewhere_finds_shipped_recipes_and_prefers_its_own_files(tmp_path):
    path = write_suite(tmp_path, {"gated": {"grid": "gated"}},
                       configs=["../configs/recipes/quick.yaml"])  # as ablations/quick.yaml
    assert load_suite(path).runs[0].cfg.eval.loss_recovered.contexts == 256  # the recipe's
    (tmp_path / "gated.yaml").write_text("defaults: [" + str(ROOT / "configs/base.yaml") +
                                         "]\noptim: {lr: 0.002}\n")
    assert load_suite(path).runs[0].cfg.optim.lr == 0.002  # the file beside the suite wins


@pytest.mark.slow
def test_output_dir_and_a_rerun_keeps_the_wall_time(tmp_path):
    path = write_suite(tmp_path, {"gated": {"grid": "gated"}}, grids={"gated": [0.1]})
    out = tmp_path / "moved"
    first = ablate("--suite", path, "--output-dir", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert (out / "runs/gated_l1-0.1_seed0/metrics.json").is_file()
    assert not (tmp_path / "out").exists()  # the suite file's output_dir stays unused
    seconds = json.loads((out / "wall_time.json").read_text())["seconds"]
    assert seconds > 0 and f"suite wall time {seconds:.0f} s." in (out / "report.md").read_text()
    again = ablate("--suite", path, "--output-dir", str(out), timeout=120)
    assert again.returncode == 0 and "1 already finished" in again.stdout
    assert f"suite wall time {seconds:.0f} s." in (out / "report.md").read_text()
