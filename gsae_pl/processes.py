"""Which copy of a command this process is, under torchrun, SLURM or Lightning's DDP
launcher: the first one alone writes reports and shared caches."""

from __future__ import annotations

import os

LAUNCHER_RANKS = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK")


def launcher_rank() -> int:
    """Which copy of this command torchrun or SLURM started this is: 0 for the first (or
    the only) one. The others' fit processes join rank 0's runs. The largest of the ranks
    set is the global one (a node rank never exceeds it), and 0 only when all are 0."""
    return max((int(os.environ[var]) for var in LAUNCHER_RANKS if os.environ.get(var)),
               default=0)


def is_first_process() -> bool:
    """Whether this is the first process a launcher started: rank 0 alone writes reports,
    notes once and hosts the runs' stores. False when any rank variable is set and non-zero:
    torchrun's RANK / LOCAL_RANK / GROUP_RANK, SLURM's SLURM_PROCID, Lightning's NODE_RANK,
    and the LOCAL_RANK that Lightning's own DDP launcher sets alone for the processes it
    starts after the first. True with none set (a plain process)."""
    return launcher_rank() == 0 and int(os.environ.get("LOCAL_RANK") or 0) == 0
