"""What a real (tiny) fit leaves for TensorBoard, read back two ways: through the real
`tensorboard` server's HTTP data API on loopback, and from the event files directly."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN = "tiny"
MAX_STEPS, LOG_EVERY, HIST_EVERY = 60, 10, 20
OVERRIDES = [
    "data.source=synthetic", f"trainer.max_steps={MAX_STEPS}", "data.batch_size=256",
    "eval.rows=512",
    "eval.every_n_steps=30", f"log.every_n_steps={LOG_EVERY}",
    f"log.histogram_every_n_steps={HIST_EVERY}", "checkpoint.every_n_steps=30",
    "data.normalize_rows=512", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    "sae.d_sae=64", "data.synthetic.n_features=32", "data.synthetic.d_in=16",
]
LOSS_TAGS = ["loss/reconstruction", "loss/sparsity", "loss/aux", "loss/total"]
SCALAR_TAGS = LOSS_TAGS + [
    "train/l0", "train/mse", "train/fvu", "train/gamma",
    "train/dead_fraction", "train/dense_fraction", "lr", "schedule/sparsity_coefficient",
    "val/l0", "val/fvu", "val/gamma", "val/mmcs",
]
HISTOGRAM_TAGS = ["train/log10_feature_density", "val/log10_feature_density"]
# HParams metrics: the held-out scalars themselves (their latest value), metrics.json's keys
FINAL_METRICS = {"val/l0": "l0", "val/fvu": "fvu", "val/mmcs": "mmcs",
                 "val/gamma": "relative_reconstruction_bias"}
SERVER_TIMEOUT_S, POLL_S = 60.0, 0.25


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny training run, in-process; its run directory."""
    from gsae_pl.fit import main

    out = tmp_path_factory.mktemp("tensorboard")
    rc = main(["--config", str(ROOT / "configs/base.yaml"), f"output.dir={out}",
               f"output.name={RUN}", *OVERRIDES])
    assert rc == 0
    path = out / RUN
    assert (path / "metrics.json").exists() and list(path.glob("events.out.tfevents.*"))
    return path


# ---- the real server, on loopback only -------------------------------------------------
# No proxy handler: loopback requests must never be sent to an http_proxy from the env.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.proc, self.log = f"http://127.0.0.1:{port}", proc, log

    def get(self, route: str, **query: str):
        url = f"{self.base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with _LOOPBACK.open(url, timeout=10) as response:
            return json.load(response)

    def post(self, route: str, body: dict):
        request = urllib.request.Request(f"{self.base}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"},
                                         method="POST")
        with _LOOPBACK.open(request, timeout=10) as response:
            return json.load(response)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def wait_for(self, ready) -> object:
        """Poll `ready()` (None: not yet) a bounded number of times, within a total timeout."""
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        last_error = None
        for _ in range(int(SERVER_TIMEOUT_S / POLL_S)):
            if self.proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                result = ready()
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
                result, last_error = None, err  # not listening yet, or still loading
            if result is not None:
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        pytest.fail(f"tensorboard not ready after {SERVER_TIMEOUT_S:.0f} s (last error: "
                    f"{last_error!r}):\n{self.log_tail()}")


@pytest.fixture
def server(run_dir, tmp_path):
    tensorboard = Path(sys.executable).parent / "tensorboard"
    assert tensorboard.exists(), f"no tensorboard next to {sys.executable}"
    port = _free_port()
    log = tmp_path / "tensorboard.log"
    # --load_fast=false: the pure-Python reader (no Rust data-server subprocess to fetch or
    # spawn); host 127.0.0.1: loopback only; output to a file: quiet.
    cmd = [str(tensorboard), "--logdir", str(run_dir.parent), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast=false", "--reload_interval", "2",
           "--window_title", "gsae_pl-test"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        yield Server(port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_server_serves_scalars_and_hparams(server, run_dir):
    final = json.loads((run_dir / "metrics.json").read_text())
    wanted = set(SCALAR_TAGS)

    def tags_loaded():  # every event file read
        tags = server.get("/data/plugin/scalars/tags").get(RUN, {})
        return tags if wanted <= set(tags) else None

    tags = server.wait_for(tags_loaded)
    assert wanted <= set(tags)
    assert set(HISTOGRAM_TAGS) <= set(server.get("/data/plugin/histograms/tags").get(RUN, {}))

    # /scalars answers [[wall_time, step, value], ...]
    mmcs = server.get("/data/plugin/scalars/scalars", run=RUN, tag="val/mmcs")
    _, last_step, last_value = max(mmcs, key=lambda point: point[1])
    assert last_step == MAX_STEPS - 1  # Lightning's x-axis: index of the last step
    assert isinstance(last_value, float) and 0.0 <= last_value <= 1.0
    assert last_value == pytest.approx(final["mmcs"], rel=1e-5)
    total = server.get("/data/plugin/scalars/scalars", run=RUN, tag="loss/total")
    assert len(total) >= MAX_STEPS // LOG_EVERY
    assert all(math.isfinite(value) for _, _, value in total)

    # HParams tab: /experiment and /session_groups take a JSON request body by POST.
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    metric_tags = [info["name"]["tag"] for info in experiment["metricInfos"]]
    # the headline metrics first: TensorBoard ticks only the first five (synthetic: MMCS)
    assert metric_tags[:4] == ["val/l0", "val/fvu", "val/mmcs", "val/gamma"]
    assert set(FINAL_METRICS) <= set(metric_tags)
    hparam_names = [info["name"] for info in experiment["hparamInfos"]]
    assert {"sae.d_sae", "sae.architecture", "loss.sparsity.coefficient"} <= set(hparam_names)
    # The keys that tell runs apart come first in the tab's columns (the server lists the
    # differing ones first, by name)
    assert hparam_names[:5] == ["loss.sparsity.coefficient", "output.variant",
                                "sae.architecture", "sae.d_sae", "seed"]

    groups = server.post("/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"metric": {"group": "", "tag": tag}}
                      for tag in FINAL_METRICS] + [{"hparam": "sae.d_sae"}],
    })["sessionGroups"]
    assert [group["name"] for group in groups] == [RUN]
    assert groups[0]["hparams"]["sae.d_sae"] == 64
    values = {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}
    for tag, name in FINAL_METRICS.items():
        assert values[tag] == pytest.approx(final[name], rel=1e-5), name
    assert groups[0]["sessions"][0]["status"] == "STATUS_SUCCESS"


# ---- the event files, read directly -------------------------------------------------------
def test_event_files_hold_histograms_windows_and_losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    events = EventAccumulator(str(run_dir), size_guidance={
        "scalars": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0})
    events.Reload()  # a directory: every event file of the run, in order
    tags = events.Tags()
    assert set(HISTOGRAM_TAGS) <= set(tags["histograms"])
    assert set(SCALAR_TAGS) <= set(tags["scalars"])

    # Everything shares Lightning's x-axis: the 0-based index of the step just taken.
    window_steps = list(range(HIST_EVERY - 1, MAX_STEPS, HIST_EVERY))
    histogram = events.Histograms("train/log10_feature_density")
    assert [event.step for event in histogram] == window_steps
    assert all(event.histogram_value.num == 64 for event in histogram)  # one value per feature
    assert events.Histograms("val/log10_feature_density")

    # Window metrics go to the logger at their own interval, never re-emitted in between.
    for tag in ("train/dead_fraction", "train/dense_fraction"):
        series = events.Scalars(tag)
        assert [event.step for event in series] == window_steps, tag
        assert all(0.0 <= event.value <= 1.0 for event in series), tag
    l0_steps = [event.step for event in events.Scalars("train/l0")]
    assert l0_steps == list(range(LOG_EVERY - 1, MAX_STEPS, LOG_EVERY))
    assert l0_steps == sorted({e.step for e in events.Scalars("loss/total")})  # aligned

    # Each loss term has its own series; the total is their sum at every logged step.
    series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in LOSS_TAGS}
    for tag, points in series.items():
        assert len(points) >= MAX_STEPS // LOG_EVERY, tag
        assert all(math.isfinite(value) for value in points.values()), tag
    for step, total in series["loss/total"].items():
        parts = sum(series[tag][step] for tag in LOSS_TAGS[:-1])
        assert total == pytest.approx(parts, rel=1e-4, abs=1e-6), step

    # The HParams summary (what the server's hparams plugin reads) names the final metrics.
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    experiment = hparams_metadata.parse_experiment_plugin_data(
        content[hparams_metadata.EXPERIMENT_TAG])
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert set(FINAL_METRICS) <= metric_tags
    assert set(FINAL_METRICS) <= set(tags["scalars"])
    # No duplicate charts of the final values, no `epoch` line
    assert "epoch" not in tags["scalars"]
    assert not [tag for tag in tags["scalars"] if tag.startswith("final/")]
