"""How many CPUs this process may use: the cores it may run on, capped by its cgroup's CPU quota.

In a Kubernetes pod ``os.sched_getaffinity`` lists every core of the node, while the pod's CPU
limit is a CFS quota in its cgroup (``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` on v1). Threads beyond the quota are throttled, not parallel, so thread
counts are sized by this, not by the node.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (``1.5`` for a 1500m limit); None when it
    has none or it cannot be read (not Linux, no cgroup mounted)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP_ROOT) -> float:
    """The cores this process may run on, capped by its cgroup's quota (at least 1)."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = float(os.cpu_count() or 1)
    quota = cgroup_quota(root)
    return max(1.0, min(cores, quota) if quota is not None else cores)
