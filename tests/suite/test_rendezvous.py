"""`is_first_process`: one rule for every launcher, read by the cache, the locks and ablate."""

from __future__ import annotations

import pytest

from gsae_pl.data import cache
from gsae_pl.run import lock
from gsae_pl.suite import rendezvous

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID",
                  "SLURM_LOCALID", "SLURM_NODEID")


@pytest.mark.parametrize("env, first", [
    ({}, True),  # a plain process
    # torchrun: 2 nodes x 2 processes
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),
    ({"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, False),
    ({"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),
    # SLURM's srun, which sets no RANK: 2 nodes x 2 tasks
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}, True),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}, False),
    ({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}, False),
    # Lightning's own DDP launcher: the first process, then the ones it starts with
    # LOCAL_RANK alone; with MASTER_ADDR and NODE_RANK set by hand, another node's
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    ({"RANK": ""}, True),  # set but empty counts as unset
])
def test_one_rule_for_every_launcher(monkeypatch, env, first):
    for var in RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert rendezvous.is_first_process() is first
    assert lock.takes_run_lock() is first  # the run lock asks the same function
    assert cache.is_first_process is rendezvous.is_first_process  # and so does the cache
