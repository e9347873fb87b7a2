"""Config loading: every shipped YAML loads, deltas merge over the base, bad input is
refused with one line naming the key (and the nearest valid one for a typo)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.suite.spec import is_suite_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("configs/**/*.yaml")) + [
    p for p in sorted(ROOT.glob("ablations/*.yaml")) if not is_suite_file(p)]
REQUIRED_KEYS = ["seed", "sae.architecture", "sae.d_sae", "loss.sparsity.coefficient",
                 "data.source",
                 "data.path", "data.batch_size", "trainer.max_steps", "trainer.accelerator",
                 "trainer.devices", "trainer.strategy", "trainer.precision",
                 "checkpoint.every_n_steps", "output.dir", "output.name"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    load_config(path)


def test_required_key_names_exist():
    from omegaconf import OmegaConf
    cfg = load_config(ROOT / "configs/base.yaml")
    for key in REQUIRED_KEYS:
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert cfg.output.dir == "tensorboard_logs"


def test_base_yaml_sets_every_schema_key_that_no_plugin_declares():
    """configs/base.yaml documents every option the framework itself declares, and sets no
    key the schema lacks. A plug-in's own fields (an architecture's `sae.` fields, a loss
    term's, an evaluation's or a source's block) are declared once, in its dataclass: the
    file may document them (test_base_yaml_values_are_the_schema_defaults holds it to
    theirs), and a new plug-in needs no edit here."""
    import dataclasses

    import yaml
    from omegaconf import OmegaConf

    from gsae_pl.config import Config
    from gsae_pl.data.base import SOURCES
    from gsae_pl.eval.base import EVALUATORS
    from gsae_pl.saes.base import ARCHITECTURES, SAECommon

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    common = {f"sae.{f.name}" for f in dataclasses.fields(SAECommon)}
    owned = {f"sae.{f.name}" for _, cls in ARCHITECTURES.items()
             for f in dataclasses.fields(cls.Config)} - common
    blocks = ("loss.", *(f"eval.{name}." for name in EVALUATORS.names()),
              *(f"data.{name}." for name, build in SOURCES.items() if hasattr(build, "Settings")))
    schema = set(leaves(OmegaConf.to_container(OmegaConf.structured(Config))))
    written = set(leaves(yaml.safe_load((ROOT / "configs/base.yaml").read_text())))
    framework = {key for key in schema - owned if not key.startswith(blocks)}
    assert framework <= written, f"base.yaml lacks {sorted(framework - written)}"
    assert written <= schema, f"base.yaml sets keys the schema lacks: {sorted(written - schema)}"


def test_ablation_deltas_merge_over_base():
    cfg = load_config(ROOT / "ablations/baseline.yaml", ["sae.d_sae=77"])
    assert cfg.sae.architecture == "relu" and not cfg.loss.aux.enabled
    assert cfg.sae.d_sae == 77  # the command line wins over the file
    assert cfg.data.batch_size == 1024  # untouched keys come from the base
    assert cfg.output.name == "relu_l1-0.015_seed0"
    gated = load_config(ROOT / "ablations/gated.yaml")
    assert gated.sae.architecture == "gated" and gated.loss.aux.decoder == "frozen"


@pytest.mark.parametrize("overrides,needle", [
    (["sae.d_sea=3"], "unknown config key sae.d_sea in the command line; did you mean sae.d_sae?"),
    (["loss.aux.decoderr=x"], "did you mean loss.aux.decoder?"),
    (["trainer.max_step=5"], "did you mean trainer.max_steps?"),
    # A key written without its section: the same last part anywhere, an old name's new place.
    (["l1_coefficient=0.1"], "unknown config key l1_coefficient in the command line; did you "
     "mean loss.sparsity.coefficient (old name loss.l1_coefficient)? (valid keys: seed,"),
    (["d_sae=3"], "; did you mean sae.d_sae? (valid keys: seed,"),
    (["loss.coefficient=1"], "did you mean loss.reconstruction.coefficient or "
     "loss.sparsity.coefficient or loss.aux.coefficient or loss.orthogonality.coefficient?"),
    (["dsae=3"], "did you mean sae.d_sae?"),  # a leaf's spelling, not the section `sae`
    (["maxsteps=3"], "did you mean trainer.max_steps?"),
    (["sed=1"], "did you mean seed?"),
    (["sae.d_sae=abc"], "bad value for config key sae.d_sae"),
    (["loss.l1_coefficient=-0.1"], "loss.sparsity.coefficient=-0.1 must be >= 0"),
    (["sae.d_sae=0"], "sae.d_sae=0 must be > 0"),
    (["sae.architecture=crosscoder"], "sae.architecture=crosscoder is not one of: relu, gated"),
    (["data.source=hub"], "data.source=hub is not one of"),
    (["data.source=file"], "data.source=file needs data.path"),
    (["sae.architecture=relu"], "loss.aux needs a gate"),
    (["loss.sparsity.kind=decoder_norm_l1"], "also set sae.unit_norm_decoder=false"),
    (["no_equals_sign"], "is not key=value"),
])
def test_bad_overrides_are_refused_with_one_line(overrides, needle):
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/base.yaml", overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sae:\n  d_sae: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("sae:\n  widht: 3\n")
    with pytest.raises(UserError, match=f"unknown config key sae.widht in {unknown}"):
        load_config(unknown)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(scalar)


def test_base_yaml_values_are_the_schema_defaults():
    """base.yaml documents the defaults, so it must not drift from the schema."""
    from omegaconf import OmegaConf

    from gsae_pl.config import Config

    loaded = OmegaConf.to_container(load_config(ROOT / "configs/base.yaml"))
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    loaded["output"]["name"] = defaults["output"]["name"] = None  # derived when null
    assert loaded == defaults


# ---- issue 11: combinations that train but measure the wrong thing ----------------------
@pytest.mark.parametrize("max_steps,last", [(2000, 2000), (2100, 2000), (1199, 1000)])
def test_resample_too_near_the_end_is_refused(max_steps, last):
    """The base schedule resamples after steps 500 ... 2000 and returns the lr over 200
    steps: a resample inside the last 200 steps would leave the final metrics measuring
    half-trained, freshly re-initialised features at a dropped lr."""
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/base.yaml", [f"trainer.max_steps={max_steps}"])
    message = str(info.value)
    assert f"resample at step {last}" in message and "resample.lr_return_steps=200" in message
    assert f"resample.max_resamples={last // 500 - 1}" in message and "\n" not in message
    # What it says to set, set, loads: both ways out.
    fewer = re.search(r"set (resample\.max_resamples=\d+)", message).group(1)
    spread = re.search(r"with (resample\.every_n_steps=\d+) (resample\.window_steps=\d+)",
                       message).groups()
    for fix in ([fewer], list(spread)):
        load_config(ROOT / "configs/base.yaml", [f"trainer.max_steps={max_steps}", *fix])


def test_the_quick_run_loads_with_a_schedule_that_fits():
    """`make fit-quick` (configs/quick.yaml): 1000 steps, every resample inside the run."""
    cfg = load_config(ROOT / "configs/quick.yaml", [])
    assert cfg.trainer.max_steps == 1000 and cfg.resample.enabled
    assert cfg.resample.every_n_steps * cfg.resample.max_resamples + \
        cfg.resample.lr_return_steps <= cfg.trainer.max_steps


@pytest.mark.parametrize("overrides", [
    ["trainer.max_steps=2200"],  # the last resample (2000) has its 200 steps
    ["trainer.max_steps=1200", "resample.max_resamples=2"],  # 500, 1000
    ["trainer.max_steps=1000", "resample.enabled=false"],
    ["trainer.max_steps=300"],  # no resample falls inside the run
])
def test_resample_schedules_that_leave_room_are_accepted(overrides):
    load_config(ROOT / "configs/base.yaml", overrides)


def test_decoder_norm_l1_with_a_frozen_aux_decoder_is_refused():
    """The penalty shrinks decoder rows, and a frozen aux decoder (sg(W_dec)) does not resist:
    the rows collapse and the penalty loses its bite (review measured median row norm 0.10,
    L0 3.4x). Accepted with the aux decoder unfrozen, or without the aux term."""
    dn = ["loss.sparsity.kind=decoder_norm_l1", "sae.unit_norm_decoder=false"]
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/base.yaml", [*dn, "loss.aux.decoder=frozen"])
    message = str(info.value)
    assert "loss.sparsity.kind=decoder_norm_l1" in message and "\n" not in message
    assert "loss.aux.decoder=frozen" in message and "set loss.aux.decoder=unfrozen" in message
    load_config(ROOT / "configs/base.yaml", [*dn, "loss.aux.decoder=unfrozen"])
    load_config(ROOT / "configs/base.yaml", [*dn, "loss.aux.enabled=false"])


def test_defaults_may_name_one_file_as_a_string(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"defaults: {ROOT / 'configs/base.yaml'}\nsae:\n  d_sae: 96\n")
    cfg = load_config(child)
    assert cfg.sae.d_sae == 96 and cfg.trainer.max_steps == 4000  # the rest from base.yaml


def test_a_key_set_twice_is_refused_with_both_lines(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("sae:\n  d_sae: 64\n  architecture: gated\n  d_sae: 128\n")
    with pytest.raises(UserError, match=r"sets 'd_sae' twice in one mapping \(lines 2 and 4\)"):
        load_config(dup)
    # The same key under two different parents is not a repeat.
    load_config(ROOT / "configs/base.yaml", [])


@pytest.mark.parametrize("override,needle", [
    ("seed=-1", "seed=-1 must lie in [0, 4294967295]"),
    (f"seed={2**32}", f"seed={2**32} must lie in [0, 4294967295]"),
    ("output.name=${oc.env:GSAE_PL_SURELY_UNSET}", "GSAE_PL_SURELY_UNSET' not found"),
    ("sae.d_sae=${nope.key}", "interpolation in sae.d_sae: Interpolation key 'nope.key'"),
])
def test_unusable_seeds_and_interpolations_are_one_line(override, needle):
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/base.yaml", [override])
    assert needle in str(info.value) and "\n" not in str(info.value)
    load_config(ROOT / "configs/base.yaml", [f"seed={2**32 - 1}"])  # the top of the range


def test_an_aliased_key_means_its_new_key_everywhere_and_both_at_once_is_refused(monkeypatch,
                                                                                  tmp_path):
    from gsae_pl import config

    monkeypatch.setattr(config, "ALIASES", {"optim.old_lr": "optim.lr"})
    path = tmp_path / "old.yaml"
    path.write_text("optim: {old_lr: 0.5}\n")
    assert config.load_config(path).optim.lr == 0.5
    assert config.load_config(None, ["optim.old_lr=0.25"]).optim.lr == 0.25
    assert config.migrate({"optim": {"old_lr": 1}}) == {"optim": {"lr": 1}}
    with pytest.raises(UserError, match="sets both optim.old_lr and optim.lr"):
        config.load_config(None, ["optim.old_lr=0.25", "optim.lr=0.1"])


def test_configs_compose_in_order_and_a_shared_base_is_merged_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    data, no_aux = root / "configs/data/pythia_70m.yaml", root / "ablations/no_aux.yaml"
    both = load_config([data, no_aux])
    alone = load_config(data)
    # no_aux.yaml's own `defaults: [../configs/base.yaml]` must not reset the data preset
    assert both.data.model == alone.data.model == "EleutherAI/pythia-70m-deduped"
    assert both.sae.d_sae == alone.sae.d_sae and not both.loss.aux.enabled
    assert alone.loss.aux.enabled
    later = tmp_path / "later.yaml"
    later.write_text("sae: {d_sae: 7}\n")
    assert load_config([data, later]).sae.d_sae == 7  # the later file wins
    assert load_config([later, data]).sae.d_sae == alone.sae.d_sae


def test_fit_takes_several_config_files_and_overrides_after_them():
    from gsae_pl.run.fit_args import parse_args

    args = parse_args(["--config", "a.yaml", "b.yaml", "sae.d_sae=8", "--force", "seed=1"])
    assert args.config == ["a.yaml", "b.yaml"] and args.overrides == ["sae.d_sae=8", "seed=1"]


def test_a_partial_file_given_first_still_lands_over_the_next_files_base(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim: {lr: 0.002}\n")  # no defaults: a delta, not a whole config
    no_aux = Path(__file__).resolve().parents[1] / "ablations/no_aux.yaml"
    cfg = load_config([recipe, no_aux])
    assert cfg.optim.lr == 0.002 and not cfg.loss.aux.enabled


def test_the_readme_names_every_renamed_key_and_its_new_name():
    from gsae_pl.config import ALIASES

    readme = (ROOT / "README.md").read_text()
    for old, new in ALIASES.items():
        assert f"`{old}` is `{new}`" in readme


def test_on_off_yes_no_stay_words_for_a_name_and_switch_a_boolean(tmp_path):
    # YAML 1.1 reads `on` as true: the run `on` was trained into the folder `True`
    cli = load_config(None, ["output.name=on", "data.cache=yes", "output.variant=No"])
    assert (cli.output.name, cli.data.cache, cli.output.variant) == ("on", True, "No")
    path = tmp_path / "words.yaml"
    path.write_text("output: {name: off, variant: yes}\ndata: {cache: on}\nseed: 1\n")
    from_file = load_config(path)
    assert (from_file.output.name, from_file.output.variant, from_file.data.cache) == \
        ("off", "yes", True)
    assert load_config(None, ["data.cache=true"]).data.cache is True
