"""The head start: the first batches decoded in a process forked before torch is imported (`siglip_cli.headstart`).

What it takes must be exactly what the decoding workers would have made, and what it guessed wrong must be left."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEFAULT_REPO_ID, HubCache, deadline, make_photo, ok, siglip, with_bogus_huffman_table
from siglip_cli import headstart
from siglip_cli.checkpoints import local_preprocessing, resolve_checkpoint
from siglip_cli.config import PreprocessConfig
from siglip_cli.files import discover
from siglip_cli.preprocess import DecodeOptions
from siglip_cli.reading import failure_reason, pixels_and_facts


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Photos in three formats, a broken JPEG and a text file named .jpg among them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(5):
        make_photo((96, 64), seed=seed).save(folder / f"photo{seed}.jpg", quality=95)
    make_photo((50, 40), seed=8).save(folder / "drawing.png")
    make_photo((30, 50), seed=9).save(folder / "icon.webp")
    (folder / "broken.jpg").write_bytes(with_bogus_huffman_table((folder / "photo0.jpg").read_bytes()))
    (folder / "notes.jpg").write_text("not a photo")
    return folder


def finished(count: int, folder: Path, model: Path, options: DecodeOptions = DecodeOptions()) -> None:
    """A head start on `folder`'s first `count` files, waited for to its end."""
    headstart._start([str(folder)], None, str(model), None, count, options)
    os.waitpid(headstart._running.pid, 0)


def assert_as_a_worker_makes(paths: list[str], taken: list, cfg: PreprocessConfig) -> None:
    """Each file the head start gave (`taken`, in the order of `paths`) is what a decoding worker makes of it: the
    same pixels and facts, or the same failure."""
    for path, (pixels, facts) in zip(paths, taken):
        try:
            expected, expected_facts, _ = pixels_and_facts(path, cfg, DecodeOptions())
        except Exception as e:
            assert pixels is None and facts == failure_reason(e, path)
        else:
            assert np.array_equal(pixels, expected) and facts == {"path": path, **expected_facts}


def test_what_it_takes_is_what_a_worker_makes(folder: Path, tiny_siglip: Path) -> None:
    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    paths = discover([str(folder)])
    finished(len(paths), folder, tiny_siglip)
    taken = headstart.take(paths, cfg, DecodeOptions())
    assert len(taken) == len(paths) == 9 and headstart._running is None
    assert_as_a_worker_makes(paths, taken, cfg)
    assert [p for p, (pixels, _) in zip(paths, taken) if pixels is None] == [
        str(folder / "broken.jpg"), str(folder / "notes.jpg")
    ]  # fmt: skip


def test_only_the_first_files_are_decoded_and_taken_from_the_first(folder: Path, tiny_siglip: Path) -> None:
    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    paths = discover([str(folder)])
    finished(3, folder, tiny_siglip)
    taken = headstart.take(paths, cfg, DecodeOptions())
    assert [facts if pixels is None else facts["path"] for pixels, facts in taken] == [
        "broken data stream when reading image file", paths[1], paths[2]
    ]  # broken.jpg, drawing.png, icon.webp  # fmt: skip


@pytest.mark.parametrize("guess", ["other files", "other order", "other preprocessing", "other options"])
def test_a_wrong_guess_is_left(folder: Path, tiny_siglip: Path, guess: str) -> None:
    # A run that continues earlier work embeds other files first; a Hub repo with a newer commit may resize otherwise.
    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    paths = discover([str(folder)])
    finished(4, folder, tiny_siglip)
    if guess == "other files":
        paths = paths[1:]
    elif guess == "other order":
        paths[0], paths[1] = paths[1], paths[0]
    elif guess == "other preprocessing":
        cfg = dataclasses.replace(cfg, resample=0 if cfg.resample else 3)
    options = DecodeOptions(exif_transpose=False) if guess == "other options" else DecodeOptions()
    assert headstart.take(paths, cfg, options) == [] and headstart._running is None


def test_stopped_early_it_gives_what_it_finished(
    folder: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped halfway through a file, it gives the files before that one, whole. Its 4th file's decoding never ends
    # here (the process is forked with the stand-in in place): once it has begun, the three before it are sent.
    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    paths = discover([str(folder)])
    begun, told = os.pipe()

    def stuck_on_the_fourth(path: str, *args):
        if path == paths[3]:
            os.write(told, b"4")
            time.sleep(3600)  # until `take` kills the process
        return pixels_and_facts(path, *args)

    monkeypatch.setattr(headstart, "pixels_and_facts", stuck_on_the_fourth)
    headstart._start([str(folder)], None, str(tiny_siglip), None, len(paths), DecodeOptions())
    try:
        with deadline(60):
            assert os.read(begun, 1) == b"4"
    finally:
        os.close(begun), os.close(told)
    taken = headstart.take(paths, cfg, DecodeOptions())
    assert len(taken) == 3 and headstart._running is None
    assert_as_a_worker_makes(paths, taken, cfg)


def test_a_checkpoint_not_on_this_machine_gets_no_head_start(folder: Path, hf_cache: HubCache) -> None:
    # The head start never waits on the network: a Hub id not in the cache is left to the run, which downloads it.
    assert local_preprocessing(DEFAULT_REPO_ID) is None
    finished(4, folder, Path(DEFAULT_REPO_ID))
    assert headstart.take(discover([str(folder)]), PreprocessConfig(32, 32), DecodeOptions()) == []


def test_a_cached_hub_checkpoint_is_read_from_the_cache_alone(
    tiny_siglip: Path, hf_cache: HubCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hf_cache(tiny_siglip)

    def no_network(*args, **kwargs):
        raise AssertionError("the head start asked the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, for all it knows
    assert local_preprocessing(DEFAULT_REPO_ID) == resolve_checkpoint(str(tiny_siglip)).preprocess


def test_a_tree_too_long_to_list_gets_no_head_start(
    folder: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A million photos take the run itself long to list; the head start's own list of them cost memory too.
    monkeypatch.setattr(headstart, "WALK_SECONDS", 1e-6)
    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    finished(4, folder, tiny_siglip)
    assert headstart.take(discover([str(folder)]), cfg, DecodeOptions()) == []


def test_stop_ends_the_process(folder: Path, tiny_siglip: Path) -> None:
    headstart._start([str(folder)], None, str(tiny_siglip), None, 4, DecodeOptions())
    pid = headstart._running.pid
    headstart.stop()
    assert headstart._running is None
    with pytest.raises(ChildProcessError):  # reaped: no zombie left
        os.waitpid(pid, os.WNOHANG)


def test_it_runs_without_torch() -> None:
    # Its process is forked before torch is imported; importing torch there would cost what it wins.
    code = "import sys, siglip_cli.headstart; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


RUN_COUNTING_THE_HEAD_START = textwrap.dedent("""
    import sys
    import siglip_cli.headstart as headstart
    headstart.usable_cpus = lambda: 2  # a one-CPU machine gets none: not the point here
    take = headstart.take
    def counted(*args):
        taken = take(*args)
        print(f"head start: {len(taken)}", file=sys.__stderr__)
        return taken
    headstart.take = counted
    from siglip_cli.cli import app
    app(prog_name="siglip")
""")


def test_a_run_with_a_head_start_writes_what_one_without_writes(folder: Path, tiny_siglip: Path, tmp_path: Path) -> None:
    # In a fresh process, as a user runs it (torch not yet imported), against this one's run, where torch is.
    args = [str(folder), "-m", str(tiny_siglip), "-b", "4", "--device", "cpu"]
    ok(siglip("embed", *args, "-o", tmp_path / "plain.npy"))
    process = subprocess.run(
        [sys.executable, "-c", RUN_COUNTING_THE_HEAD_START, "embed", *args, "-o", str(tmp_path / "head.npy")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "head start: 8" in process.stderr.splitlines()  # the first two batches, the broken file among them
    assert np.array_equal(np.load(tmp_path / "head.npy"), np.load(tmp_path / "plain.npy"))
    for suffix in (".jsonl", ".errors.jsonl"):
        rows = [(tmp_path / f"{name}{suffix}").read_text().splitlines() for name in ("head", "plain")]
        assert [json.loads(row) for row in rows[0]] == [json.loads(row) for row in rows[1]]


@pytest.mark.parametrize(
    "ahead, batch_size", [(2, 4), (4, 4), (6, 4), (8, 4), (9, 4), (9, 16)], ids=["part", "one", "more", "two", "all", "less"]
)
def test_the_batches_are_the_same_with_a_head_start(
    folder: Path, tiny_siglip: Path, tmp_path: Path, ahead: int, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Part of the first batch, all of it, part of the second, two, every file; every file in one batch. The files
    # the head start decoded are decoded by no worker: its pixels are the ones used, not only equal to them.
    from siglip_cli import decoding

    cfg = resolve_checkpoint(str(tiny_siglip)).preprocess
    paths = discover([str(folder)])
    log, decode_file = tmp_path / "decoded", decoding.decode_file

    def logged(path: str, *args, **kwargs):  # in the workers too, forked with it: a line a decoded file
        with open(log, "a") as f:
            f.write(f"{path}\n")
        return decode_file(path, *args, **kwargs)

    def batches() -> tuple[list[tuple[list, list, list]], list[str]]:
        log.unlink(missing_ok=True)
        made = [
            (batch.rows, batch.errors, [p.numpy() for p in batch.pixels])
            for batch in decoding.decoded_batches(paths, cfg, DecodeOptions(), batch_size=batch_size, workers=1,
                                                  pin=False)  # fmt: skip
        ]
        return made, sorted(log.read_text().splitlines()) if log.exists() else []

    monkeypatch.setattr(decoding, "decode_file", logged)
    plain, decoded = batches()
    assert decoded == sorted(paths)
    finished(ahead, folder, tiny_siglip)
    with_head_start, decoded = batches()
    assert headstart._running is None and decoded == sorted(paths[ahead:])
    assert [(rows, errors) for rows, errors, _ in with_head_start] == [(rows, errors) for rows, errors, _ in plain]
    for (_, _, ours), (_, _, theirs) in zip(with_head_start, plain):
        assert np.array_equal(np.concatenate(ours), np.concatenate(theirs))


def test_paths_read_from_stdin_are_left_to_the_run(folder: Path, tiny_siglip: Path, tmp_path: Path) -> None:
    # `--files-from -` where a file named "-" happens to be: the head start read the run's stdin, and the lines it
    # took were lost to the run (4 of 40 paths embedded, exit 0).
    (tmp_path / "-").write_text("a stray file named -")
    listed = "".join(f"{path}\n" for path in discover([str(folder)]))
    process = subprocess.run(
        [sys.executable, "-c", RUN_COUNTING_THE_HEAD_START, "embed", "--files-from", "-", "-m", str(tiny_siglip),
         "-b", "4", "--device", "cpu", "-o", str(tmp_path / "out.npy")],
        input=listed, capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "head start: 0" in process.stderr.splitlines()
    rows = (tmp_path / "out.jsonl").read_text().splitlines() + (tmp_path / "out.errors.jsonl").read_text().splitlines()
    assert len(rows) == len(discover([str(folder)]))


def test_a_process_that_outlives_its_kill_does_not_hold_the_run(
    tmp_path: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed amid a read of a hung network share, a process dies only once the read returns; the run goes on.
    fifo = tmp_path / "list"
    os.mkfifo(fifo)  # its reading blocks: no one writes
    headstart._start([], str(fifo), str(tiny_siglip), None, 4, DecodeOptions())
    child = headstart._running.pid
    kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: None if pid == child else kill(pid, sig))
    monkeypatch.setattr(headstart, "REAP_SECONDS", 0.2)
    try:
        assert headstart.take([], PreprocessConfig(32, 32), DecodeOptions()) == []  # at once, not when it dies
    finally:
        kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_short_of_memory_the_kernel_stops_the_head_start_first(tmp_path: Path, tiny_siglip: Path) -> None:
    # It decodes beside the model's loading; what it did, the workers can redo, and what the run did may be lost.
    fifo = tmp_path / "list"
    os.mkfifo(fifo)  # it waits there, to be looked at
    headstart._start([], str(fifo), str(tiny_siglip), None, 4, DecodeOptions())
    score = Path(f"/proc/{headstart._running.pid}/oom_score_adj")
    try:
        deadline = time.monotonic() + 10
        while score.read_text().strip() != "1000" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert score.read_text().strip() == "1000"
    finally:
        headstart.stop()


@pytest.mark.parametrize(
    "state, overwrite, fresh",
    [("none", False, True), ("output", False, False), ("output", True, True), ("work", True, False), ("bad name", False, False)],
)  # fmt: skip
def test_a_head_start_only_for_a_run_that_embeds_from_the_first_file(
    tmp_path: Path, state: str, overwrite: bool, fresh: bool
) -> None:
    # A run that continues earlier work embeds other files first, and one refused embeds none: its work is wasted.
    from siglip_cli.cli import _fresh

    output = tmp_path / ("out.txt" if state == "bad name" else "out.npy")
    if state == "output":
        output.write_bytes(b"")
    elif state == "work":
        (tmp_path / "out.npy.partial").mkdir()
    assert _fresh(output, overwrite) is fresh
