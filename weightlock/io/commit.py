"""The commit point of a command, and what a Ctrl-C means before and after it.

A command that writes has one moment at which its output becomes final: ``apply --out`` when the verified
folder (or GGUF file set) has been renamed into place and the rename made durable, ``apply --in-place`` when
the edited folder has passed verify, ``revert`` when the original files are back. The code that reaches that
moment calls :func:`mark_committed` with what is now true ("/x/out was published and verified").

Under the CLI (:func:`cli_guard`, entered by ``cli.main``):

- before the commit point a Ctrl-C stops the command (KeyboardInterrupt): the code on the way out undoes
  what it started and says, with :func:`set_interrupt_advice`, what the disk now holds;
- inside a :func:`critical` section (a publish's renames, an in-place rollback) a Ctrl-C waits for the
  section to end, so it never splits steps that belong together;
- from the commit point to the end of the process a Ctrl-C is remembered and ignored: the command finishes
  (prints its summary) and exits 0, and ``cli.main`` says on stderr that the interruption came after the
  work was done. A Ctrl-C once the command has ended (printing, interpreter shutdown) is ignored too, so
  it can never turn into a traceback.

Outside the CLI (a library caller) the process's SIGINT handling is left as it is, except that a
:func:`critical` section run on the main thread holds a Ctrl-C back until the section ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _State:
    def __init__(self) -> None:
        self.guarded = False  # cli_guard installed our handler
        self.committed: list[str] = []  # what became final, in order
        self.critical = 0  # depth of critical sections
        self.pending = False  # a Ctrl-C arrived inside a critical section, before the commit point
        self.late = False  # a Ctrl-C arrived after the commit point (or after the command ended)
        self.ended = False  # the command returned or failed; only reporting is left
        self.advice: str | None = None  # what to tell the user if the command is interrupted now


_state = _State()


def _on_sigint(signum, frame) -> None:
    if _state.guarded and (_state.committed or _state.ended):
        _state.late = True
        return
    if _state.critical:
        _state.pending = True
        return
    raise KeyboardInterrupt


def mark_committed(description: str) -> None:
    """The output is final: ``description`` says what is now true (e.g. "OUT was published and verified").
    Under the CLI, a Ctrl-C from here on no longer stops the command."""
    _state.committed.append(description)


def committed() -> list[str]:
    """What became final so far in this command (empty: nothing)."""
    return list(_state.committed)


def set_interrupt_advice(text: str) -> None:
    """What is true on disk, and what to do, if the command is interrupted from here on (before commit)."""
    _state.advice = text


def interrupt_advice() -> str | None:
    return _state.advice


def interrupted_late() -> bool:
    """A Ctrl-C arrived after the commit point or after the command ended, and was ignored."""
    return _state.late


@contextmanager
def critical() -> Iterator[None]:
    """Steps that must not be split by a Ctrl-C: one arriving inside waits for the section's end and is then
    raised (under the CLI: unless the section reached the commit point). Nests."""
    own_handler = None
    if (
        not _state.guarded
        and _state.critical == 0
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        own_handler = signal.signal(signal.SIGINT, _on_sigint)  # a library caller: only for this section
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
        if own_handler is not None:
            signal.signal(signal.SIGINT, own_handler)
    if _state.critical == 0 and _state.pending:
        _state.pending = False
        if _state.guarded and _state.committed:
            _state.late = True
        else:  # (a library caller gets its Ctrl-C once the section is done, committed or not)
            raise KeyboardInterrupt


@contextmanager
def committing(description: str) -> Iterator[None]:
    """The steps that make an output final, as one :func:`critical` section that reaches the commit point
    (:func:`mark_committed` with ``description``) when it completes: a Ctrl-C during a publish's renames then
    waits for them and no longer stops the command, and one that fails leaves the state uncommitted."""
    with critical():
        yield
        mark_committed(description)


def command_ended() -> None:
    """The command returned or failed: from here a Ctrl-C is ignored (only reporting is left)."""
    _state.ended = True


@contextmanager
def cli_guard() -> Iterator[None]:
    """One CLI command: fresh state, our SIGINT handler while it runs, the previous handler restored after
    (the console entry point's previous handler ignores SIGINT, so interpreter shutdown cannot be
    interrupted)."""
    global _state
    previous_state = _state
    _state = _State()
    _state.guarded = True
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main_thread else None
    try:
        yield
    finally:
        _state.ended = True
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        _state = previous_state
