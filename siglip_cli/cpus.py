"""How many CPUs this process can keep busy, and PyTorch's threads fitted to them; how much memory its cgroup leaves
it (a container's limit); how much of its CPUs' time other processes took meanwhile (`others_share`)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROCESS_CGROUPS = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")


def usable_cpus() -> int:
    """The CPUs this process can keep busy: those its affinity allows (taskset, a cpuset), and no more than its
    cgroup's CPU quota (`docker run --cpus 4`, a Kubernetes CPU limit) pays for. `os.cpu_count()` counts the whole
    machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per second that this process's cgroup, or a cgroup above it, may use; None if unlimited
    or unknown. cgroup v2 (`cpu.max`: "400000 100000" is 4 CPUs) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    return min(_along_cgroups("cpu", _v2_quota, _v1_quota), default=None)


def cgroup_memory_room() -> int | None:
    """Bytes that this process's cgroup, or a cgroup above it, may still take before its out-of-memory killer acts
    (`docker run --memory 4g`, a Kubernetes memory limit, a Slurm job's): its limit less what it uses, the page cache
    it could drop not counted as used; None if unlimited or unknown. /proc/meminfo, read inside a container, is the
    host's."""
    return min(_along_cgroups("memory", _v2_memory_room, _v1_memory_room), default=None)


def _along_cgroups(
    controller: str, read_v2: Callable[[Path], T | None], read_v1: Callable[[Path], T | None]
) -> list[T]:
    """What `read_v2` (cgroup v2) or `read_v1` (v1's `controller` hierarchy) finds in the cgroup folders of this
    process and of every cgroup above it. Inside a container the process's cgroup is the root of the mount (cgroup
    namespaces) or missing from it (older Docker mounts its own cgroup there): a limit is looked for along the path
    from the process's cgroup up."""
    try:
        lines = PROCESS_CGROUPS.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id, controllers, path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: one hierarchy, on /sys/fs/cgroup or, beside v1, on /sys/fs/cgroup/unified
            mounts, read = [CGROUP_ROOT, CGROUP_ROOT / "unified"], read_v2
        elif controller in controllers.split(","):
            mounts, read = [CGROUP_ROOT / controllers, CGROUP_ROOT / controller], read_v1
        else:
            continue
        parts = Path(path).parts[1:]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                value = read(mount.joinpath(*parts[:depth]))
                if value is not None:
                    found.append(value)
    return found


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(quota) > 0 and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota, period = (int((folder / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
        return quota / period if quota > 0 and period > 0 else None  # -1: unlimited
    except (OSError, ValueError):
        return None


def _v2_memory_room(folder: Path) -> int | None:
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        return max(0, int(limit) - used + _memory_stat(folder, "active_file", "inactive_file"))
    except (OSError, ValueError):
        return None


def _v1_memory_room(folder: Path) -> int | None:
    try:
        limit = int((folder / "memory.limit_in_bytes").read_text())
        if limit >= 2**62:  # unlimited reads as 2**63 less a page: a limit this large is none
            return None
        used = int((folder / "memory.usage_in_bytes").read_text())
        return max(0, limit - used + _memory_stat(folder, "total_active_file", "total_inactive_file"))
    except (OSError, ValueError):
        return None


def _memory_stat(folder: Path, *keys: str) -> int:
    """The sum of counters of the cgroup's `memory.stat` (bytes), each 0 where it is missing: the room then counts
    short. The page cache (active and inactive file pages) is dropped before the out-of-memory killer acts, as
    MemAvailable counts it outside a container; tmpfs and shared memory are not in it."""
    try:
        stats = dict(line.split(" ", 1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        return sum(int(stats.get(key, 0)) for key in keys)
    except (OSError, ValueError):
        return 0


def fit_cpu_threads() -> None:
    """PyTorch's CPU threads, down to `usable_cpus()`: torch heeds the affinity but not a cgroup quota, and a forward
    on more threads than the quota pays for waits at every op's barrier for threads the quota keeps off the CPU."""
    import torch  # here, not above: the head start (`headstart`) counts the CPUs before torch is imported

    cpus = usable_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)


@dataclass(frozen=True)
class CpuClock:
    """Where the CPUs this process may run on stood at one moment (Linux's /proc/stat): the seconds they had been
    busy, a hypervisor's steal included, and in all; and this process's own CPU seconds, its finished children's
    (decoding workers) included."""

    busy: float
    total: float
    ours: float


def cpu_clock() -> CpuClock | None:
    """The clock now; None where the system does not keep one (no /proc/stat: macOS, Windows)."""
    try:
        lines = PROC_STAT.read_text().splitlines()
        allowed = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not re.fullmatch(r"cpu\d+", name) or int(name[3:]) not in allowed:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in [*fields, *"0" * 8][:8])
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
    if not total:
        return None
    tick, own = os.sysconf("SC_CLK_TCK"), os.times()
    return CpuClock(busy / tick, total / tick, own.user + own.system + own.children_user + own.children_system)


def others_share(start: CpuClock | None, end: CpuClock | None) -> float | None:
    """The share of the time of this process's CPUs between two clocks that went to other processes (or to a
    hypervisor's other guests): what a timing taken meanwhile lost to them. None where either clock is unknown."""
    if start is None or end is None or end.total <= start.total:
        return None
    others = (end.busy - start.busy) - (end.ours - start.ours)
    return min(1.0, max(0.0, others / (end.total - start.total)))
