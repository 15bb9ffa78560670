"""The cores a process may use: its affinity, capped by a container's CPU quota."""

from __future__ import annotations

import os

import pytest

from noodle.cores import available_cores, cgroup_cpu_quota


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-unlimited", "v1", "v1-unlimited", "no-cgroup"],
)
def test_the_cgroup_quota_is_read_in_cores(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path / name, text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_a_quota_below_the_affinity_caps_the_cores_and_rounds_up(tmp_path):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores(tmp_path) == affinity
    write(tmp_path / "cpu.max", "50000 100000\n")
    assert available_cores(tmp_path) == 1
    write(tmp_path / "cpu.max", f"{(affinity + 4) * 100000} 100000\n")
    assert available_cores(tmp_path) == affinity
