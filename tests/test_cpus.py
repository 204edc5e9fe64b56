"""The CPUs a run may use: affinity and cgroup quotas (containers), read from stand-in /proc and /sys files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siglip_cli import cpus


@pytest.fixture
def cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a stand-in /proc/self/cgroup and files under a stand-in /sys/fs/cgroup."""
    root = tmp_path / "sys-fs-cgroup"
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROCESS_CGROUPS", tmp_path / "proc-self-cgroup")

    def write(membership: str, files: dict[str, str]) -> None:
        (tmp_path / "proc-self-cgroup").write_text(membership)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)

    return write


def test_a_v2_quota_above_the_process_cgroup_counts(cgroups) -> None:
    # Kubernetes: the pod's cgroup has the limit, the container's own cgroup none.
    cgroups("0::/kubepods/pod1/c1\n", {"kubepods/pod1/cpu.max": "250000 100000\n",
                                       "kubepods/pod1/c1/cpu.max": "max 100000\n"})  # fmt: skip
    assert cpus.cgroup_cpu_quota() == 2.5


def test_the_smallest_quota_on_the_path_wins(cgroups) -> None:
    cgroups("0::/a/b\n", {"cpu.max": "max 100000", "a/cpu.max": "800000 100000", "a/b/cpu.max": "100000 100000"})
    assert cpus.cgroup_cpu_quota() == 1.0


def test_a_v1_quota_at_the_mount_root_counts_when_the_process_path_is_not_mounted(cgroups) -> None:
    # Older Docker on cgroup v1: /proc/self/cgroup names /docker/<id>, the container sees its own cgroup as the root.
    cgroups(
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert cpus.cgroup_cpu_quota() == 1.5


@pytest.mark.parametrize(
    "membership, files",
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}),
        ("0::/\n", {}),
        ("0::/\n", {"cpu.max": "garbled\n"}),
        ("garbled\n", {"cpu.max": "100000 100000\n"}),
    ],
)
def test_no_quota_when_unlimited_or_unreadable(cgroups, membership: str, files: dict[str, str]) -> None:
    cgroups(membership, files)
    assert cpus.cgroup_cpu_quota() is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 1.5)
    assert cpus.usable_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: None)
    assert cpus.usable_cpus() == 64
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 8.0)
    assert cpus.usable_cpus() == 1


def test_torch_threads_come_down_to_the_usable_cpus_never_up(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
        cpus.fit_cpu_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 4)
        cpus.fit_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_loading_a_model_for_the_cpu_fits_the_threads(tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from siglip_cli.runtime import load

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)  # a container's 1-CPU quota on a 2-core machine
        load(str(tiny_siglip), device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ memory

GB = 2**30


def test_a_v2_memory_limit_leaves_its_room_less_what_is_used_but_droppable_cache(cgroups) -> None:
    # `docker run --memory 4g`: /proc/meminfo inside shows the host's memory, and 15 workers were budgeted on it.
    cgroups("0::/\n", {"memory.max": f"{4 * GB}\n", "memory.current": f"{3 * GB}\n",
                       "memory.stat": f"anon {2 * GB}\nfile {GB}\nactive_file {GB // 4}\ninactive_file {GB // 2}\n"
                                      f"shmem {GB // 4}\n"})  # fmt: skip
    assert cpus.cgroup_memory_room() == GB + GB // 4 + GB // 2  # the page cache; shared memory (in `file`) is no room


def test_a_v1_memory_limit_above_the_process_cgroup_counts(cgroups) -> None:
    cgroups("4:memory:/slurm/job1/step0\n", {
        "memory/slurm/job1/memory.limit_in_bytes": f"{8 * GB}\n",
        "memory/slurm/job1/memory.usage_in_bytes": f"{2 * GB}\n",
        "memory/slurm/job1/memory.stat": f"cache {GB}\ntotal_active_file {GB // 2}\ntotal_inactive_file {GB // 2}\n",
        "memory/slurm/job1/step0/memory.limit_in_bytes": "9223372036854771712\n",  # unlimited
        "memory/slurm/job1/step0/memory.usage_in_bytes": f"{GB}\n",
    })  # fmt: skip
    assert cpus.cgroup_memory_room() == 7 * GB


@pytest.mark.parametrize(
    "membership, files",
    [
        ("0::/\n", {"memory.max": "max\n", "memory.current": "100\n"}),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                          "memory/memory.usage_in_bytes": "1\n"}),
        ("0::/\n", {"memory.max": "garbled\n", "memory.current": "100\n"}),
        ("0::/\n", {}),
    ],
)
def test_no_memory_room_when_unlimited_or_unreadable(cgroups, membership: str, files: dict[str, str]) -> None:
    cgroups(membership, files)
    assert cpus.cgroup_memory_room() is None


def test_the_decoding_workers_are_counted_on_the_containers_memory(
    cgroups, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import decoding, limits

    cgroups("0::/\n", {"memory.max": f"{4 * GB}\n", "memory.current": f"{GB}\n"})
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * GB // 1024} kB\nMemAvailable: {60 * GB // 1024} kB\n")
    monkeypatch.setattr(limits, "MEMINFO", tmp_path / "meminfo")  # the host's, as a container reads it
    assert limits.available_memory() == 3 * GB
    monkeypatch.setattr(decoding, "usable_cpus", lambda: 16)
    assert decoding.default_workers() == 3 * GB // decoding.WORKER_PEAK_BYTES == 2  # not 15


def test_the_cpu_clock_counts_only_the_cpus_this_process_may_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A container pinned to CPUs 0 and 2 of a busy host: the host's other CPUs are none of its business.
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 900 900 0 0 0 0 0 0\n"
        "cpu0 100 10 50 800 20 5 5 10 0 0\n"
        "cpu1 500 0 500 0 0 0 0 0 0 0\n"
        "cpu2 200 0 100 700 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    monkeypatch.setattr(cpus, "PROC_STAT", stat)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 2})
    clock = cpus.cpu_clock()
    tick = cpus.os.sysconf("SC_CLK_TCK")
    assert (clock.busy, clock.total) == ((180 + 300) / tick, (1000 + 1000) / tick)  # steal counts as busy


def test_others_share_is_what_other_processes_took_of_this_ones_cpus() -> None:
    start = cpus.CpuClock(busy=100.0, total=200.0, ours=1.0)
    assert cpus.others_share(start, cpus.CpuClock(busy=160.0, total=300.0, ours=11.0)) == pytest.approx(0.5)
    assert cpus.others_share(start, cpus.CpuClock(busy=110.0, total=300.0, ours=11.0)) == 0.0  # this process alone
    assert cpus.others_share(None, start) is None
