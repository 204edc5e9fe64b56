"""What this process may use: the memory available to new work, and its resource limits (`ulimit`): the largest
file it may write, the memory it may map, the files it may hold open."""

from __future__ import annotations

import os

from .cpus import cgroup_memory_room

MEMINFO = "/proc/meminfo"


def available_memory() -> int | None:
    """Bytes of memory available to new work: Linux's MemAvailable, or less where this process's cgroup leaves it
    less (`cpus.cgroup_memory_room`: a container's limit, whose out-of-memory killer picks the largest process, the
    one holding the model); None where the system does not say."""
    available = []
    try:
        with open(MEMINFO) as f:
            available = [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if (room := cgroup_memory_room()) is not None:
        available.append(room)
    return min(available, default=None)


def file_size_limit() -> int | None:
    """The largest file this process may write, in bytes (`ulimit -f`); None where there is no limit."""
    return _limit("RLIMIT_FSIZE")


def address_space_limit() -> int | None:
    """The most memory this process may map, in bytes (`ulimit -v`); None where there is no limit."""
    return _limit("RLIMIT_AS")


def _limit(name: str) -> int | None:
    """A resource limit (`ulimit`) of this process: its soft value, or None where there is none (or no such limits:
    Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(getattr(resource, name))
    return None if soft == resource.RLIM_INFINITY else soft


def open_files_limit(wanted: int = 0) -> int | None:
    """This process's limit on open files (`ulimit -n`), first raised towards `wanted` where it is lower: the soft
    limit a shell sets (1,024 on Linux, 256 on macOS) may go up to the hard one without privileges, and the decoding
    workers inherit it. None where there is no limit, or no way to know (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def open_files_now() -> int:
    """Files this process has open now (Linux and macOS list them in a folder); 0 where that cannot be known."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing))
        except OSError:
            continue
    return 0


def raising_open_files() -> str:
    """How to allow more open files: the shell's `ulimit -n` up to the hard limit, which only root can raise."""
    try:
        import resource
    except ImportError:
        return "raise the limit on open files"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return "it is also the hard limit: raising it takes root, or `nofile` in /etc/security/limits.conf"
    return "raise it with `ulimit -n 4096`"
