"""Check what a newcomer sees of two runs in TensorBoard, in a real headless browser.

    python benchmarks/tensorboard_browser_check.py [--chromium /usr/bin/chromium] [--out DIR]

Trains two tiny synthetic runs (`python -m gsae_pl.fit`) into a temporary directory, the
second killed (SIGKILL) right after its first held-out evaluation reached its event file,
starts this venv's `tensorboard` on them and opens the HParams and CUSTOM SCALARS dashboards
in headless Chromium. It then checks, from the rendered page, what gsae_pl/run/tensorboard.py
means them to show: HParams lists both runs, its first hparam columns are the keys that tell
runs apart, and it has `val/` metric columns with values for the killed run too; CUSTOM
SCALARS shows the pinned charts, with the killed run's held-out points in them.

Both dashboards are Polymer elements whose content lives in shadow roots, which
`chromium --dump-dom` leaves out (it gives TensorBoard's header and an empty
<tf-hparams-dashboard>). So the page is driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`, standard library only), and read by walking the shadow roots;
the HParams table is a vaadin-grid whose cells are slotted into its shadow table.

Writes hparams.png, custom_scalars.png and browser_check.json (each check, the table as
seen, the gsae_pl commit, the Chromium and TensorBoard versions) to --out; prints one line
per check; exits 0 if all passed, 1 if not, 2 if Chromium is not found. Not part of
`make test` (a browser, a server and two training processes).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tensorboard
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from gsae_pl.run.provenance import code_state
from gsae_pl.run.tensorboard import LOSSES, WATCH, distinguishing_keys, layout, metric_tags

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs/base.yaml"), "data.source=synthetic",
        "data.batch_size=128", "eval.rows=512", "eval.every_n_steps=20",
        "log.every_n_steps=10", "log.histogram_every_n_steps=20",
        "checkpoint.every_n_steps=20", "data.normalize_rows=256",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "sae.d_sae=32",
        "data.synthetic.n_features=24", "data.synthetic.d_in=8",
        "output.variant=baseline", "output.sweep=loss.sparsity.coefficient"]
FINISHED, KILLED = "l1_0.01", "l1_0.1_killed"
RUNS = {FINISHED: ["loss.sparsity.coefficient=0.01", "trainer.max_steps=40"],
        KILLED: ["loss.sparsity.coefficient=0.1", "trainer.max_steps=100000"]}
EVALUATORS = ["reconstruction", "ground_truth"]  # what a synthetic run evaluates
WAIT_S = 300  # for a fit's first evaluation, TensorBoard or a dashboard, on a busy machine
SIZE = (1500, 1100)

# The vaadin-grid(s) of the page, found through shadow roots: each visible row's cells.
GRID_JS = r"""(() => {
  const grids = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.localName === 'vaadin-grid') grids.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  const text = (cell) => {
    const slot = cell.querySelector('slot');
    const nodes = slot ? slot.assignedNodes({flatten: true}) : [cell];
    return nodes.map(n => n.textContent).join(' ').replace(/\s+/g, ' ').trim();
  };
  return grids.map(grid => [...grid.shadowRoot.querySelectorAll('tr')]
    .filter(tr => !tr.hidden)
    .map(tr => [...tr.querySelectorAll('th, td')].filter(c => !c.hidden).map(text)));
})()"""
# The page's text, shadow roots included (what --dump-dom would give if it expanded them).
TEXT_JS = r"""(() => {
  const out = [];
  const walk = (node) => {
    if (node.nodeType === 3) { out.push(node.textContent); return; }
    if (['STYLE', 'SCRIPT'].includes(node.nodeName)) return;
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) walk(child);
  };
  walk(document);
  return out.join(' ').replace(/\s+/g, ' ');
})()"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe: it reads
    NUL-terminated JSON commands on fd 3 and answers on fd 4."""

    def __init__(self, path: str, profile: Path):
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()

        def as_fds_3_and_4():  # in the child, before exec
            a, b = os.dup(commands_r), os.dup(replies_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=as_fds_3_and_4, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(replies_w)
        self._id, self._buffer = 0, b""

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events (no id) come in between: skip them
            while b"\0" not in self._buffer:
                if not select.select([self._replies], [], [], 60)[0]:
                    raise RuntimeError(f"chromium did not answer {method} in 60 s")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> str:
        """A new tab of SIZE showing url; returns its session."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session, width=SIZE[0], height=SIZE[1],
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", session, url=url)
        return session

    def evaluate(self, session: str, js: str):
        return self.send("Runtime.evaluate", session, expression=js,
                         returnByValue=True)["result"].get("value")

    def screenshot(self, session: str, path: Path) -> None:
        data = self.send("Page.captureScreenshot", session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        os.close(self._commands)
        os.close(self._replies)


def fit(runs: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(runs.parent / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "gsae_pl.fit", *TINY, f"output.dir={runs}",
                             f"output.name={name}", *RUNS[name]],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def has_val_point(run: Path) -> bool:
    """Whether a held-out scalar reached the run's event files (not only its name in the
    HParams experiment, which is written at the start)."""
    return any(value.tag == "val/fvu" for events in run.glob("events.out.tfevents.*")
               for event in EventFileLoader(str(events)).Load() for value in event.summary.value)


def train(runs: Path) -> None:
    """The finished run, then the killed one, SIGKILLed after its first evaluation."""
    if fit(runs, FINISHED).wait(WAIT_S) != 0:
        raise SystemExit(f"the {FINISHED} fit failed: {runs.parent / FINISHED}.log")
    proc = fit(runs, KILLED)
    deadline = time.time() + WAIT_S
    while not has_val_point(runs / KILLED):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"the {KILLED} fit wrote no evaluation: {runs.parent / KILLED}.log")
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(runs: Path, port: int, log: Path) -> subprocess.Popen:
    """This venv's TensorBoard, once it answers with both runs loaded."""
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + WAIT_S
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                if {FINISHED, KILLED} <= set(json.load(r)):
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"tensorboard did not answer with both runs in {WAIT_S} s: {log}")


def wait_for(browser: Chromium, session: str, js: str, ready) -> object:
    """Evaluate js until ready(value) or WAIT_S; then let charts finish drawing."""
    deadline = time.time() + WAIT_S
    value = browser.evaluate(session, js)
    while not ready(value) and time.time() < deadline:
        time.sleep(1)
        value = browser.evaluate(session, js)
    time.sleep(2)
    return browser.evaluate(session, js)


def hparams_table(grids: list) -> tuple[list[str], dict[str, list[str]]]:
    """The HParams table's header and its rows by trial id, from the page's grids."""
    for rows in grids or []:
        header = next((row for row in rows if row and row[0] == "Trial ID"), None)
        if header:
            return header, {row[0]: row for row in rows if row and row[0] and row is not header}
    return [], {}


def check_hparams(grids, cfg) -> dict[str, tuple[bool, str]]:
    header, rows = hparams_table(grids)
    keys = distinguishing_keys(cfg)
    hparams = [c for c in header[1:] if c != "Show Metrics" and not c.startswith("val/")]
    metrics = [i for i, c in enumerate(header) if c.startswith("val/")]

    def numbers(run):  # the val/ columns with a value for this run
        return [header[i] for i in metrics if run in rows
                and re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", rows[run][i] if i < len(rows[run])
                                 else "")]

    shown = {run: numbers(run) for run in (FINISHED, KILLED)}
    # TensorBoard ticks a run's first 5 metrics (and hparams) for display; the rest wait
    # in the left pane's Metrics list.
    hidden = [tag for tag in metric_tags(EVALUATORS) if tag not in header]
    return {
        "hparams: both runs listed": (
            {FINISHED, KILLED} <= set(rows), f"rows: {', '.join(rows) or 'none'}"),
        "hparams: first columns are the distinguishing keys": (
            set(hparams[:len(keys)]) == set(keys),
            f"first {len(keys)}: {', '.join(hparams[:len(keys)])} (project order: "
            f"{', '.join(keys)})"),
        "hparams: val/ metric values for the killed run": (
            bool(metrics) and len(shown[KILLED]) == len(metrics) > 0
            and "val/fvu" in shown[KILLED],
            f"{len(metrics)} val/ columns shown; values: {FINISHED} {len(shown[FINISHED])}, "
            f"{KILLED} {len(shown[KILLED])}; not shown by default: {', '.join(hidden)}"),
    }


def check_custom_scalars(text: str, titles: list[str]) -> dict[str, tuple[bool, str]]:
    text = text or ""
    missing = [t for t in titles if t not in text]
    series = f"val/l0 ({KILLED})"
    return {
        "custom scalars: pinned charts shown": (
            not missing, f"{len(titles) - len(missing)}/{len(titles)} titles"
            + (f"; missing: {'; '.join(missing)}" if missing else "")),
        "custom scalars: killed run's val/ series charted": (
            series in text, f"'{series}' {'found' if series in text else 'absent'}"),
    }


def find_chromium(given: str | None) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else shutil.which(given)
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                 "google-chrome"))), None)


def browser_command_line(doc: str, out: Path) -> tuple[argparse.Namespace, str] | None:
    """The browser checks' shared command line (--chromium, --out): the parsed arguments
    and the Chromium to drive, with --out made; None (after one line on stderr) when no
    Chromium is found."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromium", help="the Chromium (or Chrome) executable; default: "
                        "chromium, chromium-browser or google-chrome on PATH")
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(f"error: Chromium not found ({args.chromium or 'chromium on PATH'}); "
              "install it or pass --chromium PATH", file=sys.stderr)
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return args, chromium


def main() -> int:
    parsed = browser_command_line(__doc__, ROOT / "benchmarks/results/tensorboard_browser")
    if parsed is None:
        return 2
    args, chromium = parsed
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train(work / "runs")
        cfg = OmegaConf.load(work / "runs" / FINISHED / "config.yaml")
        pinned = layout(cfg, EVALUATORS)
        titles = [*pinned[WATCH], *pinned[LOSSES]]
        port = free_port()
        server = start_tensorboard(work / "runs", port, work / "tensorboard.log")
        browser = Chromium(chromium, work / "profile")
        try:
            version = browser.send("Browser.getVersion")["product"]
            page = browser.open(f"http://127.0.0.1:{port}/#hparams")
            grids = wait_for(browser, page, GRID_JS,
                             lambda g: {FINISHED, KILLED} <= set(hparams_table(g)[1]))
            browser.screenshot(page, args.out / "hparams.png")
            page = browser.open(f"http://127.0.0.1:{port}/#custom_scalars")
            text = wait_for(browser, page, TEXT_JS,
                            lambda t: t and all(title in t for title in titles))
            browser.screenshot(page, args.out / "custom_scalars.png")
        finally:
            browser.close()
            server.kill()
            server.wait()
    checks = {**check_hparams(grids, cfg), **check_custom_scalars(text, titles)}
    header, rows = hparams_table(grids)
    results = {"code": code_state(ROOT), "chromium": version,
               "tensorboard": tensorboard.__version__,
               "checks": {name: {"passed": ok, "seen": seen}
                          for name, (ok, seen) in checks.items()},
               "hparams_table": {"header": header, "rows": list(rows.values())}}
    (args.out / "browser_check.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, (ok, seen) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
