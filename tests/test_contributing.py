"""CONTRIBUTING.md's worked examples are true: every file it marks "(new file)" (an
architecture, a loss term and an evaluation, each with a YAML and a test) is dropped into a
copy of the layout, the packages find the plug-ins there as if they were their own files,
and the examples' own tests pass with no file of gsae_pl/ edited."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import sys

import pytest

from gsae_pl.eval.base import EVALUATORS
from gsae_pl.losses.base import LOSS_TERMS
from gsae_pl.saes.base import ARCHITECTURES
from tests.tiny_run import ROOT

BLOCK = re.compile(r"```(?:python|yaml)\n# (\S+) \(new file\)\n(.*?)```", re.S)
PACKAGES = {"saes": ARCHITECTURES, "losses": LOSS_TERMS, "eval": EVALUATORS}


def example_files() -> dict[str, str]:
    return dict(BLOCK.findall((ROOT / "CONTRIBUTING.md").read_text()))


def test_the_examples_are_new_files_one_plugin_yaml_and_test_each():
    files = example_files()
    plugins = [p for p in files if p.startswith("gsae_pl/")]
    assert sorted(p.split("/")[1] for p in plugins) == ["eval", "losses", "saes"]
    assert len([p for p in files if p.endswith(".yaml")]) == 3
    assert len([p for p in files if p.startswith("tests/")]) == 3
    assert not [p for p in files if (ROOT / p).exists()], "an example names a shipped file"


@pytest.fixture
def layout_copy(tmp_path, monkeypatch):
    """The examples' files in a copy of the layout; gsae_pl's packages also look there."""
    tree = tmp_path / "repo"
    tree.mkdir()
    shutil.copytree(ROOT / "configs", tree / "configs")  # a copy: examples add files to it
    for path, text in example_files().items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    for name, registry in PACKAGES.items():
        package = importlib.import_module(f"gsae_pl.{name}")
        registry.names()  # the shipped plug-ins first, as any lookup loads them
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(tree / "gsae_pl" / name)])
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_loaded", False)  # the next lookup imports the copies
    before = set(sys.modules)
    yield tree
    for module in set(sys.modules) - before:
        if module.startswith("gsae_pl."):
            del sys.modules[module]


def _run_tests(path, tmp_path) -> list[str]:
    """Every test_* function of the file at `path`, given tmp_path where it asks."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = []
    for name, fn in vars(module).items():
        if name.startswith("test_") and callable(fn):
            wanted = inspect.signature(fn).parameters
            out = tmp_path / path.stem / name
            out.mkdir(parents=True)
            fn(**({"tmp_path": out} if "tmp_path" in wanted else {}))
            ran.append(name)
    return ran


@pytest.mark.slow
def test_each_example_works_dropped_in(layout_copy, tmp_path):
    tests = sorted(layout_copy.glob("tests/*/test_*.py"))
    assert len(tests) == 3
    ran = [name for path in tests for name in _run_tests(path, tmp_path)]
    assert len(ran) == 6
    # nothing of the package was edited: the plug-ins live only in the copy
    assert not [p for p in example_files() if (ROOT / p).exists()]


@pytest.mark.slow
def test_the_whole_suite_passes_with_the_examples_added(tmp_path):
    """A plug-in with fields of its own (the tied ReLU SAE's sae.tied_scale), a loss term
    and an evaluation, added as their files alone: every other test of the repository still
    passes (the config snapshot, base.yaml, the registries' lists, the floors)."""
    import os
    import subprocess

    tree = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (ROOT / name).is_file() and not name.startswith("tensorboard_logs/"):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    for path, text in example_files().items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    # A checkout of its own, as the repository is (provenance records the code's commit).
    git = ["git", "-c", "user.name=gsae_pl", "-c", "user.email=gsae_pl@localhost"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the examples added"]):
        subprocess.run([*git, *step], cwd=tree, check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTEST_XDIST_WORKER", None)
    # The inner suite less this file (which would start it again), on both cores.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p",
         "no:cacheprovider", "-n", "2", "--dist", "loadfile",
         "--deselect", "tests/test_contributing.py"],
        cwd=tree, env=env, capture_output=True, text=True)
    tail = "\n".join(done.stdout.splitlines()[-15:])
    assert done.returncode == 0, tail
    assert " passed" in tail and "tied_relu" in "".join(
        p.name for p in (tree / "gsae_pl" / "saes").iterdir())
