"""Ctrl-C, SIGTERM and SIGHUP: deferred out of code that must not be interrupted, never lost (`siglip_cli.interrupts`)."""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from siglip_cli import interrupts


def ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)  # the handler runs before the next line does


def test_ctrl_c_inside_a_deferred_block_takes_effect_as_it_is_left() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            ctrl_c()
            reached.append("the rest of the block")
        reached.append("after the block")
    assert reached == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_takes_effect_at_once() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            ctrl_c()
            reached.append("after the first")
            ctrl_c()
            reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_blocks_deliver_once_as_the_outermost_is_left() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():
                ctrl_c()
            reached.append("between")
    assert reached == ["between"]


def test_a_block_off_the_main_thread_runs_as_is() -> None:
    failures = []

    def work() -> None:
        try:
            with interrupts.deferred():  # signal.signal would raise here: only the main thread may set handlers
                pass
        except Exception as e:
            failures.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert failures == []


def test_sigterm_during_a_run_stops_it_like_ctrl_c() -> None:
    with pytest.raises(KeyboardInterrupt):
        with interrupts.stop_on_signals():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_output_in_place_stays_so_for_the_rest_of_the_command() -> None:
    # A command's block holds its run's: a stop after the run put its output in place (its summary being printed)
    # would report the finished run interrupted.
    with interrupts.stop_on_signals():
        with interrupts.stop_on_signals():
            interrupts.mark_output_in_place()
        signal.raise_signal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):  # the next command starts afresh
        with interrupts.stop_on_signals():
            signal.raise_signal(signal.SIGTERM)


def test_a_hang_up_during_a_run_stops_it_like_ctrl_c() -> None:
    # As from a terminal: `nohup pytest` starts the session with SIGHUP ignored, which a run rightly keeps.
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.stop_on_signals():
                signal.raise_signal(signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_signal_found_ignored_stays_ignored() -> None:
    # `nohup` ignores SIGHUP, and a shell ignores SIGINT for a job started with `&`: the run must not take them back.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts.stop_on_signals():
            signal.raise_signal(signal.SIGHUP)
            with interrupts.deferred():
                signal.raise_signal(signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


class SwallowsACtrlC:
    def __del__(self) -> None:
        ctrl_c()  # KeyboardInterrupt inside __del__: printed as "Exception ignored" and lost


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_lost_in_a_destructor_is_raised_at_the_next_check() -> None:
    interrupts.check()  # nothing received: nothing raised
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.stop_on_signals():
            SwallowsACtrlC()
            reached.append("the run went on")
            interrupts.check()
            reached.append("past the check")
    assert reached == ["the run went on"]
    interrupts.check()  # the run is over: nothing left to raise


@pytest.fixture
def photo_folder(tmp_path: Path) -> list[str]:
    for i in range(12):
        Image.new("RGB", (40, 30), (20 * i, 100, 200)).save(tmp_path / f"{i:02d}.png")
    return sorted(str(p) for p in tmp_path.iterdir())


def test_ctrl_c_inside_the_data_loader_lets_it_finish_the_call_and_shut_its_workers_down(
    photo_folder: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raised inside the loader's queue code, a KeyboardInterrupt can leave a queue lock held, and the workers'
    # shutdown then waits for it forever: the loader's call must finish first.
    from torch.utils.data import dataloader

    from siglip_cli.config import PreprocessConfig
    from siglip_cli.decoding import decoded_batches
    from siglip_cli.preprocess import DecodeOptions

    next_data = dataloader._MultiProcessingDataLoaderIter._next_data
    finished = []

    def interrupted(self):
        if not finished:
            ctrl_c()
        data = next_data(self)
        finished.append(len(data))
        return data

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_next_data", interrupted)
    batches = decoded_batches(photo_folder, PreprocessConfig(16, 16), DecodeOptions(), batch_size=4, workers=2, pin=False)
    with pytest.raises(KeyboardInterrupt):
        next(batches)
    assert finished == [4]  # the interrupted call returned its parcel
    assert multiprocessing.active_children() == []  # and the workers are gone


def test_a_second_ctrl_c_in_a_destructor_while_the_run_stops_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C twice: the second landed in the DataLoader's __del__, and Python printed "Exception ignored ...
    # Traceback ... KeyboardInterrupt" under the run's one sentence.
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_type))

    class Closing:
        def __init__(self, error: BaseException):
            self.error = error

        def __del__(self):
            raise self.error

    with interrupts.stop_on_signals():
        Closing(KeyboardInterrupt())  # before any stop: reported as Python reports it
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        Closing(KeyboardInterrupt())  # while stopping: quiet
        Closing(ValueError("a bug in a destructor"))  # still reported
    Closing(KeyboardInterrupt())  # after the block, as a library caller goes on: reported again
    assert reported == [KeyboardInterrupt, ValueError, KeyboardInterrupt]


def test_the_command_line_keeps_destructors_quiet_about_ctrl_c_once_it_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_type))

    class Closing:
        def __del__(self):
            raise KeyboardInterrupt

    interrupts.quiet_destructors()
    quiet = sys.unraisablehook
    interrupts.quiet_destructors()  # a second stopped run in this process (tests, a notebook): not stacked
    assert sys.unraisablehook is quiet
    Closing()
    assert reported == []
