"""Every file a run reads is checked against what was recorded (issue 25, docs/faults.md
section 4): cache shards against metadata.json, a resume's data against the run's
inputs.json; and the config and data messages say what is actually wrong. One line on
stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from gsae_pl.data.base import train_stream
from gsae_pl.data.cache import CachedSource, write_cache
from gsae_pl.data.file import FileSource
from gsae_pl.data.transformer_lens import build_lm_source
from gsae_pl.errors import UserError
from gsae_pl.fit import main
from gsae_pl.run.inputs import INPUTS, check_inputs, record_inputs
from tests.data.lm_fixtures import lm_cfg, write_text, write_tiny_gpt2
from tests.run.test_clean_errors import assert_one_line
from tests.tiny_run import BASE, ROOT, args, fit_process, run


def one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    return err


# ---------------------------------------------------------------- the activation cache

@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs_lm")
    return write_tiny_gpt2(root / "model"), write_text(root / "corpus")


@pytest.fixture(scope="module")
def made(lm_files, tmp_path_factory):
    """A 600-row cache in 5 shards (128 rows each, the last 88: the writer's shards made
    small)."""
    import gsae_pl.data.cache as cache

    cfg = lm_cfg(*lm_files, "data.cache_rows=600")
    lm = build_lm_source(cfg)
    directory = tmp_path_factory.mktemp("inputs_cache") / "acts"
    saved = cache._SHARD_BYTES
    cache._SHARD_BYTES = 200 * 4 * lm.d_in
    try:
        write_cache(lm, directory, cfg, progress=False)
    finally:
        cache._SHARD_BYTES = saved
    return lm, cfg, directory


@pytest.fixture
def cache(made, tmp_path):
    """A fresh copy of the cache for one test to damage."""
    lm, cfg, directory = made
    copy = tmp_path / "acts"
    shutil.copytree(directory, copy)
    return lm, cfg, copy


def _open(lm, cfg, directory) -> CachedSource:
    source = CachedSource(lm, cfg, directory)
    source.prepare(progress=False)
    return source


def _meta(directory):
    return json.loads((directory / "metadata.json").read_text())


def _cut_rows(d):
    shard = d / "shard_00001.npy"
    np.save(shard, np.load(shard)[:100])  # a valid .npy, fewer rows than recorded


def _int32(d):
    for shard in sorted(d.glob("shard_*.npy")):
        np.save(shard, np.load(shard).astype(np.int32))


def _truncated(d):
    shard = d / "shard_00002.npy"
    shard.write_bytes(shard.read_bytes()[:-1000])


def _missing(d):
    (d / "shard_00000.npy").unlink()


def _other_rows(d):
    shard = d / "shard_00001.npy"
    np.save(shard, np.load(shard)[::-1].copy())  # same shape and dtype, rows reordered


def _wider(d):
    shard = d / "shard_00000.npy"
    np.save(shard, np.zeros((128, 7), np.float32))


def _metadata(text):
    return lambda d: (d / "metadata.json").write_text(text)


DAMAGED = {
    "shard cut to fewer rows": (_cut_rows, "shard_00001.npy holds float32 [100, 128] where "
                                "metadata.json records float32 [128, 128]"),
    "int32 shards": (_int32, "shard_00000.npy holds int32"),
    "truncated shard": (_truncated, "shard_00002.npy cannot be read as .npy"),
    "missing shard": (_missing, "shard_00000.npy is missing"),
    "shard of other rows": (_other_rows, "holds other rows than the cache recorded"),
    "shard of another width": (_wider, "[128, 7]"),
    "metadata not JSON": (_metadata("{"), "metadata.json cannot be read"),
    "metadata a list": (_metadata("[]"), "metadata.json holds a list"),
    "metadata without shards": (_metadata('{"key": {}, "rows": 1, "d_in": 32, "dtype": '
                                          '"float32"}'), "lacks shards"),
    "metadata shard outside": (_metadata('{"key": {}, "rows": 1, "d_in": 32, "dtype": '
                                         '"float32", "shards": [{"file": "../x.npy", "rows": '
                                         '1}]}'), "shard list"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_cache_is_one_line_naming_the_file(cache, case):
    lm, cfg, directory = cache
    damage, needle = DAMAGED[case]
    damage(directory)
    with pytest.raises(UserError) as err:
        _open(lm, cfg, directory)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert f"delete the folder {directory}" in message, message


def test_an_intact_cache_opens_and_reads_every_row(cache):
    lm, cfg, directory = cache
    source = _open(lm, cfg, directory)
    assert source.n_rows == 600 and len(source.shards) == 5
    assert all("sample_blake2b" in s and "blake2b" in s for s in _meta(directory)["shards"])


def test_a_cache_from_before_the_digests_is_still_read(cache):
    lm, cfg, directory = cache
    meta = _meta(directory)
    meta["shards"] = [{"file": s["file"], "rows": s["rows"]} for s in meta["shards"]]
    (directory / "metadata.json").write_text(json.dumps(meta))
    assert _open(lm, cfg, directory).n_rows == 600


def _fit_on_cache(lm_files, out, cache_dir, *extra):
    model, corpus = lm_files
    return run([sys.executable, "-m", "gsae_pl.fit", *args(
        out, "run", "data.source=transformer_lens", f"data.model={model}",
        f"data.dataset={corpus}", "data.context_size=16", "eval.rows=64",
        "eval.loss_recovered.contexts=4", "data.buffer_size=256", "data.batch_size=32",
        "data.lm_batch_size=8", "data.normalize_rows=64", "data.cache=true",
        f"data.cache_dir={cache_dir}", "data.cache_rows=600", "trainer.max_steps=10",
        "eval.every_n_steps=10", *extra)])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shard cut to fewer rows", "int32 shards"])
def test_fit_refuses_a_damaged_cache_before_writing(lm_files, cache, tmp_path, case):
    """Issue 25: shards cut to 100 rows trained on 400; int32 shards under float32 metadata
    finished with FVU 1351 and exit 0."""
    _, _, directory = cache
    damage, needle = DAMAGED[case]
    damage(directory)
    proc = _fit_on_cache(lm_files, tmp_path / "out", directory)
    assert_one_line(proc, needle)
    assert not (tmp_path / "out").exists()


def test_a_resume_refuses_a_cache_rebuilt_with_other_rows(cache, tmp_path):
    """The cache a run started on, then the same key with other rows and a metadata.json
    that matches them (a rebuild): the run's record differs."""
    import gsae_pl.data.cache as cache_module

    lm, cfg, directory = cache
    run_dir = tmp_path / "run"
    record_inputs(run_dir, _open(lm, cfg, directory), resuming=False)
    meta = _meta(directory)
    shard = directory / "shard_00001.npy"
    rows = np.load(shard)[::-1].copy()
    np.save(shard, rows)
    meta["shards"][1] = {"file": shard.name, "rows": len(rows),
                         "blake2b": cache_module._digest(rows),
                         "sample_blake2b": cache_module._digest(
                             rows[cache_module._sample_index(len(rows))])}
    (directory / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="the activation cache in .* changed since the run"):
        check_inputs(run_dir, _open(lm, cfg, directory))


# ---------------------------------------------------------------- a data file on resume

def _file_run(tmp_path, data, *extra):
    return fit_process(tmp_path / "out", "run", "data.source=file", f"data.path={data}",
                       "eval.rows=256", "data.normalize_rows=256", "trainer.max_steps=20",
                       *extra)


@pytest.mark.slow
def test_resume_refuses_a_data_file_whose_rows_changed(tmp_path):
    """Issue 25: the same shape, other contents, and the resume kept the old normalisation
    without a word. Now: refused, one line; the original back, it resumes; --force trains
    afresh on the new data."""
    rng = np.random.default_rng(0)
    data = tmp_path / "acts.npy"
    original = np.abs(rng.standard_normal((2048, 8))).astype(np.float32)
    np.save(data, original)
    first = _file_run(tmp_path, data)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "out" / "run"
    recorded = json.loads((run_dir / INPUTS).read_text())["data"]
    assert recorded["rows"] == 2048 and len(recorded["blake2b"]) == 32
    (run_dir / "metrics.json").unlink()  # as if killed after its last checkpoint
    np.save(data, original * 3)  # same shape and dtype, other rows
    config_before = (run_dir / "config.yaml").read_bytes()
    proc = _file_run(tmp_path, data)
    assert_one_line(proc, f"data file {data} changed since the run")
    assert "--force" in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "config.yaml").read_bytes() == config_before
    np.save(data, original)  # put back: the run resumes
    again = _file_run(tmp_path, data)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    np.save(data, original * 3)
    forced = _file_run(tmp_path, data, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((run_dir / INPUTS).read_text())["data"] != recorded


def test_a_run_folder_from_before_the_record_resumes_and_records(tmp_path):
    rows = np.ones((64, 4), np.float32)
    np.save(tmp_path / "a.npy", rows)
    source = FileSource(tmp_path / "a.npy", seed=0, holdout_rows=8, min_train_rows=8)
    check_inputs(tmp_path / "run", source)  # no record: nothing to compare
    record_inputs(tmp_path / "run", source, resuming=True)
    assert json.loads((tmp_path / "run" / INPUTS).read_text())["data"]["rows"] == 64
    (tmp_path / "run" / INPUTS).write_text("{")
    with pytest.raises(UserError, match="cannot read .*inputs.json"):
        check_inputs(tmp_path / "run", source)


# ---------------------------------------------------------------- data files load exactly

@pytest.mark.parametrize("layout", ["float16", "fortran", "big-endian", "big-endian-f64"])
def test_npy_layouts_load_exactly_and_digest_by_value(tmp_path, layout):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((96, 5)).astype(np.float32)
    stored = {"float16": values.astype(np.float16), "fortran": np.asfortranarray(values),
              "big-endian": values.astype(">f4"), "big-endian-f64": values.astype(">f8")}[layout]
    np.save(tmp_path / "a.npy", stored)
    np.save(tmp_path / "plain.npy", np.ascontiguousarray(stored, stored.dtype.newbyteorder("<")))
    source = FileSource(tmp_path / "a.npy", seed=0, holdout_rows=16, min_train_rows=16)
    expected = torch.from_numpy(stored.astype(np.float32))
    assert torch.equal(source.eval_rows(16), expected[80:])
    batches = list(zip(range(5), train_stream(source, 16, 0, 1)))
    seen = torch.cat([b for _, b in batches])
    assert torch.equal(seen.sort(0).values, expected[:80].sort(0).values)  # every row, exact
    plain = FileSource(tmp_path / "plain.npy", seed=0, holdout_rows=16, min_train_rows=16)
    assert source.blake2b == plain.blake2b  # the digest is of the values, not the layout


# ---------------------------------------------------------------- data messages

def _fit_file(tmp_path, array, capsys, needle):
    np.save(tmp_path / "a.npy", array)
    out = tmp_path / "out"
    assert main(args(out, "run", "data.source=file", f"data.path={tmp_path / 'a.npy'}",
                     "eval.rows=256")) == 2
    err = one_line(capsys, needle)
    assert not out.exists()
    return err


def test_width_zero_is_named_not_all_zero(tmp_path, capsys):
    err = _fit_file(tmp_path, np.zeros((1024, 0), np.float32), capsys, "of width 0")
    assert "all zero" not in err


def test_subnormal_data_is_too_small_not_all_zero(tmp_path, capsys):
    err = _fit_file(tmp_path, np.full((1024, 8), 1e-40, np.float32), capsys, "too small")
    assert "all zero" not in err


def test_float64_beyond_float32_is_named_not_nan(tmp_path, capsys):
    array = np.ones((1024, 8))
    array[300, 2] = 1e39
    err = _fit_file(tmp_path, array, capsys, "value of 1e+39 in row 300, beyond float32")
    assert "NaN" not in err


def test_all_zero_is_still_all_zero(tmp_path, capsys):
    _fit_file(tmp_path, np.zeros((1024, 8), np.float32), capsys, "are all zero")


# ---------------------------------------------------------------- config

@pytest.mark.slow
def test_a_second_config_adds_files_and_keeps_the_overrides_between(tmp_path):
    """Issue 25: `--config gated.yaml sae.d_sae=64 --config baseline.yaml` trained d_sae
    768, the first list and the key=value between dropped."""
    (tmp_path / "a.yaml").write_text(f"defaults: [{BASE}]\nsae:\n  d_sae: 96\nseed: 5\n")
    (tmp_path / "b.yaml").write_text("optim:\n  lr: 0.001\n")
    proc = run([sys.executable, "-m", "gsae_pl.fit", "--config", str(tmp_path / "a.yaml"),
                "sae.d_sae=64", "--config", str(tmp_path / "b.yaml"), "--print-config"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout
    assert "d_sae: 64" in printed and "seed: 5" in printed and "lr: 0.001" in printed


@pytest.mark.slow
def test_beta2_of_one_is_refused_before_the_run_dir(tmp_path):
    proc = fit_process(tmp_path / "out", "run", "optim.beta2=1.0")
    assert_one_line(proc, "optim.beta2=1.0 must lie in [0, 1)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,needle", [
    ("optim.beta1=1", "optim.beta1=1.0 must lie in [0, 1)"),
    ("optim.beta2=1.5", "optim.beta2=1.5 must lie in [0, 1]"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0 must be a finite number"),
    ("trainer.gradient_clip_val=0", "or null for none"),
    ("trainer.gradient_clip_val=nan", "gradient_clip_val=nan"),
])
def test_optimiser_and_clipping_ranges(tmp_path, capsys, extra, needle):
    assert main(args(tmp_path / "out", "run", extra)) == 2
    one_line(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_a_python_yaml_tag_is_named_as_such(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["--config", BASE, str(config), f"output.dir={tmp_path / 'out'}"]) == 2
    err = one_line(capsys, "uses the YAML tag !!python/object/apply:os.system at line 1")
    assert "refused for safety" in err and "not valid YAML" not in err
    assert not (ROOT / "pwned").exists() and not (tmp_path / "out").exists()


def test_a_directory_given_to_config_is_named_as_such(tmp_path, capsys):
    assert main(["--config", str(tmp_path), f"output.dir={tmp_path / 'out'}"]) == 2
    err = one_line(capsys, f"config file {tmp_path} is a directory")
    assert "not found" not in err
