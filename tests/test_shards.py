"""Splitting a run into shards: `--shard K/N` and `--shard auto` parsed, and the split itself (pure functions).

Shard runs and `siglip merge` end to end are in test_long_runs.py.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from siglip_cli.errors import UserError
from siglip_cli.outputs import BLOCK_BYTES, GAP_BYTES, Ref, row_blocks
from siglip_cli.shards import parse_shard, select_shard, shard_of

NO_SCHEDULER: dict[str, str] = {}
PATHS = [f"photos/{year}/img_{i:04d}.jpg" for year in (2019, 2020, 2021) for i in range(300)]
PATHS.append(os.fsdecode(b"photos/caf\xe9.jpg"))  # a Latin-1 name: not valid UTF-8


def test_k_of_n_is_index_and_count() -> None:
    assert parse_shard("2/5", None, NO_SCHEDULER) == (2, 5)


def test_no_shard_means_the_whole_run() -> None:
    assert parse_shard(None, None, NO_SCHEDULER) is None


@pytest.mark.parametrize("spec", ["2", "a/b", "1/2/3", "", "3/3", "-1/4", "0/0", "1/-2"])
def test_malformed_or_out_of_range_shard_is_refused(spec: str) -> None:
    with pytest.raises(UserError, match="--shard"):
        parse_shard(spec, None, NO_SCHEDULER)


@pytest.mark.parametrize(("spec", "said"), [("0/0", "N, the number of shards, must be at least 1"),
                                            ("1/-2", "N, the number of shards, must be at least 1"),
                                            ("3/3", "K must be between 0 and N-1")])  # fmt: skip
def test_a_shard_out_of_range_names_what_is_wrong(spec: str, said: str) -> None:
    with pytest.raises(UserError, match=f"--shard {spec}: {said}."):
        parse_shard(spec, None, NO_SCHEDULER)


def test_num_shards_without_shard_auto_is_refused() -> None:
    with pytest.raises(UserError, match="--num-shards goes with --shard auto"):
        parse_shard(None, 4, NO_SCHEDULER)


def test_auto_counts_the_slurm_task_id_from_the_arrays_first_id() -> None:
    # `sbatch --array=5-7`: tasks 5, 6, 7.
    slurm = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("auto", None, slurm) == (1, 3)


def test_auto_follows_a_slurm_array_with_a_step() -> None:
    # `sbatch --array=0-14:2`: tasks 0, 2, …, 14.
    slurm = {
        "SLURM_ARRAY_TASK_ID": "4",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_COUNT": "8",
    }
    assert parse_shard("auto", None, slurm) == (2, 8)


def test_a_rerun_of_some_slurm_tasks_with_num_shards_redoes_their_parts() -> None:
    # `sbatch --array=3,5 job.sh` after tasks 3 and 5 of `--array=0-7` failed: counted from the array's first id
    # and with its task count, task 5 was part 1 of 2 (and task 3 part 0, everything again, of 1 under --array=3).
    rerun = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert parse_shard("auto", 8, rerun) == (5, 8)
    with pytest.raises(UserError, match=r"its task ids are taken as the parts they redo, and 8 is not below 8"):
        parse_shard("auto", 8, {**rerun, "SLURM_ARRAY_TASK_ID": "8"})


@pytest.mark.parametrize(
    "array, expected",
    [
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, (7, 8)),
        ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "8"}, (7, 8)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 8)),  # no task count said
    ],
    ids=["array-1-8", "array-0-14-step-2", "no-task-count"],
)
def test_a_whole_slurm_array_with_num_shards_counts_from_its_first_id(array: dict, expected: tuple) -> None:
    assert parse_shard("auto", 8, array) == expected


def test_a_slurm_array_larger_than_num_shards_is_refused() -> None:
    with pytest.raises(UserError, match="the Slurm array has 16 tasks but --num-shards says 8"):
        parse_shard("auto", 8, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16"})


def test_num_shards_that_contradicts_the_shard_is_refused() -> None:
    with pytest.raises(UserError, match="--shard 1/2 says 2 shards but --num-shards says 4"):
        parse_shard("1/2", 4)
    assert parse_shard("1/2", 2) == (1, 2)


def test_auto_takes_the_kubernetes_completion_index_and_num_shards() -> None:
    assert parse_shard("auto", 4, {"JOB_COMPLETION_INDEX": "3"}) == (3, 4)


def test_auto_on_kubernetes_without_num_shards_asks_for_it() -> None:
    with pytest.raises(UserError, match="--num-shards"):
        parse_shard("auto", None, {"JOB_COMPLETION_INDEX": "3"})


def test_auto_with_an_index_beyond_the_count_is_refused() -> None:
    with pytest.raises(UserError, match="not below the shard count"):
        parse_shard("auto", 4, {"JOB_COMPLETION_INDEX": "4"})


def test_auto_outside_a_scheduler_says_to_give_k_of_n() -> None:
    with pytest.raises(UserError, match="--shard K/N"):
        parse_shard("auto", None, NO_SCHEDULER)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_and_together_complete(count: int) -> None:
    parts = [select_shard(PATHS, k, count) for k in range(count)]
    assert sorted(path for part in parts for path in part) == sorted(PATHS)


def test_a_shard_keeps_the_order_of_the_paths_it_was_given() -> None:
    part = select_shard(PATHS, 1, 3)
    assert part == [path for path in PATHS if path in set(part)]


def test_a_files_shard_does_not_change_when_other_files_come_and_go() -> None:
    before = {path: shard_of(path, 4) for path in PATHS}
    now = [path for path in PATHS if "2019" not in path] + [f"photos/2022/img_{i:04d}.jpg" for i in range(300)]
    for k in range(4):
        assert all(before[path] == k for path in select_shard(now, k, 4) if path in before)


def test_shards_are_about_the_same_size() -> None:
    sizes = [len(select_shard(PATHS, k, 4)) for k in range(4)]
    assert min(sizes) > 0.8 * len(PATHS) / 4, sizes


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID is 'abc'"),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_STEP": "0", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_STEP is '0'"),
        ({"JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX is '-1'"),
    ],
)
def test_auto_with_a_variable_that_is_not_a_count_is_refused(environ: dict, named: str) -> None:
    # A ValueError and a ZeroDivisionError traceback before.
    with pytest.raises(UserError, match=re.escape(named)):
        parse_shard("auto", 4, environ)


class _CountedRows:
    """A row source over an array in memory that counts its reads and the rows each one spans."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.reads = rows, []

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        self.reads.append((start, stop))
        return self.rows[start:stop]

    def count(self, name: str) -> int:
        return len(self.rows)


def test_interleaved_sources_are_read_a_span_at_a_time_and_put_in_order() -> None:
    # A merge's parts interleave row by row (a path's hash picks its part): read run by run, 100,000 rows took
    # 75,000 reads, each an open of the part's file.
    parts = [_CountedRows(np.arange(i * 1000, i * 1000 + 400, dtype=np.float32).reshape(100, 4)) for i in range(3)]
    order = sorted(((part, index) for part in range(3) for index in range(100)), key=lambda p: (p[1] * 7 + p[0]) % 300)
    refs = [Ref(parts[part], index, {}) for part, index in order]
    got = np.concatenate(list(row_blocks(refs, "embeddings", row_bytes=16)))
    assert np.array_equal(got, np.stack([parts[part].rows[index] for part, index in order]))
    assert [part.reads for part in parts] == [[(0, 100)]] * 3
    # Rows far apart in one source are read apart, not with everything between them; a small block, in pieces.
    far = _CountedRows(np.zeros((1_000_000, 4), np.float32))
    near = GAP_BYTES // 16 + 1  # as far as a gap read through goes
    indices = [0, 1, 1 + near, 2 + 2 * near, 999_999]
    blocks = list(row_blocks([Ref(far, i, {}) for i in indices], "embeddings", row_bytes=16))
    assert far.reads == [(0, 2 + near), (2 + 2 * near, 3 + 2 * near), (999_999, 1_000_000)]
    assert [len(b) for b in blocks] == [5]
    far.reads.clear()
    blocks = list(row_blocks([Ref(far, i, {}) for i in range(10)], "embeddings", row_bytes=BLOCK_BYTES // 4))
    assert [len(b) for b in blocks] == [4, 4, 2] and far.reads == [(0, 4), (4, 8), (8, 10)]
