"""Where a multi-node ablation suite's DDP runs meet (docs/scaling.md).

Under torchrun or SLURM every node runs the same `ablate` command, and each of its runs is
a fresh set of `fit` processes that must find each other. They cannot all use the
launcher's own store one after another: the second run reads the first run's stale
addresses and times out. So the first `ablate` process, which outlives every run, hosts
one store per run on port MASTER_PORT + the run's 1-based index in the suite, and every
rank of the run connects to it as torchrun's workers connect to torchrun's store
(TORCHELASTIC_USE_AGENT_STORE=True): no run's store depends on which of its processes
exits first. (`fit.leave_process_group` makes them exit together as well.)
"""

from __future__ import annotations

import os
from datetime import timedelta

from gsae_pl.processes import is_first_process

STORE_TIMEOUT = timedelta(minutes=30)  # torch's default process-group timeout


def launcher_port() -> int | None:
    """The launcher's MASTER_PORT under torchrun or SLURM; None without either."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ["MASTER_PORT"])
    if SLURMEnvironment.detect():
        return SLURMEnvironment().main_port  # MASTER_PORT, else Lightning's from the job id
    return None


class RunStores:
    """Each run's rendezvous: `env(index)` is what the run's fit processes need."""

    def __init__(self):
        self.base = launcher_port()
        self.hosted: dict = {}  # index -> TCPStore, on the first process only

    def env(self, index: int) -> dict:
        if self.base is None:
            return {}  # one machine: Lightning finds a free port itself
        port = self.base + index
        if is_first_process():
            from torch.distributed import TCPStore

            self.hosted[index] = TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), port,
                                          is_master=True, wait_for_workers=False,
                                          timeout=STORE_TIMEOUT)
            # Run index - 1 may still be shutting down on other nodes; older ones cannot
            # be, since run index - 1 needed every node.
            for old in [k for k in self.hosted if k < index - 1]:
                del self.hosted[old]
        return {"MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
