"""Tests for edge_runtime/cpus.py: the CPUs a process may use, read from fake cgroup files
under a tmp root, and the thread count each engine gets from them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_runtime.cpus import (
    ALL_CORES,
    UsableCpus,
    cgroup_cpu_limit,
    choose_threads,
    parse_cfs,
    parse_cpu_max,
    usable_cpus,
)

EIGHT = set(range(8))


def write(root: Path, files: dict[str, str]) -> Path:
    """Write each ``relative path: text`` under ``root``; return ``root``."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        pytest.param("max 100000\n", None, id="no-limit"),
        pytest.param("max\n", None, id="max-alone"),
        pytest.param("150000 100000\n", 2, id="one-and-a-half"),
        pytest.param("100000 100000\n", 1, id="one"),
        pytest.param("50000 100000\n", 1, id="half-rounds-up-to-one"),
        pytest.param("400000 100000\n", 4, id="four"),
        pytest.param("200000\n", 2, id="default-period"),
        pytest.param("", None, id="empty"),
        pytest.param("lots 100000\n", None, id="garbage"),
        pytest.param("100000 0\n", None, id="zero-period"),
    ],
)
def test_parse_cpu_max_rounds_the_quota_up(text, cpus):
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("quota", "period", "cpus"),
    [
        pytest.param("-1\n", "100000\n", None, id="unlimited"),
        pytest.param("150000\n", "100000\n", 2, id="one-and-a-half"),
        pytest.param("250000\n", "100000\n", 3, id="two-and-a-half"),
        pytest.param("20000\n", "10000\n", 2, id="short-period"),
        pytest.param("x\n", "100000\n", None, id="garbage"),
    ],
)
def test_parse_cfs_rounds_the_v1_quota_up(quota, period, cpus):
    assert parse_cfs(quota, period) == cpus


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {
                "proc/self/cgroup": "0::/system.slice/app.service\n",
                "sys/fs/cgroup/system.slice/app.service/cpu.max": "150000 100000\n",
            },
            (2, "cgroup v2 cpu.max 150000 100000"),
            id="v2-own-cgroup",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "0::/system.slice/app.service\n",
                "sys/fs/cgroup/system.slice/cpu.max": "100000 100000\n",
                "sys/fs/cgroup/system.slice/app.service/cpu.max": "max 100000\n",
            },
            (1, "cgroup v2 cpu.max 100000 100000"),
            id="v2-parent-binds",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "0::/kubepods/pod1/abc\n",
                "sys/fs/cgroup/cpu.max": "300000 100000\n",
            },
            (3, "cgroup v2 cpu.max 300000 100000"),
            id="v2-container-without-cgroupns",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "0::/\n",
                "sys/fs/cgroup/cpu.max": "max 100000\n",
            },
            None,
            id="v2-no-limit",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
                "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
                "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            (2, "cgroup v1 cfs quota 150000/100000"),
            id="v1-co-mounted",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "3:cpu:/docker/abc\n0::/\n",
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "250000\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
                "sys/fs/cgroup/unified/cgroup.controllers": "\n",
            },
            (3, "cgroup v1 cfs quota 250000/100000"),
            id="hybrid-v1-cpu-in-container",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "3:cpu:/\n",
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            None,
            id="v1-unlimited",
        ),
        pytest.param(
            {"sys/fs/cgroup/cpu.max": "200000 100000\n"},
            (2, "cgroup v2 cpu.max 200000 100000"),
            id="no-procfs-reads-the-mount-root",
        ),
        pytest.param({}, None, id="no-cgroups"),
    ],
)
def test_cgroup_cpu_limit_reads_the_tightest_quota(tmp_path, files, expected):
    root = write(tmp_path, files)

    assert cgroup_cpu_limit(root) == expected


@pytest.mark.parametrize(
    ("files", "affinity", "expected"),
    [
        pytest.param({}, EIGHT, UsableCpus(8, ALL_CORES, 8), id="unrestricted"),
        pytest.param({}, {0, 1}, UsableCpus(2, "affinity", 8), id="affinity"),
        pytest.param(
            {"sys/fs/cgroup/cpu.max": "150000 100000"},
            EIGHT,
            UsableCpus(2, "cgroup v2 cpu.max 150000 100000", 8),
            id="quota",
        ),
        pytest.param(
            {"sys/fs/cgroup/cpu.max": "400000 100000"},
            {0, 1},
            UsableCpus(2, "affinity", 8),
            id="affinity-tighter-than-quota",
        ),
        pytest.param(
            {"sys/fs/cgroup/cpu.max": "100000 100000"},
            {0, 1},
            UsableCpus(1, "cgroup v2 cpu.max 100000 100000", 8),
            id="quota-tighter-than-affinity",
        ),
        pytest.param(
            {"sys/fs/cgroup/cpu.max": "1600000 100000"},
            EIGHT,
            UsableCpus(8, ALL_CORES, 8),
            id="quota-above-the-cores",
        ),
    ],
)
def test_usable_cpus_takes_the_smallest_limit_and_names_it(tmp_path, files, affinity, expected):
    root = write(tmp_path, files)

    found = usable_cpus(root, affinity=affinity, cores=8)

    assert found == expected
    assert found.restricted is (expected.count < 8)


def test_usable_cpus_of_this_process_counts_its_affinity():
    import os

    found = usable_cpus()

    assert 1 <= found.count <= len(os.sched_getaffinity(0))
    assert found.cores == os.cpu_count()


# -- the thread count each engine gets ----------------------------------------------------

TWO = UsableCpus(2, "affinity", 8)
UNRESTRICTED = UsableCpus(8, ALL_CORES, 8)


@pytest.mark.parametrize(
    ("profile", "explicit", "cpus", "zero_counts_cores", "threads", "message"),
    [
        pytest.param(
            8,
            None,
            TWO,
            True,
            2,
            (
                logging.INFO,
                "threads: profile asks for 8, this process may use 2 CPUs (affinity); using 2",
            ),
            id="profile-capped",
        ),
        pytest.param(
            8,
            None,
            UsableCpus(2, ALL_CORES, 2),
            True,
            2,
            (
                logging.INFO,
                "threads: profile asks for 8, this process may use 2 CPUs "
                "(all of this host's cores); using 2",
            ),
            id="smaller-host",
        ),
        pytest.param(2, None, TWO, True, 2, None, id="profile-fits"),
        pytest.param(4, None, UNRESTRICTED, True, 4, None, id="profile-below-the-cpus"),
        pytest.param(
            8,
            4,
            TWO,
            True,
            4,
            (
                logging.WARNING,
                "threads: 4 asked for explicitly, but this process may use 2 CPUs "
                "(affinity); using 4, which oversubscribes them",
            ),
            id="explicit-wins",
        ),
        pytest.param(8, 1, TWO, True, 1, None, id="explicit-below"),
        pytest.param(
            0,
            None,
            TWO,
            True,
            2,
            (
                logging.INFO,
                "threads: profile leaves them to the engine, which counts 8 cores, "
                "this process may use 2 CPUs (affinity); using 2",
            ),
            id="engine-choice-capped",
        ),
        pytest.param(0, None, UNRESTRICTED, True, 0, None, id="engine-choice-unrestricted"),
        pytest.param(0, None, TWO, False, 0, None, id="litert-choice-stays"),
        pytest.param(0, 0, TWO, True, 0, None, id="explicit-engine-choice"),
    ],
)
def test_choose_threads_caps_the_profile_and_lets_explicit_win(
    profile, explicit, cpus, zero_counts_cores, threads, message
):
    choice = choose_threads(
        "ONNX Runtime intra-op", profile, explicit, cpus, zero_counts_cores=zero_counts_cores
    )

    assert choice.threads == threads
    assert choice.message() == message
    assert choice.oversubscribed is (threads > cpus.count)
