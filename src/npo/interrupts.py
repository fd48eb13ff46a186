"""Stopping a local run: Ctrl-C (SIGINT) and SIGTERM end it the same way.

Python turns SIGINT into KeyboardInterrupt; SIGTERM (what `kill`, systemd and a container
runtime send) would end the process at once, leaving the run marked `running` with nothing
said. `terminate_as_interrupt()` makes SIGTERM raise KeyboardInterrupt too, so both unwind
through the same `except KeyboardInterrupt` and `finally` blocks: the step server is stopped,
the run is marked `interrupted` (npo.steps.context.mark_stopped) and the CLI prints one line
and exits 128 + the signal's number, as a shell reports it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


def signal_of(interrupt: KeyboardInterrupt) -> signal.Signals:
    """Which signal stopped the run: SIGTERM when `terminate_as_interrupt`'s handler raised
    `interrupt`, else SIGINT (Ctrl-C)."""
    return getattr(interrupt, "signum", signal.SIGINT)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal_of(interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # A plain KeyboardInterrupt, not a subclass: subprocess.Popen.__exit__ (kfp.local runs
    # each task in one) stops waiting for its child only for exactly KeyboardInterrupt.
    interrupt = KeyboardInterrupt()
    interrupt.signum = signal.Signals(signum)  # type: ignore[attr-defined]
    raise interrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does (in the main thread,
    as signals go), with the signal in its `signum`."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
