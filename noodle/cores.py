"""How many CPU cores this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota
    (which the affinity does not show)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2, else v1), or None."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)
