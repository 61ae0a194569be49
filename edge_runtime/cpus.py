"""How many CPUs this process may use, and the thread count each engine gets.

A bundle's profile names a thread count for the device it was built for: 8 on an
``x86-64-avx512-vnni`` server, 4 on a Raspberry Pi 5. The process that runs it often has
fewer CPUs: a container with a CPU quota, a Pi sharing its cores with a camera pipeline,
``taskset`` or cgroup pinning. Engine threads beyond that only wait on each other; on a
2-core host MiniLM built for 8 spinning threads ran 6.7x slower than with 2, and SmolLM2
built for 4 threads generated 3.6x fewer tokens a second (issue 13).

``usable_cpus`` counts what the process may use: its CPU affinity, and the CFS quota of
its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up.
``choose_threads`` caps the profile's figure at that count; a thread count the caller gives
explicitly wins.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ALL_CORES = "all of this host's cores"
# Where the cgroup hierarchies are mounted, under the root: v2 alone (the unified layout),
# v2 beside v1 (the hybrid layout), and v1's cpu controller, alone or co-mounted.
V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")
V1_CPU_MOUNTS = ("sys/fs/cgroup/cpu", "sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpuacct,cpu")


@dataclass(frozen=True)
class UsableCpus:
    """The CPUs this process may use, and what limits them.

    Attributes:
        count: CPUs the process may keep busy at once (at least 1).
        reason: what sets ``count``: "affinity", the cgroup quota (e.g. "cgroup v2
            cpu.max 150000 100000"), or "all of this host's cores".
        cores: the host's CPUs (``os.cpu_count()``).
    """

    count: int
    reason: str
    cores: int

    @property
    def restricted(self) -> bool:
        """Whether the process may use fewer CPUs than the host has."""
        return self.count < self.cores

    def describe(self) -> str:
        """e.g. "2 CPUs (affinity)"."""
        return f"{self.count} CPU{'s' if self.count != 1 else ''} ({self.reason})"


def usable_cpus(
    root: str | Path = "/", affinity: set[int] | None = None, cores: int | None = None
) -> UsableCpus:
    """The CPUs this process may use: the smaller of its affinity and its cgroup quota.

    Args:
        root: the file system root to read ``proc/self/cgroup`` and ``sys/fs/cgroup``
            under (tests point it at a folder of fake files).
        affinity: the CPUs the process may run on; None asks the kernel
            (``os.sched_getaffinity``, where the platform has it).
        cores: the host's CPUs; None asks ``os.cpu_count()``.
    """
    cores = cores or os.cpu_count() or 1
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    candidates: list[tuple[int, str]] = []
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        candidates.append(quota)
    if affinity is not None and len(affinity) < cores:
        candidates.append((len(affinity), "affinity"))
    candidates.append((cores, ALL_CORES))
    # min keeps the first of equals: the quota, then the affinity, name the limit.
    count, reason = min(candidates, key=lambda candidate: candidate[0])
    return UsableCpus(max(1, count), reason, cores)


def parse_cpu_max(text: str) -> int | None:
    """CPUs a cgroup v2 ``cpu.max`` allows ("150000 100000" -> 2); None for no limit."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = fields[1] if len(fields) > 1 else "100000"  # the kernel's default period
    return _ceil_ratio(fields[0], period)


def parse_cfs(quota: str, period: str) -> int | None:
    """CPUs cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` allow; None for -1."""
    return _ceil_ratio(quota.strip(), period.strip())


def _ceil_ratio(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None  # not a limit this code understands: assume none rather than fail
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def cgroup_cpu_limit(root: str | Path = "/") -> tuple[int, str] | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, as (CPUs,
    reason), or None when no cgroup limits it (or none can be read).

    A cgroup's quota also binds every cgroup below it, so the folders from the process's
    own cgroup up to the hierarchy's root are all read. In a container without a cgroup
    namespace, ``/proc/self/cgroup`` names the host's path, which does not exist under the
    container's mount; the mount's root, which is the container's cgroup, still does.
    """
    root = Path(root)
    limits: list[tuple[int, str]] = []
    for controllers, path in _memberships(root):
        if controllers == "":
            for mount in V2_MOUNTS:
                for folder in _up_from(root / mount, path):
                    text = _read(folder / "cpu.max")
                    cpus = parse_cpu_max(text) if text else None
                    if cpus is not None:
                        limits.append((cpus, f"cgroup v2 cpu.max {' '.join(text.split())}"))
        elif "cpu" in controllers.split(","):
            for mount in V1_CPU_MOUNTS:
                for folder in _up_from(root / mount, path):
                    quota = _read(folder / "cpu.cfs_quota_us")
                    period = _read(folder / "cpu.cfs_period_us")
                    cpus = parse_cfs(quota, period) if quota and period else None
                    if cpus is not None:
                        reason = f"cgroup v1 cfs quota {quota.strip()}/{period.strip()}"
                        limits.append((cpus, reason))
    return min(limits, key=lambda limit: limit[0]) if limits else None


def _memberships(root: Path) -> list[tuple[str, str]]:
    """(controllers, path) per line of ``proc/self/cgroup``: "" is the v2 hierarchy."""
    text = _read(root / "proc" / "self" / "cgroup")
    if text is None:  # no procfs here: look at the mounts' roots
        return [("", "/"), ("cpu", "/")]
    memberships = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            memberships.append((parts[1], parts[2]))
    return memberships


def _up_from(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each folder above it up to ``mount``, those that exist."""
    parts = [part for part in path.strip().split("/") if part and part != ".."]
    folders = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count one engine gets, and why.

    Attributes:
        engine: who gets the threads, e.g. "ONNX Runtime intra-op".
        profile: the bundle's figure (0 = the engine's own choice).
        explicit: the caller's ``threads=`` / ``--threads``, which wins; None if not given.
        threads: what the engine is given (0 = the engine's own choice).
        cpus: the CPUs this process may use.
    """

    engine: str
    profile: int
    explicit: int | None
    threads: int
    cpus: UsableCpus

    @property
    def oversubscribed(self) -> bool:
        """More threads than CPUs: ONNX Runtime's spinning workers would starve each other."""
        return self.threads > self.cpus.count

    @property
    def lowered(self) -> bool:
        """Whether the runtime gave fewer threads than the profile's figure means here."""
        if self.explicit is not None:
            return False
        asked = self.profile or self.cpus.cores
        return 0 < self.threads < asked

    def message(self) -> tuple[int, str] | None:
        """The one log line about this choice, with its level; None when there is nothing
        to say (the profile's figure fits)."""
        if self.lowered:
            asked = (
                f"profile asks for {self.profile}"
                if self.profile
                else f"profile leaves them to the engine, which counts {self.cpus.cores} cores"
            )
            return logging.INFO, (
                f"threads: {asked}, this process may use {self.cpus.describe()}; "
                f"using {self.threads}"
            )
        if self.explicit is not None and self.oversubscribed:
            return logging.WARNING, (
                f"threads: {self.explicit} asked for explicitly, but this process may use "
                f"{self.cpus.describe()}; using {self.explicit}, which oversubscribes them"
            )
        return None

    def as_dict(self) -> dict[str, object]:
        """What ``Runtime.info`` adds to the backend's own facts (its ``threads``): the
        figures behind that count."""
        return {
            "profile_threads": self.profile,
            "explicit_threads": self.explicit,
            "usable_cpus": self.cpus.count,
            "usable_cpus_reason": self.cpus.reason,
        }


def choose_threads(
    engine: str,
    profile: int,
    explicit: int | None,
    cpus: UsableCpus,
    *,
    zero_counts_cores: bool,
) -> ThreadChoice:
    """The threads an engine gets: ``explicit`` if given, else the profile's figure capped
    at the usable CPUs.

    Args:
        engine: who gets the threads, for the log line.
        profile: the manifest's figure; 0 leaves the count to the engine.
        explicit: the caller's figure, used as given (0 = the engine's own choice).
        cpus: what ``usable_cpus`` found.
        zero_counts_cores: the engine's own choice counts the host's cores rather than the
            process's CPUs (ONNX Runtime, llama.cpp): on a restricted process, 0 becomes
            the usable count.
    """
    if explicit is not None:
        threads = explicit
    elif profile > 0:
        threads = min(profile, cpus.count)
    else:
        threads = cpus.count if zero_counts_cores and cpus.restricted else 0
    return ThreadChoice(engine, profile, explicit, threads, cpus)


def log_choice(choice: ThreadChoice, logger: logging.Logger = log) -> None:
    """Log ``choice``'s one line, if it has one."""
    message = choice.message()
    if message is not None:
        logger.log(*message)
