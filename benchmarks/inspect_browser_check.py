"""Check the page `python -m gsae_pl.inspect` writes, in a real headless browser.

    python benchmarks/inspect_browser_check.py [--chromium /usr/bin/chromium] [--out DIR]

Trains a tiny run on a small random GPT-2's MLP neurons (`python -m gsae_pl.fit`, no
download), runs `python -m gsae_pl.inspect RUN --n 6 --k 5` on it, and opens
RUN/inspect/latents.html from disk (file://) in headless Chromium, driven over the
DevTools protocol as benchmarks/tensorboard_browser_check.py does. It checks, from the
rendered page: the 6 latents' sections are shown with their density lines; every top
context shows exactly one highlighted token, painted in the highlight colour; the
highlighted token is the one at the row's (window, position); the promoted tokens are
listed; and the page runs no script and fetches nothing (no resource entries).

Writes latents.png (the page's top) and browser_check.json (each check, what was seen,
the gsae_pl commit, the Chromium version) to --out; prints one line per check; exits 0 if
all passed, 1 if not, 2 if Chromium is not found. Not part of `make test`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tensorboard_browser_check import Chromium, browser_command_line  # noqa: E402
from gsae_pl.run.provenance import code_state  # noqa: E402
from tests.data.lm_fixtures import write_text, write_tiny_gpt2  # noqa: E402

N, K = 6, 5
HIGHLIGHT = "rgb(255, 179, 71)"  # mark.tok's background in gsae_pl/inspect_html.py
# What the rendered page shows, per latent section.
PAGE_JS = r"""(() => ({
  scripts: document.scripts.length,
  fetched: performance.getEntriesByType('resource').map(e => e.name),
  title: document.title,
  sections: [...document.querySelectorAll('section')].map(s => ({
    id: s.id,
    density: (s.querySelector('p') || {}).innerText || '',
    contexts: [...s.querySelectorAll('td.ctx')].map(td => ({
      marks: [...td.querySelectorAll('mark')].map(m => ({
        text: m.textContent,
        background: getComputedStyle(m).backgroundColor,
        width: m.getBoundingClientRect().width})),
      where: td.nextElementSibling.innerText})),
    promoted: [...s.querySelectorAll('table.promoted td span.tok')].map(t => t.textContent),
  })),
}))()"""


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc


def make_run(work: Path) -> Path:
    model, corpus = write_tiny_gpt2(work / "model"), write_text(work / "corpus", n_docs=300)
    run(["-m", "gsae_pl.fit", "--config", str(ROOT / "configs/base.yaml"),
         "data.source=transformer_lens", f"data.model={model}", f"data.dataset={corpus}",
         "data.context_size=16", "data.buffer_size=256", "data.batch_size=32",
         "data.lm_batch_size=8", "data.normalize_rows=64", "eval.rows=256",
         "eval.loss_recovered.contexts=4", "eval.every_n_steps=20", "trainer.max_steps=20",
         "log.every_n_steps=5", "checkpoint.every_n_steps=20", "sae.d_sae=64",
         "resample.enabled=false", "trainer.enable_progress_bar=false",
         "trainer.accelerator=cpu", f"output.dir={work}", "output.name=run"])
    run(["-m", "gsae_pl.inspect", str(work / "run"), "--n", str(N), "--k", str(K)])
    return work / "run"


def expected_marks(run_dir: Path, sections: list) -> list[str]:
    """The token at each shown context's (window, position), decoded as the page does."""
    from gsae_pl.inspect import read_finished_run, token_text
    from gsae_pl.inspect_html import visible
    from gsae_pl.run.datamodule import build_source

    cfg, _, _ = read_finished_run(run_dir)
    lm = build_source(cfg).lm
    out = []
    for section in sections:
        for context in section["contexts"]:
            window, _, position = context["where"].removeprefix("window ").partition(", token ")
            token = int(lm.heldout[int(window)][int(position)])
            out.append(visible(token_text(lm.bridge.tokenizer, token)))
    return out


def checks(seen: dict, want_marks: list[str]) -> dict[str, tuple[bool, str]]:
    sections = seen["sections"]
    contexts = [c for s in sections for c in s["contexts"]]
    marks = [m for c in contexts for m in c["marks"]]
    shown_marks = [c["marks"][0]["text"] if c["marks"] else None for c in contexts]
    return {
        "the latents are shown": (
            len(sections) == N and all("of the held-out rows" in s["density"]
                                       for s in sections),
            f"{len(sections)} sections: {', '.join(s['id'] for s in sections)}"),
        "each context highlights one token, in the highlight colour": (
            len(contexts) > 0 and all(len(c["marks"]) == 1 for c in contexts)
            and all(m["background"] == HIGHLIGHT and m["width"] > 0 for m in marks),
            f"{len(contexts)} contexts, {len(marks)} marks, backgrounds "
            f"{sorted({m['background'] for m in marks})}"),
        "the highlighted token is the activating one": (
            shown_marks == want_marks,
            f"first: {shown_marks[:5]} (want {want_marks[:5]})"),
        "promoted tokens listed": (
            all(len(s["promoted"]) == 10 for s in sections),
            f"{[len(s['promoted']) for s in sections]} per latent"),
        "no script run, nothing fetched": (
            seen["scripts"] == 0 and not seen["fetched"],
            f"{seen['scripts']} scripts, fetched {seen['fetched']}"),
    }


def main() -> int:
    parsed = browser_command_line(__doc__, ROOT / "benchmarks/results/inspect_browser")
    if parsed is None:
        return 2
    args, chromium = parsed
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp))
        browser = Chromium(chromium, Path(tmp) / "profile")
        try:
            version = browser.send("Browser.getVersion")["product"]
            page = browser.open((run_dir / "inspect/latents.html").as_uri())
            deadline = time.time() + 60
            while browser.evaluate(page, "document.readyState") != "complete":
                if time.time() > deadline:
                    raise SystemExit("the page did not load in 60 s")
                time.sleep(0.2)
            seen = browser.evaluate(page, PAGE_JS)
            browser.screenshot(page, args.out / "latents.png")
        finally:
            browser.close()
        results = checks(seen, expected_marks(run_dir, seen["sections"]))
    (args.out / "browser_check.json").write_text(json.dumps(
        {"code": code_state(ROOT), "chromium": version,
         "checks": {name: {"passed": ok, "seen": what} for name, (ok, what) in results.items()},
         "page": seen}, indent=2) + "\n")
    for name, (ok, what) in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {what}")
    return 0 if all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
