"""Long runs that survive (issue 5): continuing after kill -9, Ctrl-C or SIGTERM, `--update`, shards and merge,
several devices, CUDA out of memory, and memory that does not grow with the number of images.

Interruptions are real where only a real process can tell (kill -9, signals, peak memory, worker processes): the
`siglip` command runs as a subprocess with `SIGLIP_FLUSH_SECONDS` small, so finished batches reach the work area
(`<output>.partial/`) often. Everything else runs in-process through typer's `CliRunner`, and an in-process
"Ctrl-C" is a progress display that raises `KeyboardInterrupt` after a few batches.

"Equals an uninterrupted run" is checked byte for byte on every output file. The thread count can change the last
bit of an embedding on CPU without anything being wrong, so every run here uses one thread. Which images share a
batch does not (the tower gives each image the same bits in any batch: test_model_parity checks that on its own);
still, runs whose batches are necessarily composed differently (`--update`, shards, several devices) use
`--batch-size 1`, so that what they check (rows kept, moved, merged) does not rest on it. A run continued after an
interruption keeps the batches of an uninterrupted one (the work area holds whole batches), so it is compared at a
larger batch size.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file
from typer.testing import Result

import siglip_cli.earlier_rows as earlier_rows_module
import siglip_cli.embed as embed_module
import siglip_cli.outputs as outputs_module
import siglip_cli.runtime as runtime_module
import siglip_cli.storage as storage_module
from conftest import (
    DEFAULT_REPO_ID, PICKLE_NAME, PREPROCESSOR_NAME, build_checkpoint, make_photo, ok, save_as_pickles, siglip,
    the_error,
)
from siglip_cli import interrupts, locks
from siglip_cli.reading import digest_of_file, file_digest
from siglip_cli.embed import EmbedOptions, Embedder, embed_to_file, load
from siglip_cli.errors import UserError
from siglip_cli.files import discover
from siglip_cli.outputs import OutputPaths
from siglip_cli.shards import merge_outputs, shard_of
from siglip_cli.text import no_note

SIGLIP = str(Path(sys.executable).with_name("siglip"))
R = TypeVar("R")
GOOD_PHOTOS = 160  # the subprocess runs' folder: these plus two broken files
BATCH = 4


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs compute like the subprocesses (OMP_NUM_THREADS=1), so their outputs compare byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ helpers


def summary_of(result: Result) -> dict:
    return json.loads(ok(result).stdout)


def companions(output: Path) -> dict[str, Path]:
    """Every file a finished run may leave, by role."""
    stem = output.with_suffix("")
    return {
        "embeddings": output,
        "manifest": output.with_suffix(".jsonl"),
        "errors": stem.with_name(stem.name + ".errors.jsonl"),
        "tokens": stem.with_name(stem.name + ".tokens.npy"),
        "meta": stem.with_name(stem.name + ".meta.json"),
    }


def differences(output: Path, expected: Path) -> list[str]:
    """The roles whose files differ between two finished runs (present in one only, or not byte-identical)."""
    ours, theirs = companions(output), companions(expected)
    return [
        role
        for role in ours
        if ours[role].exists() != theirs[role].exists()
        or (ours[role].exists() and not filecmp.cmp(ours[role], theirs[role], shallow=False))
    ]


def differences_from_a_fresh_run(embed, folder: Path, output: Path) -> list[str]:
    """`differences` between `output` and a fresh run over `folder` (one image a batch: reruns are byte-identical)."""
    fresh = output.parent / "fresh" / output.name
    ok(embed(folder, fresh, "--batch-size", 1))
    return differences(output, fresh)


def rows_of(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []


def work_area(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def chunks_in(work: Path) -> int:
    return sum(1 for p in work.glob("chunk-*")) if work.is_dir() else 0


def save_photos(folder: Path, names: list[str], size: tuple[int, int] = (48, 40), first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names, start=first_seed):
        make_photo(size, seed=seed).save(folder / name, quality=90)
    return folder


def with_a_part_of(folder: Path, part: tuple[int, int], files: int) -> Path:
    """`folder`, with photos added until `--shard K/N` takes at least `files` of them. A file's part is a hash of its
    path, and the path holds pytest's numbered folder: of twelve photos, part 0/2 takes two or fewer in one session
    in fifty."""
    k, n = part
    for seed in range(100, 200):
        if sum(shard_of(path, n) == k for path in discover([str(folder)])) >= files:
            return folder
        save_photos(folder, [f"x{seed}.jpg"], first_seed=seed)
    raise AssertionError(f"100 photos added, and part {k}/{n} takes fewer than {files}")  # a failure, not a hang


def touch(path: Path) -> None:
    """Move the file's mtime one second on, keeping its bytes."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))


class CtrlCAfter:
    """A progress display whose user presses Ctrl-C while batch number `batches` is reported."""

    def __init__(self, batches: int):
        self.left = batches

    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt

    def note(self, message: str) -> None:
        pass


class Notes:
    """A progress display that keeps the notes it is given."""

    def __init__(self):
        self.notes: list[str] = []

    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


# ------------------------------------------------------------------------------------------ in-process runs


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Twelve small photos, p00.jpg … p11.jpg."""
    return save_photos(tmp_path / "photos", [f"p{i:02d}.jpg" for i in range(12)])


@pytest.fixture
def embedder(tiny_vision: Path) -> Embedder:
    return load(str(tiny_vision), device="cpu")


@pytest.fixture
def embed(tiny_vision: Path):
    """`embed(folder, output, *args)` runs `siglip embed` in-process on the tiny tower, two images a batch."""

    def run(folder: Path, output: Path, *args: object) -> Result:
        return siglip("embed", folder, "-o", output, "--model", tiny_vision, "--workers", 0, "--batch-size", 2, *args)

    return run


def interrupt(embedder: Embedder, folder: Path, output: Path, *, batch_size: int = 2, batches: int = 4) -> Path:
    """Run with the options of `embed` (no arguments) and press Ctrl-C during batch number `batches`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(KeyboardInterrupt):
        options = EmbedOptions(batch_size=batch_size, workers=0)
        embed_to_file(embedder, discover([str(folder)]), output, options=options, progress=CtrlCAfter(batches))
    return output


@pytest.fixture
def interrupted(embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The output of a run stopped by Ctrl-C during its 4th batch, two images a batch; its output path."""
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 0.0)  # every finished batch reaches the work area
    return interrupt(embedder, folder, tmp_path / "out" / "embeddings.safetensors")


def test_a_stop_keeps_the_batches_finished_since_the_last_flush(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM 600 images into a run kept nothing but its state file when the flush interval had not come round.
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 1e9)
    output = interrupt(embedder, folder, tmp_path / "out" / "embeddings.safetensors")
    summary = summary_of(embed(folder, output, "--json"))
    assert (summary["embedded"], summary["reused"]) == (4, 8)  # batches 1-4 of 2 images each were finished
    ok(embed(folder, tmp_path / "whole.safetensors"))
    assert differences(output, tmp_path / "whole.safetensors") == []


def test_an_error_mid_run_keeps_the_batches_finished_before_it(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only Ctrl-C flushed them: a CUDA error, or a disk that filled up, cost every batch since the last flush.
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 1e9)
    forward, calls = Embedder.__call__, []

    def fails_at_the_fifth_batch(self: Embedder, pixels: torch.Tensor):
        calls.append(len(pixels))
        if len(calls) == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(self, pixels)

    output = tmp_path / "out" / "embeddings.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(Embedder, "__call__", fails_at_the_fifth_batch)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            embed_to_file(embedder, discover([str(folder)]), output, options=EmbedOptions(batch_size=2, workers=0))
    summary = summary_of(embed(folder, output, "--json"))
    assert (summary["embedded"], summary["reused"]) == (4, 8)


@pytest.mark.parametrize("api", ["embed_to_file", "embed_paths"])
def test_an_error_in_the_model_stops_the_decoding_workers_at_once(
    embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    # The workers lived on as long as the error's traceback (in a notebook, `sys.last_traceback`: for ever).
    import multiprocessing

    forward, calls = Embedder.__call__, []

    def fails_at_the_second_batch(self: Embedder, pixels: torch.Tensor):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(self, pixels)

    monkeypatch.setattr(Embedder, "__call__", fails_at_the_second_batch)
    with pytest.raises(RuntimeError) as failure:  # holds the traceback, and so every frame it passed through
        if api == "embed_to_file":
            options = EmbedOptions(batch_size=2, workers=2)
            embed_to_file(embedder, discover([str(folder)]), tmp_path / "out" / "e.safetensors", options=options)
        else:
            embed_module.embed_paths(embedder, [folder], batch_size=2, workers=2)
    assert failure.traceback and multiprocessing.active_children() == []


def test_a_batch_that_fails_on_its_way_into_the_buffer_is_not_kept_in_part(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of memory converting a batch's tokens, after its rows and embeddings had joined the buffer: the flush
    # wrote 6 rows beside 4 tokens, and every rerun ended in a traceback.
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 1e9)

    class OutOfMemory:
        def astype(self, dtype):
            raise MemoryError

    batches = embed_module.embedded_batches

    def third_batch_fails(*args, **kwargs):
        for i, done in enumerate(batches(*args, **kwargs)):
            yield done._replace(tokens=OutOfMemory()) if i == 2 else done

    output = tmp_path / "out" / "embeddings.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(embed_module, "embedded_batches", third_batch_fails)
        with pytest.raises(MemoryError):
            options = EmbedOptions(batch_size=2, workers=0, tokens=True)
            embed_to_file(embedder, discover([str(folder)]), output, options=options)
    summary = summary_of(embed(folder, output, "--tokens", "--json"))
    assert (summary["embedded"], summary["reused"]) == (8, 4)  # the two whole batches
    ok(embed(folder, tmp_path / "whole.safetensors", "--tokens"))
    assert differences(output, tmp_path / "whole.safetensors") == []


def test_an_interrupted_run_leaves_no_output_only_its_work_area(interrupted: Path) -> None:
    assert [p.name for p in interrupted.parent.iterdir()] == [work_area(interrupted).name]


def test_continuing_embeds_only_the_images_not_yet_done(
    embed, interrupted: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images_seen = []
    forward = Embedder.__call__

    def counting(self: Embedder, pixels: torch.Tensor):
        images_seen.append(len(pixels))
        return forward(self, pixels)

    monkeypatch.setattr(Embedder, "__call__", counting)
    result = embed(folder, interrupted, "--json")
    summary = summary_of(result)
    assert summary["reused"] > 0 and summary["embedded"] > 0
    assert summary["embedded"] + summary["reused"] == 12
    assert sum(images_seen) == summary["embedded"]
    said = f"note: continuing the interrupted run in {work_area(interrupted)}: {summary['reused']} of 12 files done."
    assert said in result.stderr


def test_a_damaged_chunk_is_dropped_with_a_note_and_its_images_embedded_again(
    embed, interrupted: Path, folder: Path
) -> None:
    # A chunk cut short (a disk error) stopped every rerun in a traceback, --overwrite's too.
    chunks = sorted(work_area(interrupted).glob("chunk-*.safetensors"))
    assert len(chunks) >= 2
    chunks[0].write_bytes(b"")  # the first: the chunks after it keep their numbers, and the rerun writes new ones
    result = embed(folder, interrupted, "--json")
    assert result.exit_code == 0, result.stderr
    assert f"note: 1 chunk of the interrupted run in {work_area(interrupted)} could not be read" in result.stderr
    summary = summary_of(result)
    assert summary["embedded"] > 0 and summary["embedded"] + summary["reused"] == 12
    assert differences_from_a_fresh_run(embed, folder, interrupted) == []


def test_rows_read_from_a_safetensors_file_are_what_safetensors_reads(tmp_path: Path) -> None:
    # The header is parsed once and each read takes its bytes at their offset: every slice as safe_open gives it.
    rng = np.random.default_rng(0)
    tensors = {"embeddings": rng.standard_normal((7, 4)).astype(np.float32),
               "tokens": rng.standard_normal((7, 3, 4)).astype(np.float16)}  # fmt: skip
    path = tmp_path / "chunk.safetensors"
    specs = {name: storage_module.TensorSpec(a.dtype, a.shape, [a[:2], a[2:]]) for name, a in tensors.items()}
    storage_module.write_safetensors(path, specs, {"rows": json.dumps([{"path": "x" * 100}] * 7)})
    reader = storage_module.SafetensorsRows(path)
    assert (reader.count("embeddings"), reader.count("tokens"), reader.count("pooled")) == (7, 7, 0)
    with safe_open(path, framework="np") as f:
        for name in tensors:
            for start in range(7):
                for stop in range(start, 8):
                    got, expected = reader.read(name, start, stop), f.get_slice(name)[start:stop]
                    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    with pytest.raises(ValueError, match="holds no tensor 'pooled'"):
        reader.read("pooled", 0, 1)
    with pytest.raises(ValueError, match="holds 7 rows of tokens, not rows 6 to 8"):  # a manifest of more rows
        reader.read("tokens", 6, 8)
    path.write_bytes(path.read_bytes()[:-8])  # cut short after the header was read
    with pytest.raises(ValueError):
        reader.read("tokens", 0, 7)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="open files are listed in /proc")
def test_an_npy_reader_holds_no_file_open(tmp_path: Path) -> None:
    # `siglip merge` holds a reader of every part: a file held open by each went past `ulimit -n` (1,024 on Linux,
    # 256 on macOS) at a few hundred parts, refused as "cannot read pNNN.npy back".
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(6, 2))
    before = len(os.listdir("/proc/self/fd"))
    reader = storage_module.NpyRows({"embeddings": path})
    assert reader.count("embeddings") == 6
    assert np.array_equal(reader.read("embeddings", 2, 4), [[4, 5], [6, 7]])
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_work_folder_whose_state_is_damaged_is_refused_and_overwrite_starts_afresh(
    embed, interrupted: Path, folder: Path
) -> None:
    (work_area(interrupted) / "state.json").write_bytes(b"")
    assert the_error(embed(folder, interrupted)) == (
        f"error: {work_area(interrupted)} holds an interrupted run whose record of its options (state.json) cannot "
        "be read: add --overwrite to start afresh."
    )
    assert summary_of(embed(folder, interrupted, "--overwrite", "--json"))["embedded"] == 12


def test_an_update_after_a_run_interrupted_with_other_options_is_told_what_it_can_do(
    embed, interrupted: Path, folder: Path
) -> None:
    # It was told to add --overwrite, which --update then refused.
    assert the_error(embed(folder, interrupted, "--update", "--tokens")) == (
        f"error: {work_area(interrupted)} holds an interrupted run whose options differ (--tokens): rerun with the "
        f"same options to continue, or delete {work_area(interrupted)} to drop it."
    )


def closed_to_this_user(work: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`work`, which `os.access` now says this user may not write in (as root, whom no mode stops, it may)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.fspath(path) != str(work) and access(path, mode))
    return work


def test_a_work_area_another_user_left_is_refused_before_any_work(
    embed, interrupted: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sudo siglip embed`, interrupted, then the same command without sudo: it continued root's work area, embedded
    # every file again, then could not write its chunks; so did every rerun, and --overwrite could not remove it.
    work = closed_to_this_user(work_area(interrupted), monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: work.stat().st_uid + 1)  # not its owner
    embedded: list[tuple] = []
    monkeypatch.setattr(embed_module, "_embed_pending", lambda *args, **kwargs: embedded.append(args) or {})
    for more in ([], ["--overwrite"], ["--overwrite", "--tokens"]):
        error = the_error(embed(folder, interrupted, *more))
        assert error.startswith(f"error: {work} holds the work of a run by another user (")
        assert error.endswith("which this user cannot write in: remove it as that user, or choose another -o.")
    assert not embedded


def test_a_work_area_of_ours_made_read_only_is_refused_before_any_work(
    embed, interrupted: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `chmod 555` on one's own work area (the system's refusal stood in for, as above): said now, not after the work.
    work = closed_to_this_user(work_area(interrupted), monkeypatch)
    monkeypatch.setattr(embed_module, "_embed_pending", lambda *args, **kwargs: pytest.fail("embedded"))
    assert the_error(embed(folder, interrupted)) == f"error: cannot write in {work}: give this user write access to it."


def test_a_file_where_the_work_area_goes_is_named_in_the_way(embed, folder: Path, tmp_path: Path) -> None:
    # It was told to give this user write access, as root too.
    out = tmp_path / "out" / "e.safetensors"
    out.parent.mkdir()
    work_area(out).write_text("a file of the user's")
    for more in ([], ["--overwrite"]):
        assert the_error(embed(folder, out, *more)) == (
            f"error: {work_area(out)} is in the way of this run's work folder: it is not a folder, so not siglip's; "
            "move it away, or choose another -o."
        )
    assert work_area(out).read_text() == "a file of the user's"


def test_an_update_after_a_run_whose_state_is_damaged_is_told_what_it_can_do(
    embed, interrupted: Path, folder: Path
) -> None:
    # "add --overwrite", which --update refuses.
    (work_area(interrupted) / "state.json").write_bytes(b"")
    assert the_error(embed(folder, interrupted, "--update")).endswith(f"delete {work_area(interrupted)} to drop it.")


def test_only_the_chunks_a_run_writes_are_read_back(embed, interrupted: Path, folder: Path) -> None:
    # A sync tool's copy beside a chunk (chunk-00000000.sync-conflict-….safetensors) stopped the rerun in a traceback.
    first = sorted(work_area(interrupted).glob("chunk-*.safetensors"))[0]
    shutil.copy(first, first.with_name("chunk-00000000.sync-conflict-20261129.safetensors"))
    ok(embed(folder, interrupted))
    assert differences_from_a_fresh_run(embed, folder, interrupted) == []


def test_a_sync_tools_copy_alone_is_no_finished_work(tmp_path: Path) -> None:
    # "finished work is kept in ..." was said of a work area holding only such a copy, which no rerun reads.
    out = OutputPaths.for_output(tmp_path / "e.safetensors")
    out.work.mkdir()
    (out.work / "chunk-00000000.sync-conflict-20261129.safetensors").write_bytes(b"")
    assert not out.work_kept()
    (out.work / "chunk-00000000.safetensors").write_bytes(b"")
    assert out.work_kept()


def test_a_chunk_the_system_cannot_read_is_a_sentence_and_is_kept(
    embed, interrupted: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(path: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(storage_module, "_read_chunk", unreadable)
    chunks = sorted(work_area(interrupted).glob("chunk-*.safetensors"))
    assert the_error(embed(folder, interrupted)) == f"error: cannot read {chunks[0]}: Permission denied."
    assert sorted(work_area(interrupted).glob("chunk-*.safetensors")) == chunks


@pytest.mark.parametrize("devices", [[], ["--device", "cpu,cpu"]], ids=["one-device", "several-devices"])
def test_a_bad_flush_interval_is_one_sentence(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: list[str]
) -> None:
    monkeypatch.setenv("SIGLIP_FLUSH_SECONDS", "5s")
    assert the_error(embed(folder, tmp_path / "out.safetensors", *devices)) == (
        "error: SIGLIP_FLUSH_SECONDS is '5s', not a number of seconds (such as 5 or 0.5)."
    )
    assert list(tmp_path.glob("out.*")) == []  # several devices: refused before a work folder, not by each worker


@pytest.mark.parametrize("line", ['{"width": 1}', "[1, 2]", '{"path": 7}'], ids=["no-path", "no-object", "no-name"])
def test_an_update_of_an_output_whose_manifest_is_damaged_is_one_sentence(
    embed, folder: Path, tmp_path: Path, line: str
) -> None:
    output = tmp_path / "out.safetensors"
    ok(embed(folder, output))
    manifest = output.with_suffix(".jsonl")
    manifest.write_text("\n".join([line, *manifest.read_text().splitlines()[1:]]) + "\n")
    error = the_error(embed(folder, output, "--update"))
    assert error.startswith(f"error: cannot read {output} back as a siglip output ({manifest}: ") and "\n" not in error


@pytest.mark.parametrize(
    "code, remedy",
    [(errno.EMFILE, "raise the limit of open files (ulimit -n), and rerun."),
     (errno.EACCES, "give this user read access to the output's files, and rerun.")],  # fmt: skip
)
def test_an_output_that_cannot_be_read_for_want_of_a_file_or_a_permission_is_not_to_be_embedded_again(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, remedy: str
) -> None:
    output = tmp_path / "out.safetensors"
    ok(embed(folder, output))
    manifest = output.with_suffix(".jsonl")
    read = storage_module.read_jsonl

    def refused(path: Path) -> list[dict]:
        if path == manifest:
            raise OSError(code, os.strerror(code), str(path))
        return read(path)

    monkeypatch.setattr(outputs_module, "read_jsonl", refused)
    error = the_error(embed(folder, output, "--update"))
    assert error == f"error: cannot read {output} back ({manifest}: {os.strerror(code)}): {remedy}"


def test_a_stop_whose_last_save_fails_says_what_was_lost_and_raises_why_it_stopped(
    embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The save of the last batches on the way out failed in silence: the run then said its finished work was kept.
    class Stopped(CtrlCAfter):
        def __init__(self):
            super().__init__(batches=2)
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    def full_disk(self, work, seq):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 1e9)
    monkeypatch.setattr(embed_module._ChunkBuffer, "flush", full_disk)
    progress = Stopped()
    with pytest.raises(KeyboardInterrupt):
        embed_to_file(embedder, discover([str(folder)]), tmp_path / "out.safetensors",
                      options=EmbedOptions(batch_size=2, workers=0), progress=progress)  # fmt: skip
    assert progress.notes == [
        "the batches embedded in the last few seconds could not be saved ([Errno 28] No space left on device)."
    ]


def test_continuing_gives_the_uninterrupted_output(embed, interrupted: Path, folder: Path, tmp_path: Path) -> None:
    ok(embed(folder, interrupted))
    ok(embed(folder, tmp_path / "uninterrupted.safetensors"))
    assert differences(interrupted, tmp_path / "uninterrupted.safetensors") == []
    assert not work_area(interrupted).exists()


def test_a_file_changed_since_the_interruption_is_embedded_again(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 0.0)
    output = interrupt(embedder, folder, tmp_path / "out" / "embeddings.safetensors", batch_size=1, batches=6)
    make_photo((48, 40), seed=300).save(folder / "p00.jpg", quality=90)  # done before the interruption
    touch(folder / "p00.jpg")  # a new mtime, whatever the clock's resolution
    ok(embed(folder, output, "--batch-size", 1))
    assert differences_from_a_fresh_run(embed, folder, output) == []


class Killed(BaseException):
    """Stands for kill -9 in-process: no `except Exception` stops it, and nothing after it runs."""


def killed_once_in_place(embedder: Embedder, inputs: Path, output: Path) -> None:
    """Run (the options of `embed`) from `inputs` into `output`, killed once its output is in place, before it
    removed its work folder."""
    assemble = embed_module.assemble

    def killed_after(*args, **kwargs) -> None:
        assemble(*args, **kwargs)
        raise Killed

    output.parent.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as during_the_kill:
        during_the_kill.setattr(embed_module, "assemble", killed_after)
        with pytest.raises(Killed):
            embed_to_file(embedder, discover([str(inputs)]), output, options=EmbedOptions(batch_size=2, workers=0))


def killed_at_the_rename_to(
    name: Path, embedder: Embedder, inputs: Path, output: Path, *, update: bool = False
) -> None:
    """Run (the options of `embed`) from `inputs` into `output`, killed as it is about to rename a file to `name`."""
    replace = os.replace

    def killed(src, dst) -> None:
        if Path(dst) == name:
            raise Killed
        replace(src, dst)

    output.parent.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as during_the_kill:
        during_the_kill.setattr(os, "replace", killed)
        with pytest.raises(Killed):
            options = EmbedOptions(batch_size=2, workers=0)
            embed_to_file(embedder, discover([str(inputs)]), output, options=options, update=update)


def test_a_run_killed_while_assembling_leaves_no_embeddings_file_and_the_rerun_finishes_it(
    embed, embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    killed_at_the_rename_to(output, embedder, folder, output)
    assert output.with_suffix(".jsonl").exists() and not output.exists()  # the manifest goes first

    summary = summary_of(embed(folder, output, "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12)
    ok(embed(folder, tmp_path / "uninterrupted.safetensors"))
    assert differences(output, tmp_path / "uninterrupted.safetensors") == []


@pytest.mark.parametrize("suffix", [".jsonl", ".safetensors"], ids=["the-first-rename", "the-last-rename"])
def test_an_update_killed_between_its_renames_keeps_every_earlier_row_when_rerun(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, suffix: str
) -> None:
    # The rerun trusted neither the earlier output nor the new files, and kept only the rows of this run's inputs:
    # `--update new/` lost the rows of every other photo in the output.
    output, new = an_update_killed_at_the_rename_to(suffix, embed, embedder, folder, tmp_path)
    summary = summary_of(embed(new, output, "--update", "--json"))
    assert (summary["embedded"], summary["removed"]) == (0, 0) and not work_area(output).exists()
    assert differences(output, uninterrupted_update(embed, folder, new, tmp_path)) == []


def an_update_killed_at_the_rename_to(suffix: str, embed, embedder: Embedder, folder: Path, tmp_path: Path):
    """An output of `folder`, and an --update of it from a folder of two new photos killed as it was about to
    rename a file to the output's name with `suffix`: (the output, the new folder)."""
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    new = save_photos(tmp_path / "new", ["n0.jpg", "n1.jpg"], first_seed=100)
    killed_at_the_rename_to(output.with_suffix(suffix), embedder, new, output, update=True)
    return output, new


def uninterrupted_update(embed, folder: Path, new: Path, tmp_path: Path) -> Path:
    """What `an_update_killed_at_the_rename_to` would have made, uninterrupted."""
    expected = tmp_path / "uninterrupted" / "embeddings.safetensors"
    ok(embed(folder, expected))
    ok(embed(new, expected, "--update"))
    return expected


@pytest.mark.parametrize("suffix", [".jsonl", ".safetensors"], ids=["before-any-rename", "after-the-manifest"])
def test_an_update_killed_between_its_renames_whose_new_files_are_gone_keeps_or_refuses_but_never_drops_rows(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, suffix: str
) -> None:
    # The rerun rebuilt the output from its chunks alone: the rows of every file the --update was not given went,
    # with "removed": 0.
    output, new = an_update_killed_at_the_rename_to(suffix, embed, embedder, folder, tmp_path)
    for temporary in output.parent.glob(".*.tmp"):  # cleaned away by hand: the renames cannot be finished
        temporary.unlink()
    if suffix == ".jsonl":  # nothing replaced yet: the earlier output is whole, and read
        ok(embed(new, output, "--update"))
        assert differences(output, uninterrupted_update(embed, folder, new, tmp_path)) == []
    else:  # a new manifest beside the old embeddings
        assert the_error(embed(new, output, "--update")) == (
            f"error: {output} was being replaced when a run stopped, and the files replacing it are gone: its rows "
            "cannot be trusted; embed all its inputs again, with --overwrite."
        )


def test_a_manifest_not_written_with_the_embeddings_is_refused_even_with_as_many_rows(
    embed, embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    # An --update killed between its renames, its work folder then removed by hand: the new manifest sat beside the
    # old embeddings, rows as many, and the next --update kept two swapped photos' vectors under each other's path.
    # (A .npy has no header of its own to say so: its .meta.json is renamed with the manifest, before it.)
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    first, second = sorted(folder.glob("*.jpg"))[:2]
    swapped = second.read_bytes(), first.read_bytes()
    first.write_bytes(swapped[0]), second.write_bytes(swapped[1])
    killed_at_the_rename_to(output, embedder, folder, output, update=True)  # the manifest renamed, the embeddings not
    shutil.rmtree(work_area(output))
    manifest = output.with_suffix(".jsonl")
    assert the_error(embed(folder, output, "--update")) == (
        f"error: {manifest} is not the manifest {output} was written with: they are not from one run (or the manifest "
        f"was edited), so {output} must be embedded again (siglip embed ... --overwrite)."
    )
    ok(embed(folder, output, "--overwrite"))
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_a_run_with_other_options_after_one_killed_after_its_renames_is_told_the_output_exists(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was told to "rerun --update with the same options", though it ran no --update.
    output = tmp_path / "out" / "embeddings.safetensors"
    killed_once_in_place(embedder, folder, output)
    assert output.exists() and work_area(output).exists()
    assert the_error(embed(folder, output, "--tokens")).startswith(f"error: {output} already exists: add --overwrite")


def test_a_run_killed_between_its_renames_whose_new_files_are_gone_is_finished_from_its_chunks(
    embed, embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    killed_at_the_rename_to(output, embedder, folder, output)
    for temporary in output.parent.glob(".*.tmp"):  # cleaned away by hand: the mark's steps cannot be finished
        temporary.unlink()
    summary = summary_of(embed(folder, output, "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12)
    assert differences_from_a_fresh_run(embed, folder, output) == []


@pytest.mark.parametrize(
    "left", [None, ["assembling", "chunks"], ["assembling"]], ids=["whole-folder", "mark-and-chunks", "mark-alone"]
)
def test_a_run_killed_after_its_last_rename_ends_when_rerun(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: list[str] | None
) -> None:
    # The output was whole, but its work folder was left (whole, or part-removed, state.json gone), and the rerun
    # refused: "already exists: add --overwrite"; the folder, gigabytes of chunks, stayed.
    output = tmp_path / "out" / "embeddings.safetensors"
    killed_once_in_place(embedder, folder, output)
    work = work_area(output)
    assert output.exists() and work.exists()
    for path in work.iterdir() if left else []:  # what a kill part-way through the removal leaves
        if not (path.name == "assembling" or ("chunks" in left and path.name.startswith("chunk-"))):
            path.unlink()
    summary = summary_of(embed(folder, output, "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12) and not work.exists()
    ok(embed(folder, tmp_path / "uninterrupted.safetensors"))
    assert differences(output, tmp_path / "uninterrupted.safetensors") == []


@pytest.mark.parametrize(
    "when, devices",
    [
        ("removing-the-work-folder", []),
        ("printing-the-summary", []),
        ("removing-the-work-folder", ["--device", "cpu,cpu"]),
    ],
    ids=["removing-the-work-folder", "printing-the-summary", "several-devices"],
)
def test_ctrl_c_once_the_output_is_in_place_is_no_interruption(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, devices: list[str]
) -> None:
    # It exited 130, "interrupted: rerun the same command", and the rerun said "already exists".
    import siglip_cli.cli as cli_module

    output = tmp_path / "out" / "embeddings.safetensors"

    def ctrl_c_during(function):
        def with_ctrl_c(*args, **kwargs):
            if output.exists():  # the run's own earlier calls (making its work folder) are not this case
                os.kill(os.getpid(), signal.SIGINT)
            return function(*args, **kwargs)

        return with_ctrl_c

    with monkeypatch.context() as ctrl_c:
        if when == "removing-the-work-folder":
            ctrl_c.setattr(storage_module.WorkArea, "remove", ctrl_c_during(storage_module.WorkArea.remove))
        else:
            ctrl_c.setattr(cli_module, "_summary_line", ctrl_c_during(cli_module._summary_line))
        result = embed(folder, output, *devices)
    assert result.exit_code == 0 and "interrupted" not in result.stderr, result.stderr
    assert not work_area(output).exists()
    ok(embed(folder, tmp_path / "uninterrupted.safetensors"))
    assert differences(output, tmp_path / "uninterrupted.safetensors") == []


def test_a_second_run_under_the_same_signal_handling_can_still_be_stopped(
    embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    # The first run's finished output let stop signals go for the rest of the block: a script embedding two folders
    # could not be stopped during the second.
    paths, options = discover([str(folder)]), EmbedOptions(batch_size=2, workers=0)

    class SignalAfter(CtrlCAfter):  # a real SIGINT, as a terminal sends it, not a raised KeyboardInterrupt
        def advance(self, n: int) -> None:
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), signal.SIGINT)

    with interrupts.stop_on_signals():
        embed_to_file(embedder, paths, tmp_path / "first.safetensors", options=options)
        with pytest.raises(KeyboardInterrupt):
            embed_to_file(embedder, paths, tmp_path / "second.safetensors", options=options, progress=SignalAfter(2))
    assert not (tmp_path / "second.safetensors").exists() and work_area(tmp_path / "second.safetensors").exists()


def test_a_final_file_that_cannot_be_removed_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "cannot write embeddings.errors.jsonl": of a file the run was removing (its earlier errors, none now).
    stale = tmp_path / "embeddings.errors.jsonl"
    stale.write_text("{}\n")

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(Path, "unlink", refused)
    said = rf"^cannot remove {re.escape(str(stale))}: Operation not permitted\.$"
    with pytest.raises(storage_module.WriteError, match=said):
        storage_module.take_their_names([(stale, None)])


def test_the_work_folder_loses_its_assembling_mark_last(tmp_path: Path) -> None:
    from siglip_cli.storage import WorkArea

    work = WorkArea(tmp_path / "out.safetensors.partial")
    work.create({"options": 1})
    for name in ("assembling", "chunk-00000000.safetensors", "zz"):
        (work.directory / name).write_bytes(b"x")
    (work.directory / "shard-0-of-2.safetensors.partial").mkdir()
    removed = []
    unlink = Path.unlink

    def watched(self: Path, missing_ok: bool = False) -> None:
        removed.append(self.name)
        unlink(self, missing_ok=missing_ok)

    with pytest.MonkeyPatch.context() as watching:
        watching.setattr(Path, "unlink", watched)
        work.remove()
    assert removed[-1] == "assembling" and len(removed) == 4 and not work.directory.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_a_full_disk_while_an_update_writes_its_files_leaves_the_earlier_output_whole(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    # The new manifest was put in place before the embeddings failed to fit: readers paired 16 names with 12 old
    # rows, and the rerun, unable to trust the earlier output, embedded everything again.
    output = tmp_path / "out" / f"embeddings{suffix}"
    ok(embed(folder, output, "--tokens"))
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    save_photos(folder, [f"a{i:02d}.jpg" for i in range(4)], first_seed=100)
    writer = "write_npy" if suffix == ".npy" else "write_safetensors"
    write = getattr(outputs_module, writer)

    def full_disk(path: Path, *args, **kwargs) -> None:
        if path == output:
            raise storage_module.WriteError(f"cannot write {path}: No space left on device.")
        write(path, *args, **kwargs)

    with monkeypatch.context() as disk:
        disk.setattr(outputs_module, writer, full_disk)
        assert "No space left on device" in the_error(embed(folder, output, "--tokens", "--update"))
    assert {p.name: p.read_bytes() for p in output.parent.iterdir() if p.is_file()} == before
    summary = summary_of(embed(folder, output, "--tokens", "--update", "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 16)  # the 4 new ones from the work folder, 12 from before


def test_a_full_disk_at_the_assembling_mark_leaves_no_temporaries_and_the_earlier_output(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    save_photos(folder, ["a00.jpg"], first_seed=100)

    def full_disk(self, steps) -> None:
        raise storage_module.WriteError("cannot write the mark: No space left on device.")

    monkeypatch.setattr(storage_module.WorkArea, "mark_assembling", full_disk)
    assert "No space left on device" in the_error(embed(folder, output, "--update"))
    assert {p.name: p.read_bytes() for p in output.parent.iterdir() if p.is_file()} == before  # no .tmp either


@pytest.fixture
def disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync ("fsync", real path) and rename ("replace", real source, real destination), in order."""
    events: list[tuple[str, ...]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))

    def recording_replace(src, dst) -> None:
        replace(src, dst)
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_every_chunk_is_on_disk_before_and_after_it_gets_its_name(
    embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk_events: list
) -> None:
    """What survives a power cut: a chunk's bytes are fsynced before its rename, the folder's entry after it."""
    events = disk_events
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 0.0)
    output = interrupt(embedder, folder, tmp_path / "out" / "embeddings.safetensors")
    work = os.path.realpath(work_area(output))
    moves = [i for i, event in enumerate(events) if event[0] == "replace" and Path(event[2]).name.startswith("chunk-")]
    assert moves, "no chunk was written"
    for i, end in zip(moves, moves[1:] + [len(events)]):
        _, src, dst = events[i]
        assert Path(dst).parent == Path(work)
        assert ("fsync", src) in events[:i], f"{dst} was renamed before its bytes were fsynced"
        assert ("fsync", work) in events[i + 1 : end], f"{dst}'s folder entry was not fsynced"


@pytest.mark.parametrize("new_weights", [False, True], ids=["same-weights", "new-weights"])
def test_a_revision_moved_since_the_interruption_continues_only_with_the_same_weights(
    folder: Path, tmp_path: Path, tiny_vision: Path, hf_cache, monkeypatch: pytest.MonkeyPatch, new_weights: bool
) -> None:
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 0.0)
    hf_cache(tiny_vision, revision_hash="1" * 40)
    output = interrupt(load(DEFAULT_REPO_ID, device="cpu"), folder, tmp_path / "out" / "embeddings.safetensors")
    # A new commit on main (its README edited, or the weights retrained), then the same command again.
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "next-commit"))
    if new_weights:
        saved_over(checkpoint)
    hf_cache(checkpoint, revision_hash="2" * 40)
    result = siglip("embed", folder, "-o", output, "--model", DEFAULT_REPO_ID, "--workers", 0, "--batch-size", 2)
    if new_weights:
        error = the_error(result)
        assert "differ (--revision)" in error and "--overwrite" in error
    else:
        assert "embedded 4, reused 8" in ok(result).stderr


@pytest.mark.parametrize(
    "changed, named",
    [
        (["--no-normalize"], "--normalize/--no-normalize"),
        (["--dtype", "bfloat16"], "--dtype"),
        (["--output-dtype", "float16"], "--output-dtype"),
        (["--tokens"], "--tokens"),
        (["--no-exif-transpose"], "preprocessing"),
        (["--fast-decode"], "preprocessing"),
    ],
)
def test_continuing_with_changed_options_is_refused(
    embed, interrupted: Path, folder: Path, changed: list[str], named: str
) -> None:
    error = the_error(embed(folder, interrupted, *changed))
    assert "differ" in error and named in error and "--overwrite" in error
    assert summary_of(embed(folder, interrupted, "--json"))["reused"] > 0, "the refusal discarded the finished work"


def test_continuing_with_another_model_is_refused(interrupted: Path, folder: Path, tiny_siglip: Path) -> None:
    result = siglip("embed", folder, "-o", interrupted, "--model", tiny_siglip, "--workers", 0, "--batch-size", 2)
    error = the_error(result)
    assert "--model" in error and "--overwrite" in error


def test_overwrite_discards_interrupted_work_with_other_options(embed, interrupted: Path, folder: Path) -> None:
    summary = summary_of(embed(folder, interrupted, "--overwrite", "--no-normalize", "--json"))
    assert (summary["embedded"], summary["reused"]) == (12, 0)


def test_an_interrupted_overwrite_continues_when_its_command_is_rerun(
    embed, interrupted: Path, folder: Path, tmp_path: Path
) -> None:
    # Its rerun embedded everything again, and without --overwrite it was refused: "rerun the same command to
    # continue" did not hold for a run that replaced an earlier output.
    summary = summary_of(embed(folder, interrupted, "--overwrite", "--json"))
    assert (summary["embedded"], summary["reused"]) == (4, 8)
    ok(embed(folder, tmp_path / "whole.safetensors"))
    assert differences(interrupted, tmp_path / "whole.safetensors") == []


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_the_embeddings_file_is_moved_into_place_last(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    (folder / "p05-broken.jpg").write_bytes(b"not a picture")  # so that there is an errors file too
    output = tmp_path / "out" / f"embeddings{suffix}"
    output.parent.mkdir()
    moved_into_place = []
    replace = os.replace

    def recording(src, dst) -> None:
        replace(src, dst)
        if Path(dst).parent == output.parent:  # not the chunks and state inside the work area
            moved_into_place.append(Path(dst))

    monkeypatch.setattr(os, "replace", recording)
    ok(embed(folder, output, "--tokens"))
    files = {path for path in companions(output).values() if path.exists()}
    assert set(moved_into_place) == files
    assert moved_into_place[-1] == output


# --------------------------------------------------------------------------------------------- --update


def test_update_with_added_changed_and_deleted_files_equals_a_fresh_run(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    save_photos(folder, ["a00.jpg", "p12.jpg"], first_seed=100)  # added, one before all the others
    changed = folder / "p03.jpg"
    before = changed.stat()
    make_photo((48, 40), seed=200).save(changed, quality=90)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    (folder / "p05.jpg").unlink()
    (folder / "p07.jpg").unlink()

    summary = summary_of(embed(folder, output, "--update", "--batch-size", 1, "--json"))
    assert {k: summary[k] for k in ("embedded", "reused", "removed")} == {"embedded": 3, "reused": 9, "removed": 2}

    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_update_does_not_re_embed_a_file_that_was_only_touched(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    touch(folder / "p04.jpg")  # a new mtime, the same bytes: the content hash decides
    summary = summary_of(embed(folder, output, "--update", "--json"))
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 12, 0)


@pytest.mark.parametrize("name, options", [("embeddings.safetensors", ()), ("embeddings.npy", ("--tokens",))])
def test_an_update_that_changes_nothing_leaves_the_output_as_it_was(
    embed, folder: Path, tmp_path: Path, name: str, options: tuple[str, ...]
) -> None:
    # A nightly --update of a library that did not change rewrote every file: gigabytes, and a backup of them.
    (folder / "broken.jpg").write_bytes(b"not a photo")
    output = tmp_path / "out" / name
    ok(embed(folder, output, *options))
    files = sorted(path for path in companions(output).values() if path.exists())
    assert len(files) == (5 if name.endswith(".npy") else 3)  # with the errors file; a .npy has .meta.json and tokens
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}
    result = embed(folder, output, "--update", *options)
    assert result.exit_code == 0, result.stderr
    assert "embedded 0, reused 12 → " in result.stderr and ", unchanged (" in result.stderr
    summary = summary_of(embed(folder, output, "--update", "--json", *options))
    assert (summary["embedded"], summary["reused"], summary["failed"], summary["unchanged"]) == (0, 12, 1, True)
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files} == before
    assert not work_area(output).exists()
    touch(folder / "p04.jpg")  # its row's facts change: written anew
    summary = summary_of(embed(folder, output, "--update", "--json", *options))
    assert (summary["embedded"], summary["reused"], summary["unchanged"]) == (0, 12, False)
    assert output.stat().st_ino != before[output][0]


def test_a_stop_after_an_update_found_nothing_to_change_does_not_fail_the_run(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output is in place, left as it was: a Ctrl-C from here on changes nothing, as after files are replaced.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    summary = embed_module._summary

    def stopped_meanwhile(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return summary(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_summary", stopped_meanwhile)
    result = embed(folder, output, "--update")
    assert result.exit_code == 0, result.stderr
    assert ", unchanged (" in result.stderr


def test_an_update_looks_at_each_earlier_file_once(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether a row's file is still there, then whether it is still the same: one stat for both (on a network
    # share each is a round trip; a library of a million photos asked twice).
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    asked, stat = Counter(), os.stat

    def counted(path, *args, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == earlier_rows_module.__name__:
            asked[os.fspath(path)] += 1
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counted)
    assert summary_of(embed(folder, output, "--update", "--json"))["reused"] == 12
    photos = {str(path) for path in folder.iterdir()}
    assert {path: n for path, n in asked.items() if path in photos} == dict.fromkeys(photos, 1)


def test_update_after_a_touch_equals_a_fresh_run(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    touch(folder / "p04.jpg")
    ok(embed(folder, output, "--update", "--batch-size", 1))
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_update_reads_every_touched_file_and_re_embeds_the_one_whose_bytes_changed(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A library restored or synced anew: every mtime moved, and one photo was edited in place to the same size.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    edited = folder / "p06.jpg"
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF  # inside the entropy-coded data, before the end marker: same size, other pixels
    edited.write_bytes(bytes(data))
    for photo in folder.iterdir():
        touch(photo)
    monkeypatch.setattr(earlier_rows_module, "HASHING_NOTE_BYTES", 0)  # the note a large library gets
    result = embed(folder, output, "--update", "--batch-size", 1, "--json")
    assert (summary_of(result)["embedded"], summary_of(result)["reused"]) == (1, 11)
    assert "note: reading 12 files (0.0 GiB) whose times changed but not their size" in result.stderr
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_update_catches_a_photo_edited_in_place_with_its_size_and_mtime_kept(
    embed, folder: Path, tmp_path: Path
) -> None:
    # `exiftool -P -Orientation=6` on a photo: the same size, the mtime put back, and the row was kept stale. Its
    # ctime moved (nothing can set it back): the hash then decides. A chmod moves the ctime alone: read, not embedded.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    edited, chmodded = folder / "p06.jpg", folder / "p07.jpg"
    before = edited.stat()
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF  # inside the entropy-coded data, before the end marker: same size, other pixels
    time.sleep(0.01)  # a ctime of its own, on file systems with coarse timestamps
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    chmodded.chmod(0o600)
    assert (edited.stat().st_size, edited.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    summary = summary_of(embed(folder, output, "--update", "--batch-size", 1, "--json"))
    assert (summary["embedded"], summary["reused"]) == (1, 11)
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_update_never_reads_a_fifo_found_where_a_row_was(tmp_path: Path) -> None:
    # Opening a FIFO to hash it blocks until something writes to it: a resumed run hung forever on one.
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    row = {"path": str(fifo), "size": 0, "mtime_ns": 1, "blake2b": file_digest(b"")}

    def let_a_reader_go() -> None:  # else a read stuck in a hashing thread would hang the test, not fail it
        with contextlib.suppress(OSError):  # ENXIO: no reader, nothing stuck
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(5, let_a_reader_go)
    timer.start()
    try:
        assert earlier_rows_module._still_current({str(fifo): row}, no_note, {}) == ({}, [])  # read, it would match
    finally:
        timer.cancel()


def test_ctrl_c_while_touched_files_are_read_stops_the_reads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop waited for every file the threads were reading, and a second Ctrl-C did not help: 20 s for 3 GB files.
    photos = [tmp_path / f"p{i}.jpg" for i in range(20)]
    for photo in photos:
        photo.write_bytes(b"x")
    rows = {str(p): {"path": str(p), "size": 1, "mtime_ns": 1, "blake2b": file_digest(b"x")} for p in photos}
    saw_the_stop = []

    def slow_digest(path: str, stop: threading.Event | None = None) -> str:
        saw_the_stop.append(stop is not None and stop.wait(timeout=30))  # a huge file, read until told to stop
        raise KeyboardInterrupt

    monkeypatch.setattr(earlier_rows_module, "digest_of_file", slow_digest)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt), interrupts.stop_on_signals():
        earlier_rows_module._still_current(rows, no_note, {})
    assert saw_the_stop and all(saw_the_stop)  # every read in flight was told, none waited out its 30 s


def test_a_stop_flag_ends_a_digest_mid_file(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(bytes(3 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        digest_of_file(str(tmp_path / "big.bin"), stop)


def test_the_streamed_digest_is_the_manifests(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # over three reads
    (tmp_path / "big.bin").write_bytes(data)
    assert digest_of_file(str(tmp_path / "big.bin")) == file_digest(data)


def test_update_tries_again_a_file_that_failed_before(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    make_photo((20, 20), seed=99).save(folder / "small.jpg")
    summary = summary_of(embed(folder, output, "--max-pixels", 1000, "--json"))  # the 48×40 photos are refused
    assert (summary["embedded"], summary["failed"]) == (1, 12)
    summary = summary_of(embed(folder, output, "--update", "--json"))  # the limit raised: they embed now
    assert (summary["embedded"], summary["reused"], summary["failed"]) == (12, 1, 0)


@pytest.fixture
def output_of_other_files(embed, folder: Path, tmp_path: Path) -> Path:
    """An output of {p00..p11}, one image a batch, after which p11 is deleted and a00 added: an --update now has
    the same row count and other rows, every one of them moved (a00 sorts first)."""
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    (folder / "p11.jpg").unlink()
    save_photos(folder, ["a00.jpg"], first_seed=100)
    return output


def test_update_interrupted_while_writing_the_new_files_leaves_the_output_and_recovers(
    embed, folder: Path, output_of_other_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped while the new embeddings file is written (its manifest written too, not yet renamed).
    output = output_of_other_files
    before = {path.name: path.read_bytes() for path in companions(output).values() if path.exists()}
    write_safetensors = outputs_module.write_safetensors

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs_module, "write_safetensors", power_cut)
    assert embed(folder, output, "--update", "--batch-size", 1).exit_code == 130
    assert {path.name: path.read_bytes() for path in companions(output).values() if path.exists()} == before
    monkeypatch.setattr(outputs_module, "write_safetensors", write_safetensors)
    ok(embed(folder, output, "--update", "--batch-size", 1))
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_update_killed_between_its_renames_recovers_on_the_next_update(
    embed, folder: Path, output_of_other_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed after the new manifest took its name, before the new embeddings did: a new manifest beside the old
    # embeddings, rows paired with other images' vectors. The next --update must not read that pair as an output.
    output, replace = output_of_other_files, os.replace

    def killed_before_the_embeddings(src, dst) -> None:
        if Path(dst) == output:
            raise KeyboardInterrupt  # as far as a kill -9 lets a run get
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_embeddings)
    assert embed(folder, output, "--update", "--batch-size", 1).exit_code == 130
    monkeypatch.setattr(os, "replace", replace)
    assert rows_of(companions(output)["manifest"])[0]["path"].endswith("a00.jpg")  # the mixed state, made
    ok(embed(folder, output, "--update", "--batch-size", 1))
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_ctrl_c_during_the_renames_waits_for_them(
    embed, folder: Path, output_of_other_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C between two renames would leave a new manifest beside old embeddings: the renames finish first. Then
    # the output is whole, and the run no longer stops: it exited 130, "interrupted", with nothing left to do.
    output, replace = output_of_other_files, os.replace

    def ctrl_c_after_the_manifest(src, dst) -> None:
        replace(src, dst)
        if Path(dst) == companions(output)["manifest"]:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", ctrl_c_after_the_manifest)
    result = embed(folder, output, "--update", "--batch-size", 1)
    assert result.exit_code == 0 and "interrupted" not in result.stderr, result.stderr
    assert not work_area(output).exists()
    monkeypatch.setattr(os, "replace", replace)
    assert differences_from_a_fresh_run(embed, folder, output) == []  # whole and new, before any rerun


def test_the_final_files_are_on_disk_before_and_after_they_get_their_names(
    embed, folder: Path, tmp_path: Path, disk_events: list
) -> None:
    """What survives a power cut: each final file's bytes are fsynced before its rename, its folder after."""
    (folder / "broken.jpg").write_bytes(b"not a photo")  # so that there is an errors file too
    output = tmp_path / "out" / "embeddings.safetensors"
    events = disk_events
    ok(embed(folder, output))
    finals = {str(path.resolve()) for role, path in companions(output).items() if path.exists()}
    moves = [i for i, event in enumerate(events) if event[0] == "replace" and event[2] in finals]
    assert {events[i][2] for i in moves} == finals and len(finals) == 3  # embeddings, manifest, errors
    for i in moves:
        assert ("fsync", events[i][1]) in events[:i], f"{events[i][2]} was renamed before its bytes were fsynced"
    assert ("fsync", str(output.parent.resolve())) in events[moves[-1] + 1 :], "the folder was not fsynced"


def test_a_refused_update_leaves_nothing_behind(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    assert "made with other options (--tokens)" in the_error(embed(folder, output, "--update", "--tokens"))
    assert not (tmp_path / "out" / "embeddings.safetensors.partial").exists()
    ok(embed(folder, output, "--update"))  # the same options as the output: not blocked by the refusal


def test_a_forked_child_does_not_keep_the_lock_once_the_run_is_gone(tmp_path: Path) -> None:
    # Decoding workers share the lock's open file: killed alone, the main process left one holding it for ~7 s,
    # and the rerun was refused ("another siglip run is writing").
    output = tmp_path / "embeddings.safetensors"
    # The child says when its fork has returned (its at-fork hooks run before that), as a decoding worker long since
    # started would be: a kill within microseconds of a fork is not the case this guards.
    script = (
        "import os, sys, time; from pathlib import Path; from siglip_cli.locks import exclusive\n"
        "forked, told = os.pipe()\n"
        f"with exclusive(Path({str(output)!r})):\n"
        "    if os.fork() == 0:\n"
        "        os.write(told, b'1'); time.sleep(30); os._exit(0)\n"
        "    os.read(forked, 1); print('locked', flush=True); time.sleep(30)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert run.stdout.readline() == "locked\n"
        run.kill()  # the main process alone, as the OOM killer would; its child sleeps on
        run.wait()
        with locks.exclusive(output):
            pass
    finally:
        os.killpg(run.pid, signal.SIGKILL)


def test_a_lock_file_unlinked_by_a_finishing_run_does_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run that opened the lock file just before the finishing run unlinked it could lock that orphan while a third
    # run locked a new file of the same name: two runs writing one output.
    output = tmp_path / "embeddings.safetensors"
    lock = tmp_path / ".embeddings.lock"
    opened = os.open
    raced = []

    def open_then_lose_the_race(path, *args, **kwargs):
        descriptor = opened(path, *args, **kwargs)
        if Path(path) == lock and not raced:
            raced.append(path)
            lock.unlink()  # the finishing run's unlink, between our open and our lock
            lock.touch()  # and the third run's new file
        return descriptor

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    with pytest.raises(UserError, match="another siglip run is writing"):
        with locks.exclusive(output):
            pass


@pytest.mark.parametrize("name", ["embeddings.safetensors", "embeddings.npy"])
def test_a_second_run_writing_the_same_output_is_refused(embed, folder: Path, tmp_path: Path, name: str) -> None:
    import fcntl

    output = tmp_path / "out" / name
    output.parent.mkdir()
    # What a running siglip holds, writing either format: the two would share embeddings.jsonl.
    with open(output.parent / ".embeddings.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = the_error(embed(folder, output))
    assert error == f"error: another siglip run is writing {output}: wait for it, or choose another -o."
    assert not (tmp_path / "out" / f"{name}.partial").exists()
    ok(embed(folder, output))
    assert {"embeddings.jsonl", name} <= {p.name for p in output.parent.iterdir()}
    assert not any(p.name.endswith(".lock") for p in output.parent.iterdir())


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    output.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = output.parent / f".embeddings.safetensors.{int(dead.stdout)}.tmp"  # what kill -9 mid-write leaves
    stale.write_bytes(b"half an embeddings file")
    live = output.parent / f".embeddings.jsonl.{os.getppid()}.tmp"  # a live process's: not ours to remove
    live.write_bytes(b"")
    ok(embed(folder, output))
    assert not stale.exists() and live.exists()


def test_update_with_the_folder_spelled_differently_reuses_every_row_under_its_first_spelling(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    monkeypatch.chdir(folder.parent)
    summary = summary_of(embed(folder.name, output, "--update", "--json"))  # relative now, absolute before
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 12, 0)
    assert all(Path(row["path"]).is_absolute() for row in rows_of(output.with_suffix(".jsonl")))


def test_update_over_another_folder_adds_it_and_keeps_the_rows_of_files_still_there(
    embed, folder: Path, tmp_path: Path
) -> None:
    # `siglip embed new-photos -o library.safetensors --update` adds them: the earlier rows are not "gone".
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--batch-size", 1))
    more = save_photos(tmp_path / "more", ["m0.jpg", "m1.jpg"], first_seed=50)
    summary = summary_of(embed(more, output, "--update", "--batch-size", 1, "--json"))
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (2, 12, 0)
    ok(embed(folder, tmp_path / "fresh.safetensors", more, "--batch-size", 1))
    assert differences(output, tmp_path / "fresh.safetensors") == []


def test_update_after_a_folder_is_renamed_reuses_its_rows_by_content(embed, tmp_path: Path) -> None:
    library = tmp_path / "library"
    save_photos(library / "2020", [f"p{i:02d}.jpg" for i in range(6)])
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(library, output, "--batch-size", 1))
    (library / "2020").rename(library / "2020 - Lisbon")
    edited = library / "2020 - Lisbon" / "p02.jpg"  # moved and edited: embedded again
    make_photo((48, 40), seed=300).save(edited, quality=90)

    result = ok(embed(library, output, "--update", "--batch-size", 1, "--json"))
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (1, 5, 1)
    assert "5 photos found under a new name (moved or renamed): rows reused" in result.stderr
    assert differences_from_a_fresh_run(embed, library, output) == []


def test_update_with_shards_keeps_only_the_files_of_its_part(embed, folder: Path, tmp_path: Path) -> None:
    # A part's files are decided by its inputs: rows of files outside them (another spelling's part, or another
    # split) are not kept, or the merge would hold photos twice.
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(Path(os.path.relpath(folder)), part, "--shard", f"{k}/2"))
    for k, part in enumerate(parts):
        ok(embed(folder.resolve(), part, "--shard", f"{k}/2", "--update"))  # absolute now
    summary = summary_of(siglip("merge", *parts, "-o", tmp_path / "merged.safetensors", "--json"))
    assert summary["rows"] == 12


@pytest.mark.parametrize("made, given", [(None, "0/2"), ("0/2", "1/2"), ("0/2", None)])
def test_update_with_another_shard_than_the_output_was_made_with_is_refused(
    embed, folder: Path, tmp_path: Path, made: str | None, given: str | None
) -> None:
    # `--update --shard 0/2` on a whole library kept half its rows without a word ("removed 6").
    output = tmp_path / "library.safetensors"
    ok(embed(folder, output, *(["--shard", made] if made else [])))
    before = output.read_bytes()
    error = the_error(embed(folder, output, "--update", *(["--shard", given] if given else [])), code=2)
    was = f"made with --shard {made}" if made else "made without --shard"
    has = f"--shard {given}" if given else "no --shard"
    assert error == f"error: {output} was {was}, and this --update has {has}: update it as it was made, or embed " \
                    "afresh with --overwrite."
    assert output.read_bytes() == before and not output.with_name(output.name + ".partial").exists()


@pytest.mark.parametrize("made, given", [("0/2", "1/2"), (None, "0/2"), ("0/2", None)])
@pytest.mark.parametrize("update", [False, True], ids=["rerun", "update"])
def test_an_interrupted_part_is_not_continued_as_another(
    embed, embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    made: str | None, given: str | None, update: bool,
) -> None:  # fmt: skip
    # Its chunks are of its part: continued with another --shard, the run said "0 of 6 files done" and threw them away.
    from siglip_cli.shards import select_shard

    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", 0.0)  # every finished batch reaches the work area
    output = tmp_path / "out" / "embeddings.safetensors"
    output.parent.mkdir()
    part = tuple(int(n) for n in made.split("/")) if made else None
    if part:  # two batches of its files at least: the Ctrl-C comes as the second is reported
        with_a_part_of(folder, part, files=3)
    paths = select_shard(discover([str(folder)]), *part) if part else discover([str(folder)])
    with pytest.raises(KeyboardInterrupt):
        options = EmbedOptions(batch_size=2, workers=0, shard=part)
        embed_to_file(embedder, paths, output, options=options, progress=CtrlCAfter(2))
    args = [*(["--shard", given] if given else []), *(["--update"] if update else [])]
    error = the_error(embed(folder, output, *args), code=2)
    assert error.startswith(f"error: {output}.partial holds an interrupted run whose options differ (--shard): ")
    summary = summary_of(embed(folder, output, *(["--shard", made] if made else []), "--json"))
    assert summary["reused"] > 0 and summary["reused"] + summary["embedded"] == len(paths)  # its batches, kept


def test_several_devices_rerun_with_overwrite_and_fewer_inputs_keeps_none_of_the_others(
    embed, stopped_on_two_devices: Path, tmp_path: Path
) -> None:
    output = stopped_on_two_devices
    fewer = save_photos(tmp_path / "fewer", ["f0.jpg", "f1.jpg"], first_seed=90)
    ok(embed(fewer, output, "--device", "cpu,cpu", "--overwrite"))
    assert len(rows_of(output.with_suffix(".jsonl"))) == 2


@pytest.fixture(params=["safetensors", "npy-of-an-earlier-version"])
def relative_output(embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> Path:
    """An output of `folder` embedded by its relative name, from the folder above it (the working directory); or
    one of a version that did not record that folder."""
    output = tmp_path / "out" / ("embeddings.safetensors" if request.param == "safetensors" else "embeddings.npy")
    monkeypatch.chdir(folder.parent)
    ok(embed(Path(folder.name), output))
    if output.suffix == ".npy":
        meta = output.with_suffix(".meta.json")
        metadata = json.loads(meta.read_text())
        assert metadata.pop("working_directory") == str(folder.parent)
        meta.write_text(json.dumps(metadata))
    return output


@pytest.mark.parametrize("inputs", ["new-photo", "and-a-copy-of-one-of-its-photos", "the-same-folder-spelled-from-there"])
def test_update_from_another_folder_of_an_output_with_relative_paths_is_refused(
    embed, relative_output: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs: str
) -> None:
    # Every relative path would look gone from there, and the rows be dropped. A copy of one of the photos in the
    # folder added, found as that photo moved, let the other eleven rows go (exit 0). The same folder spelled from
    # there (../photos) found every photo by content, "moved": every row changed its path, and changed it back on
    # the next --update from the first folder.
    output = relative_output
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    if inputs == "the-same-folder-spelled-from-there":
        given = Path("..") / folder.name
    else:
        given = save_photos(tmp_path / "more", ["m0.jpg"], first_seed=50)
        if inputs == "and-a-copy-of-one-of-its-photos":
            shutil.copy(folder / "p03.jpg", given / "copy.jpg")
    result = embed(given, output, "--update")
    if output.suffix != ".npy":
        assert the_error(result) == (
            f"error: the earlier output names 12 files by paths relative to the folder it was made in, {tmp_path}, "
            f"not this one (such as photos/p00.jpg): run --update from {tmp_path}."
        )
    elif inputs == "the-same-folder-spelled-from-there":  # where it was made unknown: as far as can be told from
        ok(result)  # here, a folder renamed (the next test but one), and taken as that
        return
    else:  # where it was made unknown: told by what is found from here
        assert "none of the 12 photos the earlier output names by relative path" in the_error(result)
    assert {p.name: p.read_bytes() for p in output.parent.iterdir()} == before


def test_update_from_where_relative_rows_were_made_drops_the_rows_of_every_photo_deleted(
    embed, relative_output: Path, folder: Path
) -> None:
    # Every photo deleted and a new one in their folder: "none is found from here", --overwrite advised.
    for photo in folder.iterdir():
        photo.unlink()
    save_photos(folder, ["new.jpg"], first_seed=50)
    result = embed(Path(folder.name), relative_output, "--update", "--json")
    if relative_output.suffix == ".npy":  # where it was made unknown: that is all the run can tell
        assert "none of the 12 photos the earlier output names by relative path" in the_error(result)
        return
    summary = summary_of(result)
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (1, 0, 12)
    assert [row["path"] for row in rows_of(relative_output.with_suffix(".jsonl"))] == ["photos/new.jpg"]


def test_update_of_relative_rows_after_their_folder_was_renamed_finds_them_by_content(
    embed, relative_output: Path, folder: Path
) -> None:
    folder.rename(folder.parent / "pictures")
    summary = summary_of(embed(Path("pictures"), relative_output, "--update", "--json"))
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 12, 0)


def test_update_after_a_subfolder_moved_out_of_an_emptied_folder_has_no_duplicates(embed, tmp_path: Path) -> None:
    # photos/2020/trip → photos/trip-2020 leaves photos/2020 empty: not a drive that is not mounted.
    library = tmp_path / "photos"
    save_photos(library / "2020" / "trip", ["a.jpg", "b.jpg"])
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(library, output))
    (library / "2020" / "trip").rename(library / "trip-2020")
    summary = summary_of(embed(library, output, "--update", "--json"))
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 2, 0)
    assert [Path(row["path"]).parent.name for row in rows_of(output.with_suffix(".jsonl"))] == ["trip-2020"] * 2


def test_update_from_a_stale_list_finds_a_moved_file_instead_of_failing_it(
    embed, folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    (folder / "sub").mkdir()
    (folder / "p00.jpg").rename(folder / "sub" / "p00.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'p00.jpg'}\n{folder / 'sub' / 'p00.jpg'}\n")  # the old line, and the new
    summary = summary_of(embed(folder / "p01.jpg", output, "--files-from", listing, "--update", "--json"))
    assert (summary["embedded"], summary["failed"], summary["removed"]) == (0, 0, 0)
    assert len(rows_of(output.with_suffix(".jsonl"))) == 12


def test_update_keeps_unchecked_the_rows_under_an_empty_mount_point(
    embed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /mnt/nas unmounted is an empty folder: the photos under it are not gone, the drive is.
    import siglip_cli.files

    monkeypatch.setattr(siglip_cli.files, "MOUNT_POINTS", {str(tmp_path / "mnt"): (1,)})
    nas = tmp_path / "mnt" / "nas"
    save_photos(nas / "photos", ["n0.jpg", "n1.jpg"], first_seed=80)
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(nas / "photos", output))
    (nas / "photos").rename(tmp_path / "elsewhere")
    more = save_photos(tmp_path / "more", ["m0.jpg"], first_seed=50)
    result = ok(embed(more, output, "--update", "--json"))
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["reused"], summary["unchecked"], summary["removed"]) == (1, 0, 2, 0)
    assert "kept 2 rows of the earlier output unchecked: their files cannot be looked at now" in result.stderr


def test_update_keeps_the_rows_of_a_drive_whose_mount_root_is_gone_and_drops_a_folder_deleted_from_it(
    embed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /run/media is a tmpfs: after a reboot with the drive unplugged, /run/media/USER/DRIVE and the folders above it
    # are all missing. Its rows were dropped as gone. Mounted again, a folder deleted from it is gone.
    import siglip_cli.files

    root = tmp_path / "run" / "media"
    monkeypatch.setattr(siglip_cli.files, "MOUNT_POINTS", {str(root): (2,)})
    drive = root / "alice" / "DRIVE"
    save_photos(drive / "photos", ["r0.jpg", "r1.jpg"], first_seed=85)
    save_photos(drive / "kept", ["r2.jpg"], first_seed=88)
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(drive, output))
    (tmp_path / "run").rename(tmp_path / "unplugged")
    more = save_photos(tmp_path / "more", ["m0.jpg"], first_seed=50)
    summary = summary_of(embed(more, output, "--update", "--json"))
    assert (summary["embedded"], summary["unchecked"], summary["removed"]) == (1, 3, 0)

    (tmp_path / "unplugged").rename(tmp_path / "run")
    shutil.rmtree(drive / "photos")
    summary = summary_of(embed(more, output, "--update", "--json"))
    assert (summary["reused"], summary["unchecked"], summary["removed"]) == (2, 0, 2)


def saved_over(checkpoint: Path) -> None:
    """`checkpoint` saved again in place with other weights, as a fine-tune saves its next epoch."""
    weights = checkpoint / "model.safetensors"
    tensors = {key: torch.from_numpy(value) * 1.01 for key, value in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def saved_wider(checkpoint: Path) -> None:
    """`checkpoint` saved again in place as another architecture: twice as wide."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = json.loads((checkpoint / "config.json").read_text())
    wider = SiglipVisionConfig(**{**config, "hidden_size": 2 * config["hidden_size"]})
    SiglipVisionModel(wider).save_pretrained(checkpoint)


def saved_larger(checkpoint: Path) -> None:
    """`checkpoint` saved again in place for images of twice the size (a 384-pixel fine-tune of a 224 one), its
    preprocessor with it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config, processor = (json.loads((checkpoint / name).read_text()) for name in ("config.json", PREPROCESSOR_NAME))
    larger = SiglipVisionConfig(**{**config, "image_size": 2 * config["image_size"]})
    SiglipVisionModel(larger).save_pretrained(checkpoint)
    size = {side: 2 * pixels for side, pixels in processor["size"].items()}
    (checkpoint / PREPROCESSOR_NAME).write_text(json.dumps({**processor, "size": size}))


def config_corrected(checkpoint: Path, **changes: Any) -> None:
    """`checkpoint`'s config.json corrected in place, its weights as they were."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "save_again, differing",
    [
        (saved_over, "the model's weights"),
        (saved_wider, "the model's architecture, the model's weights"),
        (saved_larger, "the preprocessing (--no-exif-transpose, --fast-decode, --decode, or the model's preprocessor), "
                       "the model's architecture, the model's weights"),
        # The same tensors compute other numbers: these rows were reused, mixing two models in one output.
        (functools.partial(config_corrected, hidden_act="quick_gelu"), "the model's architecture"),
        (functools.partial(config_corrected, num_attention_heads=2), "the model's architecture"),
        (functools.partial(config_corrected, layer_norm_eps=1e-3), "the model's architecture"),
    ],
    ids=["weights", "architecture", "image-size", "activation", "heads", "layer-norm-eps"],
)
def test_update_refuses_a_checkpoint_saved_over(
    folder: Path, tiny_vision: Path, tmp_path: Path, save_again: Callable[[Path], None], differing: str
) -> None:
    # Its path and (local) revision are the same: the rows of two models were mixed in one output. Of another
    # architecture, the refusal named raw keys ("embedding_dim") and advised "the same options", which none can give.
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "checkpoint"))
    output = tmp_path / "out" / "embeddings.safetensors"
    run = functools.partial(siglip, "embed", folder, "-o", output, "--model", checkpoint, "--workers", 0)
    ok(run())
    save_again(checkpoint)
    assert the_error(run("--update")) == (
        f"error: {output} was made with other options ({differing}): the checkpoint has changed since (saved again, "
        "or its config files corrected); use --overwrite to embed everything again."
    )
    ok(run("--overwrite"))
    assert summary_of(run("--update", "--json"))["reused"] == 12


def test_update_takes_the_same_checkpoint_from_another_folder(folder: Path, tiny_vision: Path, tmp_path: Path) -> None:
    # A checkpoint folder moved or copied (or a local copy of a Hub repo): the weights decide, not their path. An
    # --update was refused ("--model"), with no way to go on but embedding everything again.
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "checkpoint"))
    output = tmp_path / "out" / "embeddings.safetensors"
    run = functools.partial(siglip, "embed", folder, "-o", output, "--workers", 0)
    ok(run("--model", checkpoint))
    moved = checkpoint.rename(tmp_path / "moved")
    summary = summary_of(run("--model", moved, "--update", "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12)
    saved_over(moved)
    assert "other options (the model's weights)" in the_error(run("--model", moved, "--update"))


def test_update_takes_the_same_weights_from_a_pickle_checkpoint(folder: Path, tiny_vision: Path, tmp_path: Path) -> None:
    # The fingerprint is of the weights as loaded, whatever file held them: pytorch_model.bin or model.safetensors.
    pickled = save_as_pickles(tiny_vision, tmp_path / "pickled")
    output = tmp_path / "out" / "embeddings.safetensors"
    run = functools.partial(siglip, "embed", folder, "-o", output, "--workers", 0)
    ok(run("--model", tiny_vision))
    summary = summary_of(run("--model", pickled, "--update", "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12)
    torch.save({key: value * 1.01 for key, value in torch.load(pickled / PICKLE_NAME).items()}, pickled / PICKLE_NAME)
    assert "other options (the model's weights)" in the_error(run("--model", pickled, "--update"))


def test_update_of_an_output_that_recorded_no_weights_needs_the_same_checkpoint_folder(
    folder: Path, tiny_vision: Path, tmp_path: Path
) -> None:
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "checkpoint"))
    output = tmp_path / "out" / "embeddings.npy"
    run = functools.partial(siglip, "embed", folder, "-o", output, "--workers", 0)
    ok(run("--model", checkpoint))
    as_before_the_fingerprint(output)
    moved = checkpoint.rename(tmp_path / "moved")
    assert "other options (--model)" in the_error(run("--model", moved, "--update"))


def test_the_weights_fingerprint_sees_a_change_anywhere_in_a_tensor() -> None:
    from siglip_cli.embed import weights_fingerprint

    layer = torch.nn.Linear(100, 80)  # 8,000 weights: more than the 4,096 samples, fewer than twice as many
    before = weights_fingerprint(layer)
    with torch.no_grad():
        layer.weight[-30:] += 1  # the last 3,000
    assert weights_fingerprint(layer) != before


def test_a_resumed_run_refuses_a_checkpoint_saved_over_with_other_weights(
    folder: Path, tiny_vision: Path, tmp_path: Path
) -> None:
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "checkpoint"))
    output = interrupt(load(str(checkpoint), device="cpu"), folder, tmp_path / "out" / "embeddings.safetensors")
    saved_over(checkpoint)
    error = the_error(siglip("embed", folder, "-o", output, "--model", checkpoint, "--workers", 0, "--batch-size", 2))
    assert "holds an interrupted run whose options differ (the model's weights)" in error


def test_update_takes_an_output_of_a_version_that_recorded_no_weights_at_its_word(
    embed, folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "embeddings.npy"
    ok(embed(folder, output))
    as_before_the_fingerprint(output)
    assert summary_of(embed(folder, output, "--update", "--json"))["reused"] == 12


def as_before_the_fingerprint(output: Path) -> None:
    """A .npy output's recorded options made as a version that did not record the weights' fingerprint made them."""
    meta = output.with_suffix(".meta.json")
    metadata = json.loads(meta.read_text())
    options = json.loads(metadata["options"])
    del options["weights"], options["architecture"]  # recorded since, the architecture in full later still
    meta.write_text(json.dumps({**metadata, "options": json.dumps(options)}))


def test_merge_takes_a_part_of_a_version_that_recorded_no_weights(embed, folder: Path, tmp_path: Path) -> None:
    # Parts of one run embedded on several machines, some with an earlier siglip.
    parts = [tmp_path / "part0.npy", tmp_path / "part1.npy"]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--batch-size", 1, "--shard", f"{k}/2"))
    as_before_the_fingerprint(parts[1])
    ok(siglip("merge", *parts, "-o", tmp_path / "merged.npy"))
    assert "weights" not in json.loads(json.loads((tmp_path / "merged.meta.json").read_text())["options"])
    ok(embed(folder, tmp_path / "all.npy", "--batch-size", 1))
    assert differences(tmp_path / "merged.npy", tmp_path / "all.npy") == ["meta"]  # the rows: the same bytes


def test_a_changed_dtype_is_named_alone(embed, folder: Path, tmp_path: Path) -> None:
    # The weights' fingerprint is taken in the compute dtype: --dtype alone changed it too.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    error = the_error(embed(folder, output, "--update", "--dtype", "bfloat16"))
    assert "was made with other options (--dtype):" in error


def test_a_file_deleted_from_a_drive_mounted_one_folder_down_media_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /media/DRIVE (usbmount, fstab) and /media/USER (desktops, the drives one folder further) sit at one depth:
    # a mount point there is a drive whose files can be seen; a plain folder there may be a user's, drives unplugged.
    import siglip_cli.files

    media = tmp_path / "media"
    monkeypatch.setattr(siglip_cli.files, "MOUNT_POINTS", {str(media): (1, 2)})
    save_photos(media / "data" / "photos", ["kept.jpg"])
    mounted = {str(media / "data")}
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) in mounted)
    assert earlier_rows_module._whereabouts(str(media / "data" / "deleted.jpg"), {}) == "gone"
    assert earlier_rows_module._whereabouts(str(media / "data" / "gone" / "a.jpg"), {}) == "gone"
    mounted.clear()  # the same folders as a user's folder, not a drive: whose drives may be unplugged
    assert earlier_rows_module._whereabouts(str(media / "data" / "deleted.jpg"), {}) == "unknown"


def test_update_counts_a_copy_that_moved_as_kept_and_one_deleted_as_removed(embed, tmp_path: Path) -> None:
    photos = save_photos(tmp_path / "c", ["x.jpg"], first_seed=60)
    shutil.copy(photos / "x.jpg", photos / "y.jpg")  # two copies of one photo
    save_photos(photos, ["z.jpg"], first_seed=61)
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(photos, output))
    (tmp_path / "d").mkdir()
    (photos / "x.jpg").rename(tmp_path / "d" / "x.jpg")
    (photos / "y.jpg").unlink()
    summary = summary_of(embed(photos, output, "--update", tmp_path / "d", "--json"))
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 2, 1)


def test_update_keeps_unchecked_the_rows_under_a_link_that_leads_nowhere_and_drops_deleted_files(
    embed, folder: Path, tmp_path: Path
) -> None:
    # photos/nas → a drive that is unmounted at the next --update: its rows stay; a deleted photo's row goes. So
    # does the row of a photo linked on its own into the drive (photos/c0.jpg → drive/camera/c0.jpg): it was dropped.
    drive = save_photos(tmp_path / "drive" / "photos", ["d0.jpg", "d1.jpg", "d2.jpg"], first_seed=70)
    (folder / "nas").symlink_to(drive)
    (folder / "c0.jpg").symlink_to(save_photos(tmp_path / "drive" / "camera", ["c0.jpg"], first_seed=80) / "c0.jpg")
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    before = {row["path"]: row for row in rows_of(output.with_suffix(".jsonl"))}
    (tmp_path / "drive").rename(tmp_path / "unmounted")
    (folder / "p03.jpg").unlink()

    result = ok(embed(folder, output, "--update", "--json"))
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["reused"], summary["unchecked"], summary["removed"]) == (0, 11, 4, 1)
    assert "embedded 0, reused 11, kept 4 unchecked, removed 1 → " in result.stderr
    assert "1 file of the earlier output is gone" in result.stderr and "its row is dropped." in result.stderr
    assert "kept 4 rows of the earlier output unchecked: their files cannot be looked at now" in result.stderr
    after = {row["path"]: row for row in rows_of(output.with_suffix(".jsonl"))}
    assert set(after) == set(before) - {str(folder / "p03.jpg")}
    assert all(after[path] == before[path] for path in after)


def test_update_says_which_embedded_files_now_fail(embed, folder: Path, tmp_path: Path) -> None:
    # A photo cut short by a sync lost its row to an error row, and the summary's "1 failed" read like a new file.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    photo = folder / "p03.jpg"
    photo.write_bytes(photo.read_bytes()[:300])
    result = ok(embed(folder, output, "--update"))
    errors = output.with_name("embeddings.errors.jsonl")
    assert (f"note: 1 file embedded in the earlier output now fails ({photo}: " in result.stderr
            and f"its row is replaced by an error row in {errors}." in result.stderr)  # fmt: skip
    assert [row["path"] for row in rows_of(errors)] == [str(photo)]
    assert "now fail" not in ok(embed(folder, output, "--update")).stderr  # said once, when it happens


def test_update_keeps_unchecked_the_row_of_a_photo_that_cannot_be_read_now(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `chmod 000` moves only the ctime, and the content hash that decides then could not be read: the row gave way
    # to an error row, and the photo was embedded again once the permission was back.
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    manifest = output.with_suffix(".jsonl")
    before = manifest.read_bytes()
    photo = folder / "p03.jpg"
    photo.chmod(0)
    read = earlier_rows_module.digest_of_file

    def refused(path: str, stop: threading.Event | None = None) -> str:  # as for a user other than root
        if path == str(photo):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return read(path, stop)

    monkeypatch.setattr(earlier_rows_module, "digest_of_file", refused)
    result = ok(embed(folder, output, "--update", "--json"))
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["reused"], summary["unchecked"], summary["failed"]) == (0, 11, 1, 0)
    assert (f"kept 1 row of the earlier output unchecked: its file cannot be read now ({photo}: its times changed, "
            "and a permission was taken away?); a later --update checks it.") in result.stderr  # fmt: skip
    assert summary["unchanged"] and manifest.read_bytes() == before
    photo.chmod(0o644)
    monkeypatch.undo()
    summary = summary_of(embed(folder, output, "--update", "--json"))  # read again: the same photo
    assert (summary["embedded"], summary["reused"], summary["unchecked"]) == (0, 12, 0)


def test_update_of_an_older_output_compares_its_pooling_from_the_metadata(embed, folder: Path, tmp_path: Path) -> None:
    # Older versions kept the pooling out of the run's options, and pooled a PaliGemma tower silent on
    # vision_use_head by its tokens' mean: reusing those rows beside head-pooled ones would mix two embeddings.
    output = tmp_path / "out" / "embeddings.npy"
    ok(embed(folder, output))
    meta_path = output.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text())
    options = json.loads(meta["options"])
    del options["pooling"]
    for pooled_by, accepted in [("attention-pool head", True), ("mean of patch tokens (headless tower)", False)]:
        meta_path.write_text(json.dumps({**meta, "options": json.dumps(options), "pooling": pooled_by}) + "\n")
        result = embed(folder, output, "--update")
        if accepted:
            ok(result)
        else:
            assert "was made with other options (the pooling" in the_error(result)


def test_update_with_other_options_is_refused(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output))
    error = the_error(embed(folder, output, "--update", "--no-normalize"))
    assert "--normalize/--no-normalize" in error and "--overwrite" in error


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "suffix, damage, named",
    [
        (".safetensors", lambda out: truncate(out), "embeddings.safetensors"),
        (".safetensors", lambda out: out.with_suffix(".jsonl").unlink(), "embeddings.jsonl: No such file"),
        (".safetensors", lambda out: out.with_suffix(".jsonl").write_text("{not json"), "embeddings.jsonl"),
        (".npy", lambda out: truncate(out), "embeddings.npy"),
        (".npy", lambda out: out.with_suffix(".tokens.npy").unlink(), "embeddings.tokens.npy: No such file"),
        (".npy", lambda out: out.with_suffix(".meta.json").unlink(), "embeddings.meta.json: No such file"),
    ],
    ids=["truncated", "manifest-gone", "manifest-damaged", "npy-truncated", "tokens-gone", "meta-gone"],
)
def test_update_of_a_damaged_output_says_so_in_one_sentence(
    embed, folder: Path, tmp_path: Path, suffix: str, damage, named: str
) -> None:
    # Each was a traceback; a deleted tokens file read as "cannot write embeddings.tokens.npy ... make room".
    output = tmp_path / "out" / f"embeddings{suffix}"
    ok(embed(folder, output, "--tokens"))
    damage(output)
    error = the_error(embed(folder, output, "--tokens", "--update"))
    assert error.startswith(f"error: cannot read {output} back as a siglip output (") and named in error, error
    assert error.endswith("embed it again (--overwrite).")
    ok(embed(folder, output, "--tokens", "--overwrite"))


def test_merge_of_a_damaged_part_says_so_in_one_sentence(embed, folder: Path, tmp_path: Path) -> None:
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    truncate(parts[1])
    error = the_error(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))
    assert error.startswith(f"error: cannot read {parts[1]} back as a siglip output")
    assert not (tmp_path / "all.safetensors").exists()


def test_merge_takes_parts_through_links_without_a_suffix(embed, folder: Path, tmp_path: Path) -> None:
    for k in range(2):
        ok(embed(folder, tmp_path / f"part{k}.safetensors", "--shard", f"{k}/2"))
        (tmp_path / f"latest{k}").symlink_to(f"part{k}.safetensors")  # a link takes its target's format
    ok(siglip("merge", tmp_path / "latest0", tmp_path / "latest1", "-o", tmp_path / "all.safetensors"))
    assert len(rows_of(companions(tmp_path / "all.safetensors")["manifest"])) == 12


@pytest.mark.parametrize(
    ("name", "message"),
    [("notes.txt", "notes.txt is not a siglip output: give the .safetensors or .npy files of the shards"),
     ("model.safetensors", "(it or its manifest {folder}/model.jsonl is missing)")],
)  # fmt: skip
def test_merge_of_a_file_that_is_no_output_names_it_as_an_input(
    tmp_path: Path, name: str, message: str
) -> None:
    # A .txt part was called "output notimg.txt", and a manifest missing beside a part was named without its folder.
    (tmp_path / name).write_text("not an output")
    error = the_error(siglip("merge", tmp_path / name, "-o", tmp_path / "all.safetensors"))
    assert message.format(folder=tmp_path) in error


# ------------------------------------------------------------------------------------------ shards, merge


def test_shard_runs_take_each_file_exactly_once(embed, folder: Path, tmp_path: Path) -> None:
    (folder / "p05-broken.jpg").write_bytes(b"not a picture")
    listed = []
    for k in range(3):
        part = tmp_path / f"part{k}.safetensors"
        ok(embed(folder, part, "--shard", f"{k}/3"))
        listed += [row["path"] for role in ("manifest", "errors") for row in rows_of(companions(part)[role])]
    assert sorted(listed) == sorted(discover([str(folder)]))


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_merged_shards_equal_one_full_run(embed, folder: Path, tmp_path: Path, suffix: str) -> None:
    (folder / "p05-broken.jpg").write_bytes(b"not a picture")
    ok(embed(folder, tmp_path / f"all{suffix}", "--tokens", "--batch-size", 1))
    parts = [tmp_path / f"part{k}{suffix}" for k in range(3)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--tokens", "--batch-size", 1, "--shard", f"{k}/3"))
    merged = tmp_path / f"merged{suffix}"
    said = ok(siglip("merge", *parts, "-o", merged)).stderr.strip()
    assert differences(merged, tmp_path / f"all{suffix}") == []
    errors = merged.with_name("merged.errors.jsonl")
    assert said == f"merged 3 outputs: 12 rows → {merged}; 1 failed: see {errors}"  # as embed says it


def test_npy_and_safetensors_parts_merge_into_one_full_run(embed, folder: Path, tmp_path: Path) -> None:
    # The format is how rows are stored, not how they were computed.
    ok(embed(folder, tmp_path / "all.safetensors", "--batch-size", 1))
    parts = [tmp_path / "part0.npy", tmp_path / "part1.safetensors"]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--batch-size", 1, "--shard", f"{k}/2"))
    ok(siglip("merge", *parts, "-o", tmp_path / "merged.safetensors"))
    assert differences(tmp_path / "merged.safetensors", tmp_path / "all.safetensors") == []


@pytest.mark.parametrize("elsewhere", [False, True], ids=["one-folder", "two-folders"])
def test_merge_keeps_the_folder_the_parts_were_made_in_only_when_they_agree(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: bool
) -> None:
    # Where relative paths start (`--update` from another folder is refused): of parts run from two folders, none.
    parts = [tmp_path / "part0.npy", tmp_path / "part1.npy"]
    for k, part in enumerate(parts):
        monkeypatch.chdir(tmp_path if k == 0 or not elsewhere else folder)
        ok(embed(folder, part, "--shard", f"{k}/2"))
    ok(siglip("merge", *parts, "-o", tmp_path / "merged.npy"))
    made_in = json.loads((tmp_path / "merged.meta.json").read_text()).get("working_directory")
    assert made_in == (None if elsewhere else str(tmp_path))


def test_merge_is_refused_while_another_run_writes_its_output(embed, folder: Path, tmp_path: Path) -> None:
    import fcntl

    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    output = tmp_path / "out" / "all.safetensors"
    output.parent.mkdir()
    with open(output.parent / ".all.lock", "a+b") as held:  # what a running `siglip embed -o all.safetensors` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = the_error(siglip("merge", *parts, "-o", output))
    assert error == f"error: another siglip run is writing {output}: wait for it, or choose another -o."
    assert list(output.parent.iterdir()) == [output.parent / ".all.lock"]
    ok(siglip("merge", *parts, "-o", output))


def test_merge_waits_for_a_run_writing_one_of_its_parts(embed, folder: Path, tmp_path: Path) -> None:
    # A part's --update, replacing its files one by one, could be read half replaced in the milliseconds of its renames.
    import fcntl

    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    output = tmp_path / "all.safetensors"
    with open(tmp_path / ".part1.lock", "a+b") as held:  # what a running `siglip embed ... -o part1 --update` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = the_error(siglip("merge", *parts, "-o", output))
    assert error == f"error: another siglip run is writing {parts[1]}: wait for it to finish, then merge."
    assert not output.exists() and not (tmp_path / ".part0.lock").exists()  # the locks it took are let go
    ok(siglip("merge", *parts, "-o", output))
    assert list(tmp_path.glob(".*.lock")) == []  # each lock taken, the test's left one too, is removed with it


def test_merge_reads_parts_where_no_lock_can_be_made(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts on a read-only share: no run writes there, and no lock file can be made beside them.
    parts = [tmp_path / "parts" / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    real_open = locks._open_lock_file

    def read_only(lock: Path, output: Path):
        if lock.parent == tmp_path / "parts":
            raise UserError(f"cannot write beside {output}: Read-only file system.")
        return real_open(lock, output)

    monkeypatch.setattr(locks, "_open_lock_file", read_only)
    ok(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))


@pytest.mark.parametrize("then", ["merge", "update"])
def test_a_merge_killed_between_its_renames_is_finished_by_the_next_merge_or_update(
    embed, folder: Path, tmp_path: Path, then: str
) -> None:
    # It left a new manifest beside the old embeddings and nothing to repair them: an --update took the manifest's
    # sizes and times for the truth about the old vectors, and kept two swapped photos' vectors under each other's
    # path ("unchanged").
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2", "--batch-size", 1))
    output = tmp_path / "out" / "all.safetensors"
    ok(siglip("merge", *parts, "-o", output))
    first, second = sorted(folder.glob("*.jpg"))[:2]
    swapped = second.read_bytes(), first.read_bytes()
    first.write_bytes(swapped[0]), second.write_bytes(swapped[1])
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2", "--batch-size", 1, "--update"))
    replace = os.replace

    def killed(source, target) -> None:
        if Path(target) == output:  # the embeddings, renamed last
            raise Killed
        replace(source, target)

    with pytest.MonkeyPatch.context() as during_the_kill:
        during_the_kill.setattr(os, "replace", killed)
        with pytest.raises(Killed):
            merge_outputs(parts, output, overwrite=True)
    assert (work_area(output) / "assembling").is_file()
    if then == "merge":
        ok(siglip("merge", *parts, "-o", output, "--overwrite"))
    else:
        ok(embed(folder, output, "--update", "--batch-size", 1))
    assert not work_area(output).exists()
    assert differences_from_a_fresh_run(embed, folder, output) == []


def test_merge_refuses_a_part_its_run_left_half_replaced(
    embed, embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    # An --update of a part killed between its renames left a new manifest beside its old embeddings: the merge read
    # them, and two swapped photos kept each other's vectors in the merged output.
    part, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ok(embed(folder, part))
    ok(embed(save_photos(tmp_path / "new", ["n0.jpg"], first_seed=100), other))
    first, second = sorted(folder.glob("*.jpg"))[:2]
    swapped = second.read_bytes(), first.read_bytes()
    first.write_bytes(swapped[0]), second.write_bytes(swapped[1])
    killed_at_the_rename_to(part, embedder, folder, part, update=True)  # the manifest renamed, the embeddings not
    assert the_error(siglip("merge", part, other, "-o", tmp_path / "all.safetensors")) == (
        f"error: {part} was being replaced when its run stopped, and is half new, half old: rerun that run (siglip "
        f"embed ... -o {part}, with the same options) to finish it, then merge."
    )
    ok(embed(folder, part, "--update"))
    assert differences_from_a_fresh_run(embed, folder, part) == []
    ok(siglip("merge", part, other, "-o", tmp_path / "all.safetensors"))


def test_merge_into_an_output_with_an_interrupted_run_is_refused(
    embed, embedder: Embedder, folder: Path, tmp_path: Path
) -> None:
    # The merge's mark goes in the output's work folder, which the merge removes once done: an interrupted run's
    # chunks there are not its to throw away.
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    output = interrupt(embedder, folder, tmp_path / "out" / "all.safetensors")
    chunks = chunks_in(work_area(output))
    assert the_error(siglip("merge", *parts, "-o", output)) == (
        f"error: {work_area(output)} holds the work of an interrupted siglip embed into {output}: rerun that embed to "
        f"finish it, or remove {work_area(output)}, before merging into it."
    )
    assert chunks_in(work_area(output)) == chunks > 0


def test_merge_refuses_parts_that_named_their_inputs_differently(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One machine ran in the folder above the photos, another beside them: each hashed other strings, so the
    # parts overlapped and missed files, and the merge gave duplicates and gaps without a word.
    monkeypatch.chdir(folder.parent)
    ok(embed(Path(folder.name), tmp_path / "part0.safetensors", "--shard", "0/2"))
    ok(embed(Path(".") / folder.name, tmp_path / "same.safetensors", "--shard", "1/2"))  # ./photos is photos
    (folder.parent / "elsewhere").mkdir()
    monkeypatch.chdir(folder.parent / "elsewhere")
    ok(embed(Path("..") / folder.name, tmp_path / "part1.safetensors", "--shard", "1/2"))

    ok(siglip("merge", tmp_path / "part0.safetensors", tmp_path / "same.safetensors", "-o", tmp_path / "ok.safetensors"))
    parts = [tmp_path / "part0.safetensors", tmp_path / "part1.safetensors"]
    error = the_error(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))
    assert f"was made from other inputs (../{folder.name}) than" in error and f"({folder.name})" in error
    assert not (tmp_path / "all.safetensors").exists()


def test_merge_compares_the_paths_of_the_parts_lists_not_their_names(
    tiny_vision: Path, folder: Path, tmp_path: Path
) -> None:
    # A part recorded `--files-from -` (or the list's name): two machines fed other lists merged with gaps.
    files = sorted(str(path) for path in folder.glob("*.jpg"))

    def part(k: int, lines: list[str], name: str) -> Path:
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        output = tmp_path / f"{name}.part{k}.safetensors"
        ok(siglip("embed", "--files-from", tmp_path / name, "-o", output, "--model", tiny_vision, "--workers", 0,
                  "--shard", f"{k}/2"))  # fmt: skip
        return output

    first = part(0, files, "a.txt")
    ok(siglip("merge", first, part(1, files[::-1], "b.txt"), "-o", tmp_path / "ok.safetensors"))  # the same paths
    error = the_error(siglip("merge", first, part(1, files[:-3], "a.txt"), "-o", tmp_path / "all.safetensors"))
    assert "was made from other inputs (--files-from: 9 paths (blake2b " in error
    assert "than " + str(first) + " (--files-from: 12 paths (blake2b " in error


def test_a_shard_without_files_writes_an_empty_output_and_exits_0(embed, folder: Path, tmp_path: Path) -> None:
    paths = discover([str(folder / "p00.jpg")])
    empty = next(k for k in range(4) if k != shard_of(paths[0], 4))
    output = tmp_path / "empty.safetensors"
    summary = summary_of(embed(folder / "p00.jpg", output, "--shard", f"{empty}/4", "--json"))
    assert (summary["embedded"], summary["failed"]) == (0, 0)
    with safe_open(output, framework="np") as f:
        assert f.get_tensor("embeddings").shape == (0, 32)  # tiny_vision's width
    assert output.with_suffix(".jsonl").read_text() == ""


def test_a_shard_whose_files_all_fail_still_writes_its_part_of_the_run(embed, tmp_path: Path) -> None:
    photos = save_photos(tmp_path / "photos", ["good.jpg"])
    good = discover([str(photos)])[0]
    names = (photos / f"bad{i}.jpg" for i in range(100))
    bad = next(name for name in names if shard_of(str(name), 2) != shard_of(good, 2))  # in the other shard
    bad.write_bytes(b"not a picture")
    ok(embed(photos, tmp_path / "all.safetensors"))  # one row, one error
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(photos, part, "--shard", f"{k}/2"))
    ok(siglip("merge", *parts, "-o", tmp_path / "merged.safetensors"))
    assert differences(tmp_path / "merged.safetensors", tmp_path / "all.safetensors") == []


def test_merge_refuses_outputs_made_with_different_options(embed, folder: Path, tmp_path: Path) -> None:
    ok(embed(folder, tmp_path / "part0.safetensors", "--shard", "0/2"))
    ok(embed(folder, tmp_path / "part1.safetensors", "--shard", "1/2", "--no-normalize"))
    parts = [tmp_path / "part0.safetensors", tmp_path / "part1.safetensors"]
    error = the_error(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))
    assert "different options" in error and "--normalize/--no-normalize" in error
    assert not (tmp_path / "all.safetensors").exists()


def test_ctrl_c_once_the_merge_is_in_place_is_no_interruption(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It exited 130 ("interrupted") with the merged output whole, and the rerun it asked for was refused: the
    # output exists. As `embed` does, a finished merge ends as finished.
    import siglip_cli.cli as cli_module

    parts = [tmp_path / "part0.safetensors", tmp_path / "part1.safetensors"]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    printable = cli_module.printable

    def ctrl_c_while_reporting(message: str) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        return printable(message)

    monkeypatch.setattr(cli_module, "printable", ctrl_c_while_reporting)
    result = siglip("merge", *parts, "-o", tmp_path / "all.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "all.safetensors").exists()


def test_merge_refuses_a_run_with_a_part_missing_unless_asked(embed, folder: Path, tmp_path: Path) -> None:
    parts = [tmp_path / f"part{k}.safetensors" for k in range(3)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/3"))
    error = the_error(siglip("merge", parts[0], parts[2], "-o", tmp_path / "all.safetensors"))
    assert "part 1/3 is missing: merge all 3 parts" in error and not (tmp_path / "all.safetensors").exists()
    ok(siglip("merge", parts[0], parts[2], "-o", tmp_path / "some.safetensors", "--allow-missing"))
    ok(embed(folder, tmp_path / "half.safetensors", "--shard", "1/2"))
    for allow_missing in ([], ["--allow-missing"]):  # it allows a part missing, not parts of two splits or a part twice
        merge = functools.partial(siglip, "merge", "-o", tmp_path / "all.safetensors", *allow_missing)
        assert "parts of different splits (into 2 and 3)" in the_error(merge(parts[0], tmp_path / "half.safetensors"))
        assert "part 0/3 is given twice" in the_error(merge(parts[0], parts[0]))


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("shard", "1", "part1.safetensors's metadata gives its part as '1', not K/N"),
        ("options", "{not json", "cannot read"),
        ("options", "[1, 2]", "its options are an array, not a JSON object"),
    ],
)
def test_merge_of_an_output_with_odd_metadata_is_one_sentence(
    embed, folder: Path, tmp_path: Path, field: str, value: str, error: str
) -> None:
    # Parsed outside the checks that make an unreadable output one sentence: an IndexError, a JSONDecodeError.
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    with safe_open(parts[1], framework="pt") as f:
        tensors, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
    save_file(tensors, parts[1], metadata={**metadata, field: value})
    message = the_error(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))
    assert error in message and not (tmp_path / "all.safetensors").exists()


def test_merge_leaves_another_outputs_manifest_alone(embed, folder: Path, tmp_path: Path) -> None:
    # other.safetensors and a merge into other.npy would share other.jsonl.
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    ok(embed(folder, tmp_path / "other.safetensors"))
    before = (tmp_path / "other.jsonl").read_bytes()
    for overwrite in ([], ["--overwrite"]):
        error = the_error(siglip("merge", *parts, "-o", tmp_path / "other.npy", *overwrite))
        assert f"other.safetensors has its manifest in {tmp_path / 'other.jsonl'}" in error
        assert (tmp_path / "other.jsonl").read_bytes() == before and not (tmp_path / "other.npy").exists()


def test_merge_of_outputs_made_in_two_folders_names_every_file_from_the_first(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whole runs made in two folders name their files from each: merged as they were, `p01.jpg` (made in photos/)
    # beside `photos/p00.jpg` (made in its parent) read as a file gone to the next --update, which dropped its row.
    monkeypatch.chdir(tmp_path)
    ok(embed(Path("photos/p00.jpg"), tmp_path / "a.npy"))
    monkeypatch.chdir(folder)
    (folder / "p02.jpg").write_bytes(b"not a photo")
    ok(embed(Path("p01.jpg"), tmp_path / "b.npy", "p02.jpg"))
    monkeypatch.chdir("/")  # a merge may run anywhere
    assert ok(siglip("merge", tmp_path / "a.npy", tmp_path / "b.npy", "-o", tmp_path / "m.npy", "-q")).stderr == ""
    assert [json.loads(line)["path"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        "photos/p00.jpg", "photos/p01.jpg"
    ]
    assert [json.loads(line)["path"] for line in (tmp_path / "m.errors.jsonl").read_text().splitlines()] == [
        "photos/p02.jpg"
    ]
    assert json.loads((tmp_path / "m.meta.json").read_text())["working_directory"] == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = json.loads(ok(embed(Path("photos/p00.jpg"), tmp_path / "m.npy", "--update", "--json")).stdout)
    assert (summary["reused"], summary["removed"]) == (2, 0)


def test_merge_refuses_overlapping_outputs(embed, folder: Path, tmp_path: Path) -> None:
    ok(embed(folder, tmp_path / "part0.safetensors", "--shard", "0/2"))
    ok(embed(folder, tmp_path / "again.safetensors", "--shard", "0/2"))
    parts = [tmp_path / "part0.safetensors", tmp_path / "again.safetensors"]
    error = the_error(siglip("merge", *parts, "-o", tmp_path / "all.safetensors"))
    assert "overlap" in error
    assert not (tmp_path / "all.safetensors").exists()


def test_merge_refuses_one_file_in_two_spellings(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whole runs record no part and no inputs: their rows were told apart by their paths' strings alone, and the
    # photos of `photos`, `/…/photos` and a folder link to it were merged two and three times over.
    ok(embed(folder, tmp_path / "absolute.safetensors"))
    (tmp_path / "link").symlink_to(folder)
    ok(embed(tmp_path / "link", tmp_path / "linked.safetensors"))
    monkeypatch.chdir(tmp_path)
    ok(embed(Path("photos"), tmp_path / "relative.safetensors"))
    monkeypatch.chdir("/")  # the relative rows name their files from where they were made, not from here
    for other, spelled in (("relative", "photos/p00.jpg"), ("linked", f"{tmp_path}/link/p00.jpg")):
        error = the_error(siglip("merge", tmp_path / "absolute.safetensors", tmp_path / f"{other}.safetensors",
                                 "-o", tmp_path / "all.safetensors"))  # fmt: skip
        assert error == (f"error: {spelled} is in both {tmp_path / 'absolute.safetensors'} (as "
                         f"{folder / 'p00.jpg'}) and {tmp_path / other}.safetensors: these outputs overlap, so they "
                         "are not disjoint shards of one run.")  # fmt: skip
    assert not (tmp_path / "all.safetensors").exists()


def test_merge_refuses_a_part_beside_an_output_that_is_no_part(embed, folder: Path, tmp_path: Path) -> None:
    # Part 0/2 and another folder's whole run merged without a word that part 1/2 was missing.
    ok(embed(folder, tmp_path / "part0.safetensors", "--shard", "0/2"))
    other = save_photos(tmp_path / "other", ["o0.jpg"], first_seed=50)
    ok(embed(other, tmp_path / "whole.safetensors"))
    error = the_error(siglip("merge", tmp_path / "part0.safetensors", tmp_path / "whole.safetensors",
                             "-o", tmp_path / "all.safetensors"))  # fmt: skip
    assert error.startswith(f"error: {tmp_path / 'part0.safetensors'} is part 0/2 of a --shard run, and "
                            f"{tmp_path / 'whole.safetensors'} is not a part")  # fmt: skip


def test_merge_of_parts_that_embedded_nothing_is_refused(embed, tmp_path: Path) -> None:
    # A part may be all bad (the merge decides), but parts where every file failed (a list of paths from another
    # folder, a share not mounted on the nodes) merged into an empty output with exit 0, all the array green.
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"x{i}.jpg").write_bytes(b"not a jpeg")
    parts = [tmp_path / f"part{k}.safetensors" for k in range(2)]
    for k, part in enumerate(parts):
        ok(embed(folder, part, "--shard", f"{k}/2"))
    result = siglip("merge", *parts, "-o", tmp_path / "all.safetensors")
    assert result.exit_code == 2 and not (tmp_path / "all.safetensors").exists()
    error = the_error(result)
    assert error.startswith(f"error: none of the 6 files of these outputs could be embedded ({folder / 'x0.jpg'}")
    assert error.endswith("): there is nothing to merge.")


def test_shard_auto_takes_its_index_from_the_slurm_array(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(embed(folder, tmp_path / "explicit.safetensors", "--shard", "1/3"))
    # `sbatch --array=5-7`: task 6 is the second of three.
    for name, value in {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}.items():
        monkeypatch.setenv(name, value)
    ok(embed(folder, tmp_path / "auto.safetensors", "--shard", "auto"))
    assert differences(tmp_path / "auto.safetensors", tmp_path / "explicit.safetensors") == []


def test_shard_auto_with_num_shards_takes_a_kubernetes_jobs_index(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An indexed Job says its index, not its count: --num-shards gives that, through the command line.
    ok(embed(folder, tmp_path / "explicit.safetensors", "--shard", "2/3"))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert "add --num-shards N" in the_error(embed(folder, tmp_path / "auto.safetensors", "--shard", "auto"))
    ok(embed(folder, tmp_path / "auto.safetensors", "--shard", "auto", "--num-shards", "3"))
    assert differences(tmp_path / "auto.safetensors", tmp_path / "explicit.safetensors") == []


# ------------------------------------------------------------------------------------ several devices


def test_several_devices_run_one_worker_each_and_equal_one_run(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers compute like this process
    output = tmp_path / "out" / "embeddings.safetensors"
    summary = summary_of(embed(folder, output, "--device", "cpu,cpu", "--batch-size", 1, "--json"))
    assert (summary["embedded"], summary["reused"]) == (12, 0)
    ok(embed(folder, tmp_path / "one.safetensors", "--batch-size", 1))
    assert differences(output, tmp_path / "one.safetensors") == []
    assert sorted(p.name for p in output.parent.iterdir()) == ["embeddings.jsonl", "embeddings.safetensors"]


def test_a_worker_that_exits_just_after_its_last_message_has_not_crashed(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent's wait for a message timed out just before the last worker's "done" came, and the worker had
    # exited by the time the parent looked (a parent descheduled on a busy machine): "the worker on cpu stopped
    # (exit code 0)", its "done" unread in the queue. Made certain here: that wait times out once, the message kept.
    import multiprocessing.queues
    import queue

    get, empty = multiprocessing.queues.Queue.get, multiprocessing.queues.Queue.empty
    held: list[object] = []
    dones = Counter()

    def late_get(self, block=True, timeout=None):
        if held:
            return held.pop()
        item = get(self, block, timeout)
        dones[item[0]] += 1
        if item[0] == "done" and dones["done"] == 2:  # the last worker's: it exits while this process waits
            for process in multiprocessing.active_children():
                process.join(30)
            held.append(item)
            raise queue.Empty
        return item

    monkeypatch.setattr(multiprocessing.queues.Queue, "get", late_get)
    monkeypatch.setattr(multiprocessing.queues.Queue, "empty", lambda self: not held and empty(self))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    summary = summary_of(embed(folder, tmp_path / "out.safetensors", "--device", "cpu,cpu", "--json"))
    assert summary["embedded"] == 12 and not held


@pytest.mark.parametrize(("devices", "threads"), [("cpu,cpu", 3), ("cpu,cpu,cpu", 2), (",".join(["cpu"] * 7), 1)])
def test_cpu_devices_share_the_cores(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: str, threads: int
) -> None:
    # Each worker's model ran on every core: `--device cpu,cpu` on 2 cores took three times one device's time.
    from siglip_cli import devices as devices_module
    from siglip_cli.errors import UserError

    def report_threads(*args, **kwargs):
        raise UserError(f"{torch.get_num_threads()} threads.")

    monkeypatch.setattr(devices_module, "usable_cpus", lambda: 6)
    monkeypatch.setattr(devices_module, "load", report_threads)
    fork = multiprocessing.get_context("fork")  # the workers start as copies of this process, with both patches
    monkeypatch.setattr(devices_module.mp, "get_context", lambda method: fork)
    # Each worker ends by itself. Stopped with SIGTERM as the first one's error arrives, a copy still starting took
    # it in this process's handler, left its start-up through this very test (now a second pytest), and failed it.
    monkeypatch.setattr(devices_module, "_stop", lambda processes: None)  # `_run_workers` then joins them
    assert the_error(embed(folder, tmp_path / "out.npy", "--device", devices), 2) == f"error: {threads} threads."


def test_a_worker_that_fails_leaves_its_traceback_in_its_log(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug or a device failure in a worker was one line in the parent's sentence, with exit status 2 (the user's
    # mistake) and the traceback nowhere.
    from siglip_cli import devices

    def failing(job, channel):
        raise TypeError("a bug")

    monkeypatch.setattr(devices, "_embed_job", failing)
    fork = multiprocessing.get_context("fork")  # the workers start as copies of this process: with `failing`
    monkeypatch.setattr(devices.mp, "get_context", lambda method: fork)
    # Each worker ends by itself. Stopped with SIGTERM as the first one's crash arrives, a copy still in its fork()
    # raised it there, outside multiprocessing's `finally: os._exit()`, and ran on as a second pytest for `_stop`'s
    # 10 s (an `F` among the dots). As in test_cpu_devices_share_the_cores, `_run_workers` then joins them.
    monkeypatch.setattr(devices, "_stop", lambda processes: None)
    output = tmp_path / "out" / "embeddings.safetensors"
    error = the_error(embed(folder, output, "--device", "cpu,cpu"), 1)
    named = re.fullmatch(r"error: the worker on cpu failed \(TypeError: a bug\); its traceback is in (.+)\.", error)
    assert named and Path(named[1]).parent == work_area(output)  # the first worker to fail: device-0 or device-1
    assert 'raise TypeError("a bug")' in Path(named[1]).read_text()


@pytest.fixture
def stopped_on_two_devices(embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The output of `folder` embedded on two devices (`cpu,cpu`), the run stopped before its merge."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # stays set for the test's own runs
    output = tmp_path / "out" / "embeddings.safetensors"
    assert stop_before_the_merge(monkeypatch, lambda: embed(folder, output, "--device", "cpu,cpu")).exit_code == 130
    return output


def stop_before_the_merge(monkeypatch: pytest.MonkeyPatch, run: Callable[[], R]) -> R:
    """`run()` with several devices stopped as it would merge its finished shards (Ctrl-C, a power cut)."""
    import siglip_cli.devices as devices

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(devices, "merge_outputs", power_cut)
        return run()


def test_several_devices_rerun_after_an_interruption_brings_finished_shards_up_to_date(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both shards finished, then the run died before merging them; files came and went before the rerun.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out" / "embeddings.safetensors"
    run = stop_before_the_merge(monkeypatch, lambda: embed(folder, output, "--device", "cpu,cpu", "--batch-size", 1))
    assert run.exit_code == 130
    (folder / "p03.jpg").unlink()
    save_photos(folder, ["a00.jpg"], first_seed=100)
    summary = summary_of(embed(folder, output, "--device", "cpu,cpu", "--batch-size", 1, "--json"))
    assert (summary["embedded"], summary["reused"]) == (1, 11)
    ok(embed(folder, tmp_path / "one.safetensors", "--batch-size", 1))
    assert differences(output, tmp_path / "one.safetensors") == []


def test_several_devices_rerun_with_other_options_is_refused_as_one_device_refuses(
    embed, folder: Path, stopped_on_two_devices: Path
) -> None:
    # It named an internal shard file and advised --update, which several devices refuse.
    output = stopped_on_two_devices
    error = the_error(embed(folder, output, "--device", "cpu,cpu", "--tokens"))
    assert error == (
        f"error: {work_area(output)} holds an interrupted run whose options differ (--tokens): rerun with the same "
        "options to continue, or add --overwrite to start afresh."
    )
    assert summary_of(embed(folder, output, "--device", "cpu,cpu", "--json"))["reused"] == 12


def test_a_run_interrupted_on_several_devices_is_not_thrown_away_by_a_rerun_on_others(
    embed, folder: Path, stopped_on_two_devices: Path
) -> None:
    # One GPU of two failed, and the rerun names one device: the finished shards were deleted without a word.
    output = stopped_on_two_devices
    for devices in ("cpu", "cpu,cpu,cpu"):
        error = the_error(embed(folder, output, "--device", devices))
        assert error == (
            f"error: {work_area(output)} holds a run interrupted on 2 devices: rerun it with 2 --device to continue, "
            "or add --overwrite to start afresh."
        )
    assert summary_of(embed(folder, output, "--device", "cpu,cpu", "--json"))["reused"] == 12


def test_a_run_interrupted_on_one_device_is_not_thrown_away_by_a_rerun_on_several(
    embed, interrupted: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    error = the_error(embed(folder, interrupted, "--device", "cpu,cpu"))
    assert error == (
        f"error: {work_area(interrupted)} holds a run interrupted on one device: rerun it on one --device to "
        "continue, or add --overwrite to start afresh."
    )
    assert summary_of(embed(folder, interrupted, "--json"))["reused"] == 8  # its 4 finished batches


@pytest.mark.parametrize("stopped, rerun_on", [("stopped_on_two_devices", "cpu"), ("interrupted", "cpu,cpu")])
def test_a_run_that_saved_no_batch_holds_no_rerun_to_its_devices(
    embed, folder: Path, stopped: str, rerun_on: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its workers stopped before any saved a batch (one GPU of two out of memory at once): the rerun on the other
    # GPU alone was refused "to continue" what held nothing, after a Ctrl-C that said only "interrupted.".
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = request.getfixturevalue(stopped)
    work = work_area(output)
    for chunk in work.glob("chunk-*.safetensors"):
        chunk.unlink()  # one device: its state.json is left
    for shard in list(work.glob("shard-*")):  # several: each shard's finished files become a work area holding its
        shard.unlink()  # state.json alone, as a worker stopped before its first batch leaves it
        started = work / f"{shard.name.split('.')[0]}.safetensors.partial"
        started.mkdir(exist_ok=True)
        (started / "state.json").write_text("{}")
    assert summary_of(embed(folder, output, "--device", rerun_on, "--json"))["reused"] == 0
    assert not work_area(output).exists()


def test_several_devices_rerun_with_overwrite_continues_work_of_the_same_options(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --overwrite threw the work folder away first: every shard was embedded again, where one device continues.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out" / "embeddings.safetensors"

    def overwrite_run():
        return embed(folder, output, "--device", "cpu,cpu", "--overwrite")

    assert stop_before_the_merge(monkeypatch, overwrite_run).exit_code == 130
    summary = summary_of(embed(folder, output, "--device", "cpu,cpu", "--overwrite", "--json"))
    assert (summary["embedded"], summary["reused"]) == (0, 12)
    assert stop_before_the_merge(monkeypatch, overwrite_run).exit_code == 130  # again, then other options: afresh
    summary = summary_of(embed(folder, output, "--device", "cpu,cpu", "--overwrite", "--tokens", "--json"))
    assert (summary["embedded"], summary["reused"]) == (12, 0)
    assert "tokens" in load_file(output)


def test_several_devices_on_an_existing_output_do_not_suggest_update(embed, folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "embeddings.safetensors"
    ok(embed(folder, output, "--device", "cpu,cpu"))
    error = the_error(embed(folder, output, "--device", "cpu,cpu"))
    assert error == f"error: {output} already exists: add --overwrite to replace it (--update runs on one device)."


def test_several_devices_stopped_after_the_merge_put_the_output_in_place_continue_when_rerun(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused as "already exists" at first; then the rerun handed back the old output whatever it was asked.
    import siglip_cli.devices as devices

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out" / "embeddings.safetensors"
    with monkeypatch.context() as patch:  # killed after the last rename, before the work folder was removed
        patch.setattr(devices.WorkArea, "remove", lambda self: (_ for _ in ()).throw(Killed))
        with pytest.raises(Killed):
            embed(folder, output, "--device", "cpu,cpu", "--batch-size", 1)
    assert work_area(output).is_dir() and output.exists()
    error = the_error(embed(folder, output, "--device", "cpu,cpu", "--tokens"))
    assert "holds an interrupted run whose options differ (--tokens)" in error
    save_photos(folder, ["a00.jpg"], first_seed=100)
    summary = summary_of(embed(folder, output, "--device", "cpu,cpu", "--batch-size", 1, "--json"))
    assert (summary["embedded"], summary["reused"]) == (1, 12)
    assert not work_area(output).exists()
    ok(embed(folder, tmp_path / "one.safetensors", "--batch-size", 1))
    assert differences(output, tmp_path / "one.safetensors") == []


def test_a_ctrl_c_while_the_workers_start_stops_the_started_ones(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vision: Path
) -> None:
    # Delivered as the start block ended, before the try that stops workers: the started ones were left to die on
    # the queue this process took away, with a traceback each.
    import multiprocessing

    import siglip_cli.devices as devices

    @contextlib.contextmanager
    def ctrl_c_as_it_ends():
        yield
        raise KeyboardInterrupt

    monkeypatch.setattr(devices, "_ctrl_c_left_to_this_process", ctrl_c_as_it_ends)
    with pytest.raises(KeyboardInterrupt):
        devices.embed_on_devices(
            str(tiny_vision), ["cpu", "cpu"], discover([str(folder)]), tmp_path / "embeddings.safetensors",
            options=EmbedOptions(batch_size=1, workers=0),
        )  # fmt: skip
    assert multiprocessing.active_children() == []


def test_a_write_error_after_the_work_folder_is_gone_does_not_point_at_it(embed, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "bad.jpg").write_bytes(b"not a picture")
    output = tmp_path / "out" / "embeddings.safetensors"
    (tmp_path / "out" / "embeddings.errors.jsonl").mkdir(parents=True)  # the errors file cannot be written
    error = the_error(embed(junk, output, "--overwrite"))
    assert "embeddings.errors.jsonl" in error and "kept in" not in error, error
    assert not work_area(output).exists()


def test_several_devices_that_embed_nothing_fail_as_one_device_does(embed, tmp_path: Path) -> None:
    # Exit 0 with an empty output, where one device exits 2 with the first file's reason.
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"bad{i}.jpg").write_bytes(b"not a picture")
    output = tmp_path / "out" / "embeddings.safetensors"
    error = the_error(embed(junk, output, "--device", "cpu,cpu"))
    assert error.startswith(f"error: none of the 3 input files could be embedded (the first, {junk / 'bad0.jpg'}: ")
    assert sorted(p.name for p in output.parent.iterdir()) == ["embeddings.errors.jsonl"]


class Tally:
    """A progress display that counts rows embedded now and rows kept from earlier work."""

    def __init__(self):
        self.embedded = self.reused_rows = 0

    def start(self, total: int, done: int) -> None:
        self.reused_rows += done

    def advance(self, n: int) -> None:
        self.embedded += n

    def reused(self, n: int) -> None:
        self.reused_rows += n

    def note(self, message: str) -> None:
        pass


def test_several_devices_rerun_counts_kept_rows_apart_from_new_ones(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vision: Path
) -> None:
    # The images/s of the bar counts `advance` only: a finished shard's rows must not arrive that way.
    import siglip_cli.devices as devices

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out" / "embeddings.safetensors"
    paths = discover([str(folder)])
    run = dict(model=str(tiny_vision), devices=["cpu", "cpu"], paths=paths, output=output, options=EmbedOptions(batch_size=1, workers=0))
    with pytest.raises(KeyboardInterrupt):
        stop_before_the_merge(monkeypatch, lambda: devices.embed_on_devices(**run))
    save_photos(folder, ["a00.jpg"], first_seed=100)
    tally = Tally()
    devices.embed_on_devices(**{**run, "paths": discover([str(folder)])}, progress=tally)
    assert (tally.embedded, tally.reused_rows) == (1, 12)


@pytest.mark.parametrize(
    ("output", "existing", "message"),
    [
        ("embeddings.parquet", None, "must end in .safetensors or .npy"),
        ("embeddings.safetensors", "embeddings.jsonl", "embeddings.jsonl already exists and would be replaced"),
    ],
)
def test_several_devices_check_the_output_before_starting(
    embed, folder: Path, tmp_path: Path, output: str, existing: str | None, message: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        (out / existing).write_text("the user's own notes\n")
    assert message in the_error(embed(folder, out / output, "--device", "cpu,cpu"))
    assert sorted(p.name for p in out.iterdir()) == ([existing] if existing else [])  # no .partial left behind


def test_cuda_all_on_a_machine_with_one_gpu_runs_on_that_gpu(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    placed_on = []

    def load_model(checkpoint: object, *, device: torch.device | str, dtype: torch.dtype) -> None:
        placed_on.append(torch.device(device))
        raise UserError("the test stops here, before anything reaches for the pretend GPU")

    monkeypatch.setattr(runtime_module, "load_model", load_model)
    embed(folder, tmp_path / "embeddings.safetensors", "--device", " cuda:all")  # `--device "$GPUS"`, spaced
    assert [device.type for device in placed_on] == ["cuda"]  # it said: unknown device 'cuda:all'


def test_cuda_all_among_other_devices_is_one_sentence(embed, folder: Path, tmp_path: Path) -> None:
    assert the_error(embed(folder, tmp_path / "e.safetensors", "--device", "cuda:all,cpu")) == (
        "error: --device cuda:all,cpu: cuda:all is every GPU already, and is given on its own."
    )


# ------------------------------------------------------------------------------------- out of memory


def cuda_out_of_memory(images: int) -> RuntimeError:
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {images} images' worth")


def cpu_out_of_memory(images: int) -> RuntimeError:  # as torch's CPU allocator raises it, for one huge tensor
    return RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                        f"to allocate {images} images' worth. Error code 12 (Cannot allocate memory)")  # fmt: skip


class OutOfMemoryAbove:
    """The embedder on a pretend device with room for at most `limit` images per forward pass."""

    def __init__(self, embedder: Embedder, limit: int, error: Callable[[int], RuntimeError] = cuda_out_of_memory):
        self.embedder, self.limit, self.error, self.batch_sizes, self.failed = embedder, limit, error, [], []

    def __getattr__(self, name: str):
        return getattr(self.embedder, name)

    def __call__(self, pixels: torch.Tensor):
        if len(pixels) > self.limit:
            self.failed.append(len(pixels))
            raise self.error(len(pixels))
        self.batch_sizes.append(len(pixels))
        return self.embedder(pixels)


def cublas_out_of_memory(images: int) -> RuntimeError:  # cuBLAS's workspace, which torch raises as a CUDA error
    return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


@pytest.mark.parametrize(
    "error", [cuda_out_of_memory, cpu_out_of_memory, cublas_out_of_memory], ids=["cuda", "cpu", "cublas"]
)
@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
def test_out_of_memory_halves_the_batch_and_says_so_once(
    embedder: Embedder, folder: Path, tmp_path: Path, tokens: bool, error: Callable[[int], RuntimeError]
) -> None:
    # The CPU allocator's error (a large -b with so400m on a laptop) was a 115-line traceback.
    paths = discover([str(folder)])
    small = OutOfMemoryAbove(embedder, limit=3, error=error)
    progress = Notes()
    options = EmbedOptions(batch_size=8, workers=0, tokens=tokens)
    embed_to_file(small, paths, tmp_path / "halved.safetensors", options=options, progress=progress)
    assert small.batch_sizes == [2, 2, 2, 2, 2, 2]  # 12 images in batches of 8 and 4, run in pieces of 2
    assert small.failed == [8, 4]  # the size that fits is kept: the batch of 4 is not tried whole
    assert len(progress.notes) == 1 and "out of memory" in progress.notes[0].lower()
    pairs = EmbedOptions(batch_size=2, workers=0, tokens=tokens)
    embed_to_file(embedder, paths, tmp_path / "pairs.safetensors", options=pairs)
    assert differences(tmp_path / "halved.safetensors", tmp_path / "pairs.safetensors") == []


def test_an_image_that_does_not_fit_alone_stops_the_run(embedder: Embedder, folder: Path, tmp_path: Path) -> None:
    paths, options = discover([str(folder)]), EmbedOptions(batch_size=4, workers=0)
    with pytest.raises(UserError, match="out of memory on a single image"):
        embed_to_file(OutOfMemoryAbove(embedder, limit=0), paths, tmp_path / "e.safetensors", options=options)
    assert not (tmp_path / "e.safetensors").exists()
    # It saved no batch: nothing holds the next run to its options. A run with other ones (a smaller model, say)
    # was refused ("holds an interrupted run whose options differ"), and only --overwrite went on.
    other = EmbedOptions(batch_size=4, workers=0, tokens=True)
    embed_to_file(embedder, paths, tmp_path / "e.safetensors", options=other)
    assert not (tmp_path / "e.safetensors.partial").exists()


@pytest.mark.parametrize("error", [cuda_out_of_memory, cpu_out_of_memory], ids=["cuda", "cpu"])
def test_out_of_memory_even_for_one_image_ends_the_command_with_one_sentence(
    embed, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Callable[[int], RuntimeError]
) -> None:
    def no_room(self: Embedder, pixels: torch.Tensor):
        raise error(len(pixels))

    monkeypatch.setattr(Embedder, "__call__", no_room)
    result = embed(folder, tmp_path / "embeddings.safetensors")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), "a traceback"
    lines = result.stderr.strip().splitlines()
    # The halving note comes first (batches are halved down to one image), then the one-sentence error.
    assert all(line.startswith(("note: ", "error: ")) for line in lines), result.stderr
    assert lines[-1].startswith("error: ") and "out of memory" in lines[-1].lower(), result.stderr


# ----------------------------------------------------------------------------------- chunked flushing


@pytest.mark.parametrize("chunk_bytes, chunks", [(1, 4), (1 << 40, 1)])
def test_a_chunk_is_flushed_once_its_tensors_reach_chunk_bytes(
    embedder: Embedder, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, chunks: int
) -> None:
    monkeypatch.setattr(embed_module, "FLUSH_SECONDS", float("inf"))  # only the size limit can flush, and the stop
    monkeypatch.setattr(embed_module, "CHUNK_BYTES", chunk_bytes)
    output = interrupt(embedder, folder, tmp_path / "embeddings.safetensors")  # Ctrl-C during batch 4
    assert chunks_in(work_area(output)) == chunks  # batches 1-3 as each finished, then 4 at the stop; or all at once


# ---------------------------------------------------------------------------------- real processes


def process_env(flush_seconds: float) -> dict[str, str]:
    return {
        **os.environ,
        "SIGLIP_FLUSH_SECONDS": str(flush_seconds),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "1000",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 small photos and two broken files among them."""
    folder = save_photos(tmp_path_factory.mktemp("many"), [f"{i:03d}.jpg" for i in range(GOOD_PHOTOS)])
    (folder / "040-broken.jpg").write_bytes(b"not a picture")
    (folder / "120-broken.jpg").write_bytes((folder / "120.jpg").read_bytes()[:200])  # truncated
    return folder


def embed_command(photos: Path, output: Path, checkpoint: Path, *, workers: int = 0) -> list[str]:
    return [
        SIGLIP, "embed", str(photos), "-o", str(output), "--model", str(checkpoint),
        "--tokens", "--batch-size", str(BATCH), "--workers", str(workers), "--quiet",
    ]  # fmt: skip


def run_to_end(command: list[str], *, flush_seconds: float = 0.05) -> dict:
    env = process_env(flush_seconds)
    done = subprocess.run(command + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def uninterrupted(many_photos: Path, tiny_vision: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted") / "embeddings.safetensors"
    run_to_end(embed_command(many_photos, output, tiny_vision))
    return output


def start(command: list[str], *, flush_seconds: float) -> subprocess.Popen:
    """The command in a process group of its own, as a shell starts a foreground job (so Ctrl-C can reach all of it,
    and neither Ctrl-C nor a hang-up is ignored, even when pytest itself runs in the background with SIGINT ignored,
    or under nohup with SIGHUP ignored: a run keeps a signal it finds ignored)."""
    return subprocess.Popen(
        command, env=process_env(flush_seconds), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_as_a_foreground_job,
    )  # fmt: skip


def _as_a_foreground_job() -> None:
    for stop in (signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, signal.SIG_DFL)


def wait_for_chunks(process: subprocess.Popen, output: Path, chunks: int, timeout: float = 120) -> None:
    """Until the run's work area exists and holds at least `chunks` finished chunks."""
    work, stop = work_area(output), time.monotonic() + timeout
    while not ((work / "state.json").exists() and chunks_in(work) >= chunks):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before writing {chunks} chunks"
        assert time.monotonic() < stop, f"no {chunks} chunks after {timeout} s"
        time.sleep(0.002)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel ends them on Linux (PR_SET_PDEATHSIG)")
def test_the_decoding_workers_of_a_run_killed_end_with_it(many_photos: Path, tiny_vision: Path, tmp_path: Path) -> None:
    # They noticed only at the loader's next check, 5 s on, decoding and holding memory meanwhile (the out-of-memory
    # killer's victim is the run, whose workers then took a rerun's memory).
    photos = with_slow_photos_last(many_photos, tmp_path)  # the workers are busy when the run is killed
    output = tmp_path / "embeddings.safetensors"
    process = start(embed_command(photos, output, tiny_vision, workers=2), flush_seconds=0.05)
    wait_for_chunks(process, output, 1)
    workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if parent_of(pid) == process.pid]
    assert len(workers) >= 2 and process.poll() is None
    process.kill()
    process.wait()
    # The kernel's signal is at once; the loader's own check would come 5 s on. 4 s tells them apart with room for
    # a busy 2-core machine's scheduling.
    ended_by = time.monotonic() + 4
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < ended_by, "the decoding workers outlived the run"
        time.sleep(0.01)


def with_slow_photos_last(photos: Path, tmp_path: Path) -> Path:
    """A copy of `photos` with 8 large noisy JPEGs after them, slow to decode: a run over it is still going a while
    after its first chunks."""
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy)
    noise = np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    for i in range(8):
        Image.fromarray(np.roll(noise, i, axis=0)).save(copy / f"zz{i}.jpg", quality=95)
    return copy


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """The process's state letter and parent's pid, from /proc; None once it is gone."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        return state, int(parent)
    except (OSError, ValueError):
        return None


def parent_of(pid: int) -> int | None:
    return None if (found := _state_and_parent(pid)) is None else found[1]


def alive(pid: int) -> bool:
    """Running, not ended (a zombie is ended: its parent, init here, has yet to reap it)."""
    return (found := _state_and_parent(pid)) is not None and found[0] != "Z"


def test_kill_9_at_random_points_then_rerunning_gives_the_uninterrupted_output(
    many_photos: Path, tiny_vision: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    output = tmp_path / "embeddings.safetensors"
    command = embed_command(many_photos, output, tiny_vision)
    # Flushing after every batch makes 41 chunks whatever the machine's speed; kill -9 once the work area holds a
    # seeded random number of them, three times (a count already reached kills the next run while it starts up).
    # Each kill lands wherever the process is then: decoding, embedding, writing or fsyncing a chunk.
    kill_points = sorted(random.Random(5).sample(range(25), 3))
    for chunks in kill_points:
        process = start(command, flush_seconds=0)
        wait_for_chunks(process, output, chunks)
        process.kill()
        process.communicate()
        assert not output.exists(), "a killed run left an output file"
    summary = run_to_end(command)
    assert summary["reused"] >= BATCH * kill_points[-1] - 2  # the chunks' rows (2 broken files are no rows)
    assert summary["embedded"] > 0 and summary["embedded"] + summary["reused"] == GOOD_PHOTOS
    assert differences(output, uninterrupted) == []
    assert not work_area(output).exists()


def test_ctrl_c_exits_130_with_one_sentence_saying_to_rerun(
    many_photos: Path, tiny_vision: Path, tmp_path: Path
) -> None:
    # Large photos last keep the run going for a while after its first chunk, however late this test sees that chunk.
    photos = tmp_path / "photos"
    shutil.copytree(many_photos, photos)
    for i in range(6):
        Image.new("RGB", (3000, 2000), (40 * i, 90, 160)).save(photos / f"zz{i}.jpg")
    output = tmp_path / "embeddings.safetensors"
    process = start(embed_command(photos, output, tiny_vision, workers=1), flush_seconds=0.05)
    wait_for_chunks(process, output, 1)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the decoding worker too
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert len(stderr.strip().splitlines()) == 1, stderr  # no traceback, from the worker or the main process
    assert "interrupted" in stderr and "rerun the same command" in stderr
    assert not output.exists() and chunks_in(work_area(output)) >= 1


def test_ctrl_c_with_several_devices_is_one_sentence_too(many_photos: Path, tiny_vision: Path, tmp_path: Path) -> None:
    # The terminal's Ctrl-C reaches every worker process too: each printed a traceback (while importing torch, or as
    # its own decoding workers died) after the parent's sentence.
    output = tmp_path / "embeddings.safetensors"
    command = embed_command(many_photos, output, tiny_vision, workers=1) + ["--device", "cpu,cpu"]
    process = start(command, flush_seconds=0.05)
    work, stop = work_area(output), time.monotonic() + 120
    while not (work.is_dir() and any(work.glob("*/chunk-*"))):  # a chunk in either worker's shard
        assert process.poll() is None and time.monotonic() < stop, "no chunk written"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        f"error: interrupted; finished work is kept in {work}: rerun the same command to continue."
    ]


def test_sigterm_stops_like_ctrl_c_and_rerunning_continues(
    many_photos: Path, tiny_vision: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    output = tmp_path / "embeddings.safetensors"
    command = embed_command(many_photos, output, tiny_vision)
    process = start(command, flush_seconds=0.05)
    wait_for_chunks(process, output, 2)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "rerun" in stderr
    summary = run_to_end(command)
    assert summary["reused"] > 0 and summary["embedded"] + summary["reused"] == GOOD_PHOTOS
    assert differences(output, uninterrupted) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_before_the_run_starts_is_one_sentence(tiny_vision: Path, tmp_path: Path, signum: int) -> None:
    # While torch loaded or the inputs were walked (minutes, for a library on a network share) a scheduler's stop
    # ended the command with 143 (or 129) and no word, where Ctrl-C was "interrupted." and 130.
    paths = tmp_path / "paths"
    os.mkfifo(paths)
    command = [SIGLIP, "embed", "--files-from", str(paths), "-o", str(tmp_path / "e.safetensors"),
               "--model", str(tiny_vision), "--workers", "0"]  # fmt: skip
    process = start(command, flush_seconds=1)
    with open(paths, "wb"):  # the walk has begun once the command opens the list; its reading waits for the end
        os.kill(process.pid, signum)
        _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (130, "error: interrupted.\n")


def test_a_hang_up_stops_like_ctrl_c_and_keeps_the_work(many_photos: Path, tiny_vision: Path, tmp_path: Path) -> None:
    # A closed terminal (an ssh session dropped) sends SIGHUP to every process of the run: it ended with exit 129 and
    # no word, and lost the batches finished since the last flush.
    photos = with_slow_photos_last(many_photos, tmp_path)  # the run is still going after the hang-up
    output = tmp_path / "embeddings.safetensors"
    command = embed_command(photos, output, tiny_vision, workers=1)
    process = start(command, flush_seconds=1e9)  # nothing flushed by time: the stop itself must keep the work
    wait_for_chunks(process, output, 0)
    time.sleep(0.5)
    assert process.poll() is None, "the run ended before the hang-up"
    os.killpg(process.pid, signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert len(stderr.strip().splitlines()) == 1 and "rerun the same command" in stderr, stderr
    assert chunks_in(work_area(output)) == 1
    summary = run_to_end(command)
    assert summary["reused"] > 0 and summary["embedded"] + summary["reused"] == GOOD_PHOTOS + 8


def test_a_hang_up_leaves_a_nohup_run_going(many_photos: Path, tiny_vision: Path, uninterrupted: Path, tmp_path: Path):
    output = tmp_path / "embeddings.safetensors"
    process = subprocess.Popen(
        embed_command(many_photos, output, tiny_vision, workers=1), env=process_env(0.05), stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # nohup
    )  # fmt: skip
    wait_for_chunks(process, output, 1)
    os.killpg(process.pid, signal.SIGHUP)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert differences(output, uninterrupted) == []


# ---------------------------------------------------------------------------------------- bounded memory

# A tower that is nearly all tokens and no compute: no embedder layer, no head, 16×16 patches of 256 floats.
TOKENS, HIDDEN = 256, 256
ROW_BYTES = (TOKENS + 1) * HIDDEN * 4  # one image's tokens and embedding, float32: 257 KiB


@pytest.fixture(scope="module")
def all_tokens_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(
        tmp_path_factory.mktemp("all_tokens"), layout="vision", image_size=64, patch_size=4, hidden_size=HIDDEN,
        num_heads=4, intermediate_size=16, num_layers=0, use_head=False,
    )  # fmt: skip


def peak_rss(command: list[str], log: Path) -> int:
    """The peak resident memory of a process run to the end, in bytes.

    Every batch is flushed (SIGLIP_FLUSH_SECONDS=0): chunks of however many batches fit in a time slice would make
    the peak depend on the machine's speed (±30 MiB between identical runs), one batch a chunk keeps it within a few.
    """
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=process_env(0), stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
    return usage.ru_maxrss * 1024


def test_memory_does_not_grow_with_the_number_of_images(all_tokens_tower: Path, tmp_path: Path) -> None:
    n = 100
    photos = save_photos(tmp_path / "photos", [f"{i:04d}.jpg" for i in range(4 * n)], size=(16, 16))
    lists = {count: tmp_path / f"{count}.txt" for count in (n, 4 * n)}
    peaks = {}
    for count, listing in lists.items():
        listing.write_text("".join(f"{p}\n" for p in sorted(photos.iterdir())[:count]))
        output = tmp_path / f"{count}.safetensors"
        command = [SIGLIP, "embed", "--files-from", str(listing), "-o", str(output), "--model", str(all_tokens_tower),
                   "--tokens", "--batch-size", "16", "--workers", "0", "--quiet"]  # fmt: skip
        peaks[count] = peak_rss(command, tmp_path / f"{count}.log")
        with safe_open(output, framework="np") as f:
            assert f.get_slice("tokens").get_shape() == [count, TOKENS, HIDDEN]
    holding = 3 * n * ROW_BYTES  # what keeping the extra rows in memory would cost: 75 MiB
    growth = peaks[4 * n] - peaks[n]
    assert growth < holding / 3, f"peak RSS grew {growth / 2**20:.1f} MiB from {n} to {4 * n} images"
