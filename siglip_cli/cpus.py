"""How many CPUs this process can keep busy, and PyTorch's threads fitted to them."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROCESS_CGROUPS = Path("/proc/self/cgroup")


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
    or unknown. cgroup v2 (`cpu.max`: "400000 100000" is 4 CPUs) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`).
    Inside a container the process's cgroup is the root of the mount (cgroup namespaces) or missing from it (older
    Docker mounts its own cgroup there): the quota is looked for along the path from the process's cgroup up."""
    try:
        lines = PROCESS_CGROUPS.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id, controllers, path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: one hierarchy, on /sys/fs/cgroup or, beside v1, on /sys/fs/cgroup/unified
            mounts, read = [CGROUP_ROOT, CGROUP_ROOT / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts, read = [CGROUP_ROOT / controllers, CGROUP_ROOT / "cpu"], _v1_quota
        else:
            continue
        parts = Path(path).parts[1:]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                quota = read(mount.joinpath(*parts[:depth]))
                if quota is not None:
                    quotas.append(quota)
    return min(quotas, default=None)


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


def fit_cpu_threads() -> None:
    """PyTorch's CPU threads, down to `usable_cpus()`: torch heeds the affinity but not a cgroup quota, and a forward
    on more threads than the quota pays for waits at every op's barrier for threads the quota keeps off the CPU."""
    import torch  # here, not above: the head start (`headstart`) counts the CPUs before torch is imported

    cpus = usable_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
