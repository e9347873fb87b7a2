"""Multi-node as a cluster launches it: two torchrun "nodes" of one process each on
127.0.0.1 (gloo, CPU), each started with its own --node-rank, as on two machines.

Multi-node is Lightning's business (trainer.num_nodes; the TorchElastic environment reads
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun); these tests check that gsae_pl's
part holds across nodes: the global batch makes the run follow the 1-process one, and only
global rank 0 writes. Real machines, NCCL and SLURM are not tested here (docs/scaling.md).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run.test_ddp import assert_same_run
from tests.tiny_run import ROOT, args

pytestmark = pytest.mark.slow

TWO_NODES = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
             "trainer.strategy=ddp", "trainer.max_steps=30"]
TIMEOUT = 120  # seconds for all launchers together; a healthy run takes well under 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nnodes: int, node_rank: int, port: int, module: str = "gsae_pl.fit") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", "1", "--node-rank", str(node_rank),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", module]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its workers in their own sessions, so
    killing the launcher's process group would leave them behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_all(commands: list[list[str]], logs: Path) -> list[tuple[int, str]]:
    """Start every command at once; (exit code, stderr) of each. Kills all of them and
    what they started if any is still running after TIMEOUT, or if the test fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, errs = [], []
    try:
        for i, command in enumerate(commands):
            errs.append(open(logs / f"stderr{i}", "w+"))  # a file: no pipe to fill up
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=errs[-1], start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(p.poll() is not None for p in procs), f"still running after {TIMEOUT} s"
        out = []
        for proc, err in zip(procs, errs):
            err.seek(0)
            out.append((proc.returncode, err.read()))
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
        for err in errs:
            err.close()


def test_two_nodes_follow_one_process_and_only_rank_zero_writes(tmp_path):
    port = free_port()
    nodes = [torchrun(2, rank, port) + args(tmp_path, "two", *TWO_NODES) for rank in (0, 1)]
    one = [sys.executable, "-m", "gsae_pl.fit", *args(tmp_path, "one", "trainer.max_steps=30")]
    (rc0, err0), (rc1, err1), (rc_one, err_one) = run_all([*nodes, one], tmp_path)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert rc_one == 0, err_one[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in err1  # node 1 really was the world's 2nd process

    assert_same_run(tmp_path, "one", "two", steps=30, batch=128)

    # Written once, by global rank 0: one metrics.json, one writer of event files, the
    # checkpoints in the run directory only, no stray temporaries.
    two = tmp_path / "two"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("metrics.json")) == \
        ["one/metrics.json", "two/metrics.json"]
    pids = {re.search(r"\.(\d+)\.\d+$", p.name).group(1)
            for p in two.glob("events.out.tfevents.*")}
    assert len(pids) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == \
        ["last.ckpt", "step10.ckpt", "step20.ckpt", "step30.ckpt"]
    assert not list(two.rglob(".*.tmp*"))


def test_a_world_smaller_than_num_nodes_is_refused(tmp_path):
    """trainer.num_nodes=2 under a 1-node torchrun: refused before anything is written,
    with Lightning's reason on gsae_pl's one line (exit 2 from the worker; torchrun then
    reports the failed worker itself). The no-launcher case is in test_entry_checks.py."""
    command = torchrun(1, 0, free_port()) + args(tmp_path, "run", *TWO_NODES)
    [(rc, err)] = run_all([command], tmp_path)
    assert rc != 0
    assert "error: the launcher's world does not match the config: You set `devices=1` and " \
           "`num_nodes=2` in Lightning, but the product (1 * 2) does not match the world " \
           "size (1)." in err
    assert "exitcode  : 2" in err
    assert not (tmp_path / "run").exists()


def test_an_ablation_suite_across_two_nodes(tmp_path):
    """`ablate --strategy ddp` under torchrun on each node: the runs one after another, each
    over both nodes on its own rendezvous; rank 0 alone writes the report."""
    from tests.suite.test_ablate import SHARED, config, write_suite

    suite = write_suite(tmp_path, {"gated": {"config": config("gated"), "grid": "gated"}},
                        overrides={**SHARED, "trainer.num_nodes": 2})
    port = free_port()
    nodes = [torchrun(2, rank, port, "gsae_pl.ablate") +
             ["--suite", suite, "--devices", "1", "--strategy", "ddp"] for rank in (0, 1)]
    (rc0, err0), (rc1, err1) = run_all(nodes, tmp_path)
    out = tmp_path / "out"
    logs = {p.name: p.read_text()[-1500:] for p in (out / "logs").glob("*.log")}
    assert rc0 == 0 and rc1 == 0, (err0[-1500:], err1[-1500:], logs)
    runs = sorted(p.parent.name for p in (out / "runs").glob("*/metrics.json"))
    assert runs == ["gated_l1-0.01_seed0", "gated_l1-0.1_seed0"]
    for run in runs:  # both nodes took part in every run, not only the first
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (out / "logs" / f"{run}.rank1.log").read_text()
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()
    assert not (out / "failed").exists() or not list((out / "failed").iterdir())
