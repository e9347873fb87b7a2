"""The suite report: results.csv rows and order, plots, report.md, the Pareto interpolation
(hand-computed), a synthetic (LM-less) suite, and the command line's exit codes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from gsae_pl.errors import UserError
from gsae_pl.suite.report import (
    HEAD,
    columns,
    common_l0s,
    interpolate_at_l0,
    l0_needed,
    load_rows,
    main,
    variant_curve,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COEFFICIENTS = (0.01, 0.03, 0.1)
# (variant, l1) -> (l0, loss_recovered); gated sits above baseline at every L0.
LM_POINTS = {
    ("baseline", 0.01): (80.0, 0.95), ("baseline", 0.03): (20.0, 0.85),
    ("baseline", 0.1): (5.0, 0.60),
    ("gated", 0.01): (40.0, 0.97), ("gated", 0.03): (10.0, 0.92), ("gated", 0.1): (0.0, 0.0),
}


def mark_suite(suite: Path) -> None:
    """The suite.yaml ablate writes: what makes a folder a suite the report may write in."""
    if not (suite / "suite.yaml").exists():
        (suite / "suite.yaml").write_text("variants: {gated: {}}\n")


def _run(suite: Path, variant: str, l1: float, seed: int, metrics: dict | None) -> str:
    name = f"{variant}_l1-{l1}_seed{seed}"
    run = suite / "runs" / name
    run.mkdir(parents=True)
    mark_suite(suite)
    cfg = {"output": {"variant": variant, "name": name}, "loss": {"l1_coefficient": l1},
           "seed": seed, "data": {"source": "tiny_lm", "batch_size": 256},
           "sae": {"architecture": "gated", "d_sae": 512}, "trainer": {"max_steps": 100}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return name


def _lm_metrics(l0: float, lr: float) -> dict:
    return {"l0": l0, "fvu": 0.5 - lr / 4, "mse": 0.1,
            "relative_reconstruction_bias": 0.9 + lr / 10,
            "dead_fraction": 0.0, "dense_fraction": 0.0, "steps": 100, "seconds": 1.5,
            "tokens": 25600, "norm_scale": 1.0, "loss_recovered": lr, "delta_lm_loss": 1 - lr,
            "ce_clean": 3.0, "ce_spliced": 4.0 - lr, "ce_zero": 4.0,
            "loss_recovered_se": 0.004, "delta_lm_loss_se": 0.01}


@pytest.fixture
def lm_suite(tmp_path) -> Path:
    suite = tmp_path / "suite_lm"
    # written in reverse so the report's sort, not the file system's order, sets the rows
    for (variant, l1), (l0, lr) in reversed(list(LM_POINTS.items())):
        _run(suite, variant, l1, 0, _lm_metrics(l0, lr))
    _run(suite, "gated", 0.3, 0, None)
    (suite / "failed").mkdir()
    (suite / "failed" / "gated_l1-0.3_seed0.json").write_text(json.dumps({
        "run": "gated_l1-0.3_seed0", "variant": "gated", "l1_coefficient": 0.3, "seed": 0,
        "returncode": 3, "log": str(suite / "logs" / "gated_l1-0.3_seed0.log"),
        "error": "error: loss became NaN at step 40"}))
    return suite


def _csv(suite: Path) -> list[dict]:
    with open(suite / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_results_csv_header_rows_and_order(lm_suite):
    write_report(lm_suite)
    header = (lm_suite / "results.csv").read_text().splitlines()[0]
    assert header == ("variant,swept,value,seed,d_sae,l0,fvu,loss_recovered,loss_recovered_se,"
                      "delta_lm_loss,delta_lm_loss_se,"
                      "relative_reconstruction_bias,dead_fraction,steps,seconds,"
                      "mmcs,fraction_recovered,tokens,"
                      # every other metric the runs wrote, by name, then the run
                      "ce_clean,ce_spliced,ce_zero,dense_fraction,mse,norm_scale,run")
    rows = _csv(lm_suite)
    assert [(r["variant"], float(r["value"])) for r in rows] == sorted(LM_POINTS)
    assert {r["swept"] for r in rows} == {"l1"}  # the sparsity coefficient: no output.sweep
    first = rows[0]  # baseline, 0.01
    assert float(first["l0"]) == 80.0 and float(first["loss_recovered"]) == 0.95
    assert float(first["delta_lm_loss"]) == pytest.approx(0.05)
    assert float(first["loss_recovered_se"]) == 0.004 and float(first["delta_lm_loss_se"]) == 0.01
    assert first["seed"] == "0" and first["steps"] == "100" and first["tokens"] == "25600"
    assert first["d_sae"] == "512"  # from config.yaml: widths differ between variants
    assert first["mmcs"] == "" and first["fraction_recovered"] == ""
    assert first["run"] == "baseline_l1-0.01_seed0"
    assert "gated_l1-0.3_seed0" not in {r["run"] for r in rows}  # failed: no metrics.json


def test_plots_are_valid_pngs_and_mmcs_plot_skipped_without_mmcs(lm_suite):
    write_report(lm_suite)
    plots = lm_suite / "plots"
    for stem in ("l0_vs_loss_recovered", "l0_vs_fvu", "gamma_vs_l0"):
        data = (plots / f"{stem}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not (plots / "l0_vs_mmcs.png").exists()
    assert not list(lm_suite.rglob(".*.tmp*"))  # every write went through a temporary


def test_plots_go_to_tensorboard_as_images_one_event_file(lm_suite):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_report(lm_suite)
    write_report(lm_suite)  # a rewrite replaces the event file: no stale copies of the plots
    [events] = (lm_suite / "report").glob("events.out.tfevents.*")
    assert [p.name for p in (lm_suite / "report").iterdir()] == [events.name]
    accumulator = EventAccumulator(str(lm_suite / "report"), size_guidance={"images": 0})
    accumulator.Reload()
    tags = {"pareto/l0_vs_loss_recovered", "pareto/l0_vs_fvu", "pareto/gamma_vs_l0"}
    assert set(accumulator.Tags()["images"]) == tags
    for tag in tags:
        [image] = accumulator.Images(tag)
        png = (lm_suite / "plots" / f"{tag.removeprefix('pareto/')}.png").read_bytes()
        assert image.encoded_image_string == png and image.step == 0
        assert image.width > 100 and image.height > 100


def test_report_md_has_table_plots_pareto_and_failure(lm_suite):
    text = write_report(lm_suite, wall_seconds=123.4).read_text()
    assert text.startswith("# Ablation suite `suite_lm`")
    assert "6 finished, 1 failed" in text and "25,600 tokens per run" in text
    assert "wall time 123 s" in text and "unfinished" not in text
    # The table leaves out the columns no run has (mmcs, fraction_recovered: synthetic only).
    lm_head = [c for c in HEAD if c not in ("mmcs", "fraction_recovered")]
    assert "| " + " | ".join(lm_head) + " | ce_clean | ce_spliced | ce_zero | dense_fraction | " \
        "mse | norm_scale | run |" in text
    assert "| baseline | l1 | 0.01 | 0 | 512 | 80 | 0.2625 | 0.95 | 0.004 | 0.05 | 0.01 | 0.995 " \
        "| 0 | 100 | 1.5 | 25600 | 3 | 3.05 | 4 | 0 | 0.1 | 1 | baseline_l1-0.01_seed0 |" in text
    assert "mmcs" in (lm_suite / "results.csv").read_text().splitlines()[0]  # the CSV keeps it
    assert "(1 run(s) affected)" in text  # gated at 0.1 has L0 = 0
    for stem in ("l0_vs_loss_recovered", "l0_vs_fvu", "gamma_vs_l0"):
        assert f"(plots/{stem}.png)" in text
    assert "l0_vs_mmcs" not in text
    failed = text.split("## Failed runs")[1]
    assert "| gated_l1-0.3_seed0 | 3 | error: loss became NaN at step 40 |" \
        " [logs/gated_l1-0.3_seed0.log](logs/gated_l1-0.3_seed0.log) |" in failed
    # Pareto summary: baseline's 20 -> 0.85 is a point; gated at L0=20 interpolates between
    # (10, 0.92) and (40, 0.97): t = log 2 / log 4 = 0.5 -> 0.945.
    pareto = text.split("## Pareto summary")[1].split("## Plots")[0]
    assert "| baseline | 3 | 5 - 80 |" in pareto and "| gated | 3 | 0.01 - 40 |" in pareto
    assert "loss_recovered @ L0=20" in pareto and "0.945" in pareto


def test_stale_failure_record_is_dropped_and_running_runs_are_unfinished(lm_suite):
    run = lm_suite / "runs" / "gated_l1-0.3_seed0"
    (run / "metrics.json").write_text(json.dumps(_lm_metrics(3.0, 0.5)))  # rerun finished
    _run(lm_suite, "baseline", 0.3, 0, None)  # started, neither finished nor failed
    text = write_report(lm_suite).read_text()
    assert text.split("## Failed runs")[1].strip() == "none"
    assert "7 finished, 0 failed, 1 unfinished (baseline_l1-0.3_seed0)" in text


def test_interpolation_matches_hand_computed_values():
    points = [(10.0, 0.8), (40.0, 0.9), (1.0, 0.5)]  # unsorted on purpose
    assert interpolate_at_l0(points, 20.0) == pytest.approx(0.85)  # log2/log4 = 1/2 of the way
    assert interpolate_at_l0(points, 10.0) == pytest.approx(0.8)  # exactly on a point
    # between 1 and 10: t = log(5)/log(10) = 0.69897 -> 0.5 + 0.3 * 0.69897
    assert interpolate_at_l0(points, 5.0) == pytest.approx(0.5 + 0.3 * math.log10(5))
    assert interpolate_at_l0(points, 80.0) is None and interpolate_at_l0(points, 0.5) is None
    assert interpolate_at_l0([(10.0, 0.3)], 10.0) == 0.3
    assert interpolate_at_l0([], 10.0) is None


def test_l0_needed_inverts_the_curve_in_log_l0():
    points = [(40.0, 0.9), (10.0, 0.8), (1.0, 0.5)]
    assert l0_needed(points, 0.85) == pytest.approx(20.0)  # half way from 10 to 40 in log L0
    assert l0_needed(points, 0.8) == pytest.approx(10.0)
    assert l0_needed(points, 0.95) is None  # no run reaches it
    assert l0_needed(points, 0.4) is None  # the sparsest run already exceeds it


def test_common_l0s_ignore_a_lone_outlier_curve():
    wide = [(3.0, 0.8), (50.0, 0.98)]
    curves = {"a": wide, "b": wide, "collapsed": [(0.5, 0.3), (2.5, 0.9)]}
    assert common_l0s(curves) == [5, 10, 20, 40]  # the 4 values both wide curves bracket
    assert common_l0s({"a": [(1.5, 0.5), (2.5, 0.6)]}) == [2]
    assert common_l0s({}) == []


def test_variant_curve_means_over_seeds_and_clips_l0():
    rows = [{"value": 0.1, "l0": 10.0, "fvu": 0.2}, {"value": 0.1, "l0": 30.0,
            "fvu": 0.4}, {"value": 0.3, "l0": 0.0, "fvu": 0.9},
            {"value": 0.3, "l0": 0.0, "fvu": None}]
    assert variant_curve(rows, "fvu") == [(0.01, 0.9), (20.0, pytest.approx(0.3))]


def test_synthetic_suite_has_empty_lm_cells_and_an_mmcs_plot(tmp_path):
    suite = tmp_path / "suite_syn"
    for variant, shift in (("baseline", 0.0), ("gated", 0.05)):
        for l1, l0 in zip(COEFFICIENTS, (12.0, 6.0, 2.0)):
            _run(suite, variant, l1, 1, {
                "l0": l0, "fvu": 0.1 + 0.01 / l0, "mse": 0.01, "relative_reconstruction_bias": 0.95,
                "dead_fraction": 0.1, "dense_fraction": 0.0, "steps": 50, "seconds": 0.5,
                "tokens": 6400, "norm_scale": 1.0, "mmcs": 0.8 + shift, "fraction_recovered": 0.5})
    text = write_report(suite).read_text()
    rows = _csv(suite)
    assert len(rows) == 6 and all(r["loss_recovered"] == "" and r["delta_lm_loss"] == ""
                                  for r in rows)
    assert float(rows[0]["mmcs"]) == 0.8 and rows[0]["fraction_recovered"] == "0.5"
    assert (suite / "plots" / "l0_vs_mmcs.png").read_bytes().startswith(PNG_MAGIC)
    assert not (suite / "plots" / "l0_vs_loss_recovered.png").exists()
    assert "(plots/l0_vs_mmcs.png)" in text and "l0_vs_loss_recovered" not in text
    assert "fvu @ L0=" in text and "loss_recovered @" not in text
    assert "0 failed" in text and text.split("## Failed runs")[1].strip() == "none"


def test_cli_regenerates_and_refuses_missing_or_empty_dirs(lm_suite, tmp_path, capsys):
    assert main([str(lm_suite)]) == 0
    assert (lm_suite / "report.md").exists()
    capsys.readouterr()
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a directory" in err and err.count("\n") == 1
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    mark_suite(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert "holds no runs" in capsys.readouterr().err
    assert main([]) == 2  # usage error: one line, exit 2 like any bad input


# ---------------------------------------------------------------- seeds, noise, provenance

def _seeded_metrics(l0: float, lr: float, seed: int) -> dict:
    """Loss recovered moves by 0.01 per seed (SD 0.01 over seeds 0-2); gamma by 0.1, the same
    for both variants, so gamma differences are pure seed noise."""
    metrics = _lm_metrics(l0, lr + 0.01 * (seed - 1))
    metrics["relative_reconstruction_bias"] = 0.9 + 0.1 * (seed - 1)
    return metrics


@pytest.fixture
def seeded_suite(tmp_path) -> Path:
    suite = tmp_path / "suite_seeds"
    points = {("baseline", 0.01): (80.0, 0.95), ("baseline", 0.03): (20.0, 0.85),
              ("baseline", 0.1): (5.0, 0.60), ("gated", 0.01): (40.0, 0.97),
              ("gated", 0.03): (10.0, 0.92), ("gated", 0.1): (2.0, 0.70)}
    for (variant, l1), (l0, lr) in points.items():
        for seed in (0, 1, 2):
            _run(suite, variant, l1, seed, _seeded_metrics(l0, lr, seed))
    return suite


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_seed_spread_table_shows_mean_and_sd(seeded_suite):
    spread = _section(write_report(seeded_suite).read_text(), "Seed spread")
    assert "sample standard deviation over seeds" in spread
    # baseline 0.01: loss recovered 0.94, 0.95, 0.96 -> 0.95 ± 0.01; gamma 0.8, 0.9, 1.0
    assert "| baseline | l1 | 0.01 | 3 | 80 ± 0 | 0.2625 ± 0.0025 | 0.95 ± 0.01 | 0.9 ± 0.1 |" \
        in spread


def test_pareto_cells_carry_the_per_seed_band(seeded_suite):
    pareto = _section(write_report(seeded_suite).read_text(), "Pareto summary")
    # gated at L0=20: half way (in log L0) from (10, 0.92 + d) to (40, 0.97 + d), d = ±0.01
    assert "0.945 [0.935 – 0.955]" in pareto
    # L0 needed for 0.9 on baseline, per seed: the curve (20, 0.85 + d) - (80, 0.95 + d)
    per_seed = [l0_needed([(20.0, 0.85 + d), (80.0, 0.95 + d)], 0.9) for d in (-0.01, 0.01)]
    assert f"40 [{min(per_seed):.4g} – {max(per_seed):.4g}]" in pareto


def _comparison_lines(text: str) -> dict[str, str]:
    section = _section(text, "Gated vs baseline")
    return {line.split(" | ")[0].strip("| "): line for line in section.splitlines()
            if line.startswith("| ")}


def test_gated_vs_baseline_verdicts_follow_the_paired_interval(seeded_suite, lm_suite):
    text = write_report(seeded_suite).read_text()
    lines = _comparison_lines(text)
    # loss recovered @ 20: 0.945 - 0.85 = 0.095; the seeds move each curve by -0.01, 0, +0.01:
    # resampled, each arm's mean lies within ±0.01 of its own, a shift stretched by the
    # few-seeds scale sqrt(3/2) * 2.776 / 1.96 = 1.73: the difference within 0.095 ± 0.035.
    cells = lines["loss_recovered @ L0=20"].split(" | ")
    assert cells[1:4] == ["0.945", "0.85", cells[3]] and cells[3].startswith("0.095 [")
    low, high = (float(v) for v in cells[3].split("[")[1].rstrip("]").split(", "))
    assert 0.06 <= low < 0.095 < high <= 0.13
    assert cells[5].startswith("gated better; documents not resampled: no per-document "
                               "statistics; sparse grid (bracketing L0s 4x apart)")
    # gamma: the same seed noise in both, difference 0 -> neither higher nor level
    assert "| unresolved;" in lines["relative_reconstruction_bias @ L0=20"]
    assert "| gated better;" in lines["L0 needed @ loss_recovered=0.9"]  # lower L0 needed
    assert "seeds within each variant only: the documents are not resampled" in text
    # a one-seed comparison is never better or worse, whatever the difference
    one_seed = _comparison_lines(write_report(lm_suite).read_text())
    assert all("| unresolved (one seed of gated and baseline: its seed noise is unmeasured)"
               in line for key, line in one_seed.items() if key != "value")
    assert " better" not in _section(write_report(lm_suite).read_text(), "Gated vs baseline")


def test_the_comparison_resamples_documents_given_per_document_statistics(seeded_suite):
    """With a reader giving each run per-document sums that reproduce its metrics.json values
    (so the point estimates stay), the interval takes in the held-out documents too."""
    def reader(run_dir: Path) -> dict:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows = np.array([300.0, 100.0])  # two documents, FVU the run's own over both
        # a document effect of opposite sign in the two variants: resampled, it moves the
        # difference by -0.1 (document 0 twice), 0 or +0.3 (document 1 twice)
        effect = np.array([-15.0, 15.0]) * (1 if run_dir.name.startswith("gated") else -1)
        return {"rows": rows, "active": metrics["l0"] * rows, "centred_sq_norm": rows,
                "sq_err": metrics["fvu"] * rows + effect}

    def width(line: str) -> float:
        low, high = line.split(" | ")[3].split("[")[1].rstrip("]").split(", ")
        return float(high) - float(low)

    text = write_report(seeded_suite, document_reader=reader).read_text()
    assert "and the held-out documents, one draw shared by both variants" in text
    lines = _comparison_lines(text)
    fvu = lines["fvu @ L0=20"]
    assert "documents not resampled" not in fvu and "| unresolved;" in fvu
    assert width(fvu) > 0.35  # from about -0.1 to +0.3, the seeds' ±0.005 aside
    # loss recovered: no per-document CE sums in this reader -> seeds only, and it says so
    assert "documents not resampled: no per-document loss_recovered sums" in \
        lines["loss_recovered @ L0=20"]
    # the point estimate is the same as without the documents
    plain = _comparison_lines(write_report(seeded_suite).read_text())["fvu @ L0=20"]
    assert width(plain) < 0.02 and "| gated better;" in plain
    assert fvu.split(" | ")[3].split(" [")[0] == plain.split(" | ")[3].split(" [")[0]


def test_provenance_header_flags_mixed_commits(seeded_suite):
    runs = sorted((seeded_suite / "runs").iterdir())
    record = {"commit": "a" * 40, "dirty": False, "versions": {"torch": "2.0"},
              "data": {"source": "tiny_lm", "weights_blake2b": "ff"}, "device": "cpu",
              "threads": 1}
    for run in runs[:-1]:
        (run / "provenance.json").write_text(json.dumps(record))
    text = write_report(seeded_suite).read_text()
    header = _section(text, "Provenance")
    assert f"- commit: `{'a' * 40}`" in header and "Warning" not in header
    assert "- device: `cpu`" in header and "weights_blake2b" in header
    assert "1 run(s) have no provenance.json" in header
    (runs[-1] / "provenance.json").write_text(json.dumps({**record, "commit": "b" * 40}))
    header = _section(write_report(seeded_suite).read_text(), "Provenance")
    assert "**Warning: the runs come from 2 different commits**" in header
    assert f"`{'b' * 40}` (1 runs)" in header


def test_plots_with_seed_and_se_error_bars(seeded_suite):
    write_report(seeded_suite)
    for stem in ("l0_vs_loss_recovered", "gamma_vs_l0"):
        assert (seeded_suite / "plots" / f"{stem}.png").read_bytes().startswith(PNG_MAGIC)


def test_a_metric_some_runs_wrote_gets_a_column_after_the_head(lm_suite):
    """Any numeric metric a run wrote is shown (by name, after the fixed head); blank for
    the runs without it; non-numbers are left out, not fatal."""
    run = lm_suite / "runs" / "gated_l1-0.01_seed0"
    metrics = {**json.loads((run / "metrics.json").read_text()), "aardvark": 0.25,
               "note": "a string"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(lm_suite).read_text()
    rows = _csv(lm_suite)
    shown = list(rows[0])
    assert shown[:len(HEAD)] == list(HEAD) and shown[len(HEAD)] == "aardvark"
    assert shown[-1] == "run" and "note" not in shown
    assert {r["run"]: r["aardvark"] for r in rows}["gated_l1-0.01_seed0"] == "0.25"
    assert sum(r["aardvark"] == "" for r in rows) == 5
    assert "| aardvark |" in text
    assert columns([{"zz": 1.0}, {"aa": 2.0}]) == [*HEAD, "aa", "zz", "run"]


def test_suite_metrics_choose_the_plots(lm_suite):
    (lm_suite / "suite.yaml").write_text(yaml.safe_dump({"variants": {"gated": {}},
                                                         "metrics": ["mse", "fvu"]}))
    text = write_report(lm_suite).read_text()
    plots = sorted(p.name for p in (lm_suite / "plots").glob("*.png"))
    assert plots == ["l0_vs_fvu.png", "l0_vs_mse.png"]  # the default ones removed
    assert "(plots/l0_vs_mse.png)" in text and "l0_vs_loss_recovered" not in text


@pytest.mark.parametrize("metrics", [[], "fvu", ["fvu", "fvu"], ["val/fvu"], [3]])
def test_bad_suite_metrics_are_refused(lm_suite, metrics):
    (lm_suite / "suite.yaml").write_text(yaml.safe_dump({"variants": {"gated": {}},
                                                         "metrics": metrics}))
    with pytest.raises(UserError, match="metric"):
        write_report(lm_suite)
    assert not (lm_suite / "results.csv").exists()  # refused before anything is written


def test_rows_and_curves_follow_the_key_the_suite_swept(tmp_path):
    suite = tmp_path / "swept"
    for k, l0 in ((64, 60.0), (16, 14.0), (32, 30.0)):
        name = f"topk_d_sae-{k}_seed0"
        run = suite / "runs" / name
        run.mkdir(parents=True)
        mark_suite(suite)
        cfg = {"output": {"variant": "wide", "name": name, "sweep": "sae.d_sae"},
               "loss": {"sparsity": {"coefficient": 0.1}}, "seed": 0, "sae": {"d_sae": k}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "metrics.json").write_text(json.dumps(_lm_metrics(l0, 0.9)))
    rows, _ = load_rows(suite)
    assert [(r["swept"], r["value"], r["l0"]) for r in rows] == [
        ("d_sae", 16, 14.0), ("d_sae", 32, 30.0), ("d_sae", 64, 60.0)]


def test_the_wall_time_is_summed_over_invocations_and_kept_on_a_rerun(lm_suite):
    from gsae_pl.suite.report import add_wall_time

    assert "wall time" not in write_report(lm_suite).read_text()  # no record: not shown
    add_wall_time(lm_suite, 100.4)
    assert "; suite wall time 100 s." in write_report(lm_suite).read_text()
    assert "; suite wall time 100 s." in write_report(lm_suite).read_text()  # a rerun keeps it
    add_wall_time(lm_suite, 20.2)
    text = write_report(lm_suite).read_text()
    assert "; suite wall time 121 s over 2 invocations of ablate." in text
    assert json.loads((lm_suite / "wall_time.json").read_text()) == {"seconds": 120.6,
                                                                      "invocations": 2}
    (lm_suite / "wall_time.json").write_text("{broken")  # unreadable: left out, not fatal
    assert "wall time" not in write_report(lm_suite).read_text()


def test_the_table_drops_only_columns_empty_in_every_row():
    from gsae_pl.suite.report import table_columns

    rows = [{**dict.fromkeys(HEAD), "variant": "g", "l0": 1.0, "run": "a", "extra": None},
            {**dict.fromkeys(HEAD), "variant": "g", "mmcs": 0.5, "run": "b", "extra": None}]
    assert table_columns(rows) == ["variant", "l0", "mmcs", "run"]
    assert table_columns([]) == [*HEAD, "run"]  # no rows: the header as results.csv's


def test_the_report_is_titled_by_the_suites_name(lm_suite):
    """suite.yaml's name (what ablate printed), not the output folder; the folder without one."""
    assert write_report(lm_suite).read_text().startswith("# Ablation suite `suite_lm`")
    (lm_suite / "suite.yaml").write_text("name: gated_vs_baseline\nvariants: {}\n")
    text = write_report(lm_suite).read_text()
    assert text.startswith("# Ablation suite `gated_vs_baseline`")
    assert "| variant | swept | value | seed | d_sae | l0 |" in text
