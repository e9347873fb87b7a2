"""What the repository cites exists: the method document is docs/method.md (no private
notes file), and every `docs/method.md sec. N` names one of its numbered sections.
Committed reports under tensorboard_logs/ name the commit that made them and are left as
written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTES = "PAPER" + ".md"  # spelled apart, so this file does not mention it itself


def _tracked() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.split("\0")
            if name and not name.startswith("tensorboard_logs/")]


def _texts():
    for path in _tracked():
        try:
            yield path, path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # a binary file (a plot), or one deleted in the working tree


def test_no_tracked_file_cites_the_private_notes():
    texts = dict(_texts())
    # the scan reads the repository itself, not an empty list
    assert {ROOT / "README.md", ROOT / "docs/method.md",
            ROOT / "gsae_pl/saes/base.py"} <= set(texts)
    citing = [str(path.relative_to(ROOT)) for path, text in texts.items() if NOTES in text]
    assert not citing, f"cite docs/method.md instead of {NOTES} in: {citing}"


def test_every_method_section_cited_exists():
    method = (ROOT / "docs/method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, re.M)}
    assert sections == {1, 2, 3, 4, 5, 6}
    found = [(str(path.relative_to(ROOT)), m) for path, text in _texts()
             for m in re.finditer(r"method\.md,? secs?\. ?(\d+)(\.\d+)?", text)]
    assert len(found) > 100  # the code cites the method document throughout
    cited = {(where, m.group(0)) for where, m in found
             if int(m.group(1)) not in sections or m.group(2)}
    assert not cited, f"no such section (method.md numbers 1-6, no subsections): {cited}"


def test_every_committed_report_names_the_commits_that_made_it():
    """The docstring's promise: each suite report under tensorboard_logs/ names, in its
    provenance, the commit (or commits) of its runs, and each is in this repository's
    history (a shallow clone can only check the form)."""
    listed = subprocess.run(["git", "ls-files", "-z", "tensorboard_logs"], cwd=ROOT,
                            capture_output=True).stdout.decode().split("\0")
    reports = [ROOT / name for name in listed if name.endswith("/report.md")]
    if not reports:
        pytest.skip("not a git checkout")
    assert len(reports) >= 9  # every committed suite: quick, frontier, real, ...
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip() == "true"
    for report in reports:
        line = next((ln for ln in report.read_text().splitlines()
                     if ln.startswith("- commit: ")), "")
        shas = re.findall(r"`([0-9a-f]{40})`", line)
        assert shas, f"{report.relative_to(ROOT)} names no commit"
        for sha in [] if shallow else shas:
            known = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT,
                                   capture_output=True).returncode == 0
            assert known, f"{report.relative_to(ROOT)}: {sha} is not in this history"
