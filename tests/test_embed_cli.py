"""`siglip embed`, end to end: output files, every flag, bad files, exit codes, and the Python API behind it.

The CLI runs in-process through typer's `CliRunner`, which keeps stdout and stderr apart (stdout carries data
only). A tiny random checkpoint and a few synthetic photos keep each run well under a second; `--workers 0`
unless a test is about workers. A real process is used only where in-process cannot tell: a traceback
reaching the terminal, a pipe on stdin.
"""

from __future__ import annotations

import base64
import errno
import faulthandler
import gc
import io
import json
import multiprocessing
import os
import shlex
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import typer
from typer.testing import CliRunner, Result

from conftest import (
    DEFAULT_REPO_ID,
    DEFAULT_REVISION,
    HubCache,
    deadline,
    make_photo,
    ok,
    save_animated_gif,
    save_as_pickles,
    save_booby_trapped_pickle,
    save_png_claiming_size,
    save_sideways_jpeg,
    siglip,
    the_error,
    with_bogus_huffman_table,
    with_preprocessing,
)
from siglip_cli import __version__, cli, usage_errors
from siglip_cli.cli import app
from siglip_cli.embed import EmbedOptions, embed_paths, embed_to_file, load
from siglip_cli.errors import UserError
from siglip_cli.files import discover
from siglip_cli.preprocess import DecodeOptions
from siglip_cli.storage import atomic_write

# conftest's RUNNER is 1,000 columns wide (test_error_stays_on_one_line_without_a_terminal covers the default).
SAME = 1e-6  # two runs that should agree: only float rounding between batches may differ
SUMMARY_KEYS = {"embedded", "failed", "output", "manifest", "errors", "seconds", "images_per_s"}


def test_help_and_version_answer_without_importing_torch() -> None:
    # Importing torch took 2 s of every `siglip --help`; the commands import what they run.
    script = "import sys, siglip_cli.__main__, siglip_cli.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_merge_runs_without_importing_torch() -> None:
    # It imported the weights module for a type hint: 2.5 s of torch in a command that joins arrays.
    script = "import sys, siglip_cli.shards; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_the_quick_exit_still_joins_threads_runs_atexit_and_flushes(tmp_path: Path) -> None:
    # `siglip` ends with os._exit, skipping the interpreter's teardown (0.35 s with torch loaded), not what comes
    # before it: a thread still writing, an atexit callback, buffered stdout, and the status.
    script = textwrap.dedent("""
        import atexit, sys, threading, time
        from pathlib import Path
        from siglip_cli.__main__ import _exit_now
        folder = Path(sys.argv[1])
        threading.Thread(target=lambda: (time.sleep(0.3), (folder / "thread").write_text("joined"))).start()
        atexit.register(lambda: (folder / "atexit").write_text("ran"))
        sys.stdout.write("buffered")
        _exit_now(3)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered", "")
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"


def test_the_command_ends_through_the_quick_exit_with_its_status() -> None:
    script = textwrap.dedent("""
        import os, sys
        import siglip_cli.__main__ as entry

        def quick(status):
            print(f"quick exit {status}", file=sys.stderr)
            os._exit(status)

        entry._exit_now = quick
        entry.main()
    """)
    for arguments, status in ((["--version"], 0), (["embed"], 2), (["no-such-command"], 2)):
        done = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.splitlines()[-1]) == (status, f"quick exit {status}"), done.stderr


def test_ctrl_c_while_the_command_line_is_read_is_one_sentence(tmp_path: Path) -> None:
    # Typer turns a KeyboardInterrupt before any command runs (parsing its arguments) into status 130, silently.
    script = textwrap.dedent("""
        import typer.core
        from siglip_cli.__main__ import main

        def parse_args(self, ctx, args):
            raise KeyboardInterrupt

        typer.core.TyperCommand.parse_args = parse_args
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script, "merge", "a.npy", "-o", "b.npy"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert (done.returncode, done.stderr) == (130, "error: interrupted.\n")


def test_ctrl_c_while_the_program_starts_is_one_sentence_and_an_import_of_it_leaves_ctrl_c_alone() -> None:
    # A Ctrl-C among the console script's first imports, before `main` ran, was a KeyboardInterrupt's traceback.
    script = textwrap.dedent("""
        import signal, sys
        sys.argv[0] = sys.argv[1]  # as the console script, or another program importing the module
        import siglip_cli.__main__
        signal.raise_signal(signal.SIGINT)  # after the imports, before `main`: as a Ctrl-C in the last of them
    """)
    def run(program: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, program], capture_output=True, text=True, timeout=60)

    started = run("/venv/bin/siglip")
    assert (started.returncode, started.stderr) == (130, "error: interrupted.\n")
    imported = run("pytest")
    assert imported.returncode != 130 and "KeyboardInterrupt" in imported.stderr  # Python's own Ctrl-C, untouched


@pytest.mark.parametrize("command", ["embed", "inspect", "bench"])
def test_ctrl_c_while_torch_imports_stops_the_command(tmp_path: Path, command: str) -> None:
    # torch's C module imports numpy and drops what that raises: a Ctrl-C landing there was lost, and the command
    # ran on to its end. Here the Ctrl-C comes as torch starts to import, and is dropped the way torch drops it.
    script = textwrap.dedent("""
        import builtins, os, signal, sys
        real_import = builtins.__import__

        def importing(name, *args, **kwargs):
            if name.split(".")[0] == "torch" and "torch" not in sys.modules:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: the handler runs here
                except KeyboardInterrupt:
                    pass
            return real_import(name, *args, **kwargs)

        builtins.__import__ = importing
        from siglip_cli.__main__ import main
        main()
    """)
    arguments = {"embed": [str(tmp_path / "none.jpg")], "inspect": [str(tmp_path / "none.jpg")], "bench": ["--iters", "1"]}
    done = subprocess.run([sys.executable, "-c", script, command, *arguments[command]], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert (done.returncode, done.stderr.strip()) == (130, "error: interrupted."), done.stderr


def test_help_lists_every_command_and_names_arguments_without_type_tags() -> None:
    overview = ok(siglip("--help")).stdout
    assert all(f"  {command}  " in overview for command in ("embed ", "merge ", "inspect", "bench  "))
    for command in ("embed", "merge", "inspect", "bench"):
        text = ok(siglip(command, "--help")).stdout
        assert "<list[" not in text and "<path>" not in text, text  # typer's `PATH <list[str]>`


@pytest.mark.parametrize(
    "args, sentence",
    [
        (["embed", "x", "--dtype", "float64"],
         "--dtype: 'float64' is not one of auto, float32, bfloat16, float16 (see siglip embed -h)."),
        (["embed", "x", "--output-dtype", "bf16"], "--output-dtype: 'bf16' is not one of float32, float16 (see siglip embed -h)."),
        (["embed", "x", "-b", "abc"], "--batch-size: 'abc' is not a whole number (see siglip embed -h)."),
        (["embed", "x", "-b", "0"], "--batch-size: must be at least 1, not 0 (see siglip embed -h)."),
        (["embed", "x", "-o"], "-o needs a value (see siglip embed -h)."),
        (["embed", "x", "-o", ""], "-o: the name is empty (see siglip embed -h)."),
        (["embed", "x", "--bogus"], "no option --bogus (see siglip embed -h)."),
        (["embed", "x", "--no-tokens"], "no option --no-tokens; the closest: --tokens, --workers (see siglip embed -h)."),
        (["embed", "x", "--updte"], "no option --updte; the closest: --update, --dtype, --output-dtype (see siglip embed -h)."),
        (["embed", "x", "--tokens=yes"], "--tokens takes no value (see siglip embed -h)."),
        (["inspect", "a.jpg", "b.jpg"], "unexpected argument(s): b.jpg (see siglip inspect -h)."),
        (["inspect", "--layers"], "--layers needs a value (see siglip inspect -h)."),
        (["bench", "--iters", "x"], "--iters: 'x' is not a whole number (see siglip bench -h)."),
        (["bench", "--warmup", "-1"], "--warmup: must be at least 0, not -1 (see siglip bench -h)."),
        (["merge"], "missing SHARD (see siglip merge -h)."),
        (["merge", "a.npy"], "missing -o (see siglip merge -h)."),
        (["embd"], "no such command 'embd'; the closest: embed (see siglip -h)."),
        (["--bogus"], "no option --bogus (see siglip -h)."),
    ],
)  # fmt: skip
def test_a_command_line_that_does_not_parse_is_one_sentence(args: list[str], sentence: str) -> None:
    # Typer printed its own four lines (Usage, Try, an empty one, "Error: Invalid value for '--dtype': Value error,
    # 'float64' is not one of ..."), unlike every other error.
    result = siglip(*args)
    assert the_error(result) == f"error: {sentence}"
    assert result.stderr == f"error: {sentence}\n"


def test_a_file_named_like_an_option_is_told_apart_from_a_typo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `siglip embed -dash.jpg` said "no option -d": a file the user meant, which -- or ./ names.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-dash.jpg").write_bytes(b"")
    assert the_error(siglip("embed", "-dash.jpg", "-o", "x.npy")) == (
        "error: no option -d: -dash.jpg is read as options; to give it as a path, put -- before it, or write "
        "./-dash.jpg (see siglip embed -h)."
    )


@pytest.mark.parametrize(
    "message, words",
    [
        ("'abc' is not a valid int range.", "'abc' is not a whole number"),  # click 8.2 and later
        ("'abc' is not a valid integer range.", "'abc' is not a whole number"),  # click 8.1
        ("'abc' is not a valid integer.", "'abc' is not a whole number"),
        ("0 is not in the range x>=1.", "must be at least 1, not 0"),
        ("'float64' is not one of 'auto', 'float32'.", "'float64' is not one of auto, float32"),
        ("'x' is not a valid float.", "'x' is not a valid float."),  # none of ours: said as click says it
    ],
)  # fmt: skip
def test_a_bad_value_reads_the_same_with_a_typer_that_checks_values_with_click(message: str, words: str) -> None:
    """Typers before pydantic (0.27 and earlier, which a machine's own Python may hold) leave the value checks to
    click, whose words differ from the pydantic ones that the test above sees with the typer installed here."""
    error = typer.BadParameter(message)
    assert usage_errors._bad_value(error) == words


def test_every_option_names_its_flags() -> None:
    """typer 0.27 named an option left to its parameter name by its metavar: `siglip embed --device cuda` was
    "no option --device" on a GPU machine's own Python, whose option was `--DEVICE`. Named, an option reads the same
    with every typer."""
    import typing

    import typer.models

    options, unnamed = 0, []
    for command in cli.app.registered_commands:
        for name, hint in typing.get_type_hints(command.callback, include_extras=True).items():
            for info in (m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)):
                # In `Annotated`, typer takes the first positional argument, stored as the default, as a flag.
                flags = [*info.param_decls, *([info.default] if isinstance(info.default, str) else [])]
                options += 1
                if not any(flag.startswith("-") for flag in flags):
                    unnamed.append(f"{command.callback.__name__} {name}")
    assert options > 30 and unnamed == []  # every command's options were read, and each names its flags


def test_no_command_still_prints_the_help() -> None:
    result = siglip()
    assert result.exit_code == 2 and "Usage: siglip [OPTIONS] COMMAND" in result.stderr and "embed" in result.stderr


@pytest.fixture
def embed(tiny_siglip: Path):
    """`embed(*args)` runs `siglip embed *args --model tiny_siglip --workers 0` (either can be overridden)."""

    def run(*args: object, model: Path | str = tiny_siglip, workers: int = 0, input: str | None = None) -> Result:
        return siglip("embed", *args, "--model", model, "--workers", workers, input=input)

    return run


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three photos in three formats, one in a subfolder: b.png 80×60, a.jpg 45×70, sub/c.webp 20×20."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    make_photo((80, 60), seed=0).save(folder / "b.png")
    make_photo((45, 70), seed=1).save(folder / "a.jpg")
    make_photo((20, 20), seed=2).save(folder / "sub" / "c.webp")
    return folder


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Where outputs go: `out / "embeddings.safetensors"` and friends."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(path, framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -------------------------------------------------------------------------------------- output files


def test_safetensors_output_holds_an_n_by_d_float32_embeddings_tensor(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    tensors, _ = read_safetensors(out / "embeddings.safetensors")
    assert set(tensors) == {"embeddings"}
    assert tensors["embeddings"].shape == (3, 32) and tensors["embeddings"].dtype == np.float32


def test_safetensors_header_describes_the_run(embed, photos: Path, out: Path, tiny_siglip: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    _, meta = read_safetensors(out / "embeddings.safetensors")
    assert meta["model"] == str(tiny_siglip) and meta["revision"] == ""  # a local folder has no revision
    assert (meta["embedding_dim"], meta["num_images"], meta["dtype"]) == ("32", "3", "float32")
    assert (meta["normalized"], meta["compute_dtype"]) == ("true", "float32")
    assert meta["tool"] == f"siglip {__version__}"
    preprocessing = json.loads(meta["preprocessing"])
    assert (preprocessing["height"], preprocessing["width"], preprocessing["resample"]) == (32, 32, 3)
    assert preprocessing["exif_transpose"] is True


def test_npy_output_is_the_embedding_array_with_its_metadata_beside_it(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.npy"))
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    meta = json.loads((out / "embeddings.meta.json").read_text())
    assert (meta["embedding_dim"], meta["normalized"], meta["tool"]) == ("32", "true", f"siglip {__version__}")


def test_safetensors_and_npy_outputs_hold_the_same_numbers(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "tensors.safetensors"))
    ok(embed(photos, "-o", out / "array.npy"))  # another stem: the two would share a manifest otherwise
    assert np.array_equal(np.load(out / "array.npy"), load_file(out / "tensors.safetensors")["embeddings"].numpy())


def test_manifest_has_one_row_per_embedding_in_sorted_path_order(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    rows = read_jsonl(out / "embeddings.jsonl")  # the output's name with .jsonl for its suffix
    assert [(r["path"], r["width"], r["height"]) for r in rows] == [
        (str(photos / "a.jpg"), 45, 70),
        (str(photos / "b.png"), 80, 60),
        (str(photos / "sub" / "c.webp"), 20, 20),
    ]


def test_unsupported_output_suffix_is_refused(embed, photos: Path, out: Path) -> None:
    assert ".safetensors or .npy" in the_error(embed(photos, "-o", out / "embeddings.csv"))


def test_a_finished_run_leaves_only_its_output_files(embed, photos: Path, out: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == [
        "embeddings.errors.jsonl",
        "embeddings.jsonl",
        "embeddings.safetensors",
    ]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.npy"
    path.write_bytes(b"previous run")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"previous run"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_file_written_over_a_folder_in_the_way_takes_no_mode_of_it(tmp_path: Path) -> None:
    # A folder named like the manifest, removed once the rename failed: the rerun's manifest was executable (755).
    from siglip_cli.storage import Staging

    (tmp_path / "plain").write_bytes(b"")
    folder = tmp_path / "e.jsonl"
    folder.mkdir(mode=0o751)
    staging = Staging()
    with atomic_write(folder, staging) as f:
        f.write(b"{}\n")
    [(written, target)] = staging.steps
    umask_mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert target == folder and stat.S_IMODE(written.stat().st_mode) == umask_mode


def _read_only_file_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing can be created or removed, as on a read-only mount (EROFS), where even the cleanup's unlink fails."""
    import builtins
    import errno

    from siglip_cli import storage

    def refused(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refused(path)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(storage, "open", read_only_open, raising=False)
    monkeypatch.setattr(Path, "unlink", refused)


def test_atomic_write_on_a_read_only_file_system_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cleanup's unlink failed too, and its OSError, a traceback, replaced the sentence.
    from siglip_cli.storage import WriteError

    _read_only_file_system(monkeypatch)
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path / 'a.npy'}: Read-only file system.$"):
        with atomic_write(tmp_path / "a.npy") as f:
            f.write(b"never")


def test_a_failed_write_on_a_read_only_file_system_keeps_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli.storage import replaced_together, write_jsonl

    path = tmp_path / "a.npy"
    with pytest.raises(RuntimeError, match="the writer's own"), atomic_write(path):
        _read_only_file_system(monkeypatch)  # made read-only once its temporary file is open
        raise RuntimeError("the writer's own")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="the writer's own"):
        with replaced_together(before=lambda steps: None, after=lambda: None) as staging:
            write_jsonl(tmp_path / "a.jsonl", [{"a": 1}], staging=staging)
            _read_only_file_system(monkeypatch)
            raise RuntimeError("the writer's own")


def test_stale_temporaries_on_a_read_only_file_system_are_left_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's clean-up of what a killed run left: the run's own write, if any, is the one to tell of the mount.
    from siglip_cli.storage import remove_stale_temporaries

    stale = tmp_path / f".a.npy.{2**22 + 1}.tmp"  # a process id no process has
    stale.write_bytes(b"half")
    _read_only_file_system(monkeypatch)
    remove_stale_temporaries([tmp_path / "a.npy"])
    assert stale.exists()


def test_a_full_disk_is_one_sentence_and_the_rerun_continues(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from siglip_cli import storage

    real_fsync = os.fsync
    monkeypatch.setattr("siglip_cli.embed.FLUSH_SECONDS", 0.0)  # every batch becomes a chunk on disk

    def fsync(fd: int) -> None:  # the disk fills up as the second chunk is written
        if "chunk-00000001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    with monkeypatch.context() as full:
        full.setattr(storage.os, "fsync", fsync)
        error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--batch-size", "1"))
    assert "No space left on device" in error and "rerun the same command to continue" in error
    summary = json.loads(ok(embed(photos, "-o", out / "embeddings.safetensors", "--batch-size", "1", "--json")).stdout)
    assert (summary["embedded"], summary["reused"]) == (2, 1)


def test_a_file_system_that_cannot_sync_folders_still_gets_its_output(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some FUSE and SMB mounts refuse fsync on a folder (EINVAL): after each rename, in place, the run said "cannot
    # write" its output.
    import errno
    import stat

    from siglip_cli import storage

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    summary = json.loads(ok(embed(photos, "-o", out / "embeddings.safetensors", "--update", "--json")).stdout)
    assert (summary["reused"], summary["unchanged"]) == (3, True)
    assert len(read_jsonl(out / "embeddings.jsonl")) == 3


def test_a_folder_made_read_only_during_the_run_is_one_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock file's removal failed in turn, and its PermissionError came out as a traceback on top of the sentence.
    import errno
    import pathlib

    from siglip_cli import storage

    real_fsync, real_unlink = os.fsync, pathlib.Path.unlink

    def fsync(fd: int) -> None:
        if "chunk-00000000" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EACCES, "Permission denied")
        real_fsync(fd)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr("siglip_cli.embed.FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--batch-size", "1"))
    assert "Permission denied" in error  # nothing was finished: no "finished work is kept"
    assert error.endswith("Permission denied; once the files can be written, rerun the same command.")


def test_the_readme_python_api_runs_as_written(tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "photos").mkdir()
    make_photo((80, 60), seed=0).save(tmp_path / "photos" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace("google/siglip-base-patch16-224", str(tiny_siglip)), scope)  # the Hub is out of reach here
    assert scope["result"].embeddings.shape == scope["pooled"].shape == (1, 32)
    pooled = torch.nn.functional.normalize(scope["pooled"].detach(), dim=-1)
    assert np.allclose(scope["result"].embeddings[0], pooled[0].numpy(), atol=1e-5)
    assert scope["summary"].embedded == 1 and (tmp_path / "photos.safetensors").exists()


def test_existing_output_is_refused_without_overwrite(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    before = (out / "embeddings.safetensors").read_bytes()
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"))
    assert f"{out / 'embeddings.safetensors'} already exists" in error and "--overwrite" in error
    assert (out / "embeddings.safetensors").read_bytes() == before
    # Before the walk and the model's load, not after (minutes, on a large library): neither is looked at here.
    refused = embed(out / "no-such-folder", "-o", out / "embeddings.safetensors", model=out / "no-such-model")
    assert the_error(refused) == (
        f"error: {out / 'embeddings.safetensors'} already exists: add --overwrite to replace it, or --update to "
        "refresh it."
    )


@pytest.mark.parametrize("update", [[], ["--update"]])  # an --update with no output yet is a first run
@pytest.mark.parametrize(
    ("output", "theirs"), [("embeddings.safetensors", "embeddings.jsonl"), ("embeddings.npy", "embeddings.meta.json")]
)
def test_existing_side_file_of_another_run_is_not_clobbered(
    embed, photos: Path, out: Path, update: list[str], output: str, theirs: str
) -> None:
    # A .npy's metadata file was replaced without a word: `-o data.npy` wrote over the user's own data.meta.json.
    (out / theirs).write_text('{"path": "somebody else\'s file"}\n')
    error = the_error(embed(photos, "-o", out / output, *update))
    assert f"{out / theirs} already exists" in error
    assert (out / theirs).read_text() == '{"path": "somebody else\'s file"}\n'


def test_overwrite_replaces_an_existing_output(embed, photos: Path, out: Path) -> None:
    ok(embed(photos / "b.png", "-o", out / "embeddings.safetensors"))
    ok(embed(photos, "-o", out / "embeddings.safetensors", "--overwrite"))
    assert load_file(out / "embeddings.safetensors")["embeddings"].shape == (3, 32)
    assert len(read_jsonl(out / "embeddings.jsonl")) == 3


@pytest.mark.parametrize("tokens", [[], ["--tokens"]])
def test_another_output_named_like_our_tokens_file_is_never_replaced(
    embed, photos: Path, out: Path, tokens: list[str]
) -> None:
    ok(embed(photos / "a.jpg", "-o", out / "x.tokens.npy"))  # an output of its own, with x.tokens.jsonl
    before = (out / "x.tokens.npy").read_bytes()
    for overwrite in ([], ["--overwrite"]):
        error = the_error(embed(photos, "-o", out / "x.npy", *tokens, *overwrite))
        assert f"{out / 'x.tokens.npy'} is another output" in error
    assert (out / "x.tokens.npy").read_bytes() == before and not (out / "x.npy").exists()


@pytest.mark.parametrize("first, second", [("x.errors.safetensors", "x.safetensors"), ("x.safetensors", "x.errors.npy")])
def test_an_output_whose_files_meet_another_outputs_is_refused(
    embed, photos: Path, out: Path, first: str, second: str
) -> None:
    # x.errors.jsonl is the errors file of -o x.safetensors and the manifest of -o x.errors.safetensors.
    ok(embed(photos, "-o", out / first))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    for flags in ([], ["--overwrite"], ["--update"]):
        error = the_error(embed(photos, "-o", out / second, *flags))
        assert f"{out / 'x.errors.jsonl'} is a file of another output, {out / first}" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_an_output_that_is_a_symlink_is_written_through(embed, photos: Path, out: Path) -> None:
    # The links were replaced by plain files, and the output on the big disk was never updated.
    disk = out / "disk"
    ok(embed(photos / "a.jpg", "-o", disk / "lib.safetensors"))
    for name in ("lib.safetensors", "lib.jsonl"):
        (out / name).symlink_to(disk / name)
    ok(embed(photos, "-o", out / "lib.safetensors", "--update"))
    assert (out / "lib.safetensors").is_symlink() and (out / "lib.jsonl").is_symlink()
    (out / "latest").symlink_to(disk / "lib.safetensors")  # a name without a suffix: the target's kind decides
    ok(embed(photos, "-o", out / "latest", "--update"))
    ok(embed(photos, "-o", out / "latest", "--overwrite", "--device", "cpu,cpu"))  # its shards named by the target
    assert load_file(disk / "lib.safetensors")["embeddings"].shape[0] == len(read_jsonl(disk / "lib.jsonl")) == 3


@pytest.mark.parametrize("tokens", [[], ["--tokens"]])
def test_an_output_named_as_another_outputs_tokens_file_is_refused(
    embed, photos: Path, out: Path, tokens: list[str]
) -> None:
    # `-o x.tokens.npy --overwrite` replaced x.npy's tokens with its own embeddings, and every later run of x.npy
    # was refused.
    ok(embed(photos, "-o", out / "x.npy", *tokens))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    for overwrite in ([], ["--overwrite"]):
        error = the_error(embed(photos / "a.jpg", "-o", out / "x.tokens.npy", *overwrite))
        assert error == (
            f"error: {out / 'x.tokens.npy'} is a file of another output, {out / 'x.npy'}: choose another -o, or remove "
            f"{out / 'x.npy'} first."
        )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_an_output_link_into_a_missing_folder_or_to_another_kind_of_file_is_refused(
    embed, photos: Path, out: Path
) -> None:
    # Written through, it made the unmounted drive's folders on the local disk, or an .npy file named .safetensors.
    (out / "nas.safetensors").symlink_to(out / "unmounted" / "lib.safetensors")
    error = the_error(embed(photos, "-o", out / "nas.safetensors"))
    assert error == (
        f"error: output {out / 'nas.safetensors'} is a link to {out / 'unmounted' / 'lib.safetensors'}, whose folder "
        "does not exist (an unmounted drive?)."
    )
    (out / "latest.safetensors").symlink_to(out / "lib.npy")
    error = the_error(embed(photos, "-o", out / "latest.safetensors"))
    assert error == (
        f"error: output {out / 'latest.safetensors'} is a link to {out / 'lib.npy'}, a file of another kind: give -o "
        "a name of its own."
    )
    (out / "drive").symlink_to(out / "unmounted")
    refused = embed(photos, "-o", out / "drive" / "lib.safetensors")
    assert the_error(refused) == (
        f"error: cannot write {out / 'drive' / 'lib.safetensors'}: {out / 'drive'} is a link to {out / 'unmounted'}, "
        "which does not exist (an unmounted drive?)."
    )
    assert refused.stderr.count("\n") == 1  # before the walk, and with no note that the folder will be made
    (out / "notes.txt").write_text("")
    (out / "notes").symlink_to(out / "notes.txt")  # a link to a file: a file, not a missing drive
    refused = embed(photos, "-o", out / "notes" / "lib.safetensors")
    assert the_error(refused) == (
        f"error: cannot write {out / 'notes' / 'lib.safetensors'}: {out / 'notes'} is a file, not a folder."
    )
    assert refused.stderr.count("\n") == 1
    assert the_error(embed(photos, "-o", "/dev/null/lib.safetensors")) == (
        "error: cannot write /dev/null/lib.safetensors: /dev/null is not a folder."
    )
    names = ["drive", "latest.safetensors", "nas.safetensors", "notes", "notes.txt"]
    assert sorted(path.name for path in out.iterdir()) == names


def test_an_output_in_a_missing_folder_makes_it_with_a_note_but_not_where_a_drive_is_not_mounted(
    embed, photos: Path, out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `-o /media/me/USBDISK/lib.safetensors` with the drive unplugged, or `-o /mnt/nas/lib.safetensors` with the NAS
    # not mounted (fstab leaves its empty folder), wrote the output, silently, on the disk under the mount point.
    import siglip_cli.files

    media, mnt = out / "media", out / "mnt"
    monkeypatch.setattr(siglip_cli.files, "MOUNT_POINTS", {str(media): (1, 2), str(mnt): (1,)})
    (media / "me").mkdir(parents=True)
    (mnt / "nas").mkdir(parents=True)
    (out / "drives").symlink_to(media)
    for given, drive in [
        (media / "USBDISK" / "photos", media / "USBDISK"),
        (media / "me" / "USBDISK", media / "me" / "USBDISK"),
        (out / "drives" / "me" / "USBDISK", media / "me" / "USBDISK"),  # the way through a link is the link's
    ]:
        error = the_error(embed(photos, "-o", given / "lib.safetensors"))
        assert error == (
            f"error: no drive is mounted at {drive}, which does not exist: mount the drive, or make the folder first "
            "to write on this disk."
        )
    for given in (mnt / "nas", mnt / "nas" / "2026"):
        error = the_error(embed(photos, "-o", given / "lib.safetensors"))
        assert error == (
            f"error: no drive is mounted at {mnt / 'nas'}, an empty folder: mount the drive, or put any file in the "
            "folder first to write on this disk."
        )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["drives", "media", "media/me", "mnt", "mnt/nas"]
    (mnt / "nas" / "README").write_text("scratch space")  # a folder of this disk, as the user says
    ok(embed(photos, "-o", mnt / "nas" / "lib.safetensors"))
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(media) or ismount(path))
    ok(embed(photos, "-o", media / "data" / "lib.safetensors"))  # a cloud machine's data disk, mounted at the root

    result = ok(embed(photos, "-o", out / "new" / "sub" / "lib.safetensors"))
    assert f"note: the output's folder {out / 'new' / 'sub'} does not exist: it will be made." in result.stderr
    assert len(read_jsonl(out / "new" / "sub" / "lib.jsonl")) == 3
    (tmp_path / "empty").mkdir()
    result = embed(tmp_path / "empty", "-o", out / "other" / "lib.safetensors")
    assert the_error(result).startswith("error: no image files found") and "note:" not in result.stderr


def test_overwrite_without_tokens_removes_the_old_tokens_file(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.npy", "--tokens"))
    ok(embed(photos / "b.png", "-o", out / "embeddings.npy", "--overwrite"))
    assert not (out / "embeddings.tokens.npy").exists()


# ---------------------------------------------------------------------------------------- the flags


def test_embeddings_are_l2_normalized_by_default(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.npy"))
    assert np.allclose(np.linalg.norm(np.load(out / "embeddings.npy"), axis=1), 1, atol=1e-6)


def test_no_normalize_stores_the_raw_pooled_vectors(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "normalized.npy"))
    ok(embed(photos, "-o", out / "raw.npy", "--no-normalize"))
    raw, normalized = np.load(out / "raw.npy"), np.load(out / "normalized.npy")
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    assert np.abs(raw / np.linalg.norm(raw, axis=1, keepdims=True) - normalized).max() <= SAME
    assert json.loads((out / "raw.meta.json").read_text())["normalized"] == "false"


def test_tokens_are_saved_in_the_safetensors_file(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors", "--tokens"))
    tensors, _ = read_safetensors(out / "embeddings.safetensors")
    assert tensors["tokens"].shape == (3, 16, 32) and tensors["tokens"].dtype == np.float32  # 32 px / patch 8 = 4×4
    assert tensors["embeddings"].shape == (3, 32)


def test_tokens_are_saved_beside_an_npy_output(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.npy", "--tokens"))
    assert np.load(out / "embeddings.tokens.npy").shape == (3, 16, 32)
    assert np.load(out / "embeddings.npy").shape == (3, 32)


def test_output_dtype_float16_stores_half_precision(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "full.safetensors"))
    ok(embed(photos, "-o", out / "half.safetensors", "--output-dtype", "float16", "--tokens"))
    tensors, meta = read_safetensors(out / "half.safetensors")
    assert tensors["embeddings"].dtype == np.float16 and tensors["tokens"].dtype == np.float16
    assert meta["dtype"] == "float16"
    full = load_file(out / "full.safetensors")["embeddings"].numpy()
    assert np.abs(tensors["embeddings"].astype(np.float32) - full).max() <= 1e-3  # half-precision rounding only


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_keeps_cosine_to_float32(embed, photos: Path, out: Path, dtype: str) -> None:
    ok(embed(photos, "-o", out / "float32.npy", "--dtype", "float32"))
    ok(embed(photos, "-o", out / f"{dtype}.npy", "--dtype", dtype))
    cosine = (np.load(out / "float32.npy") * np.load(out / f"{dtype}.npy")).sum(axis=1)  # rows are unit vectors
    assert cosine.min() >= 0.999
    assert json.loads((out / f"{dtype}.meta.json").read_text())["compute_dtype"] == dtype


def test_bfloat16_compute_still_stores_float32_tokens(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "float32.safetensors", "--tokens", "--dtype", "float32"))
    ok(embed(photos, "-o", out / "bfloat16.safetensors", "--tokens", "--dtype", "bfloat16"))
    exact, rounded = load_file(out / "float32.safetensors")["tokens"], load_file(out / "bfloat16.safetensors")["tokens"]
    assert rounded.dtype == exact.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(rounded, exact, dim=-1).min() >= 0.999


def test_batch_size_does_not_change_the_embeddings(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "one.npy", "--batch-size", "1"))
    ok(embed(photos, "-o", out / "all.npy", "--batch-size", "32"))
    assert np.array_equal(np.load(out / "one.npy"), np.load(out / "all.npy"))  # an image gets the same bits in any batch


def test_output_assembled_from_many_chunks_is_the_same(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli.storage import WorkArea

    chunks, write_chunk = [], WorkArea.write_chunk
    monkeypatch.setattr(WorkArea, "write_chunk", lambda *args: chunks.append(args[1]) or write_chunk(*args))
    ok(embed(photos, "-o", out / "one_chunk.safetensors", "--batch-size", "1", "--tokens"))
    assert len(chunks) == 1
    monkeypatch.setattr("siglip_cli.embed.FLUSH_SECONDS", 0.0)  # every batch becomes a chunk on disk
    ok(embed(photos, "-o", out / "many_chunks.safetensors", "--batch-size", "1", "--tokens"))
    assert len(chunks) == 1 + 3  # one a photo
    one, many = load_file(out / "one_chunk.safetensors"), load_file(out / "many_chunks.safetensors")
    assert all(one[name].equal(many[name]) for name in ("embeddings", "tokens"))


def test_two_workers_give_the_same_output_as_none(embed, photos: Path, out: Path) -> None:
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    ok(embed(photos, "-o", out / "inline.safetensors", workers=0))
    ok(embed(photos, "-o", out / "workers.safetensors", workers=2))
    assert load_file(out / "inline.safetensors")["embeddings"].equal(
        load_file(out / "workers.safetensors")["embeddings"]
    )
    assert read_jsonl(out / "inline.jsonl") == read_jsonl(out / "workers.jsonl")
    assert read_jsonl(out / "inline.errors.jsonl") == read_jsonl(out / "workers.errors.jsonl")


def test_max_pixels_refuses_larger_images(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors", "--max-pixels", 1000))  # c.webp is 400 px, the rest more
    assert [r["path"] for r in read_jsonl(out / "embeddings.jsonl")] == [str(photos / "sub" / "c.webp")]
    errors = read_jsonl(out / "embeddings.errors.jsonl")
    assert [e["path"] for e in errors] == [str(photos / "a.jpg"), str(photos / "b.png")]
    assert all("exceeds the limit of 1,000" in e["error"] and "--max-pixels" in e["error"] for e in errors)


def test_the_default_pixel_limit_lets_100_megapixel_camera_photos_through(embed, tmp_path: Path, out: Path) -> None:
    # Pillow's warning threshold (89 MP) refused every photo of a GFX100 (11648x8736) as a "decompression bomb";
    # Pillow itself, and transformers, open them. Refused now only past where Pillow refuses.
    folder = tmp_path / "large"
    folder.mkdir()
    save_png_claiming_size(folder / "gfx100.png", 11648, 8736)
    save_png_claiming_size(folder / "bomb.png", 15000, 12000)
    embed(folder, "-o", out / "e.npy")
    errors = {Path(e["path"]).name: e["error"] for e in read_jsonl(out / "e.errors.jsonl")}
    assert "exceeds the limit" not in errors["gfx100.png"]  # it got as far as decoding
    assert "180,000,000 pixels exceeds the limit of 178,956,970" in errors["bomb.png"]


def test_no_exif_transpose_embeds_the_pixels_as_stored(embed, tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "phone"
    folder.mkdir()
    save_sideways_jpeg(folder / "portrait.jpg", make_photo((80, 60)))
    with Image.open(folder / "portrait.jpg") as stored:
        stored.convert("RGB").save(folder / "sideways.png")  # the same pixels, no EXIF
    ok(embed(folder, "-o", out / "embeddings.npy", "--no-exif-transpose"))
    portrait, sideways = np.load(out / "embeddings.npy")
    assert np.abs(portrait - sideways).max() <= SAME
    assert [(r["width"], r["height"]) for r in read_jsonl(out / "embeddings.jsonl")] == [(60, 80), (60, 80)]
    assert (
        json.loads(json.loads((out / "embeddings.meta.json").read_text())["preprocessing"])["exif_transpose"] is False
    )


def test_strict_exits_1_when_any_file_failed(embed, photos: Path, out: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    result = embed(photos, "-o", out / "embeddings.safetensors", "--strict")
    error = the_error(result, code=1)
    assert error == f"error: 1 file could not be embedded: see {out / 'embeddings.errors.jsonl'} (--strict)."
    assert len(read_jsonl(out / "embeddings.jsonl")) == 3  # the good rows are still written


def test_a_folder_that_cannot_be_listed_is_in_the_json_and_fails_strict(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A nightly job checking the exit code or the JSON never learnt that a whole folder was left out.
    (photos / "locked").mkdir()
    make_photo((30, 30), seed=3).save(photos / "locked" / "d.jpg")
    scandir = os.scandir

    def refusing(path="."):  # `chmod 0 locked`, as root too
        if not isinstance(path, int) and os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    summary = json.loads(ok(embed(photos, "-o", out / "a.safetensors", "--json")).stdout)
    assert summary["unlisted_folders"] == [{"path": str(photos / "locked"), "reason": "Permission denied"}]
    assert summary["failed"] == 0
    error = the_error(embed(photos, "-o", out / "b.safetensors", "--strict"), code=1)
    assert error == f"error: could not read 1 folder: {photos / 'locked'} (Permission denied) (--strict)."
    assert len(read_jsonl(out / "b.jsonl")) == 3  # the rows are still written


def test_links_into_a_drive_not_mounted_are_in_the_json_and_fail_strict(embed, photos: Path, out: Path) -> None:
    # The walk said so on stderr, but --strict passed and the JSON had no word of it: a nightly job on a library
    # whose NAS was not mounted reported success with the whole share missing.
    (photos / "nas").symlink_to("/mnt/no-such-share/photos")
    (photos / "fav.jpg").symlink_to("/mnt/no-such-share/fav.jpg")
    summary = json.loads(ok(embed(photos, "-o", out / "a.safetensors", "--json")).stdout)
    assert summary["dangling_links"] == [{"link": str(photos / "nas"), "target": "/mnt/no-such-share/photos"}]
    assert summary["not_files"] == [{"path": str(photos / "fav.jpg"), "kind": "a broken link"}]
    error = the_error(embed(photos, "-o", out / "b.safetensors", "--strict"), code=1)
    assert error == (
        f"error: 1 link that leads nowhere (an unmounted drive?): {photos / 'nas'} → /mnt/no-such-share/photos; 1 entry "
        f"named like an image is not a file: {photos / 'fav.jpg'} (a broken link) (--strict)."
    )
    assert len(read_jsonl(out / "b.jsonl")) == 3  # the rows are still written


def test_the_json_names_odd_paths_as_the_manifest_does(embed, photos: Path, out: Path) -> None:
    # They came as the terminal notes show them: a newline as the four characters `\x0a`, which no script could
    # find on disk, and a name that is not UTF-8 with its bytes lost.
    raw = os.fsencode(photos) + b"/caf\xe9.jpg"
    os.symlink(b"/mnt/no-such-share/caf\xe9.jpg", raw)
    (photos / "new\nline.jpg").symlink_to("/mnt/no-such-share/a\tb.jpg")
    summary = json.loads(ok(embed(photos, "-o", out / "a.safetensors", "--json")).stdout)
    link, odd = summary["not_files"]
    assert odd == {"path": f"{photos}/new\nline.jpg", "kind": "a broken link"}
    assert base64.b64decode(link["path_bytes_b64"]) == raw and link["path"] == f"{photos}/caf\ufffd.jpg"
    assert os.path.islink(odd["path"])


def test_an_output_kept_in_the_folder_it_embeds_is_not_passed_over(embed, photos: Path) -> None:
    # Each --update said "passed over 3 files (2 .jsonl, 1 .safetensors) ...: not images siglip reads" of its own output.
    output = photos / "library.safetensors"
    (photos / "library.safetensors.partial").mkdir()  # an interrupted run's work folder, as it was being continued
    (photos / "notes.txt").write_text("mine")
    (photos / "broken.png").write_text("not a png")  # so that there is an errors file too
    result = ok(embed(photos, "-o", output))
    assert (photos / "library.errors.jsonl").exists()
    result = ok(embed(photos, "-o", output, "--update"))
    notes = [line for line in result.stderr.splitlines() if "passed over" in line]
    assert notes == ["note: passed over 1 file (1 .txt) in the folders: not images siglip reads (name a file "
                     "explicitly to try it anyway)."]  # fmt: skip


def test_a_bad_file_without_strict_still_exits_0(embed, photos: Path, out: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    ok(embed(photos, "-o", out / "embeddings.safetensors"))


def test_strict_run_without_bad_files_exits_0(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors", "--strict"))


def test_quiet_leaves_stderr_empty(embed, photos: Path, out: Path) -> None:
    result = ok(embed(photos, "-o", out / "embeddings.safetensors", "--quiet"))
    assert result.stderr == "" and result.stdout == ""


def test_quiet_still_names_the_errors_file(embed, photos: Path, out: Path) -> None:
    # Files that failed are images left out too: without the summary line, `-q` said nothing of them.
    (photos / "broken.png").write_text("not a png")
    result = ok(embed(photos, "-o", out / "embeddings.safetensors", "--quiet"))
    assert result.stderr == f"note: 1 file could not be embedded: see {out / 'embeddings.errors.jsonl'}.\n"
    strict = embed(photos, "-o", out / "embeddings.safetensors", "--quiet", "--strict", "--overwrite")
    assert strict.exit_code == 1 and strict.stderr.count("could not be embedded") == 1  # said once, as the error


def test_quiet_still_says_what_was_left_out(embed, photos: Path, out: Path) -> None:
    # A nightly `-q` job must still hear of images it did not embed; of files that are no images, and of what
    # `-q` is for, not.
    (photos / "gone.jpg").symlink_to(photos / "deleted.jpg")  # an entry named like an image that is no file
    (photos / "nas").symlink_to("/mnt/no-such-share/photos")  # a folder link into a drive not mounted
    (photos / "readme.txt").write_text("not an image")  # passed over
    result = ok(embed(photos, "-o", out / "embeddings.safetensors", "--quiet"))
    notes = result.stderr.splitlines()
    assert notes == [
        f"note: 1 entry named like an image is not a file: {photos / 'gone.jpg'} (a broken link); not embedded.",
        f"note: 1 link that leads nowhere (an unmounted drive?): {photos / 'nas'} → /mnt/no-such-share/photos; "
        "nothing there is embedded.",
    ]


def test_json_prints_exactly_one_json_document_on_stdout(embed, photos: Path, out: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    result = ok(embed(photos, "-o", out / "embeddings.safetensors", "--json"))
    summary = json.loads(result.stdout)  # raises if anything else shares stdout
    assert SUMMARY_KEYS <= summary.keys()
    assert (summary["embedded"], summary["failed"]) == (3, 1)
    assert summary["output"] == str(out / "embeddings.safetensors")
    assert summary["manifest"] == str(out / "embeddings.jsonl")
    assert summary["errors"] == str(out / "embeddings.errors.jsonl")
    # The embedded images (not the failed one) per second; `seconds` is rounded to the millisecond, hence rel.
    assert summary["seconds"] > 0 and summary["images_per_s"] == pytest.approx(3 / summary["seconds"], rel=0.1)


def test_the_summarys_seconds_count_from_the_commands_start(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timed from the run proper, the seconds left out the model's load and the head start's decoding meanwhile: a
    # small folder read 614 images/s, done in 5 s. The walk of the inputs, slowed here, comes before the run proper.
    walk = cli._images_to_embed

    def slow_walk(*args, **kwargs):
        time.sleep(1.0)
        return walk(*args, **kwargs)

    monkeypatch.setattr(cli, "_images_to_embed", slow_walk)
    summary = json.loads(ok(embed(photos, "-o", out / "embeddings.safetensors", "--json")).stdout)
    assert summary["seconds"] >= 1.0
    assert summary["images_per_s"] == pytest.approx(3 / summary["seconds"], rel=0.01)


def test_json_names_no_errors_file_when_nothing_failed(embed, photos: Path, out: Path) -> None:
    summary = json.loads(ok(embed(photos, "-o", out / "embeddings.safetensors", "--json")).stdout)
    assert summary["errors"] is None and summary["failed"] == 0


def test_stdout_stays_empty_without_json(embed, photos: Path, out: Path) -> None:
    assert ok(embed(photos, "-o", out / "embeddings.safetensors")).stdout == ""


def test_stderr_ends_with_the_summary_line(embed, photos: Path, out: Path) -> None:
    result = ok(embed(photos, "-o", out / "embeddings.safetensors"))
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith(f"embedded 3 → {out / 'embeddings.safetensors'} (")
    assert re.search(r"\(\d+\.\d s, [\d,]+\.\d images/s\)$", summary)  # how long, and how fast


def test_summary_line_points_at_the_errors_file(embed, photos: Path, out: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    result = ok(embed(photos, "-o", out / "embeddings.safetensors"))
    assert result.stderr.splitlines()[-1].endswith(f"; 1 failed: see {out / 'embeddings.errors.jsonl'}")


def test_error_stays_on_one_line_without_a_terminal(
    tmp_path: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    missing = tmp_path / "an-album-with-a-rather-long-descriptive-folder-name" / "missing.jpg"
    result = CliRunner().invoke(app, ["embed", str(missing), "--model", str(tiny_siglip)])
    assert result.stderr == f"error: input {missing} does not exist.\n"


@pytest.mark.parametrize("command", ["embed", "merge"])
def test_an_output_named_with_a_trailing_slash_is_refused(command: str, photos: Path, out: Path, tiny_siglip: Path) -> None:
    # `-o photos.safetensors/` wrote the file photos.safetensors: the / was dropped without a word.
    args = [photos, "--model", tiny_siglip, "--workers", 0] if command == "embed" else [out / "part.safetensors"]
    error = the_error(siglip(command, *args, "-o", f"{out / 'photos.safetensors'}/"))
    assert error == f"error: -o: {out / 'photos.safetensors'}/ ends in /, but -o names a file: drop the trailing / " \
        f"(see siglip {command} -h)."  # fmt: skip
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("end", [".", ".."])
def test_an_output_named_as_a_folder_is_refused(end: str, photos: Path, out: Path, tiny_siglip: Path) -> None:
    # `-o photos.safetensors/.` wrote the file photos.safetensors, as the trailing / alone did.
    name = f"{out / 'photos.safetensors'}/{end}"
    error = the_error(siglip("embed", photos, "--model", tiny_siglip, "--workers", 0, "-o", name))
    assert error == f"error: -o: {name} names a folder, but -o names a file (ending in .safetensors or .npy) " \
        "(see siglip embed -h)."  # fmt: skip
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["embed", "photo.jpg", "-o", ""],
        ["merge", "", "-o", "merged.npy"],
        ["merge", "part.npy", "-o", ""],
        ["inspect", ""],
        ["inspect", "--plot", ""],
        ["bench", "--images", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args: list[str], tmp_path: Path, monkeypatch) -> None:
    # An unset shell variable (`--plot "$DIR"`): typer read "" as `.`, and inspect wrote its pictures there.
    monkeypatch.chdir(tmp_path)
    result = siglip(*args)
    assert the_error(result).endswith(": the name is empty (see siglip " + args[0] + " -h).")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_input_is_named_as_such(embed, out: Path) -> None:
    error = the_error(embed("", "-o", out / "e.safetensors"))
    assert error == "error: an input path is empty: give image files or folders."


# ------------------------------------------------------------------------------- which files are read


def test_files_from_reads_a_list_of_paths(embed, photos: Path, out: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'b.png'}\n{photos / 'a.jpg'}\n")
    ok(embed("--files-from", listing, "-o", out / "embeddings.safetensors"))
    assert [r["path"] for r in read_jsonl(out / "embeddings.jsonl")] == [str(photos / "a.jpg"), str(photos / "b.png")]


def test_a_listed_name_with_spaces_around_it_fails_naming_the_file_that_exists(
    embed, photos: Path, out: Path, tmp_path: Path
) -> None:
    # The errors file said only "No such file or directory" of a line copied with a trailing space.
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'a.jpg'} \n{photos / 'b.png'}\n")
    ok(embed("--files-from", listing, "-o", out / "e.safetensors"))
    [error] = read_jsonl(out / "e.errors.jsonl")
    assert error == {
        "path": f"{photos / 'a.jpg'} ",
        "error": f"No such file or directory (without the spaces at its ends, {photos / 'a.jpg'} exists)",
    }


def test_files_from_dash_reads_stdin(embed, photos: Path, out: Path) -> None:
    result = ok(
        embed("--files-from", "-", "-o", out / "embeddings.safetensors", input=f"{photos / 'sub' / 'c.webp'}\n")
    )
    assert [r["path"] for r in read_jsonl(out / "embeddings.jsonl")] == [str(photos / "sub" / "c.webp")]
    assert result.stdout == ""


def test_an_empty_list_of_paths_says_so(embed, out: Path, tmp_path: Path) -> None:
    # `find ... | siglip embed --files-from -` that found nothing said "no image files found in -".
    error = the_error(embed("--files-from", "-", "-o", out / "e.safetensors", input=""))
    assert error == "error: the list of paths read from stdin is empty: give one path per line, or NUL-separated."
    (tmp_path / "list.txt").write_text("\n")
    error = the_error(embed("--files-from", tmp_path / "list.txt", "-o", out / "e.safetensors"))
    listing = tmp_path / "list.txt"
    assert error == f"error: the list of paths in {listing} is empty: give one path per line, or NUL-separated."


def test_non_utf8_file_name_carries_its_bytes_in_the_manifest(embed, tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "card"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    make_photo().save(os.fsdecode(raw))
    ok(embed(folder, "-o", out / "embeddings.safetensors"))
    (row,) = read_jsonl(out / "embeddings.jsonl")
    assert row["path"] == f"{folder}/caf\ufffd.png"
    assert base64.b64decode(row["path_bytes_b64"]) == raw


def test_non_utf8_output_name_is_shown_as_names_of_photos_are(embed, photos: Path, tmp_path: Path) -> None:
    output = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.npy")  # -o typed in a Latin-1 terminal
    result = ok(embed(photos / "b.png", "-o", output))
    assert f"\u2192 {tmp_path}/caf\\xe9.npy (" in result.stderr  # as a photo's name is shown, not `caf\\udce9`
    assert os.path.exists(output)


def test_paths_with_square_brackets_are_printed_as_they_are(embed, tmp_path: Path) -> None:
    # Rich reads `[...]` as markup: `Kids [/old]` once crashed the summary line, `[edited]` vanished from it.
    album = tmp_path / "Wedding [edited]"
    album.mkdir()
    make_photo().save(album / "[bold]first.png")
    output = tmp_path / "Kids [/old]" / "embeddings.safetensors"  # folders `Kids [` and `old]` in it
    output.parent.mkdir(parents=True)
    result = ok(embed(album, "-o", output))
    assert f"→ {output} (" in result.stderr
    missing = tmp_path / "[red]gone.jpg"
    assert the_error(embed(missing, "-o", output, "--overwrite")) == f"error: input {missing} does not exist."


def test_fifo_named_on_the_command_line_is_reported_not_opened(embed, photos: Path, out: Path) -> None:
    os.mkfifo(photos / "stream.jpg")  # opening it would block: no writer will ever come
    with deadline(30):
        ok(embed(photos / "stream.jpg", photos / "b.png", "-o", out / "embeddings.safetensors"))
    (error,) = read_jsonl(out / "embeddings.errors.jsonl")
    assert (error["path"], error["error"]) == (str(photos / "stream.jpg"), "not a regular file")


# ------------------------------------------------------------------------ a folder of awkward files


@dataclass
class MessyRun:
    folder: Path
    result: Result
    rows: list[dict]
    errors: list[dict]
    embeddings: dict[str, np.ndarray]  # by file name

    def error(self, name: str) -> str:
        return next(e["error"] for e in self.errors if e["path"] == str(self.folder / name))


GOOD = ["IMG_0001.HEIC", "UPPER.JPG", "animated.gif", "first_frame.png", "gray.png", "heic_pixels.png", "photo.jpg",
        "photo.png", "rotated.jpg", "second_frame.png", "sideways.png", "sixteen.png", "upright.png"]  # fmt: skip
BAD = {  # file name: what its error says
    "bomb.png": "decompression bomb",
    "empty.jpg": "empty file (0 bytes)",
    "notes.png": "cannot identify image file",
    "truncated.jpg": "truncated",
}


@pytest.fixture(scope="module")
def messy(tiny_siglip: Path, tmp_path_factory: pytest.TempPathFactory) -> MessyRun:
    """One run over the folder a real photo library looks like, good files and bad."""
    folder = tmp_path_factory.mktemp("messy")
    make_photo((80, 60), seed=0).save(folder / "photo.png")
    make_photo((80, 60), seed=1).save(folder / "photo.jpg")
    make_photo((64, 48), seed=2).save(folder / "UPPER.JPG")
    # A phone portrait: sideways pixels + EXIF orientation, and the same decoded pixels turned upright.
    save_sideways_jpeg(folder / "rotated.jpg", make_photo((80, 60), seed=3))
    with Image.open(folder / "rotated.jpg") as stored:
        stored.convert("RGB").save(folder / "sideways.png")
        stored.convert("RGB").rotate(-90, expand=True).save(folder / "upright.png")
    make_photo((80, 60), mode="I;16", seed=4).save(folder / "sixteen.png")
    make_photo((80, 60), mode="L", seed=4).save(folder / "gray.png")
    first, second = (make_photo((80, 60), seed=s).quantize(64) for s in (5, 6))
    save_animated_gif(folder / "animated.gif", [first, second])
    first.convert("RGB").save(folder / "first_frame.png")
    second.convert("RGB").save(folder / "second_frame.png")
    # An iPhone photo, its live-photo video and edit sidecar, and a NAS's thumbnail of it.
    make_photo((80, 60), seed=9).save(folder / "IMG_0001.HEIC", quality=90)
    with Image.open(folder / "IMG_0001.HEIC") as stored:
        stored.convert("RGB").save(folder / "heic_pixels.png")
    (folder / "IMG_0001.MOV").write_bytes(b"\0\0\0\x14ftypqt  ")
    (folder / "IMG_0001.AAE").write_text("<?xml version='1.0'?><plist/>")
    (folder / "@eaDir" / "IMG_0001.HEIC").mkdir(parents=True)
    make_photo((40, 30), seed=9).save(folder / "@eaDir" / "IMG_0001.HEIC" / "SYNOFILE_THUMB_M.jpg")
    # Bad files.
    make_photo((200, 150), seed=7).save(folder / "whole.jpg.orig", format="JPEG")
    whole = (folder / "whole.jpg.orig").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("shopping list: milk, eggs\n")
    save_png_claiming_size(folder / "bomb.png", 30_000, 30_000)
    # Never to be read.
    os.mkfifo(folder / "fifo.jpg")
    (folder / "loop").symlink_to(".")
    make_photo(seed=8).save(folder / ".hidden.jpg")
    (folder / "readme.txt").write_text("not an image")

    output = tmp_path_factory.mktemp("messy_out") / "embeddings.safetensors"
    with deadline(60):
        result = siglip("embed", folder, "-o", output, "--model", tiny_siglip, "--workers", 0, "--batch-size", 4)
    rows = read_jsonl(output.with_suffix(".jsonl")) if output.exists() else []
    errors = read_jsonl(output.with_name("embeddings.errors.jsonl")) if output.exists() else []
    vectors = load_file(output)["embeddings"].numpy() if output.exists() else []
    embeddings = {Path(r["path"]).name: v for r, v in zip(rows, vectors, strict=True)}
    return MessyRun(folder, result, rows, errors, embeddings)


def test_messy_folder_run_succeeds(messy: MessyRun) -> None:
    assert messy.result.exit_code == 0, messy.result.output
    assert messy.result.stdout == ""


def test_messy_folder_embeds_the_good_images_in_sorted_path_order(messy: MessyRun) -> None:
    assert [r["path"] for r in messy.rows] == [str(messy.folder / name) for name in GOOD]


def test_messy_folder_lists_each_bad_file_with_a_one_line_reason(messy: MessyRun) -> None:
    assert [e["path"] for e in messy.errors] == [str(messy.folder / name) for name in BAD]
    assert all(e["error"] and "\n" not in e["error"] for e in messy.errors)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_file_error_says_what_is_wrong(messy: MessyRun, name: str) -> None:
    assert BAD[name] in messy.error(name)


def test_fifo_symlink_loop_hidden_and_non_image_files_are_never_read(messy: MessyRun) -> None:
    listed = {Path(r["path"]) for r in messy.rows + messy.errors}
    assert listed and all(p.parent == messy.folder for p in listed)  # nothing found again through loop/
    assert not {"fifo.jpg", ".hidden.jpg", "readme.txt", "whole.jpg.orig"} & {p.name for p in listed}


def test_files_left_out_of_the_walk_are_counted_on_stderr(messy: MessyRun) -> None:
    notes = [line for line in messy.result.stderr.splitlines() if line.startswith("note: passed over")]
    assert notes == ["note: passed over 4 files (1 .aae, 1 .mov, 1 .orig, 1 .txt) in the folders: not images siglip "
                     "reads (name a file explicitly to try it anyway)."]  # fmt: skip


def test_entries_named_like_images_that_are_no_files_are_said_on_stderr(messy: MessyRun) -> None:
    notes = [line for line in messy.result.stderr.splitlines() if "not a file" in line]
    assert notes == [f"note: 1 entry named like an image is not a file: {messy.folder / 'fifo.jpg'} (a FIFO); not embedded."]


def test_heic_photo_embeds_as_its_decoded_pixels(messy: MessyRun) -> None:
    assert np.abs(messy.embeddings["IMG_0001.HEIC"] - messy.embeddings["heic_pixels.png"]).max() <= SAME


def test_exif_rotated_photo_embeds_as_the_same_photo_rotated(messy: MessyRun) -> None:
    assert np.abs(messy.embeddings["rotated.jpg"] - messy.embeddings["upright.png"]).max() <= SAME
    assert np.abs(messy.embeddings["rotated.jpg"] - messy.embeddings["sideways.png"]).max() > 0.01  # EXIF mattered
    rotated = next(r for r in messy.rows if r["path"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (80, 60)  # upright size, not the stored 60×80


def test_sixteen_bit_png_embeds_like_its_eight_bit_twin(messy: MessyRun) -> None:
    assert np.abs(messy.embeddings["sixteen.png"] - messy.embeddings["gray.png"]).max() <= SAME


def test_animated_gif_embeds_its_first_frame(messy: MessyRun) -> None:
    assert np.abs(messy.embeddings["animated.gif"] - messy.embeddings["first_frame.png"]).max() <= SAME
    assert np.abs(messy.embeddings["animated.gif"] - messy.embeddings["second_frame.png"]).max() > 0.01


# ----------------------------------------------------------------------------------- failing clearly


def test_nothing_embeddable_is_an_error_pointing_at_the_errors_file(embed, tmp_path: Path, out: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not a png")
    error = the_error(embed(folder, "-o", out / "embeddings.safetensors"))
    assert error == (
        f"error: none of the 2 input files could be embedded (the first, {folder / 'empty.jpg'}: empty file "
        f"(0 bytes)): see {out / 'embeddings.errors.jsonl'}."
    )
    assert len(read_jsonl(out / "embeddings.errors.jsonl")) == 2
    assert not (out / "embeddings.safetensors").exists()


def test_the_same_command_runs_again_once_the_files_are_fixed(embed, tmp_path: Path, out: Path) -> None:
    # The errors file of the run that embedded nothing made its rerun refuse: "already exists and would be replaced".
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    the_error(embed(folder, "-o", out / "embeddings.safetensors"))
    make_photo((40, 30)).save(folder / "empty.jpg")
    ok(embed(folder, "-o", out / "embeddings.safetensors"))
    assert not (out / "embeddings.errors.jsonl").exists() and len(read_jsonl(out / "embeddings.jsonl")) == 1
    (out / "embeddings.safetensors").unlink()
    (out / "embeddings.jsonl").unlink()
    (out / "embeddings.errors.jsonl").write_text("a file of the user's\n")  # not ours: still refused
    assert "embeddings.errors.jsonl already exists" in the_error(embed(folder, "-o", out / "embeddings.safetensors"))


def test_one_file_that_cannot_be_embedded_is_an_error_giving_its_reason(embed, tmp_path: Path, out: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    error = the_error(embed(tmp_path / "empty.jpg", "-o", out / "embeddings.safetensors"))
    assert error.startswith(f"error: could not embed {tmp_path / 'empty.jpg'}: empty file (0 bytes)")


def test_a_failed_overwrite_leaves_the_earlier_output_as_it_was(embed, photos: Path, tmp_path: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors"))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (tmp_path / "empty.jpg").write_bytes(b"")
    error = the_error(embed(tmp_path / "empty.jpg", "-o", out / "embeddings.safetensors", "--overwrite"))
    assert error == (  # one file: its reason, as when there is no earlier output (not "none of the 1 input files")
        f"error: could not embed {tmp_path / 'empty.jpg'}: empty file (0 bytes); "
        f"{out / 'embeddings.safetensors'} is left as it was, with every row it had: a run that would leave no row "
        "does not replace it (remove it to start afresh)."
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no errors file of the failed run


@pytest.mark.parametrize("then", ["nothing", "a file that fails"])
def test_an_update_that_would_leave_no_row_keeps_the_output_and_says_so(
    embed, tmp_path: Path, out: Path, then: str
) -> None:
    # A folder whose photos are all gone looks like a drive not mounted: the nightly --update must not empty the
    # output. It said "no image files found", or after "its row is dropped" that the output was left as it was,
    # without a word of the rows it kept.
    folder = tmp_path / "folder"
    folder.mkdir()
    make_photo((30, 20)).save(folder / "a.jpg")
    ok(embed(folder, "-o", out / "e.safetensors"))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (folder / "a.jpg").unlink()
    if then == "a file that fails":
        (folder / "b.jpg").write_bytes(b"")
    error = the_error(embed(folder, "-o", out / "e.safetensors", "--update"))
    kept = f"; {out / 'e.safetensors'} is left as it was, with every row it had"
    if then == "nothing":
        assert error.startswith(f"error: no image files found in {folder}") and error.endswith(f"{kept}.")
    else:
        assert error.endswith(f"{kept}: a run that would leave no row does not replace it (remove it to start afresh).")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    missing = the_error(embed(tmp_path / "elsewhere", "-o", out / "e.safetensors", "--update"))
    assert missing == f"error: input {tmp_path / 'elsewhere'} does not exist."  # no word of rows: not a reason of theirs


def test_output_that_is_a_folder_is_refused_before_any_work(embed, photos: Path, out: Path) -> None:
    (out / "embeddings.safetensors").mkdir()
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--overwrite"))
    assert error == f"error: output {out / 'embeddings.safetensors'} is a folder; give a file name (ending in .safetensors or .npy) for -o."
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.safetensors"]
    assert "is a folder" in the_error(embed(photos, "-o", out))  # without an extension too (it said "must end in")


def test_output_that_is_only_an_extension_is_refused_as_such(embed, photos: Path, out: Path) -> None:
    error = the_error(embed(photos, "-o", out / ".npy"))  # it said "must end in .safetensors or .npy"
    assert error == f"error: output {out / '.npy'} has no name before its extension: give one, as in -o photos.npy."


def test_a_name_with_control_characters_is_escaped_in_messages(embed, photos: Path, out: Path) -> None:
    # A newline or an escape sequence in an -o name went raw to the terminal, which the summary then recoloured.
    output = out / "e\x1b[31mred\n.npy"
    result = ok(embed(photos, "-o", output))
    assert "\x1b" not in result.stderr and "e\\x1b[31mred\\x0a.npy" in result.stderr
    assert "e\\x1b[31mred\\x0a.npy already exists" in the_error(embed(photos, "-o", output))


@pytest.mark.parametrize(
    "first, second",
    [("e.safetensors", "e.npy"), ("e.npy", "e.safetensors"), ("e.NPY", "e.safetensors"), ("e.SafeTensors", "e.npy"),
     ("e.npy", "e.NPY")],
)  # fmt: skip
@pytest.mark.parametrize("flag", [None, "--overwrite", "--update"])
def test_the_other_format_of_one_name_is_refused_since_they_share_the_manifest(
    embed, photos: Path, out: Path, first: str, second: str, flag: str | None
) -> None:
    # e.npy and e.safetensors both keep their rows' paths in e.jsonl: the second run used to replace the first's
    # manifest, and a later --update of the first then stored embeddings under other files' names. So do e.NPY
    # and e.npy, where a file system tells them apart.
    if _case_blind(out) and first.lower() == second.lower():
        pytest.skip("a file system blind to case: the two names are one file")  # macOS, Windows; not CI's
    ok(embed(photos, "-o", out / first))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = embed(photos / "b.png", "-o", out / second, *([flag] if flag else []))
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {out / first} has its manifest in {out / 'e.jsonl'}, which this run would replace: choose another "
        f"-o, or remove {out / first} first."
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _case_blind(folder: Path) -> bool:
    probe = folder / "case-probe"
    probe.touch()
    try:
        return (folder / "CASE-PROBE").exists()
    finally:
        probe.unlink()


@pytest.mark.parametrize("length", [248, 256])
def test_an_output_name_too_long_for_its_side_files_is_one_sentence(embed, photos: Path, out: Path, length: int) -> None:
    # 248 bytes fit the file but not `.NAME.errors.jsonl.PID.tmp`; 256 not even the file: both were tracebacks.
    output = out / ("a" * (length - len(".safetensors")) + ".safetensors")
    result = embed(photos, "-o", output)
    assert result.exit_code == 2
    assert result.output.startswith("error: output name 'aaa") and result.output.strip().endswith("choose a shorter -o.")
    assert list(out.iterdir()) == []


def test_update_refuses_a_manifest_that_does_not_match_its_embeddings(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "e.safetensors"))
    manifest = out / "e.jsonl"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")  # a manifest of 1 row beside 3 embeddings
    result = embed(photos, "-o", out / "e.safetensors", "--update")
    assert result.exit_code == 2
    assert "lists 1 rows but" in result.output and "holds 3" in result.output and "--overwrite" in result.output


def test_output_folder_that_cannot_be_written_is_one_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli.storage import WorkArea

    def read_only(self, state):  # tests may run as root, who can write anywhere: the refusal is stood in for
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(WorkArea, "create", read_only)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"))
    assert error == f"error: cannot write beside {out / 'embeddings.safetensors'}: Permission denied."


# What another user's files and folders refuse this one. The tests may run as root, whom no mode stops: the system's
# refusal is stood in for where it would come.


def closed_to_this_user(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`chmod 0 folder`: what is in it can no more be looked at (`os.stat` of it refused), as for a user not root."""
    monkeypatch.setattr(os, "stat", _refusing_below(folder, os.stat, follow=True))  # a link's target's way too
    monkeypatch.setattr(os, "lstat", _refusing_below(folder, os.lstat, follow=False))


def _refusing_below(folder: Path, look: Callable, *, follow: bool) -> Callable:
    def refusing(path, *args, **kwargs):
        if not isinstance(path, int):
            where = os.path.realpath(path) if follow else os.path.abspath(path)
            if where.startswith(f"{folder}{os.sep}"):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return look(path, *args, **kwargs)

    return refusing


@pytest.mark.parametrize("closed", ["its-folder", "a-folder-on-its-way"])
def test_a_checkpoint_closed_to_this_user_is_one_sentence(
    embed, photos: Path, out: Path, tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed: str
) -> None:
    # A traceback (PermissionError from pathlib's is_dir / is_file).
    shutil.copytree(tiny_siglip, tmp_path / "models" / "ck")
    model = tmp_path / "models" / "ck"
    closed_to_this_user(model if closed == "its-folder" else tmp_path / "models", monkeypatch)
    error = the_error(embed(photos, "-o", out / "e.npy", model=model))
    reading = f"the folder {model}" if closed == "its-folder" else str(model)
    assert error == f"error: cannot read {reading}: Permission denied."


def test_a_permission_refused_where_no_sentence_was_ready_is_still_one(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def closed(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(photos / "sub"))

    monkeypatch.setattr("siglip_cli.files.discover", closed)
    assert the_error(embed(photos, "-o", out / "e.npy")) == f"error: cannot use {photos / 'sub'}: Permission denied."


def left_by_another_user(lock: Path, monkeypatch: pytest.MonkeyPatch, *, readable: bool) -> None:
    """Make `lock` a lock file that another user's run left: this user may not open it for writing, nor at all
    unless `readable`. Through `os.open` and through storage's `open` alike."""
    from siglip_cli import storage

    lock.write_bytes(b"")
    system_open = os.open

    def refused(path: str, writing: bool) -> None:
        if path == str(lock) and (writing or not readable):
            raise PermissionError(errno.EACCES, "Permission denied", path)

    def os_open(path, flags, *args, **kwargs):
        refused(os.fspath(path), writing=bool(flags & (os.O_WRONLY | os.O_RDWR)))
        return system_open(path, flags, *args, **kwargs)

    def python_open(path, mode="r", *args, **kwargs):
        refused(os.fspath(path), writing=any(c in mode for c in "wa+x"))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(storage, "open", python_open, raising=False)


@pytest.mark.parametrize("its_mode", [0o644, 0o600], ids=["mode-644", "mode-600"])
def test_a_lock_file_another_user_left_is_no_permission_error(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, its_mode: int
) -> None:
    # A run under sudo, killed, left its lock (root's, 644): every run of the user then said "cannot write beside
    # OUT: Permission denied", of a folder they could write, since the lock was opened for writing.
    lock = out / ".e.lock"
    left_by_another_user(lock, monkeypatch, readable=its_mode == 0o644)
    result = embed(photos, "-o", out / "e.npy")
    if its_mode == 0o644:  # a lock needs only to be read
        ok(result)
    else:
        assert the_error(result) == (
            f"error: cannot open {lock}, the lock of another user's run on {out / 'e.npy'} (Permission denied): if no "
            "such run is writing it now, delete that file."
        )


def test_an_output_folder_that_cannot_be_made_is_named(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "cannot write beside OUT: Permission denied", of a folder that did not exist.
    (out / "shared").mkdir()
    mkdir = Path.mkdir

    def closed(self, *args, **kwargs):
        if str(self).startswith(str(out / "shared") + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", closed)
    output = out / "shared" / "2024" / "e.npy"
    error = the_error(embed(photos, "-o", output))
    assert error == f"error: cannot write {output}: cannot make the folder {output.parent} (Permission denied)."


@pytest.mark.parametrize("how", ["--overwrite", "--update"])
def test_another_users_output_in_a_sticky_folder_is_refused_before_any_work(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # In /tmp (mode 1777) only a file's owner may replace it: the run embedded every file, then failed at its last
    # rename, and told the user to rerun, which failed the same way.
    ok(embed(photos, "-o", out / "e.safetensors"))
    out.chmod(0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(out / "e.safetensors").st_uid + 1)  # not the output's owner
    embedded = []
    monkeypatch.setattr("siglip_cli.embed._embed_pending", lambda *args, **kwargs: embedded.append(args) or {})
    assert the_error(embed(photos, "-o", out / "e.safetensors", how)) == (
        f"error: {out / 'e.jsonl'} belongs to another user, and in {out}, a sticky folder (like /tmp), only its owner "
        "may replace it: choose another -o."
    )
    assert not embedded


@pytest.mark.parametrize("way", ["closed/sub", "link-to-closed-sub"])
def test_an_output_under_a_folder_closed_to_this_user_names_it(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    # It said that the folder, there all along, would be made, then that it could not be.
    (out / "closed" / "sub").mkdir(parents=True)
    (out / "link-to-closed-sub").symlink_to(out / "closed" / "sub")
    closed_to_this_user(out / "closed", monkeypatch)
    result = embed(photos, "-o", out / way / "e.npy")
    assert the_error(result) == (
        f"error: cannot write {out / way / 'e.npy'}: the folder {out / 'closed'} is closed to this user "
        "(Permission denied)."
    )
    assert "will be made" not in result.stderr


def nfs_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exclusive `flock` as NFS takes it: refused (EBADF) on a file not open for writing."""
    import fcntl

    flock = fcntl.flock

    def on_nfs(handle, operation):
        descriptor = handle if isinstance(handle, int) else handle.fileno()
        if operation & fcntl.LOCK_EX and fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", on_nfs)


def test_a_run_on_an_nfs_share_takes_its_lock(embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nfs_locks(monkeypatch)
    ok(embed(photos, "-o", out / "e.npy"))
    # A lock file another user's run left, which this user may only read: one sentence, not a traceback.
    left_by_another_user(out / ".e.lock", monkeypatch, readable=True)
    assert the_error(embed(photos, "-o", out / "e.npy", "--overwrite")) == (
        f"error: cannot lock {out / '.e.lock'} (Bad file descriptor): if no siglip run is writing {out / 'e.npy'}, "
        "delete that file; or choose another -o."
    )


def test_another_users_errors_file_in_a_sticky_folder_is_refused_before_any_work(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run that could embed nothing leaves its errors file, which the next run replaces without --overwrite: in a
    # sticky folder, another user's, it failed at that rename, after all the work.
    (out / "bad").mkdir()
    (out / "bad" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    the_error(embed(out / "bad", "-o", out / "e.npy"))
    assert [p.name for p in out.iterdir() if p.is_file()] == ["e.errors.jsonl"]
    out.chmod(0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(out / "e.errors.jsonl").st_uid + 1)
    error = the_error(embed(photos, "-o", out / "e.npy"))
    assert error.startswith(f"error: {out / 'e.errors.jsonl'} belongs to another user")


def test_update_keeps_the_outputs_permissions(embed, photos: Path, out: Path) -> None:
    # A manifest kept private (600) came back world-readable (644, as the umask makes a new file), and one made
    # read-only came back writable.
    ok(embed(photos, "-o", out / "e.safetensors"))
    (out / "e.jsonl").chmod(0o600)
    (out / "e.safetensors").chmod(0o444)
    make_photo((30, 40), seed=5).save(photos / "new.png")
    ok(embed(photos, "-o", out / "e.safetensors", "--update"))
    assert len(read_jsonl(out / "e.jsonl")) == 4
    assert [stat.S_IMODE((out / name).stat().st_mode) for name in ("e.jsonl", "e.safetensors")] == [0o600, 0o444]


def test_update_of_an_output_closed_to_this_user_says_so(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors says "No such file or directory" of a file it may not read: the advice was to embed it all again.
    from safetensors import safe_open

    from siglip_cli import outputs, storage

    ok(embed(photos, "-o", out / "e.safetensors"))
    closed = str(out / "e.safetensors")

    def python_open(path, *args, **kwargs):
        if os.fspath(path) == closed and args[:1] == ("rb",):
            raise PermissionError(errno.EACCES, "Permission denied", closed)
        return open(path, *args, **kwargs)

    def safetensors_open(path, *args, **kwargs):  # what safetensors 0.8 raises of a file it may not read
        if os.fspath(path) == closed:
            raise FileNotFoundError(f"No such file or directory: {closed}")
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(storage, "open", python_open, raising=False)
    for module in (storage, outputs):
        monkeypatch.setattr(module, "safe_open", safetensors_open, raising=False)
    error = the_error(embed(photos, "-o", out / "e.safetensors", "--update"))
    assert error == (
        f"error: cannot read {out / 'e.safetensors'} back (Permission denied): give this user read access to the "
        "output's files, and rerun."
    )


@pytest.mark.parametrize("under", ["Thumbs.db", "Thumbs.db/2024"])
def test_output_under_a_file_says_which_is_not_a_folder(embed, photos: Path, out: Path, under: str) -> None:
    # It said "File exists", as if the output did; and, first, that the folder (a file) would be made.
    (out / "Thumbs.db").write_bytes(b"")
    result = embed(photos, "-o", out / under / "x.safetensors")
    assert the_error(result) == (
        f"error: cannot write {out / under / 'x.safetensors'}: {out / 'Thumbs.db'} is a file, not a folder."
    )
    assert "will be made" not in result.stderr


def test_update_and_overwrite_together_are_refused(embed, photos: Path, out: Path) -> None:
    error = the_error(embed(photos, "-o", out / "e.safetensors", "--update", "--overwrite"))
    assert "give one of the two" in error and not any(out.iterdir())


def test_device_decoder_with_the_model_on_the_cpu_says_what_it_costs(
    embed, photos: Path, out: Path, tiny_siglip: Path
) -> None:
    result = ok(embed(photos, "-o", out / "e.safetensors", "--decode", "gpu", "--device", "cpu"))
    assert "note: --decode gpu with the model on the CPU" in result.stderr
    assert "note: --decode gpu" not in ok(embed(photos, "-o", out / "f.safetensors", "--device", "cpu")).stderr
    quiet = ok(embed(photos, "-o", out / "g.safetensors", "--decode", "gpu", "--device", "cpu", "-q"))
    assert quiet.stderr == ""

    class Heard:  # the Python API is told too: the note is the library's, not the command line's
        notes: list[str] = []

        def start(self, total: int, done: int) -> None: ...
        def advance(self, n: int) -> None: ...
        def note(self, message: str) -> None:
            self.notes.append(message)

    heard = Heard()
    options = EmbedOptions(decoder="gpu", workers=0)
    embed_to_file(load(str(tiny_siglip), device="cpu"), discover([photos]), out / "h.npy", options=options, progress=heard)
    assert [n for n in heard.notes if n.startswith("--decode gpu with the model on the CPU")]


def test_decode_gpu_for_a_filter_it_lacks_is_refused_before_any_work(
    embed, photos: Path, out: Path, tiny_siglip: Path, tmp_path: Path
) -> None:
    # Refused after the run had recorded `gpu` in its work area, the advice to use the CPU decoder was refused in turn.
    lanczos = with_preprocessing(tiny_siglip, tmp_path / "lanczos", resample=1)
    error = the_error(embed(photos, "-o", out / "e.safetensors", "--decode", "gpu", "--device", "cpu", model=lanczos))
    assert error.endswith("asks for PIL filter 1; use the CPU decoder.")
    assert list(out.iterdir()) == []
    ok(embed(photos, "-o", out / "e.safetensors", "--decode", "cpu", model=lanczos))


def test_missing_input_path_is_named(embed, photos: Path, out: Path) -> None:
    error = the_error(embed(photos, photos / "holiday.jpg", "-o", out / "embeddings.safetensors"))
    assert error == f"error: input {photos / 'holiday.jpg'} does not exist."


def test_folder_without_images_is_an_error(embed, tmp_path: Path, out: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    assert "no image files found in" in the_error(embed(tmp_path / "docs", "-o", out / "embeddings.safetensors"))


def test_no_inputs_at_all_is_an_error(embed, out: Path) -> None:
    assert "give at least one image file or folder" in the_error(embed("-o", out / "embeddings.safetensors"))


def test_unknown_model_directory_is_one_sentence(embed, photos: Path, out: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "siglip-mine"
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model=missing))
    assert str(missing) in error


def test_directory_that_is_not_a_checkpoint_is_one_sentence(embed, photos: Path, out: Path) -> None:
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model=photos))
    assert f"{photos} has no config.json" in error


@pytest.mark.parametrize("device", ["tpu", "gpu:0", "cuda:99", "cpu:1"])
@pytest.mark.parametrize("beside", [False, True], ids=["alone", "after-another"])
def test_bad_device_is_one_sentence(embed, photos: Path, out: Path, device: str, beside: bool) -> None:
    # After a good one (cpu,cuda:99: a run on several devices), it left an empty OUT.partial/ behind.
    devices = f"cpu,{device}" if beside else device
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--device", devices))
    assert device in error
    assert list(out.iterdir()) == []


def test_missing_tensor_is_named_by_the_cli(embed, photos: Path, out: Path, tiny_vision: Path, tmp_path: Path) -> None:
    checkpoint = Path(shutil.copytree(tiny_vision, tmp_path / "damaged"))
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["encoder.layers.1.mlp.fc2.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model=checkpoint))
    assert "missing tensor encoder.layers.1.mlp.fc2.weight" in error


def test_pickle_checkpoint_embeds_as_its_safetensors_twin(
    embed, photos: Path, out: Path, tiny_siglip: Path, tmp_path: Path
) -> None:
    # The same tensors from pytorch_model.bin. Not always the same bits: safetensors hands its tensors over at
    # addresses that are not 64-byte aligned, and a vectorized kernel sums in another order where they are not.
    pickled = save_as_pickles(tiny_siglip, tmp_path / "pickled")
    ok(embed(photos, "-o", out / "safetensors.safetensors"))
    ok(embed(photos, "-o", out / "pickle.safetensors", model=pickled))
    reference = read_safetensors(out / "safetensors.safetensors")[0]["embeddings"]
    np.testing.assert_allclose(read_safetensors(out / "pickle.safetensors")[0]["embeddings"], reference, rtol=0, atol=SAME)


def test_pickle_checkpoint_that_would_run_code_is_refused_and_never_unpickled(
    embed, photos: Path, out: Path, tiny_vision: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "old"
    checkpoint.mkdir()
    shutil.copy(tiny_vision / "config.json", checkpoint)
    save_booby_trapped_pickle(checkpoint / "pytorch_model.bin", tmp_path / "pwned", torch_format=True)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model=checkpoint))
    assert f"pytorch_model.bin is not a plain tensor checkpoint: its pickle calls {open.__module__}.open" in error
    assert not (tmp_path / "pwned").exists()


def test_pickle_file_as_model_is_refused_and_never_unpickled(embed, photos: Path, out: Path, tmp_path: Path) -> None:
    weights = save_booby_trapped_pickle(tmp_path / "some.bin", tmp_path / "pwned")
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model=weights))
    assert "some.bin is a file; pass the checkpoint directory that holds config.json instead." in error
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("model_type", ["siglip2", "clip"])
def test_unsupported_model_type_is_one_sentence(
    embed, photos: Path, out: Path, tmp_path: Path, model_type: str
) -> None:
    checkpoint = tmp_path / model_type
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert f"model_type '{model_type}'" in the_error(
        embed(photos, "-o", out / "embeddings.safetensors", model=checkpoint)
    )


def test_hub_id_is_served_from_the_offline_cache_with_its_revision_recorded(
    embed, photos: Path, out: Path, hf_cache: HubCache, tiny_siglip: Path
) -> None:
    hf_cache(tiny_siglip)
    ok(embed(photos, "-o", out / "hub.safetensors", model=DEFAULT_REPO_ID))
    ok(embed(photos, "-o", out / "local.safetensors", model=tiny_siglip))
    tensors, meta = read_safetensors(out / "hub.safetensors")
    assert (meta["model"], meta["revision"]) == (DEFAULT_REPO_ID, DEFAULT_REVISION)
    assert np.array_equal(tensors["embeddings"], load_file(out / "local.safetensors")["embeddings"].numpy())


def test_hub_id_missing_from_the_offline_cache_fails_naming_it_without_trying_the_network(
    embed, photos: Path, out: Path, hf_cache: HubCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    connections = []  # counted rather than timed: huggingface_hub's retries of an unreachable Hub took ~26 s
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connections.append(address) or 1 / 0)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", model="google/siglip-not-downloaded"))
    assert "google/siglip-not-downloaded is not in the local Hugging Face cache" in error
    assert connections == []


def test_headless_tower_embedding_is_the_mean_of_its_tokens(
    embed, photos: Path, out: Path, tiny_paligemma: Path
) -> None:
    ok(embed(photos, "-o", out / "embeddings.safetensors", "--tokens", "--no-normalize", model=tiny_paligemma))
    tensors, meta = read_safetensors(out / "embeddings.safetensors")
    assert np.abs(tensors["embeddings"] - tensors["tokens"].mean(axis=1)).max() <= SAME
    assert "mean of patch tokens" in meta["pooling"]


# ------------------------------------------------------------------------------------ in a real process


def run_siglip(*args: object, input: str = "", **env: str) -> subprocess.CompletedProcess:
    code = "from siglip_cli.cli import app; app(prog_name='siglip')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000", **env}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], input=input, capture_output=True, text=True, env=env, timeout=120
    )


def test_what_c_decoders_print_stays_off_the_terminal(photos: Path, out: Path, tiny_siglip: Path) -> None:
    # libtiff writes a line per bad scanline of a damaged scan straight to file descriptor 2, over the progress bar.
    scan = io.BytesIO()
    make_photo((320, 240)).convert("1").save(scan, format="TIFF", compression="group4")
    data = bytearray(scan.getvalue())
    for i in range(40, 200, 20):  # a few flipped bits in the fax-coded strip: it still decodes, with complaints
        data[i] ^= 0x5A
    (photos / "scan.tif").write_bytes(data)
    process = run_siglip("embed", photos, "-o", out / "e.safetensors", "--model", tiny_siglip, "--workers", 1)
    assert process.returncode == 0, process.stderr
    assert "Fax4Decode" not in process.stderr and process.stderr.splitlines()[-1].startswith("embedded 4 → ")
    # Decoded in the command's own process (`--workers 0`, `inspect`), they reached the terminal.
    command = [sys.executable, "-m", "siglip_cli"]
    for args in (["embed", photos, "-o", out / "main.npy", "--workers", 0], ["inspect", photos / "scan.tif"]):
        process = subprocess.run([*command, *map(str, args), "--model", str(tiny_siglip)], capture_output=True,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
        assert process.returncode == 0, process.stderr
        assert "Fax4Decode" not in process.stderr and "Traceback" not in process.stderr


def test_a_run_from_a_deleted_folder_says_so(photos: Path, out: Path, tmp_path: Path) -> None:
    # torch's import failed there with oneMKL's "FATAL ERROR: Cannot load .../libtorch_cpu.so".
    gone = tmp_path / "gone"
    gone.mkdir()
    command = f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m siglip_cli embed "{photos}" -o x.npy'
    process = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert (process.returncode, process.stdout) == (2, "")
    assert process.stderr == "error: the current folder no longer exists: cd to one that does.\n"


def test_real_process_reads_stdin_and_keeps_stdout_clean(photos: Path, out: Path, tiny_siglip: Path) -> None:
    listing = f"{photos / 'b.png'}\n{photos / 'a.jpg'}\n"
    args = ["embed", "--files-from", "-", "-o", out / "embeddings.safetensors", "--model", tiny_siglip, "--workers", 0]
    process = run_siglip(*args, input=listing)
    assert process.returncode == 0, process.stderr
    assert process.stdout == ""
    assert process.stderr.splitlines()[-1].startswith("embedded 2 → ")


def test_a_long_tmpdir_does_not_hang_the_decoding_workers(
    photos: Path, out: Path, tiny_siglip: Path, tmp_path: Path
) -> None:
    # A worker hands its pixels over through a Unix socket made in TMPDIR, and a socket's path holds at most 107
    # bytes: under a longer TMPDIR (a cluster job's scratch folder) the worker dropped its parcel, and the run waited
    # for it forever. The files come from stdin, so that the workers decode them all (no head start).
    scratch = tmp_path / ("t" * 60) / ("u" * 60)
    scratch.mkdir(parents=True)
    listing = "".join(f"{path}\n" for path in sorted(photos.rglob("*.*")))
    args = ["embed", "--files-from", "-", "-o", out / "e.safetensors", "-m", tiny_siglip, "--workers", 1, "-b", 1]
    process = run_siglip(*args, input=listing, TMPDIR=str(scratch))
    assert process.returncode == 0, process.stderr
    assert process.stderr.splitlines()[-1].startswith("embedded 3 → ")


def test_real_process_user_error_has_no_traceback(photos: Path, out: Path, tiny_siglip: Path) -> None:
    process = run_siglip("embed", photos, "-o", out / "e.safetensors", "--model", tiny_siglip, "--device", "tpu")
    assert process.returncode == 2
    assert process.stdout == "" and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == ["error: unknown device 'tpu' (expected auto, cpu, cuda or cuda:N)."]


def run_shell(command: str, **env: str) -> subprocess.CompletedProcess:
    """`command` in bash, where `siglip` is `python -m siglip_cli` (pipes and closed streams are the shell's to make)."""
    return subprocess.run(
        ["bash", "-c", f"siglip() {{ {sys.executable} -m siglip_cli \"$@\"; }}; set -o pipefail; {command}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip


def test_json_is_plain_json_and_a_log_gets_no_bar_even_with_force_color(photos: Path, out: Path, tiny_siglip: Path) -> None:
    # FORCE_COLOR (common in CI) coloured --json into invalid JSON, and drew the bar into the log file.
    process = run_shell(f"siglip embed {photos} -o {out / 'e.safetensors'} -m {tiny_siglip} --json 2> {out / 'log'}", FORCE_COLOR="1")
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["embedded"] == 3
    assert "\r" not in (out / "log").read_text() and (out / "log").read_text().startswith("embedded 3")


def test_closed_and_broken_streams_cost_no_work_and_no_traceback(photos: Path, out: Path, tiny_siglip: Path) -> None:
    embed = f"siglip embed {photos} -m {tiny_siglip} --workers 0"
    gone = run_shell(f"{embed} -o {out / 'a.npy'} --json | true; echo $? >&2")  # the reader left before the summary
    assert gone.stderr.strip().splitlines()[-1] == "141" and "Traceback" not in gone.stderr
    closed = run_shell(f"{embed} -o {out / 'b.npy'} --json >&-")  # Python's stdout is None
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    (photos / "clip.mov").write_bytes(b"")  # a note to print before any work
    no_stderr = run_shell(f"{embed} -o {out / 'c.npy'} 2>&1 | true")
    assert no_stderr.returncode == 0, no_stderr.stderr
    assert all((out / f"{name}.npy").exists() for name in "abc")


def test_a_closed_stderr_leaves_descriptor_2_to_no_file_of_ours(photos: Path, tiny_siglip: Path) -> None:
    # Python's stand-in for it was let go, and descriptor 2 taken by the next file opened: `embed`'s lock file, which
    # a photo decoded in this process then closed (freeing the lock); where none had, inspect failed on every photo.
    inspect = run_shell(f"siglip inspect {photos / 'a.jpg'} -m {tiny_siglip} --json 2>&-")
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["stages"]
    script = (
        "import gc, os; from siglip_cli import __main__ as m; m._standard_streams(); gc.collect(); "
        "print(open(os.devnull).fileno(), os.path.realpath('/dev/fd/2'))"
    )
    fd, target = run_shell(f"{sys.executable} -c {shlex.quote(script)} 2>&-").stdout.split()
    assert fd != "2" and target == "/dev/null"


def test_a_terminal_that_cannot_show_the_characters_gets_them_escaped(tiny_siglip: Path) -> None:
    process = run_shell(f"siglip inspect -m {tiny_siglip}", PYTHONIOENCODING="ascii")
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
    assert "\\xd7" in process.stdout  # the × of the shapes


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full, a file that is always full, is Linux's")
def test_stdout_on_a_full_disk_is_one_sentence(photos: Path, out: Path, tiny_siglip: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["inspect", "--help"], ["embed", photos, "-o", out / "e.npy", "-m", tiny_siglip, "--json", "-q"]):
        with open("/dev/full", "w") as full:
            process = subprocess.run(
                [sys.executable, "-m", "siglip_cli", *map(str, args)], stdout=full, stderr=subprocess.PIPE, text=True,
                env=env, timeout=120,
            )  # fmt: skip
        assert process.returncode == 1
        assert process.stderr.strip().splitlines() == ["error: cannot write to stdout: No space left on device."]
    assert (out / "e.npy").exists()  # the embeddings were written; only the summary could not be


# ------------------------------------------------------------------------------------------ Python API


def test_embed_paths_returns_normalized_rows_in_path_order_and_errors(photos: Path, tiny_siglip: Path) -> None:
    (photos / "broken.png").write_text("not a png")
    result = embed_paths(load(str(tiny_siglip), device="cpu"), [photos])
    assert result.embeddings.shape == (3, 32) and result.tokens is None
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1, atol=1e-6)
    assert [r["path"] for r in result.rows] == [str(photos / n) for n in ("a.jpg", "b.png", "sub/c.webp")]
    assert [e["path"] for e in result.errors] == [str(photos / "broken.png")]


def test_one_path_alone_is_a_list_of_one_in_the_python_api(photos: Path, tiny_siglip: Path, out: Path) -> None:
    # A string was taken letter by letter: "input p does not exist".
    embedder = load(str(tiny_siglip), device="cpu")
    assert [r["path"] for r in embed_paths(embedder, str(photos / "sub")).rows] == [str(photos / "sub/c.webp")]
    # A name as bytes too: embed_paths took it byte by byte ("expected str, bytes or os.PathLike object, not int").
    assert [r["path"] for r in embed_paths(embedder, os.fsencode(photos / "sub")).rows] == [str(photos / "sub/c.webp")]
    assert discover(photos / "sub") == [str(photos / "sub/c.webp")]
    summary = embed_to_file(embedder, str(photos / "a.jpg"), out / "one.npy", options=EmbedOptions(workers=0))
    assert summary.embedded == 1


def test_the_python_api_takes_a_list_of_path_objects(photos: Path, tiny_siglip: Path, out: Path) -> None:
    # Path objects in a list reached the manifest as they were: "Object of type PosixPath is not JSON serializable",
    # and an --update-like second call "'PosixPath' object has no attribute 'casefold'".
    embedder = load(str(tiny_siglip), device="cpu")
    given = [photos / "a.jpg", photos / "b.png"]
    for update in (False, True):
        summary = embed_to_file(embedder, given, out / "two.npy", options=EmbedOptions(workers=0), update=update)
        assert (summary.embedded, summary.reused) == ((0, 2) if update else (2, 0))
    rows = [json.loads(line) for line in (out / "two.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in given]


def test_the_python_api_expands_a_leading_tilde_as_a_shell_would(
    photos: Path, tiny_siglip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No shell sees a Python caller's "~/...": an input was "not there", and an output made a folder named "~" here.
    home, here = tmp_path / "home", tmp_path / "here"
    shutil.copytree(photos, home / "photos")
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    embedder = load(str(tiny_siglip), device="cpu")
    assert [r["path"] for r in embed_paths(embedder, "~/photos/sub").rows] == [str(home / "photos/sub/c.webp")]
    summary = embed_to_file(embedder, [str(home / "photos/a.jpg")], "~/out.npy", options=EmbedOptions(workers=0))
    assert summary.output == str(home / "out.npy") and (home / "out.npy").is_file() and list(here.iterdir()) == []
    (here / "~").mkdir()  # a folder of that very name is taken as named
    embed_to_file(embedder, [str(home / "photos/a.jpg")], "~/out.npy", options=EmbedOptions(workers=0))
    assert (here / "~" / "out.npy").is_file()


def test_the_python_api_takes_path_objects_and_torch_types_where_it_takes_names(
    photos: Path, tiny_siglip: Path
) -> None:
    # load(Path(...)): "'PosixPath' object has no attribute 'strip'"; dtype=torch.float32: "unknown dtype".
    from siglip_cli.tracing import inspect_image

    embedder = load(tiny_siglip, device=torch.device("cpu"), dtype=torch.bfloat16)  # not what auto gives here
    assert embedder.dtype == torch.bfloat16 and embedder.device == torch.device("cpu")
    assert inspect_image(tiny_siglip, photos / "a.jpg").model == str(tiny_siglip)


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda: DecodeOptions(max_pixels="1000000"),
         "max_pixels must be a whole number of at least 1, or None for no limit, not '1000000'."),
        (lambda: DecodeOptions(exif_transpose="no"),
         "exif_transpose must be True or False, not 'no'."),
        (lambda: EmbedOptions(shard=(5, 2)), "shard must be (K, N), whole numbers with 0 <= K < N, not (5, 2)."),
        (lambda: EmbedOptions(shard=(0, 2), shard_inputs="photos"),
         "shard_inputs must be a tuple of paths as text, not 'photos'."),
    ],
    ids=["max_pixels", "exif_transpose", "shard", "shard_inputs"],
)
def test_a_python_callers_bad_decode_or_shard_option_is_one_sentence(call, said: str) -> None:
    # Unchecked, max_pixels="1000000" failed every file, and a shard (5, 2) was written into the metadata.
    with pytest.raises(UserError) as refused:
        call()
    assert str(refused.value) == said


@pytest.mark.parametrize(
    ("given", "said"),
    [({"progress": True}, "progress must have start, advance and note methods (embed.Progress), not True."),
     ({"paths": [None]}, "paths must be file paths (str or pathlib.Path), as `discover` gives them.")],
    ids=["progress", "path"],
)  # fmt: skip
def test_a_bad_argument_to_embed_to_file_leaves_nothing_behind(
    photos: Path, tiny_siglip: Path, out: Path, given: dict, said: str
) -> None:
    # Refused once the work folder was made: an AttributeError, and OUT.partial/state.json left behind.
    embedder = load(str(tiny_siglip), device="cpu")
    paths = given.get("paths", [str(photos / "a.jpg")])
    with pytest.raises(UserError) as refused:
        embed_to_file(embedder, paths, out / "e.safetensors", progress=given.get("progress"))
    assert str(refused.value) == said
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({"batch_size": -1}, "batch_size must be a whole number of at least 1, not -1."),  # gave no rows, no error
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1, not 0."),
        ({"workers": -2}, "workers must be a whole number of at least 0, not -2."),
        ({"output_dtype": "float64"}, "output_dtype must be one of float32, float16, not 'float64'."),
        ({"tokens": "yes"}, "tokens must be True or False, not 'yes'."),
        ({"decoder": "nvjpeg"}, "decoder must be auto, cpu or gpu, not 'nvjpeg'."),
    ],
)
def test_a_python_callers_bad_option_is_one_sentence_before_any_work(
    photos: Path, tiny_siglip: Path, out: Path, values: dict, said: str
) -> None:
    with pytest.raises(UserError) as refused:
        EmbedOptions(**values)
    assert str(refused.value) == said
    if "output_dtype" not in values:  # embed_paths takes the others as they are named there
        with pytest.raises(UserError, match=re.escape(said)):
            embed_paths(load(str(tiny_siglip), device="cpu"), [photos], **values)
    with pytest.raises(UserError, match=r"^options must be an EmbedOptions, not dict\.$"):
        embed_to_file(load(str(tiny_siglip), device="cpu"), [str(photos / "a.jpg")], out / "e.npy", options=values)
    assert list(out.iterdir()) == []  # nothing made


def test_a_row_the_model_overflowed_on_is_an_error_not_an_embedding(
    photos: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float16 can overflow inside the tower: a row of NaNs stored as an embedding poisons every search it enters.
    from siglip_cli.runtime import Embedder

    forward = Embedder.__call__

    def overflowing(self, pixels):
        pooled, tokens = forward(self, pixels)
        pooled = pooled.clone()
        pooled[1] = float("nan")
        return pooled, tokens

    monkeypatch.setattr(Embedder, "__call__", overflowing)
    result = embed_paths(load(str(tiny_siglip), device="cpu"), [photos], tokens=True)
    assert [r["path"] for r in result.rows] == [str(photos / "a.jpg"), str(photos / "sub/c.webp")]
    assert result.embeddings.shape == (2, 32) and result.tokens.shape[0] == 2 and np.isfinite(result.embeddings).all()
    assert [e["path"] for e in result.errors] == [str(photos / "b.png")]
    assert result.errors[0]["error"] == "the model gave NaN or infinite values in float32"


def test_a_row_too_large_for_a_float16_output_is_an_error_not_infinities(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked before the cast to --output-dtype only, such a row was stored as inf.
    from siglip_cli.runtime import Embedder

    forward = Embedder.__call__

    def large(self, pixels):
        pooled, tokens = forward(self, pixels)
        return pooled * torch.tensor([[1.0], [1e6], [1.0]])[: len(pooled)], tokens

    monkeypatch.setattr(Embedder, "__call__", large)
    ok(embed(photos, "-o", out / "e.npy", "--no-normalize", "--output-dtype", "float16"))
    assert np.isfinite(np.load(out / "e.npy")).all() and len(np.load(out / "e.npy")) == 2
    assert [e["error"] for e in read_jsonl(out / "e.errors.jsonl")] == ["values beyond float16's range: try --output-dtype float32"]


def test_embed_paths_agrees_with_the_cli(embed, photos: Path, out: Path, tiny_siglip: Path) -> None:
    ok(embed(photos, "-o", out / "embeddings.npy"))
    result = embed_paths(load(str(tiny_siglip), device="cpu"), [photos], tokens=True)
    assert np.abs(result.embeddings - np.load(out / "embeddings.npy")).max() <= SAME
    assert result.tokens.shape == (3, 16, 32)


def test_embed_to_file_writes_the_output_and_returns_a_summary(photos: Path, out: Path, tiny_siglip: Path) -> None:
    from siglip_cli.embed import EmbedOptions

    paths = [str(photos / "b.png"), str(photos / "a.jpg")]  # kept in the order given
    summary = embed_to_file(  # a file given twice is one row (it was two, which `siglip merge` then refused)
        load(str(tiny_siglip), device="cpu"), paths + paths[:1], out / "api.npy", options=EmbedOptions(workers=0)
    )
    assert (summary.embedded, summary.failed, summary.output) == (2, 0, str(out / "api.npy"))
    assert [r["path"] for r in read_jsonl(out / "api.jsonl")] == paths
    assert np.load(out / "api.npy").shape == (2, 32)


def test_embedding_leaves_pillows_bomb_guard_alone(
    photos: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default; restored after the test
    embed_paths(load(str(tiny_siglip), device="cpu"), [photos], workers=0)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_a_second_ctrl_c_while_the_stop_is_reported_keeps_the_sentence_whole(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C twice: the second, landing while the bar was taken down, left "error: interrupted." without the rerun hint.
    import siglip_cli.cli as cli_module
    import siglip_cli.devices as devices

    def stopped(*args, **kwargs):
        (out / "embeddings.safetensors.partial").mkdir()
        (out / "embeddings.safetensors.partial" / "chunk-00000000.safetensors").write_bytes(b"")
        raise KeyboardInterrupt

    stop = cli_module._RichProgress.stop

    def impatient(self, *, keep: bool = True) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        stop(self, keep=keep)

    monkeypatch.setattr(devices, "load_and_embed", stopped)
    monkeypatch.setattr(cli_module._RichProgress, "stop", impatient)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=130)
    assert error.endswith("rerun the same command to continue.")


@pytest.mark.parametrize("work_kept", [True, False], ids=["during-the-run", "before-any-work"])
def test_gpu_out_of_memory_outside_the_forward_is_one_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, work_kept: bool
) -> None:
    # The forward halves its batch when the GPU runs out of memory; anywhere else (decoding a batch into device
    # memory, loading the model) it ended the run in a traceback.
    import siglip_cli.devices as devices

    def out_of_memory(*args, **kwargs):
        if work_kept:
            (out / "embeddings.safetensors.partial").mkdir()
            (out / "embeddings.safetensors.partial" / "chunk-00000000.safetensors").write_bytes(b"")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(devices, "load_and_embed", out_of_memory)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=1)
    assert error.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    if work_kept:
        assert error.endswith("embeddings.safetensors.partial: rerun with a smaller --batch-size to continue.")
    else:  # auto is already bfloat16 on CUDA; float32 was asked for here
        assert error.endswith(": try a smaller --batch-size or another GPU.")
        error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--dtype", "float32"), code=1)
        assert error.endswith(": try a smaller --batch-size, --dtype bfloat16, or another GPU.")


def test_cpu_out_of_memory_outside_the_forward_is_one_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siglip_cli.devices as devices

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr(devices, "load_and_embed", out_of_memory)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=1)
    assert error.startswith("error: this machine ran out of memory ([enforce fail at alloc_cpu.cpp:127]")
    assert error.endswith("(Cannot allocate memory)): try a smaller --batch-size or another machine.")


def test_a_gpu_librarys_allocation_failure_outside_the_forward_is_the_gpus_memory(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cuBLAS's workspace, as torch raises it: a "CUDA error", so it was told as a fault of the GPU ("rerun").
    import siglip_cli.devices as devices

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(devices, "load_and_embed", out_of_memory)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=1)
    assert error == ("error: the GPU ran out of memory (CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                     "`cublasCreate(handle)`): try a smaller --batch-size or another GPU.")  # fmt: skip


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (MemoryError("Unable to allocate 24.0 GiB for an array with shape (4096, 1024, 1536) and data type float32"),
         "this machine ran out of memory (Unable to allocate 24.0 GiB for an array"),
        (MemoryError(), "this machine ran out of memory (MemoryError)"),
    ],
    ids=["numpy", "python"],
)
def test_a_memory_error_outside_the_forward_is_one_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, raised: MemoryError, said: str
) -> None:
    # numpy's allocations (a batch's conversion to --output-dtype, a chunk's concatenation) raise MemoryError, not
    # torch's RuntimeError: it ended the run in a traceback.
    import siglip_cli.devices as devices

    def out_of_memory(*args, **kwargs):
        raise raised

    monkeypatch.setattr(devices, "load_and_embed", out_of_memory)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=1)
    assert error.startswith(f"error: {said}")
    assert error.endswith(": try a smaller --batch-size or another machine.")


@pytest.mark.parametrize("decode", ["auto", "cpu"])
def test_a_gpu_fault_is_one_sentence_that_says_how_to_go_on(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch, decode: str
) -> None:
    # An illegal address (a driver, a JPEG the GPU decoder chokes on) ended the run in a traceback; the work is kept.
    import siglip_cli.devices as devices

    def fault(*args, **kwargs):
        (out / "embeddings.safetensors.partial").mkdir()
        (out / "embeddings.safetensors.partial" / "chunk-00000000.safetensors").write_bytes(b"")
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nmore details")

    monkeypatch.setattr(devices, "load_and_embed", fault)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--decode", decode), code=1)
    assert error.startswith("error: the GPU failed (CUDA error: an illegal memory access was encountered); finished ")
    # Not "or with --decode cpu": the work area records the decoder, and that rerun was refused.
    again = ", or start afresh with --decode cpu --overwrite if it fails again at the same place" if decode == "auto" else ""
    assert error.endswith(f"embeddings.safetensors.partial: rerun to continue{again}.")


def test_a_device_fault_the_jpeg_decoder_reports_in_its_own_words_is_the_same_sentence(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision's "Failed to synchronize CUDA stream: 700" (an illegal address) says neither "CUDA error" nor is an
    # AcceleratorError: the run ended in a traceback, not the sentence that says the work is kept.
    import torchvision.io

    def fault(*args, **kwargs):
        raise RuntimeError("Error while decoding JPEG images: decode_images, Failed to synchronize CUDA stream: 700")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fault)
    error = the_error(embed(photos, "-o", out / "embeddings.safetensors", "--decode", "gpu"), code=1)
    assert error == "error: the GPU failed (Error while decoding JPEG images: decode_images, Failed to synchronize " \
                    "CUDA stream: 700): rerun, or rerun with --decode cpu if it fails again at the same place."  # nothing kept


def test_other_runtime_errors_are_not_taken_for_the_gpus(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siglip_cli.devices as devices

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(devices, "load_and_embed", bug)
    result = embed(photos, "-o", out / "embeddings.safetensors")
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"  # the traceback a bug gets


def test_ctrl_c_between_a_commands_sentences_is_one_too(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Typer ends a command that lets KeyboardInterrupt out with status 130 and nothing said: a Ctrl-C while
    # `siglip embed` imported its modules, before its own handling began.
    import siglip_cli.cli as cli_module

    def stopped() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "keep_freed_memory", stopped)
    assert the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=130) == "error: interrupted."


def test_ctrl_c_before_anything_was_embedded_claims_no_kept_work(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ctrl-C while the model downloads or loads said "finished work is kept in ...partial", which did not exist.
    import siglip_cli.devices as devices

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(devices, "load", stopped)
    assert the_error(embed(photos, "-o", out / "embeddings.safetensors"), code=130) == "error: interrupted."
    assert not (out / "embeddings.safetensors.partial").exists()


@pytest.mark.parametrize(("input_name", "output_name"), [("img.npy", "img.npy"), ("img.jsonl", "img.safetensors")])
def test_an_input_that_is_one_of_the_output_files_is_refused(
    embed, photos: Path, input_name: str, output_name: str
) -> None:
    # A file named explicitly is taken whatever its name: with --overwrite the photo was replaced by its embedding
    # (img.npy) or by the manifest (img.jsonl, the manifest of img.safetensors).
    photo = photos / input_name
    photo.write_bytes((photos / "a.jpg").read_bytes())
    error = the_error(embed(photo, "-o", photos / output_name, "--overwrite"))
    assert f"{photo} is one of the inputs, and -o {photos / output_name} writes a file of its own there" in error
    assert photo.read_bytes() == (photos / "a.jpg").read_bytes()


@pytest.mark.parametrize("given", ["the link", "its folder"])
def test_an_input_that_is_a_link_to_the_output_is_refused(embed, photos: Path, given: str) -> None:
    (photos / "img.npy").write_bytes((photos / "a.jpg").read_bytes())
    (photos / "photo.jpg").symlink_to("img.npy")  # another name for the file -o would replace
    inputs = photos / "photo.jpg" if given == "the link" else photos
    error = the_error(embed(inputs, "-o", photos / "img.npy", "--overwrite"))
    assert "photo.jpg is one of the inputs, and -o" in error
    assert (photos / "img.npy").read_bytes() == (photos / "a.jpg").read_bytes()


def test_a_batch_larger_than_the_folder_asks_the_workers_for_no_more_than_there_is(
    photos: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `-b 1000000000` on ten files: the loader asked for half a billion prefetched parcels, for minutes.
    import siglip_cli.decoding as decoding

    asked = []

    def recording_loader(*args, **kwargs):
        asked.append(kwargs["prefetch_factor"])
        return decoding_loader(*args, **kwargs)

    decoding_loader = decoding.DataLoader
    monkeypatch.setattr(decoding, "DataLoader", recording_loader)
    result = embed_paths(load(str(tiny_siglip), device="cpu"), [photos], batch_size=10**9, workers=1)
    assert len(result.embeddings) == 3 and asked == [2]  # one parcel of three files: the least the loader takes


def test_more_workers_than_cpus_is_taken_without_a_warning(photos: Path, tiny_siglip: Path) -> None:
    # torch's "This DataLoader will create 3 worker processes in total..." reached stderr, even with -q.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed_paths(load(str(tiny_siglip), device="cpu"), [photos], workers=(os.cpu_count() or 1) + 1)
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]


# ------------------------------------------------------------------------------ the device JPEG decoder
# `--decode gpu` decodes JPEGs in batches on the model's device (nvJPEG on CUDA); on a CPU device the same code
# runs libjpeg-turbo through torchvision, which is how it is tested here.


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """JPEGs (one stored sideways with an EXIF tag, one broken), a PNG and a CMYK JPEG: the device decoder takes
    the plain JPEGs and leaves the rest to the CPU path."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for seed in range(4):
        make_photo((96, 64), seed=seed).save(folder / f"photo{seed}.jpg", quality=95)
    save_sideways_jpeg(folder / "portrait.jpg", make_photo((64, 96), seed=7))
    make_photo((50, 40), seed=8).save(folder / "drawing.png")
    make_photo((60, 60), seed=9).convert("CMYK").save(folder / "print.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(with_bogus_huffman_table((folder / "photo0.jpg").read_bytes()))  # header whole
    return folder


def test_device_decoder_agrees_with_the_exact_cpu_path(
    embed, mixed_folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import gpu_decode

    ok(embed(mixed_folder, "-o", out / "cpu.safetensors", "--decode", "cpu"))
    taken, decode = [], gpu_decode._decode
    monkeypatch.setattr(gpu_decode, "_decode", lambda headers, device: taken.extend(headers) or decode(headers, device))
    # Batches of 2: several of them decoded at once, each in a thread of the device decoder.
    ok(embed(mixed_folder, "-o", out / "dev.safetensors", "--decode", "gpu", "--device", "cpu", "-b", "2"))
    assert len(taken) == 6  # photo0-3, portrait and broken.jpg went to the device decoder; print.jpg (CMYK) did not
    cpu, cpu_meta = read_safetensors(out / "cpu.safetensors")
    dev, dev_meta = read_safetensors(out / "dev.safetensors")
    assert read_jsonl(out / "cpu.jsonl") == read_jsonl(out / "dev.jsonl")  # same rows, same sizes (EXIF included)
    # 1 - cosine is 6e-8 here, where two different photos of this folder are 2e-3 apart on this tower.
    assert np.einsum("nd,nd->n", cpu["embeddings"], dev["embeddings"]).min() >= 0.99999
    assert (cpu_meta["decoder"], dev_meta["decoder"]) == ("cpu", "gpu")


def test_device_decoder_reports_a_broken_jpeg_like_the_cpu_path(embed, mixed_folder: Path, out: Path) -> None:
    ok(embed(mixed_folder, "-o", out / "cpu.safetensors", "--decode", "cpu"))
    ok(embed(mixed_folder, "-o", out / "dev.safetensors", "--decode", "gpu", "--device", "cpu"))
    assert [row["path"] for row in read_jsonl(out / "dev.errors.jsonl")] == [str(mixed_folder / "broken.jpg")]
    assert read_jsonl(out / "cpu.errors.jsonl") == read_jsonl(out / "dev.errors.jsonl")


@pytest.mark.parametrize(("device", "cuda_present", "expected"), [
    ("cpu", True, 32), ("auto", False, 32), ("auto", True, 128), ("cuda", True, 128), ("cuda:1", True, 128),
])  # fmt: skip
def test_default_batch_size_follows_the_device(
    device: str, cuda_present: bool, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli.runtime import default_batch_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda_present else 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert default_batch_size(device) == expected


@pytest.mark.parametrize("device", ["cuda", "auto", torch.device("cuda")])
def test_cuda_without_an_index_is_the_current_gpu(device, monkeypatch: pytest.MonkeyPatch) -> None:
    # Left bare, "cuda" meant GPU 0 in the decoding threads (each thread's current GPU is the first) while the model
    # ran on the current one, after a caller's torch.cuda.set_device(1).
    from siglip_cli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device(device) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("device", "options", "said"),
    [
        ("cpu,", [], "--device cpu, has an empty entry: give devices such as cuda:0,cuda:1."),  # was run as `cpu`
        ("cpu,cpu", ["--update"], "several devices split the work themselves: drop --update, or give one --device."),
        ("cpu,cpu", ["--shard", "0/2"],
         "several devices split the work themselves: drop --shard, or give one --device."),
        ("cpu,cuda:all", [], "--device cpu,cuda:all: cuda:all is every GPU already, and is given on its own."),
    ],
)
def test_device_lists_that_cannot_run_are_refused_in_one_sentence(
    embed, photos: Path, out: Path, device: str, options: list[str], said: str
) -> None:
    result = embed(photos, "-o", out / "embeddings.safetensors", "--device", device, *options)
    assert result.exit_code == 2 and result.stderr.endswith(f"error: {said}\n") and "Traceback" not in result.stderr


@pytest.mark.parametrize("device", ["cpu", "cpu,cpu"])
def test_a_checkpoint_without_image_settings_is_embedded_with_a_note(
    embed, tiny_siglip: Path, photos: Path, out: Path, tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once, on several devices too (where it was not said at all), as is the hint about bfloat16 after a long run.
    import shutil

    from siglip_cli import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime, "BF16_HINT_AFTER_S", 0.0)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_siglip, bare)
    (bare / "preprocessor_config.json").unlink()
    result = ok(embed(photos, "-o", out / "embeddings.safetensors", "--device", device, model=bare))
    said = f"note: {bare} has no preprocessor_config.json: assuming SigLIP's preprocessing (resize to 32×32, bicubic"
    assert result.stderr.count(said) == 1
    assert result.stderr.count("note: this CPU has native bfloat16: with --dtype bfloat16") == 1
    assert "preprocessor_config" not in ok(embed(photos, "-o", out / "again.safetensors")).stderr


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_is_float32_on_every_cpu_and_the_note_says_what_bf16_would_do(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("auto", cpu) == torch.float32  # the exact path, even where bf16 is fast
    assert (runtime.dtype_note(cpu, torch.float32) is not None) == native  # "--dtype bfloat16 runs two to three times as fast"
    assert (runtime.dtype_note(cpu, torch.bfloat16) is not None) == (not native)  # "emulated, several times slower"
    # After a run, the hint comes only where bfloat16 would save time worth a line; the warning always.
    long, short = runtime.BF16_HINT_AFTER_S, runtime.BF16_HINT_AFTER_S / 10
    assert (runtime.dtype_note(cpu, torch.float32, run_seconds=long) is not None) == native
    assert runtime.dtype_note(cpu, torch.float32, run_seconds=short) is None
    assert (runtime.dtype_note(cpu, torch.bfloat16, run_seconds=short) is not None) == (not native)


def test_device_decoder_out_of_memory_falls_back_to_the_cpu_path(
    embed, mixed_folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import gpu_decode

    tried = []

    def out_of_memory(headers, device):
        tried.extend(headers)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    ok(embed(mixed_folder, "-o", out / "cpu.safetensors", "--decode", "cpu"))
    monkeypatch.setattr(gpu_decode, "_decode", out_of_memory)
    ok(embed(mixed_folder, "-o", out / "dev.safetensors", "--decode", "gpu", "--device", "cpu"))
    assert tried  # the device decoder was asked, and ran out of memory
    assert read_jsonl(out / "cpu.jsonl") == read_jsonl(out / "dev.jsonl")  # every file, decoded the exact way
    assert np.array_equal(read_safetensors(out / "cpu.safetensors")[0]["embeddings"], read_safetensors(out / "dev.safetensors")[0]["embeddings"])
    assert read_jsonl(out / "cpu.errors.jsonl") == read_jsonl(out / "dev.errors.jsonl")


def test_auto_decoder_is_the_exact_cpu_path_on_a_cpu(embed, photos: Path, out: Path) -> None:
    ok(embed(photos, "-o", out / "e.safetensors", "--device", "cpu"))
    assert read_safetensors(out / "e.safetensors")[1]["decoder"] == "cpu"


def test_a_huge_file_that_is_no_image_is_refused_without_being_read(tmp_path: Path) -> None:
    # A video named .jpg, or a disk image: read whole before the decoder looks, it would take its size in memory in
    # every worker that meets one.
    import tracemalloc

    from siglip_cli.config import PreprocessConfig
    from siglip_cli.decoding import decode_file
    from siglip_cli.preprocess import BadImage, DecodeOptions
    from siglip_cli.reading import HEADER_FIRST_BYTES

    huge = tmp_path / "clip.jpg"
    with open(huge, "wb") as f:
        f.truncate(HEADER_FIRST_BYTES * 4)  # sparse: no disk space used
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match="cannot identify image file"):
            decode_file(str(huge), PreprocessConfig(32, 32), DecodeOptions())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HEADER_FIRST_BYTES / 4


def test_a_photo_with_a_huge_tail_costs_the_photos_memory_not_the_files(tmp_path: Path) -> None:
    # A JPEG followed by gigabytes (a damaged copy, a video glued on) was read whole into the worker's memory.
    import tracemalloc

    from siglip_cli.config import PreprocessConfig
    from siglip_cli.decoding import decode_file
    from siglip_cli.preprocess import DecodeOptions, load_pixels
    from siglip_cli.reading import HEADER_FIRST_BYTES, digest_of_file

    photo = tmp_path / "photo.jpg"
    make_photo((80, 60)).save(photo)
    expected = load_pixels(photo, PreprocessConfig(32, 32), DecodeOptions())[0]
    with open(photo, "r+b") as f:
        f.truncate(HEADER_FIRST_BYTES * 2)  # zeros after the JPEG's end, sparse: no disk space used
    tracemalloc.start()
    try:
        pixels, facts, _ = decode_file(str(photo), PreprocessConfig(32, 32), DecodeOptions())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HEADER_FIRST_BYTES / 4
    assert np.array_equal(pixels.numpy(), expected) and facts["blake2b"] == digest_of_file(str(photo))


def test_a_large_photo_passes_the_header_check_and_embeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Closing the image from the header check closed the file it was given: every file over the limit failed.
    from siglip_cli import decoding, reading
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions, load_pixels

    make_photo((80, 60), seed=0).save(tmp_path / "motion.jpg")  # over the (lowered) limit, as a motion photo is
    monkeypatch.setattr(reading, "HEADER_FIRST_BYTES", 100)
    cfg = PreprocessConfig(32, 32)
    pixels, facts, _ = decoding.decode_file(str(tmp_path / "motion.jpg"), cfg, DecodeOptions())
    assert np.array_equal(pixels.numpy(), load_pixels(tmp_path / "motion.jpg", cfg, DecodeOptions())[0]) and facts["width"] == 80


@pytest.mark.parametrize(
    "cpus, available_gb, expected",
    [(32, None, 16), (32, 64.0, 16), (32, 6.0, 4), (32, 0.5, 1), (2, 64.0, 1), (1, None, 1)],
)
def test_default_workers_leave_a_cpu_to_the_model_and_fit_in_memory(
    monkeypatch: pytest.MonkeyPatch, cpus: int, available_gb: float | None, expected: int
) -> None:
    from siglip_cli import decoding

    monkeypatch.setattr(decoding, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(decoding, "available_memory", lambda: None if available_gb is None else int(available_gb * 1e9))
    assert decoding.default_workers() == expected


def test_worker_parcels_survive_pinning(mixed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the DataLoader pins every parcel a worker hands over; pinning needs a GPU, so it is stood in for."""
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.decoding import ImageFiles, _collate
    from siglip_cli.preprocess import DecodeOptions

    paths = sorted(str(p) for p in mixed_folder.iterdir())
    for jpeg_to_device in (False, True):
        files = ImageFiles(paths, PreprocessConfig(32, 32), DecodeOptions(), jpeg_to_device=jpeg_to_device)
        parcel = _collate([files[i] for i in range(len(paths))])
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: self.clone())
        pinned = parcel.pin_memory()
        assert (pinned.rows, pinned.errors, len(pinned)) == (parcel.rows, parcel.errors, len(paths))
        assert torch.equal(pinned.pixels, parcel.pixels) and pinned.pixels is not parcel.pixels


@pytest.mark.parametrize("batch_size", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("jpeg_to_device", [False, True], ids=["cpu-decoder", "device-decoder"])
def test_batches_are_fixed_slices_put_together_from_worker_parcels(
    mixed_folder: Path, batch_size: int, jpeg_to_device: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions, load_pixels

    monkeypatch.setattr(D, "PARCEL_SIZE", 3)  # parcels smaller than most batches, and not dividing them
    paths = sorted(str(p) for p in mixed_folder.iterdir()) * 4  # 32 files, the bad ones among them
    cfg = PreprocessConfig(32, 32)
    batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=batch_size, workers=2, pin=False,
                                     jpeg_to_device=jpeg_to_device))  # fmt: skip
    assert [len(b) for b in batches] == [min(batch_size, len(paths) - s) for s in range(0, len(paths), batch_size)]
    spans = [(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    parcels = list(D._ParcelSampler(spans, 3))  # what the workers are handed: no parcel crosses a batch's edge
    assert len(D._ParcelSampler(spans, 3)) == len(parcels) and [i for c in parcels for i in c] == list(range(len(paths)))
    assert all(len(c) <= 3 and any(s <= c[0] and c[-1] < e for s, e in spans) for c in parcels)
    start = 0
    for batch in batches:
        names = paths[start : start + len(batch)]
        start += len(batch)
        assert sorted(r["path"] for r in batch.rows + batch.errors) == sorted(names)
        pixels, rows, errors = D.batch_pixels(batch, cfg, torch.device("cpu"), DecodeOptions())
        # The broken JPEG has a readable header: the device decoder is the one to find it broken.
        assert [r["path"] for r in rows] == [n for n in names if not n.endswith("broken.jpg")]  # in order
        assert [r["path"] for r in batch.errors + errors] == [n for n in names if n.endswith("broken.jpg")]
        assert (pixels is None) == (not rows)  # a batch of only the broken file has nothing to embed
        for row, got in zip(rows, pixels if rows else []):
            expected = torch.from_numpy(load_pixels(row["path"], cfg, DecodeOptions())[0])
            # The device decoder (libjpeg-turbo here) is close to PIL, not exact: within 3 levels (see gpu_decode).
            assert (got - expected).abs().max() <= (3 * 2 / 255 if jpeg_to_device else 0.0)


class _PathsOfThisProcess(list):
    """A run's path list that only the process which made it may read: a forked worker reading it would come to hold
    a copy of the memory of every path it read."""

    def __init__(self, paths: list[str]):
        super().__init__(paths)
        self.pid = os.getpid()

    def __getitem__(self, index):
        assert os.getpid() == self.pid, "a decoding worker read the run's path list"
        return super().__getitem__(index)


def test_the_workers_get_their_paths_with_their_parcels_and_rows_keep_the_runs_own(mixed_folder: Path) -> None:
    # Memory of a run over millions of photos: each worker ended with a copy of nearly every path (reading one from
    # the list it inherited writes to its page), and every row held a second copy of its path, the worker's.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    paths = _PathsOfThisProcess(str(p) for p in sorted(mixed_folder.iterdir()) * 3)
    batches = list(D.decoded_batches(paths, PreprocessConfig(32, 32), DecodeOptions(), batch_size=5, workers=2,
                                     pin=False))  # fmt: skip
    rows = [row for batch in batches for row in batch.rows + batch.errors]
    assert sorted(row["path"] for row in rows) == sorted(paths)
    ours = {id(path) for path in paths}
    assert all(id(row["path"]) in ours for row in rows)


def die_decoding(names: dict[str, Callable[[], None]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a file whose name is in `names` kills its process in the given way, as a crash in a native decoder
    or the out-of-memory killer would (the worker processes are forked with the stand-in in place)."""
    from siglip_cli import decoding as D

    decode = D.decode_file

    def dying(path: str, *args, **kwargs):
        if Path(path).name in names:
            faulthandler.disable()  # pytest's dump of every thread's stack would fill the log
            names[Path(path).name]()
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(D, "decode_file", dying)


DEATHS = {
    "photo1.jpg": lambda: os.kill(os.getpid(), signal.SIGSEGV),
    "drawing.png": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "photo3.jpg": lambda: os._exit(3),
    "print.jpg": lambda: os.kill(os.getpid(), signal.SIGRTMIN + 5),  # no name in `signal.Signals`
}


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_a_worker_that_dies_costs_only_its_file(
    mixed_folder: Path, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker killed by a segfault or the OOM killer ended the run with the DataLoader's traceback, and every
    # rerun with it at the same file.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    monkeypatch.setattr(D, "PARCEL_SIZE", 2)
    paths = sorted(str(p) for p in mixed_folder.iterdir()) * 3  # each death met three times, in different batches
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=batch_size, workers=2, pin=False))
    die_decoding(DEATHS, monkeypatch)
    batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=batch_size, workers=2, pin=False))
    assert [len(b) for b in batches] == [len(b) for b in plain]  # the same fixed slices
    for got, expected in zip(batches, plain):
        keep = [i for i, row in enumerate(expected.rows) if Path(row["path"]).name not in DEATHS]
        assert [r["path"] for r in got.rows] == [expected.rows[i]["path"] for i in keep]
        got_pixels = D.batch_pixels(got, cfg, torch.device("cpu"), DecodeOptions())[0]
        expected_pixels = D.batch_pixels(expected, cfg, torch.device("cpu"), DecodeOptions())[0]
        assert torch.equal(got_pixels, expected_pixels[keep]) if keep else got_pixels is None
    errors = {Path(e["path"]).name: e["error"] for b in batches for e in b.errors}
    assert errors["photo1.jpg"] == "its decoding process crashed (SIGSEGV)"
    assert errors["drawing.png"] == "its decoding process was killed (SIGKILL: out of memory?)"
    assert errors["photo3.jpg"] == "its decoding process exited without an answer (exit code 3)"
    assert errors["print.jpg"] == f"its decoding process crashed (signal {signal.SIGRTMIN + 5})"
    assert sum(len(b.errors) for b in batches) == 3 * (len(DEATHS) + 1)  # and the broken JPEG, as before


def test_the_workers_decode_whatever_the_default_start_method(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.14 made `forkserver` the default start method on Linux. The loader's workers were then children of
    # the server, which each took for a parent that had died: every file was decoded again in a process of its own,
    # and each of those exited without an answer.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    paths = sorted(str(p) for p in mixed_folder.iterdir()) * 3
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=5, workers=0, pin=False))

    def each_alone(*args, **kwargs):
        raise AssertionError("the workers died: files were decoded one process each")

    monkeypatch.setattr(D, "_each_alone", each_alone)  # whose answers would be the same, only slower
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=5, workers=2, pin=False))
    finally:
        multiprocessing.set_start_method(default, force=True)
    assert [(b.rows, b.errors) for b in batches] == [(b.rows, b.errors) for b in plain]
    cpu = torch.device("cpu")
    for got, expected in zip(batches, plain):
        pixels = [D.batch_pixels(batch, cfg, cpu, DecodeOptions())[0] for batch in (got, expected)]
        assert torch.equal(*pixels)


def test_a_parcel_its_worker_cannot_send_costs_only_its_file(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    # A worker's queue thread that could not send a parcel (no thread left for the socket that passes its shared
    # memory over, under `ulimit -u`) printed why and dropped it, and the run waited for it forever. Here the
    # parcel of one file cannot be pickled.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    decode = D.decode_file

    def unsendable(path: str, *args, **kwargs):
        pixels, facts, jpeg = decode(path, *args, **kwargs)
        return pixels, {**facts, **({"lambda": lambda: None} if Path(path).name == "photo1.jpg" else {})}, jpeg

    monkeypatch.setattr(D, "PARCEL_SIZE", 2)
    monkeypatch.setattr(D, "decode_file", unsendable)
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    finished: list[list] = []
    run = threading.Thread(target=lambda: finished.append(list(D.decoded_batches(
        paths, PreprocessConfig(32, 32), DecodeOptions(), batch_size=64, workers=2, pin=False
    ))), daemon=True)  # fmt: skip
    run.start()
    run.join(timeout=90)
    assert finished, "the run waited for a parcel that never came"
    [batch] = finished[0]
    errors = {Path(e["path"]).name: e["error"] for e in batch.errors}
    assert errors.keys() == {"broken.jpg", "photo1.jpg"}
    assert errors["photo1.jpg"].startswith("its decoding process exited without an answer")
    assert len(batch.rows) == len(paths) - 2
    said = capfd.readouterr().err  # the workers' own stderr; photo1.jpg's lone process fails (its own traceback)
    assert "note: a decoding worker cannot hand its files over (" in said and "in _feed" not in said, said


def test_a_parcel_cut_off_in_its_handover_is_decoded_again(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker killed (stuck, or by the kernel) while it handed a parcel's shared memory over: the main process got
    # ConnectionResetError from the socket it was reading the file descriptors from, and the run ended in a traceback.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    cut: list[int] = []

    class CutOnce(D.DataLoader):
        def __iter__(self):
            arriving = super().__iter__()

            def parcels():
                for i, parcel in enumerate(arriving):
                    if i == 1 and not cut:
                        cut.append(i)
                        raise ConnectionResetError(104, "Connection reset by peer")
                    yield parcel

            return parcels()

    monkeypatch.setattr(D, "PARCEL_SIZE", 2)
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=64, workers=2, pin=False))
    monkeypatch.setattr(D, "DataLoader", CutOnce)
    [got], [expected] = D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=64, workers=2, pin=False), plain
    assert cut and [r["path"] for r in got.rows] == [r["path"] for r in expected.rows]
    assert got.errors == expected.errors
    pixels = [D.batch_pixels(b, cfg, torch.device("cpu"), DecodeOptions())[0] for b in (got, expected)]
    assert torch.equal(*pixels)


def test_a_file_whose_decoder_is_stuck_costs_only_itself(mixed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A decoder stuck in a loop on one file hung the run, and every rerun, at that file.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    monkeypatch.setattr(D, "PARCEL_SIZE", 2)
    monkeypatch.setattr(D, "STUCK_AFTER_S", 3)  # a worker's own time on one file: fork and start-up do not count
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=64, workers=2, pin=False))
    die_decoding({"photo1.jpg": lambda: time.sleep(3600)}, monkeypatch)
    notes: list[str] = []
    batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=64, workers=2, pin=False, note=notes.append))
    [got], [expected] = batches, plain
    keep = [i for i, row in enumerate(expected.rows) if Path(row["path"]).name != "photo1.jpg"]
    assert [r["path"] for r in got.rows] == [expected.rows[i]["path"] for i in keep]
    got_pixels = D.batch_pixels(got, cfg, torch.device("cpu"), DecodeOptions())[0]
    assert torch.equal(got_pixels, D.batch_pixels(expected, cfg, torch.device("cpu"), DecodeOptions())[0][keep])
    errors = {Path(e["path"]).name: e["error"] for e in got.errors}
    assert errors == {
        "broken.jpg": next(e["error"] for e in expected.errors),
        "photo1.jpg": "its decoding took longer than 3 s and was stopped (a decoder stuck in a loop?)",
    }
    stuck = mixed_folder / "photo1.jpg"
    assert notes == [f"a decoder was stuck on {stuck} for 3 s: it is stopped, and the file listed in the errors file."]
    assert multiprocessing.active_children() == []  # the stuck worker, and every other, gone


def test_a_run_stopped_for_longer_than_a_stuck_decoder_takes_is_not_taken_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-Z, then `fg` after 5 minutes: the monotonic clock ran on while the run and its workers were stopped, and
    # the watch killed a worker on a good photo as stuck, listing the photo in the errors file.
    from siglip_cli import decoding as D

    calls = []

    def clock() -> float:  # the worker starts its file, the watch starts, and the run is stopped for 400 s
        calls.append(None)
        return time.monotonic() + (400.0 if len(calls) > 2 else 0.0)

    monkeypatch.setattr(D, "time", types.SimpleNamespace(monotonic=clock))
    watch, stuck, notes = D._Watch(1), set(), []
    decoder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch.start(0, 0)
        watch.pids[0] = decoder.pid  # the worker on file 0
        with D._stuck_workers_stopped(watch, stuck, notes.append, ["photo.jpg"]):
            time.sleep(2.5)  # two rounds of the watch
        assert (stuck, notes, decoder.poll()) == (set(), [], None)
    finally:
        decoder.kill()
        decoder.wait()


def test_a_file_stuck_when_decoded_in_a_process_of_its_own_is_stopped_too(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a worker died, the files it may have held are decoded one process each: a stuck one hung that too.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    monkeypatch.setattr(D, "STUCK_AFTER_S", 2)
    die_decoding({"photo1.jpg": lambda: time.sleep(3600)}, monkeypatch)
    paths = [str(mixed_folder / name) for name in ("photo0.jpg", "photo1.jpg", "drawing.png")]
    files = D.ImageFiles(paths, PreprocessConfig(32, 32), DecodeOptions(), jpeg_to_device=False)
    items = D._each_alone(files, range(3), 2, stuck=set())
    assert [item.info.get("error") for item in items] == [
        None, "its decoding took longer than 2 s and was stopped (a decoder stuck in a loop?)", None
    ]
    assert multiprocessing.active_children() == []


def test_a_file_decoded_in_a_process_of_its_own_while_the_run_was_stopped_is_not_taken_for_stuck(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above (a run stopped by Ctrl-Z for longer than a stuck decoder takes), for a file decoded alone.
    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    calls = []

    def clock() -> float:  # the decoder starts, and the run is stopped for 400 s as its first wait ends
        calls.append(None)
        return time.monotonic() + (400.0 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(D, "time", types.SimpleNamespace(monotonic=clock, sleep=time.sleep))
    die_decoding({"photo1.jpg": lambda: time.sleep(1.5)}, monkeypatch)  # then decoded
    photo = str(mixed_folder / "photo1.jpg")
    files = D.ImageFiles([photo], PreprocessConfig(32, 32), DecodeOptions(), jpeg_to_device=False)
    item = D._decode_alone(files, 0, threading.Event())
    assert "error" not in item.info and item.pixels is not None


def test_a_run_goes_on_past_a_file_that_kills_its_decoder(
    embed, photos: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    die_decoding({"a.jpg": lambda: os.kill(os.getpid(), signal.SIGSEGV)}, monkeypatch)
    result = ok(embed(photos, "-o", out / "e.safetensors", workers=1))
    assert "1 failed" in result.stderr and "Traceback" not in result.output
    errors = [json.loads(line) for line in (out / "e.errors.jsonl").read_text().splitlines()]
    assert [(Path(e["path"]).name, e["error"]) for e in errors] == [("a.jpg", "its decoding process crashed (SIGSEGV)")]
    assert [Path(r["path"]).name for r in map(json.loads, (out / "e.jsonl").read_text().splitlines())] == ["b.png", "c.webp"]


def _shared_memory_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_room(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)


def _out_of_open_files_at_the_third_parcel(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data import dataloader

    receive, received = dataloader._MultiProcessingDataLoaderIter._next_data, []

    def out_of_files(self):
        received.append(None)
        if len(received) == 3:
            raise RuntimeError("Too many open files. Communication with the workers is no longer possible.")
        return receive(self)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_next_data", out_of_files)


@pytest.mark.parametrize(
    "failure, note",
    [
        (_shared_memory_full, "the shared memory (/dev/shm) is too small for the parcels of 2 decoding workers "
         "(unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)): decoding in this "
         "process from here on, which is slower (in a container, give it more: docker run --shm-size=2g)."),
        (_out_of_open_files_at_the_third_parcel, "too many open files for 2 decoding workers (`ulimit -n` is {limit}): "
         "decoding in this process from here on, which is slower ({raising})."),
    ],  # fmt: skip
    ids=["shared-memory-full", "out-of-open-files"],
)
def test_workers_that_fail_mid_run_leave_the_rest_to_this_process(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch, failure: Callable[[pytest.MonkeyPatch], None], note: str
) -> None:
    # In a container with 64 MB of /dev/shm, a parcel that could not be shared was lost in the worker's sending
    # thread, and the run waited for it forever. With a low `ulimit -n` (each parcel in transit is a few file
    # descriptors) the loader gave up, and the run ended in its traceback.
    from siglip_cli import decoding as D, limits
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    monkeypatch.setattr(D, "PARCEL_SIZE", 2)
    paths = sorted(str(p) for p in mixed_folder.iterdir()) * 3
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=5, workers=0, pin=False))
    failure(monkeypatch)
    notes: list[str] = []
    batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=5, workers=2, pin=False, note=notes.append))
    assert notes == [note.format(limit=limits.open_files_limit(), raising=limits.raising_open_files())]  # one line, no traceback
    assert [[r["path"] for r in b.rows] for b in batches] == [[r["path"] for r in b.rows] for b in plain]
    for got, expected in zip(batches, plain):
        assert torch.equal(D.batch_pixels(got, cfg, torch.device("cpu"), DecodeOptions())[0],
                           D.batch_pixels(expected, cfg, torch.device("cpu"), DecodeOptions())[0])  # fmt: skip


@pytest.mark.parametrize("failing", ["the-loader's-queues", "the-watch-on-stuck-workers"])
def test_workers_that_cannot_start_leave_the_work_to_this_process(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # A full or read-only /dev/shm: the loader's queues could not make their semaphores, and the run ended in a
    # traceback. The shared memory where workers say which file they are on comes from there too.
    import errno

    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    paths = sorted(str(p) for p in mixed_folder.iterdir())
    cfg = PreprocessConfig(32, 32)
    plain = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=3, workers=0, pin=False))
    start = D.DataLoader._get_iterator

    def no_semaphores(self):
        if self.num_workers:
            raise OSError(errno.ENOSPC, "No space left on device")
        return start(self)

    def no_shared_memory(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "the-loader's-queues":
        monkeypatch.setattr(D.DataLoader, "_get_iterator", no_semaphores)
    else:
        monkeypatch.setattr(D.WORKER_CONTEXT, "RawArray", no_shared_memory)
    notes: list[str] = []
    batches = list(D.decoded_batches(paths, cfg, DecodeOptions(), batch_size=3, workers=2, pin=False, note=notes.append))
    assert notes == ["cannot start 2 decoding workers (No space left on device; their queues need a writable "
                     "/dev/shm): decoding in this process, which is slower."]  # fmt: skip
    assert [[r["path"] for r in b.rows] for b in batches] == [[r["path"] for r in b.rows] for b in plain]


def test_a_low_open_files_limit_gets_the_workers_it_can_feed(mixed_folder: Path, out: Path, tiny_siglip: Path) -> None:
    # `ulimit -n 16`: the decoding workers' parcels ran out of descriptors, and the run ended in a traceback.
    embed = f"siglip embed {mixed_folder} -m {tiny_siglip} --workers 4 --batch-size 2"
    inherited = " ".join(f"{fd}</dev/null" for fd in range(20, 32))  # left open by a parent: the run's to count
    limits = {"24": "ulimit -n 24", "88": "ulimit -n 88", "88 less 12": f"ulimit -n 88 && exec {inherited}",
              "soft": "ulimit -Sn 24", "plain": "true"}  # fmt: skip
    runs = {name: run_shell(f"{limit} && {embed} -o '{out / name}.npy'") for name, limit in limits.items()}
    assert all(run.returncode == 0 and "Traceback" not in run.stderr for run in runs.values()), runs
    assert ("note: `ulimit -n` is 24, too few open files for 4 decoding workers: decoding in this process instead "
            "(it is also the hard limit: raising it takes root, or `nofile` in /etc/security/limits.conf)."
            in runs["24"].stderr)  # fmt: skip

    def workers_taken(run: subprocess.CompletedProcess) -> int:
        taken = re.search(r"too few open files for 4 decoding workers: taking (\d) instead", run.stderr)
        return int(taken[1]) if taken else 4

    assert 0 < workers_taken(runs["88 less 12"]) < workers_taken(runs["88"])
    assert "ulimit" not in runs["soft"].stderr  # a soft limit alone is raised, as any process may
    assert "ulimit" not in runs["plain"].stderr
    assert len({(out / f"{name}.npy").read_bytes() for name in limits}) == 1


def test_a_file_size_limit_is_named_as_the_cause(tmp_path: Path, out: Path, tiny_siglip: Path) -> None:
    # `ulimit -f` (a batch job's script) limits a parcel's shared memory too, as a file: the note blamed the size of
    # /dev/shm and advised `docker run --shm-size`. A write over the limit said "File too large", as a full disk.
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(40):  # enough for workers: the first few files are decoded before they start
        make_photo((64, 48), seed=seed).save(photos / f"{seed}.jpg")
    embed = f"siglip embed {photos} -m {tiny_siglip} --workers 2 --batch-size 4"
    runs = {name: run_shell(f"{limit} && {embed} -o '{out / name}.npy'")
            for name, limit in {"parcels": "ulimit -f 24", "output": "ulimit -f 1", "plain": "true"}.items()}  # fmt: skip
    assert ("note: the file size limit (`ulimit -f` allows 24 KB) is too small for the parcels of 2 decoding workers: "
            "decoding in this process from here on, which is slower." in runs["parcels"].stderr.splitlines())  # fmt: skip
    assert (out / "parcels.npy").read_bytes() == (out / "plain.npy").read_bytes()
    assert runs["output"].returncode == 2 and "Traceback" not in runs["output"].stderr
    assert "File too large: `ulimit -f` allows 1 KB; " in runs["output"].stderr.splitlines()[-1]


def test_a_file_too_large_for_its_file_system_is_not_blamed_on_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # FAT32 refuses a file of 4 GB (an so400m output of a million photos on a USB stick) whatever `ulimit -f` allows.
    from siglip_cli import errors

    monkeypatch.setattr(errors, "file_size_limit", lambda: 8_000_000 * 1024)
    too_large = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert errors.os_reason(too_large, written=4 * 2**30 - 1) == "File too large"
    assert errors.os_reason(too_large, written=8_000_000 * 1024) == "File too large: `ulimit -f` allows 8,000,000 KB"


@pytest.mark.parametrize("command", ["embed", "inspect", "bench"])
def test_a_memory_limit_too_low_for_torch_is_one_sentence(command: str, photos: Path, out: Path, tiny_siglip: Path) -> None:
    # Under `ulimit -v 1000000` (a shared server's login limits), torch's libraries cannot be mapped: a traceback
    # from inside torch's import.
    arguments = {"embed": f"{photos} -o {out / 'e.npy'}", "inspect": str(photos / "b.png"), "bench": ""}[command]
    run = run_shell(f"ulimit -v 1000000 && siglip {command} -m {tiny_siglip} {arguments}")
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.splitlines()  # "(libtorch_cpu.so: failed to map segment from shared object)"
    assert re.fullmatch(r"error: torch cannot be loaded \(.+\): `ulimit -v` allows 976 MB, and torch needs more\.", line)


def test_ctrl_c_while_the_workers_shut_down_reaches_the_run(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shut down from the iterator's __del__, the workers' KeyboardInterrupt was swallowed ("Exception ignored"), and
    # a Ctrl-C at the end of a run let it finish with exit 0.
    from torch.utils.data import dataloader

    from siglip_cli import decoding as D
    from siglip_cli.config import PreprocessConfig
    from siglip_cli.preprocess import DecodeOptions

    shutdown = dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    calls = []

    def interrupted(self) -> None:
        calls.append(None)
        shutdown(self)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", interrupted)
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    batches = D.decoded_batches(paths, PreprocessConfig(32, 32), DecodeOptions(), batch_size=4, workers=1, pin=False)
    with pytest.raises(KeyboardInterrupt):
        for _ in batches:
            pass
    del batches
    gc.collect()  # the loader's iterator goes while the stand-in is still in place


def test_look_ahead_keeps_order_and_raises_where_the_failure_was() -> None:
    from siglip_cli.concurrency import look_ahead

    for depth in (0, 1, 3):
        assert list(look_ahead(range(10), lambda i: i * i, depth=depth)) == [i * i for i in range(10)]

    def late_for_small(i: int) -> int:
        time.sleep(0.02 * (10 - i))  # with several threads the later items finish first
        return i

    assert list(look_ahead(range(10), late_for_small, depth=8, threads=4)) == list(range(10))

    def fail_at_five(i: int) -> int:
        if i == 5:
            raise ValueError("five")
        return i

    got = []
    with pytest.raises(ValueError, match="five"):
        for value in look_ahead(range(10), fail_at_five, depth=2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def test_look_ahead_stops_working_when_the_consumer_stops() -> None:
    from siglip_cli.concurrency import look_ahead

    started = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    results = look_ahead(range(100), work, depth=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert len(started) <= 3 + 2 + 1  # what was consumed, the look-ahead, and the one in flight at most


@pytest.mark.slow  # the first torch.compile on a machine takes ~40 s on 2 cores
def test_compiled_model_gives_the_same_embeddings(embed, photos: Path, out: Path) -> None:
    from torch._dynamo.utils import counters

    ok(embed(photos, "-o", out / "plain.safetensors"))
    graphs = counters["stats"]["unique_graphs"]
    ok(embed(photos, "-o", out / "compiled.safetensors", "--compile"))
    assert counters["stats"]["unique_graphs"] > graphs  # the tower ran compiled, not as it was
    plain, _ = read_safetensors(out / "plain.safetensors")
    compiled, _ = read_safetensors(out / "compiled.safetensors")
    np.testing.assert_allclose(compiled["embeddings"], plain["embeddings"], atol=1e-5)
