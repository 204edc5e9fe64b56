"""The `siglip` command line: parse, call one library function, render.

stdout carries data only (paths, `--json` documents, tables a user asked for); progress, warnings and errors go
to stderr. A user error is one sentence and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from . import __version__, interrupts
from .allocator import keep_freed_memory
from .config import CPU_BATCH_SIZE, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_PRESET
from .errors import UserError, first_line
from .limits import address_space_limit
from .text import counted, display_path, escape_controls
from .usage_errors import click_errors, parse_error_sentence

if TYPE_CHECKING:
    from .embed import Summary
    from .files import WalkReport
    from .outputs import OutputPaths


class _OneLineParseErrors:
    """A command line that click cannot parse told as every other error is, in one sentence and exit status 2,
    not in typer's block (`Usage: ...`, `Try ...`, `Error: Invalid value for '--dtype': Value error, ...`).
    `siglip` alone still prints the help."""

    def make_context(self, info_name, args, parent=None, **extra):
        given = list(args)  # click's parser consumes the list it is given
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click_errors.UsageError as e:
            if isinstance(e, getattr(click_errors, "NoArgsIsHelpError", ())):
                raise
            path = f"{parent.command_path} {info_name}" if parent is not None else info_name
            fail(parse_error_sentence(e, path, given))


class _Group(_OneLineParseErrors, typer.core.TyperGroup):
    """`siglip` itself: an unknown command or option is one sentence too."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click_errors.UsageError as e:  # no such command
            fail(parse_error_sentence(e, ctx.command_path))


class _Command(_OneLineParseErrors, typer.core.TyperCommand):
    """A command whose help names its arguments without typer's type tags (`PATH <list[str]>`): their help says
    what they take; whose command line, if it does not parse, is one sentence (`_OneLineParseErrors`); and whose
    Ctrl-C is one sentence wherever it lands (typer ends a command that lets KeyboardInterrupt out with status 130
    and nothing said: a Ctrl-C while a command imported its modules), and so are SIGTERM and SIGHUP: from the start,
    as a scheduler's stop during torch's import or a long walk of the inputs ended the run with 143 and no word."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = lambda ctx: None

    def invoke(self, ctx: typer.Context):
        with user_errors(), interrupts.stop_on_signals():
            return super().invoke(ctx)


app = typer.Typer(
    name="siglip",
    cls=_Group,
    help="SigLIP image embeddings: embed folders of images (and merge shards of a run), inspect the model stage by "
    "stage, benchmark it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# soft_wrap: an error sentence or a path is never broken across lines when stderr is a log file. markup off: text we
# print holds paths and model names, and `Wedding [edited]/` is a folder, not a style (styled words go in as Text).
stdout = Console(soft_wrap=True, markup=False, highlight=False)
stderr = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

EXIT_USER_ERROR = UserError.exit_code

# Options that more than one command takes, declared once (typer copies the declaration for each command).
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.", metavar="REV")]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels", min=0, help="Refuse images with more pixels than this, read from the header (0: no limit).",
        metavar="N",
    ),
]


def print_json(document: dict) -> None:
    """A `--json` document on stdout: plain JSON, in ASCII, whatever the terminal (FORCE_COLOR made rich colour it)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


class OutputDtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"


class Decoder(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class ComputeDtype(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    stderr.print(Text.assemble(("error:", "bold red"), " ", printable(message)))
    raise typer.Exit(code)


def note(message: str) -> None:
    stderr.print(Text.assemble(("note:", "yellow"), " ", printable(message)))


def _note_folders_made(out: OutputPaths, *, quiet: bool) -> None:
    """Say so, before any work, when writing `out` makes its folder: a typo in -o shows now, not after the run."""
    from .files import missing_folders

    if (made := missing_folders(out.embeddings)) and not quiet:
        note(f"the output's folder {display_path(made[-1])} does not exist: it will be made.")


def printable(message: str) -> str:
    """A sentence as one terminal line (`text.escape_controls`). Input paths come escaped already (`display_path`);
    `-o` names and folder names the user typed may not."""
    return escape_controls(message)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's `UserError` into its one line on stderr and its exit status (2; 1 for a `RunFailed`), a
    file or folder closed to this user that no sentence of ours was ready for into one line and 2, memory that ran
    out into one line and 1, and Ctrl-C into one line and 130. Every command runs in it (`_Command.invoke`)."""
    try:
        yield
    except UserError as e:
        fail(str(e), e.exit_code)
    except PermissionError as e:  # a file or folder closed to this user, met where no sentence of ours was ready
        fail(f"cannot use {display_path(os.fsdecode(e.filename))}: {e.strerror}." if e.filename else f"{e}.")
    except MemoryError as e:  # numpy's or Python's allocations, in any command (embed's run says more)
        fail(f"this machine ran out of memory ({first_line(e)}).", 1)
    except KeyboardInterrupt:
        fail("interrupted.", 130)


def _import_torch() -> None:
    """Import torch (1-2 s) with Ctrl-C deferred to its end. Raised inside, the KeyboardInterrupt may be lost:
    torch's C module imports numpy and drops whatever that raises, so the run would go on to its end, or stop later
    in a traceback from a half-imported numpy. The commands that need torch call this before anything else; the
    KeyboardInterrupt raised as the import ends is their `_Command.invoke`'s sentence."""
    try:
        with interrupts.deferred():
            __import__("torch")
    except (ImportError, OSError, MemoryError) as e:  # a broken install, or too little memory to map its libraries
        no_room = isinstance(e, MemoryError) or "failed to map segment" in str(e)  # dlopen's ENOMEM
        limit = address_space_limit() if no_room else None
        cause = f": `ulimit -v` allows {limit // 2**20:,} MB, and torch needs more" if limit else ""
        raise UserError(f"torch cannot be loaded ({first_line(e)}){cause}.") from None


def _fresh(output: Path, overwrite: bool) -> bool:
    """Whether `siglip embed -o output` is to embed its files from the first: there is no earlier work to continue,
    and no output already, unless it is to be overwritten."""
    from .outputs import OutputPaths

    try:
        out = OutputPaths.for_output(output)
        return not out.work.exists() and (overwrite or not out.embeddings.exists())
    except (UserError, OSError):  # refused, or a folder closed to this user: the run says why
        return False


def _path(value: str) -> Path:
    """A path option or argument as typed. Typer's own conversion reads "" (an unset shell variable) as `.`, the
    current folder, where `--plot ""` would have written its pictures."""
    if not value:
        raise typer.BadParameter("the name is empty.")
    return Path(value)


def _output_path(value: str) -> Path:
    """`-o`, a file: `_path`, and a name that ends in a separator or in `.` refused, which `Path` drops: `-o
    photos.safetensors/` and `-o photos.safetensors/.` would both write the file photos.safetensors."""
    if isinstance(value, str):  # as typed (the default comes as a Path)
        if value.endswith(("/", os.sep)):
            end = value[-1]
            raise typer.BadParameter(f"{value} ends in {end}, but -o names a file: drop the trailing {end}.")
        if os.path.basename(value) in (".", ".."):
            raise typer.BadParameter(f"{value} names a folder, but -o names a file (ending in .safetensors or .npy).")
    return _path(value)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"siglip {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """SigLIP image embeddings from the command line."""


class _RichProgress:
    """The embed progress bar on stderr: images done, images/s, time left. rich takes its locks with signals
    deferred, since a Ctrl-C that left one held would hang the bar's refresh thread and the stop that joins it."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.bar = Progress(
            TextColumn("[bold]embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=stderr,
            disable=quiet or not sys.stderr.isatty(),  # a log file gets the summary line (rich's is_terminal: FORCE_COLOR lies)
            transient=False,
        )
        self.task = None
        self.started = 0.0
        self.fresh = 0

    def start(self, total: int, done: int) -> None:
        self.started = time.perf_counter()
        with interrupts.deferred():
            self.bar.start()
            self.task = self.bar.add_task("embed", total=total, completed=done, rate="")

    def advance(self, n: int) -> None:
        self.fresh += n
        rate = self.fresh / max(time.perf_counter() - self.started, 1e-9)
        with interrupts.deferred():
            self.bar.update(self.task, advance=n, rate=f"{rate:,.1f} img/s")

    def reused(self, n: int) -> None:
        with interrupts.deferred():
            self.bar.update(self.task, advance=n)  # on the bar, but not in the images/s

    def note(self, message: str) -> None:
        if not self.quiet:
            note(message)

    def stop(self, *, keep: bool = True) -> None:
        if self.bar.disable:  # never started; rich before 14.3 would print an empty line on stderr
            return
        if not keep:
            self.bar.live.transient = True
        with interrupts.deferred():
            self.bar.stop()


@app.command(cls=_Command, short_help="Embed images and folders into .safetensors or .npy.")
def embed(
    inputs: Annotated[list[str], typer.Argument(help="Image files and folders (walked recursively).", show_default=False, metavar="PATH")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file: .safetensors or .npy.", metavar="FILE", parser=_output_path)] = Path("embeddings.safetensors"),
    model: Annotated[str, typer.Option("--model", "-m", help="Hub id or local checkpoint directory.", metavar="MODEL")] = DEFAULT_MODEL,
    revision: Revision = None,
    files_from: Annotated[Optional[str], typer.Option("--files-from", help="Read more paths from FILE, one per line or NUL-separated (- for stdin).", metavar="FILE")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also save the patch tokens (N, T, D) after post_layernorm.")] = False,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalize rows; --no-normalize gives transformers' pooler_output.")] = True,
    output_dtype: Annotated[OutputDtype, typer.Option("--output-dtype", help="Stored precision.")] = OutputDtype.float32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, or several (cuda:0,cuda:1 or cuda:all): one worker each.", metavar="DEVICE")] = "auto",
    dtype: Annotated[ComputeDtype, typer.Option("--dtype", help="Compute precision (auto: float32 on CPU, bfloat16 on CUDA).")] = ComputeDtype.auto,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Images per forward pass (default: 32 on CPU, 128 on CUDA).", show_default=False, metavar="N")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Decoding processes beside the model (default: CPUs - 1, at most 16 and as many as memory allows, shared among --device's devices).", show_default=False, metavar="N")] = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    exif_transpose: Annotated[bool, typer.Option("--exif-transpose/--no-exif-transpose", help="Apply EXIF orientation (phone photos).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model: +10% for B/16 on an H200 after 15 s of compiling; on a CPU 18-48 s for 0-5%.")] = False,
    fast_decode: Annotated[bool, typer.Option("--fast-decode", help="Decode large JPEGs at reduced size: faster, not pixel-exact.")] = False,
    decoder: Annotated[Decoder, typer.Option("--decode", help="JPEG decoding: gpu (nvJPEG, batched), cpu (PIL, pixel-exact), auto (gpu when the model runs on CUDA).")] = Decoder.auto,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output, and interrupted work made with other options.")] = False,
    update: Annotated[bool, typer.Option("--update", help="Refresh an existing output: embed new and changed files, drop gone ones.")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Embed only part K of N (K/N, from 0), or auto from Slurm / Kubernetes.", metavar="K/N")] = None,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", min=1, help="Shard count for --shard auto (Kubernetes; under Slurm, a rerun of some tasks then redoes their parts).", metavar="N")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any file could not be embedded, any folder could not be listed, a link led nowhere, or an entry named like an image was not a file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, summary or notes on stderr, but for notes about images left out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Embed images into -o OUTPUT (.safetensors or .npy), with a manifest (.jsonl) and an errors file beside it."""
    started = time.perf_counter()  # the summary's seconds: the head start decodes images before the run proper
    from . import headstart
    from .preprocess import DecodeOptions

    if not inputs and files_from is None:
        fail("give at least one image file or folder, or --files-from.")
    if update and overwrite:
        fail("--update keeps the earlier output's rows and --overwrite discards them: give one of the two.")
    decode_options = DecodeOptions(exif_transpose=exif_transpose, max_pixels=max_pixels or None, fast_decode=fast_decode)
    if not update and shard is None and workers != 0 and decoder is not Decoder.gpu and _fresh(output, overwrite):
        # Two batches' worth: on 2 cores the first is done well before the model is ready, and the rest of the wait
        # goes to the second, which the worker would otherwise decode beside the model's first forward.
        headstart.begin(inputs or [], files_from=files_from, model=model, revision=revision, device=device,
                        count=2 * (batch_size or CPU_BATCH_SIZE), options=decode_options)  # fmt: skip
    _import_torch()

    from .decoding import default_workers
    from .devices import check_device_options, load_and_embed, parse_devices
    from .embed import EmbedOptions
    from .outputs import OutputPaths, check_outputs
    from .runtime import default_batch_size
    from .shards import parse_shard, shard_inputs

    keep_freed_memory()
    part = parse_shard(shard, num_shards)
    devices = parse_devices(device)
    check_device_options(devices, shard=part, update=update)
    out = OutputPaths.for_output(output)
    if not (overwrite or update or os.path.lexists(out.work)):
        # An output there already, with no interrupted run to continue, refused now as the run would refuse it once
        # the folders were walked and the model loaded: minutes, on a large library.
        with suppress(OSError):  # a folder closed to this user: the run's own refusal says which
            check_outputs(out, interrupted=False, overwrite=False, update=False, update_allowed=len(devices) == 1)
    paths, walk = _images_to_embed(inputs or [], files_from, out, part, quiet=quiet, update=update)
    options = EmbedOptions(
        normalize=normalize,
        tokens=tokens,
        output_dtype=output_dtype.value,
        batch_size=default_batch_size(devices[0]) if batch_size is None else batch_size,
        # Per device: each device's process starts that many (the CPUs and the memory are shared).
        workers=max(1, default_workers() // len(devices)) if workers is None else workers,
        decode=decode_options,
        decoder=decoder.value,
        shard=part,
        shard_inputs=shard_inputs(inputs or [], walk) if part else None,
    )
    progress = _RichProgress(quiet)
    float32, gpu_decode = dtype is ComputeDtype.float32, decoder is not Decoder.cpu
    with _stopped_runs_told(out, progress, float32=float32, gpu_decode=gpu_decode), interrupts.stop_on_signals():
        summary = load_and_embed(
            model, devices, paths, output, revision=revision, dtype=dtype.value, compile=compile,
            options=options, overwrite=overwrite, update=update, progress=progress,
        )
        progress.stop()  # still in the block, which lets signals go once the output is in place
    # The time the user waited, torch's import and the model's load included: timed from the run proper, a small
    # folder whose first batches the head start had decoded meanwhile read 614 images/s, finished in 5 s.
    summary = dataclasses.replace(summary, seconds=time.perf_counter() - started)
    with interrupts.ignored():  # the output is in place: what follows reports a finished run, whatever Ctrl-C says
        _report_embedding(summary, walk, json_out=json_out, quiet=quiet, strict=strict)


def _images_to_embed(
    inputs: list[str],
    files_from: str | None,
    out: OutputPaths,
    part: tuple[int, int] | None,
    *,
    quiet: bool,
    update: bool,
) -> tuple[list[str], WalkReport]:
    """The files this run embeds (of `part`, with --shard) and what the walk met, with its notes said. The refusals
    of an output that cannot be written come first: the walk may take minutes."""
    from .files import NoImagesFound, find_images, refuse_an_unreachable_folder
    from .outputs import refuse_inputs_among_outputs
    from .shards import select_shard

    refuse_an_unreachable_folder(out.embeddings)
    refuse_inputs_among_outputs(out, inputs, every=True)
    try:
        paths, walk = find_images(inputs, files_from=files_from, digest_list=part is not None, leave_out=out.entries())
    except NoImagesFound as e:  # an --update's folder emptied: its rows are not dropped (a drive not mounted?)
        if update and out.embeddings.exists():
            kept = f"{display_path(str(out.embeddings))} is left as it was, with every row it had"
            raise UserError(f"{str(e).removesuffix('.')}; {kept}.") from None
        raise
    refuse_inputs_among_outputs(out, walk.links, every=True)  # `photo.jpg -> img.npy` in a folder
    for message in walk.notes(quiet=quiet):
        note(message)
    _note_folders_made(out, quiet=quiet)
    if part:
        paths = select_shard(paths, *part)  # may be empty: the shard still writes its (empty) output
    return paths, walk


@contextmanager
def _stopped_runs_told(
    out: OutputPaths, progress: _RichProgress, *, float32: bool, gpu_decode: bool
) -> Iterator[None]:
    """A run stopped by Ctrl-C, SIGTERM, memory (the GPU's, or the CPU allocator's) or a fault of the GPU as one
    sentence, saying whether finished work is kept for the rerun; any other error with the bar taken down first, for
    the error's own sentence. `gpu_decode`: whether JPEGs may have been decoded on the GPU (--decode auto or gpu)."""
    from .runtime import device_fault, gpu_out_of_memory, out_of_memory

    try:
        yield
    except KeyboardInterrupt:
        interrupts.quiet_destructors()  # the process ends here: a second Ctrl-C in a __del__ prints nothing
        with interrupts.ignored():  # stopped, its work kept: a second Ctrl-C must not cut the sentence short
            progress.stop(keep=False)
            kept = out.kept_work("rerun the same command")  # None: stopped before a batch was saved (loading, say)
            fail(f"interrupted; {kept}." if kept else "interrupted.", 130)
    except MemoryError as e:  # numpy's or Python's own allocations, such as a batch's conversion to --output-dtype
        progress.stop(keep=False)
        _fail_out_of_memory(out, e, gpu=False, float32=float32)
    except RuntimeError as e:
        progress.stop(keep=False)
        if out_of_memory(e):  # outside the model's forward, which halves its batch instead
            _fail_out_of_memory(out, e, gpu=gpu_out_of_memory(e), float32=float32)
        if not device_fault(e):
            raise
        kept = f"; finished work is kept in {out.work}" if out.work_kept() else ""
        # The work area records the decoder: its rows continue only with the same one.
        cpu = "start afresh with --decode cpu --overwrite" if kept else "rerun with --decode cpu"
        again = f", or {cpu} if it fails again at the same place" if gpu_decode else ""
        fail(f"the GPU failed ({first_line(e)}){kept}: rerun{' to continue' if kept else ''}{again}.", 1)
    except BaseException:
        progress.stop(keep=False)  # the error sentence alone, not a half-drawn bar above it
        raise


def _fail_out_of_memory(out: OutputPaths, error: BaseException, *, gpu: bool, float32: bool) -> NoReturn:
    ran_out = f"{'the GPU' if gpu else 'this machine'} ran out of memory ({first_line(error)})"
    if kept := out.kept_work("rerun with a smaller --batch-size"):
        fail(f"{ran_out}; {kept}.", 1)
    # bf16 only where the user asked for float32 on the GPU (auto is bf16 there). Past the forward, which halves
    # its batch itself (`embed._Halving`, whose last resort does suggest bf16), memory on the CPU goes to pixels and
    # outputs, which bf16 compute does not make smaller.
    bf16 = ", --dtype bfloat16," if float32 and gpu else ""
    fail(f"{ran_out}: try a smaller --batch-size{bf16} or another {'GPU' if gpu else 'machine'}.", 1)


def _report_embedding(summary: Summary, walk: WalkReport, *, json_out: bool, quiet: bool, strict: bool) -> None:
    if json_out:  # what the walk could not reach is no file's error row, but a script must see it too
        print_json({**summary.to_dict(), **walk.unreached_json()})
    if not quiet:
        stderr.print(printable(_summary_line(summary)))
    elif summary.failed and not strict:  # images left out, as the walk's notes are; --strict says it below
        note(f"{counted(summary.failed, 'file')} could not be embedded: see {summary.errors}.")
    if strict:
        # A share not mounted (a folder link, or photos linked into it) is a whole folder missing, as one that
        # cannot be listed is: a nightly --strict run must not pass without it.
        failed = [f"{counted(summary.failed, 'file')} could not be embedded: see {summary.errors}"]
        problems = (failed if summary.failed else []) + walk.unreached()
        if problems:
            fail(f"{'; '.join(problems)} (--strict).", 1)


def _data_console() -> Console:
    """stdout for tables and reports: a file or a pipe has no width to respect, so they are printed wide (200
    columns, or COLUMNS where it is set to 40 or more), not squeezed to 80, and without the spaces rich pads lines
    with."""
    if stdout.is_terminal and sys.stdout.isatty():  # by words to its width, not broken mid-word where a line ends
        return Console(file=stdout.file, soft_wrap=False, markup=False, highlight=False)
    if stdout.is_terminal:  # FORCE_COLOR into a file or a pipe: colours, lines whole
        return stdout
    columns = os.environ.get("COLUMNS", "")
    width = None if columns.isdigit() and int(columns) >= 40 else 200  # None: rich reads COLUMNS (0 would print nothing)
    return Console(file=_TrimmedLines(stdout.file), width=width, soft_wrap=True, markup=False, highlight=False)


class _TrimmedLines:
    """A file or pipe whose lines lose their trailing spaces (rich pads every table row to the table's width):
    a report saved to a file diffs and greps cleanly. rich writes whole lines."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write("\n".join(line.rstrip(" ") for line in text.split("\n")))

    def flush(self) -> None:
        self.file.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding: as the file's
        return getattr(self.file, name)


def _summary_line(s: Summary) -> str:
    """'embedded 9,812, reused 40 → photos.safetensors (412.3 s, 23.8 images/s); 3 failed: see photos.errors.jsonl'"""
    line = f"embedded {s.embedded:,}"
    if s.reused:
        line += f", reused {s.reused:,}"
    if s.unchecked:
        line += f", kept {s.unchecked:,} unchecked"
    if s.removed:
        line += f", removed {s.removed:,}"
    rate = f", {s.embedded / s.seconds:,.1f} images/s" if s.embedded and s.seconds > 0 else ""
    line += f" → {s.output}{', unchanged' if s.unchanged else ''} ({s.seconds:.1f} s{rate})"
    if s.failed:  # the word --json uses
        line += f"; {s.failed:,} failed: see {s.errors}"
    return line


@app.command(cls=_Command, short_help="Join the outputs of --shard runs into one.")
def merge(
    inputs: Annotated[list[Path], typer.Argument(help="Outputs to join: the parts of a `siglip embed --shard K/N` run, or runs over disjoint files.", show_default=False, metavar="SHARD", parser=_path)],
    output: Annotated[Path, typer.Option("-o", "--output", help="The merged output: .safetensors or .npy.", metavar="FILE", parser=_output_path)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Merge even if some of the N parts are missing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Join shard outputs into one file, equal to a single run over all their images."""
    from .shards import merge_outputs

    with interrupts.stop_on_signals():  # SIGTERM too; once the output is in place, none
        summary = merge_outputs(inputs, output, overwrite=overwrite, allow_missing=allow_missing)
    with interrupts.ignored():  # the output is in place: what follows reports a finished merge, whatever Ctrl-C says
        if json_out:
            print_json(summary.to_dict())
        line = f"merged {counted(summary.inputs, 'output')}: {counted(summary.rows, 'row')} → {summary.output}"
        if summary.failed:  # as embed's summary says it
            line += f"; {summary.failed:,} failed: see {summary.errors}"
        if not quiet:
            stderr.print(printable(line))


@app.command(cls=_Command, short_help="Trace one image through the tower, stage by stage.")
def inspect(
    image: Annotated[Optional[Path], typer.Argument(help="The image to trace (default: a bundled sample photo).", show_default=False, metavar="IMAGE", parser=_path)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="A preset name (architecture only, random weights, no download), a Hub id or a local checkpoint.", metavar="MODEL")] = DEFAULT_PRESET,
    revision: Revision = None,
    layers: Annotated[str, typer.Option("--layers", help="Encoder layers listed stage by stage: first, all, or numbers such as 0,5,11; the others get one line.", metavar="LAYERS")] = "first",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of the tables.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write PNG pictures into this directory.", show_default=False, metavar="DIR", parser=_path)] = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
) -> None:
    """Trace one image through the vision tower: every stage's shape and statistics, parameters, GFLOPs."""
    _import_torch()
    from .inspect_report import report
    from .plots import PICTURES, plot_directory, write_plots
    from .tracing import first_non_finite, inspect_image

    from .files import missing_folders

    made = missing_folders(plot / "picture") if plot is not None else []  # the folders `plot_directory` makes
    if plot is not None:
        plot_directory(plot)  # a folder that cannot be written, said before the model runs
    try:
        result = inspect_image(model, image, layers=layers, revision=revision, max_pixels=max_pixels or None)
    except BaseException:  # an image or a model refused leaves no empty folder behind
        for folder in reversed(made):
            with suppress(OSError):
                os.rmdir(folder)
        raise
    drawable = first_non_finite(result.stages) is None
    pictures = write_plots(result, plot) if plot is not None and drawable else []
    undrawn = []  # the report is what a user with a damaged checkpoint needs: it comes all the same
    if plot is not None and not drawable:
        kept = any((plot / name).exists() for name in PICTURES)
        earlier = " (the pictures in it are an earlier run's)" if kept else ""
        undrawn.append(f"no plots drawn in {plot}{earlier}: the model gave NaN or infinite values (the report says "
                       "where they first appear).")  # fmt: skip
        note(undrawn[0])
    if json_out:  # why "plots" is empty, for a script that reads only stdout
        document = result.to_dict()
        print_json({**document, "notes": document["notes"] + undrawn, "plots": [str(p) for p in pictures]})
        if result.random_weights:
            note(f"{model} is an architecture preset: random weights, not a trained model.")
        return
    console = _data_console()
    console.print(report(result, width=console.width))
    if pictures:
        console.print("\nplots:", *(display_path(str(p)) for p in pictures), sep="\n")


@app.command(cls=_Command, short_help="Measure images/s, beside transformers and timm.")
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="A preset name (random weights, no download), a Hub id or a local checkpoint.", metavar="MODEL")] = DEFAULT_PRESET,
    revision: Revision = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", metavar="DEVICE")] = "auto",
    dtype: Annotated[ComputeDtype, typer.Option("--dtype", help="Compute precision (auto: bfloat16 on CUDA, float32 on the CPU, as embed).")] = ComputeDtype.auto,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", "-b", help="Comma-separated batch sizes (default: 1,8,32 on CPU, 1,32,256 on CUDA).", show_default=False, metavar="SIZES")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", min=1, help="Timed calls per measurement; the median is reported (default: 10 on CUDA, 3 on CPU).", show_default=False, metavar="N")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help="Untimed calls first (default: 3 on CUDA, 1 on CPU).", show_default=False, metavar="N")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile every model (default: on for CUDA, off for CPU: the compile outlasts a short CPU run).", show_default=False)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Also time decode, preprocess and end to end on the images in this folder.", show_default=False, metavar="DIR", parser=_path)] = None,
    compare: Annotated[str, typer.Option("--compare", help="Also run these on the same weights: transformers, timm (comma-separated).", metavar="NAMES")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of the table.")] = False,
) -> None:
    """Throughput of the vision tower (images/s, ms per image, peak memory), optionally against transformers and timm."""
    _import_torch()
    from . import bench_report
    from .benchmark import BenchOptions, parse_batch_sizes, parse_references, run_benchmark
    from .runtime import resolve_device

    keep_freed_memory()  # as `siglip embed` runs; the references in this process get it too
    device = str(resolve_device(device))  # the same rules as `siglip embed --device`
    references = parse_references(compare)
    options = BenchOptions(
        model=model,
        revision=revision,
        device=device,
        dtype=None if dtype is ComputeDtype.auto else dtype.value,
        batch_sizes=None if batch_size is None else parse_batch_sizes(batch_size),
        iters=iters,
        warmup=warmup,
        compile=compile,
        compare=references,
        images=images,
    )
    report = run_benchmark(options, progress=lambda message: stderr.print(printable(message), style="dim"))
    for sentence in report.notes:
        note(sentence)
    if json_out:
        print_json(report.to_dict())
        return
    console = _data_console()
    console.print(bench_report.report(report, width=console.width))
