"""The synthsaebench source: SAELens's rules (hand-computed cases), reproducible by step, the
held-out rows' true activations, and a SAELens model directory read without sae_lens."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from gsae_pl.data import synthsaebench
from gsae_pl.data.base import train_stream
from gsae_pl.data.synthsaebench import (
    SynthSAEBenchConfig,
    SynthSAEBenchSource,
    compensated,
    hierarchy_tree,
    magnitudes,
    orthogonalize,
    zipf_probabilities,
)
from gsae_pl.errors import UserError

SMALL = {"n_features": 96, "d_in": 16, "hierarchy_roots": 4, "branching": 3, "depth": 2,
         "orthogonalize_steps": 3}


def make(**overrides) -> SynthSAEBenchSource:
    cfg = OmegaConf.merge(OmegaConf.structured(SynthSAEBenchConfig), SMALL, overrides)
    return SynthSAEBenchSource(cfg)


def dense(src, n_rows, stream="train", index=0):
    x, (rows, cols, vals) = src.sample(n_rows, src.generator(stream, index))
    c = torch.zeros(n_rows, src.n_features)
    c[rows, cols] = vals
    return x, c


def test_zipf_probabilities_by_hand():
    # r = 1, 1/2, 1/3 -> (r - 1/3) / (2/3) = 1, 1/4, 0
    p = zipf_probabilities(3, 1.0, 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.5, 0.1 + 0.4 / 4, 0.1]))
    with pytest.raises(UserError, match="p_min"):
        zipf_probabilities(3, 1.0, 0.1, 0.5)


def test_the_forest_is_numbered_breadth_first():
    roots = hierarchy_tree(20, roots=2, branching=2, depth=2, me_portion=1.0, scale=True,
                           seed=0)
    assert [r["feature_index"] for r in roots] == [0, 1]
    assert [c["feature_index"] for c in roots[0]["children"]] == [2, 3]
    assert [c["feature_index"] for c in roots[1]["children"]] == [4, 5]
    grandchildren = [g["feature_index"] for c in roots[0]["children"] + roots[1]["children"]
                     for g in c["children"]]
    assert grandchildren == list(range(6, 14))
    assert all(r["mutually_exclusive_children"] and r["scale_children_by_parent"] for r in roots)
    leaf = roots[0]["children"][0]["children"][0]
    assert not leaf["children"] and not leaf["mutually_exclusive_children"]
    half = hierarchy_tree(20, 2, 2, 2, me_portion=0.5, scale=False, seed=0)
    parents = half + [c for r in half for c in r["children"]]
    assert sum(p["mutually_exclusive_children"] for p in parents) == 3  # int(6 * 0.5)


def test_compensation_by_hand():
    # root 0 (p .5) with ME children 1 (p .1) and 2 (p .2): child 1 -> .1 / .5 * (1 + .2/.5)
    roots = [{"feature_index": 0, "mutually_exclusive_children": True,
              "scale_children_by_parent": False,
              "children": [{"feature_index": 1, "children": []},
                           {"feature_index": 2, "children": []}]}]
    p = compensated(torch.tensor([0.5, 0.1, 0.2, 0.3]), roots)
    assert torch.allclose(p, torch.tensor([0.5, 0.2 * 1.4, 0.4 * 1.2, 0.3]))


def test_magnitude_generators_as_saelens_defines_them():
    assert torch.equal(magnitudes(3, 2.0, None), torch.full((3,), 2.0))
    assert torch.allclose(magnitudes(3, {"generator_name": "linear", "start": 5.0, "end": 4.0},
                                     None), torch.tensor([5.0, 4.5, 4.0]))
    folded = magnitudes(1000, {"generator_name": "folded_normal", "mean": 0.5, "std": 0.5}, 7)
    want = (0.5 + torch.randn(1000, generator=torch.Generator().manual_seed(7)) * 0.5).abs()
    assert torch.equal(folded, want) and (folded >= 0).all()


def test_orthogonalisation_lowers_overlaps_and_keeps_unit_rows():
    W = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator()
                                                  .manual_seed(0)), dim=1)
    out = orthogonalize(W, steps=50, lr=0.01)
    off = lambda M: (M @ M.T - torch.eye(len(M))).pow(2).sum()
    assert off(out) < off(W)
    assert torch.allclose(out.norm(dim=1), torch.ones(64), atol=1e-5)


def test_the_orthogonalised_dictionary_is_made_once_and_read_back_bit_for_bit(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GSAE_PL_CACHE", str(tmp_path))
    first = make()
    files = list((tmp_path / "synthsaebench").glob("*.safetensors"))
    assert len(files) == 1
    made = synthsaebench.orthogonalize
    monkeypatch.setattr(synthsaebench, "orthogonalize", lambda *a: pytest.fail("not cached"))
    assert torch.equal(make().model.W, first.model.W)  # read back, not made again
    monkeypatch.setattr(synthsaebench, "orthogonalize", made)
    make(seed=7)  # another dictionary, another file
    assert len(list((tmp_path / "synthsaebench").glob("*.safetensors"))) == 2
    files[0].write_bytes(b"not a safetensors file")
    assert torch.equal(make().model.W, first.model.W)  # made again: the same bits
    assert "is damaged" in capsys.readouterr().err
    assert torch.equal(make().model.W, first.model.W)  # and the file replaced


def test_rows_are_their_true_activations_through_the_dictionary():
    src = make()
    x, c = dense(src, 256)
    assert torch.allclose(x, c @ src.model.W + src.model.bias, atol=1e-5)
    assert src.true_features.shape == (96, 16)
    assert torch.allclose(src.true_features.norm(dim=1), torch.ones(96), atol=1e-5)
    assert torch.isclose(src.model.bias.norm(), torch.tensor(0.5))


def test_batches_by_step_resume_and_differ():
    a = [next(train_stream(make(), 32, 0, 1, start_step=k)) for k in range(3)]
    b = list(zip(range(3), train_stream(make(), 32, 0, 1)))
    assert all(torch.equal(x, y) for x, (_, y) in zip(a, b))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], next(train_stream(make(seed=1), 32, 0, 1)))


def test_eval_rows_are_a_prefix_and_have_their_true_activations():
    src = make()
    x, truth = src.eval_rows(5000), src.eval_features(5000)
    assert torch.equal(make().eval_rows(300), x[:300])
    c = truth.to_dense()
    assert c.shape == (5000, 96) and (c >= 0).all()
    assert torch.allclose(x, c @ src.model.W + src.model.bias, atol=1e-5)
    assert torch.equal(src.eval_features(300).to_dense(), c[:300])


def test_children_need_their_parent_and_exclusive_siblings_never_co_fire():
    src = make(hierarchy_roots=8, branching=3, depth=2, correlation_rank=4)
    _, c = dense(src, 20000)
    on = c > 0
    for root in src.model.roots:
        kids = [k["feature_index"] for k in root["children"]]
        assert not (on[:, kids].any(1) & ~on[:, root["feature_index"]]).any()
        assert on[:, kids].sum(1).max() <= 1  # mutually exclusive (portion 1)
        for kid in root["children"]:
            grand = [g["feature_index"] for g in kid["children"]]
            assert not (on[:, grand].any(1) & ~on[:, kid["feature_index"]]).any()
    assert on.any(0).sum() > 60  # and the hierarchy is not all dark


def test_children_scale_by_their_parent_over_its_mean():
    # std 0: every magnitude is its mean, so a child is its mean x parent / parent's mean.
    src = make(std_magnitude_mean=0.0, std_magnitude_std=0.0, correlation_rank=0)
    _, c = dense(src, 4000)
    mean = src.model.mean
    for root in src.model.roots:
        r = root["feature_index"]
        for kid in root["children"]:
            k, fired = kid["feature_index"], c[:, kid["feature_index"]] > 0
            assert torch.allclose(c[fired, k], mean[k] * c[fired, r] / mean[r])
            for g in kid["children"]:
                on = c[:, g["feature_index"]] > 0
                assert torch.allclose(c[on, g["feature_index"]],
                                      mean[g["feature_index"]] * c[on, k] / mean[k])


@pytest.mark.parametrize("rank", [0, 6])
def test_free_features_fire_at_their_probability(rank):
    src = make(hierarchy_roots=0, correlation_rank=rank, correlation_scale=0.2)
    rows = 40000
    _, c = dense(src, rows)
    rate, p = (c > 0).float().mean(0), src.model.p
    z = (rate - p) / (p * (1 - p) / rows).sqrt()
    assert z.abs().max() < 5, z.abs().max()


def model_dir(path, n=12, d=4, seed=3):
    """A directory in SyntheticModel.save's format, written by hand."""
    W = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    config = {"num_features": n, "hidden_dim": d, "seed": seed, "dtype": "float32",
              "bias": 0.5, "mean_firing_magnitudes": {"generator_name": "linear",
                                                       "start": 5.0, "end": 4.0},
              "std_firing_magnitudes": {"generator_name": "folded_normal", "mean": 0.5,
                                        "std": 0.5, "min_value": None, "max_value": None},
              "firing_probability": {"generator_name": "zipfian", "exponent": 0.5,
                                     "max_prob": 0.4, "min_prob": 0.01}}
    tree = {"roots": [{"feature_index": 0, "mutually_exclusive_children": True,
                       "scale_children_by_parent": True, "feature_id": None,
                       "children": [{"feature_index": i, "mutually_exclusive_children": False,
                                     "scale_children_by_parent": False, "feature_id": None,
                                     "children": []} for i in (1, 2, 3)]}]}
    weights = {"feature_vectors": W, "bias": torch.full((d,), 0.25),
               "firing_probabilities": torch.linspace(0.9, 0.05, n),
               "correlation_factor": torch.randn(n, 2) * 0.1,
               "correlation_diag": torch.full((n,), 0.9)}
    path.mkdir()
    (path / "synthetic_model_config.json").write_text(json.dumps(config))
    (path / "hierarchy.json").write_text(json.dumps(tree))
    save_file(weights, str(path / "synthetic_model.safetensors"))
    return weights


def test_a_saelens_model_directory_is_sampled_from(tmp_path):
    weights = model_dir(tmp_path / "model")
    src = make(model_dir=str(tmp_path / "model"))
    assert src.n_features == 12 and src.d_in == 4
    assert torch.equal(src.model.W, weights["feature_vectors"])
    assert torch.equal(src.model.p, weights["firing_probabilities"])
    assert torch.allclose(src.model.mean, torch.linspace(5.0, 4.0, 12))
    want = (0.5 + torch.randn(12, generator=torch.Generator().manual_seed(4)) * 0.5).abs()
    assert torch.equal(src.model.std, want)  # SAELens: std magnitudes seeded seed + 1
    x, c = dense(src, 3000)
    assert torch.allclose(x, c @ weights["feature_vectors"] + 0.25, atol=1e-5)
    assert ((c[:, 1:4] > 0).sum(1) <= 1).all() and not ((c[:, 1:4] > 0).any(1)
                                                         & (c[:, 0] == 0)).any()
    assert src.describe()["model_config"]["num_features"] == 12


def test_bad_settings_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="lacks synthetic_model_config.json"):
        make(model_dir=str(tmp_path))
    with pytest.raises(UserError, match="branching"):
        make(branching=1)
    with pytest.raises(UserError, match="device"):
        make(device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            make(device="cuda")


@pytest.mark.slow
def test_the_gpu_recipe_stays_valid_on_a_cpu(tmp_path):
    """configs/recipes/synthsaebench_gpu.yaml (and the 16k preset under it) for 2 steps,
    on the CPU at a tiny size: every key it sets is still read and accepted."""
    from gsae_pl.fit import main
    from tests.tiny_run import ROOT, metrics

    assert main(["--config", str(ROOT / "configs/recipes/synthsaebench_gpu.yaml"),
                 f"output.dir={tmp_path}", "output.name=run", "data.synthsaebench.device=cpu",
                 "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=2",
                 "data.batch_size=64", "eval.rows=256", "data.normalize_rows=128",
                 "sae.d_sae=32", "data.synthsaebench.n_features=64", "data.synthsaebench.d_in=8",
                 "data.synthsaebench.hierarchy_roots=2", "optim.warmup_steps=1",
                 "trainer.enable_progress_bar=false"]) == 0
    found = metrics(tmp_path, "run")
    assert found["steps"] == 2 and "synth_mcc" in found


def test_the_gpu_drivers_lease_arithmetic():
    """benchmarks/synthsaebench_gpu.py reads a run's rate off the progress lines fit prints
    (the same formatter), and sizes the suite: 1.5x the start-and-evaluation overhead and
    15 s per milestone held back, whole multiples of 500 steps, never past the protocol."""
    import importlib.util

    from gsae_pl.run.progress import tokens
    from tests.tiny_run import ROOT

    spec = importlib.util.spec_from_file_location(
        "synthsaebench_gpu", ROOT / "benchmarks/synthsaebench_gpu.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    log = (f"step 200/300 (67%) | {tokens(9.0e5)} tok/s | ETA 0:01 | L0 40\n"
           f"eval at step 250: L0 30\nstep 300/300 (100%) | {tokens(1.53e6)} tok/s | ETA 0:00\n")
    assert driver.last_rate(log) == 1.53e6
    assert driver.last_rate("no progress lines") is None
    # 400 s - 1.5 x 60 s - 2 x 15 s = 280 s at 20,480 samples/s, batch 1024: 5600 steps, so 5500
    assert driver.steps_for(400, 20_480, 1024, 2, 60) == 5500
    assert driver.steps_for(10, 20_480, 1024, 2, 60) == 500  # at least one quantum
    assert driver.steps_for(1e9, 1e9, 1024, 2, 0) == 195_313  # the protocol's 200M samples
    assert driver.milestones(3000, 1024) == [750 * 1024, 1500 * 1024]
