"""The CPUs a process may use: its affinity capped by its cgroup's quota (a pod's CPU limit),
read from cgroup v2's cpu.max or v1's cfs files as the kernel writes them."""

from __future__ import annotations

import os

from libs.common.cpus import available_cpus, cgroup_quota


def test_cgroup_v2_quota_in_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None


def test_cgroup_v1_quota_in_cores(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_quota(tmp_path) is None
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_the_quota_caps_the_cores_and_one_is_the_floor(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # a 500m limit
    assert available_cpus(tmp_path) == 1.0
    (tmp_path / "cpu.max").write_text(f"{100000 * (len(os.sched_getaffinity(0)) + 8)} 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))  # a quota above the cores: the cores
