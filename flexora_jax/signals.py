"""SIGTERM / SIGINT as a flag checked at safe points, never an exception raised into running code.

Inside :func:`stop_on_signals` a signal only sets :data:`STOP`. The training driver checks it between steps
(after the step's checkpoint is saved), the evaluator between batches and the command between stages and
files; the check raises :class:`Interrupted`, which the command turns into exit status 143 (128 + SIGTERM)
or 130 (SIGINT). So a signal never lands inside a library call, a garbage-collector callback or a half-written
file, and every stop is a clean one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from flexora_jax.errors import FlexoraError


class Interrupted(FlexoraError):
    """SIGTERM / SIGINT arrived and the work stopped at a safe point (what was saved is named)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """The pending signal (None: none), where the interrupted work lives (for the message) and how many
    :func:`stop_on_signals` blocks are open (only the outermost installs and restores the handlers)."""

    signum: int | None = None
    where: str = ""
    depth: int = 0


STOP = StopFlag()


def requested() -> bool:
    """Whether a stop was requested (a signal arrived inside :func:`stop_on_signals`)."""
    return STOP.signum is not None


def check(what: str) -> None:
    """A safe point: raise :class:`Interrupted` naming ``what`` was reached if a stop was requested."""
    if STOP.signum is not None:
        hint = f" --output-dir {STOP.where}" if STOP.where else ""
        raise Interrupted(
            f"interrupted by signal {STOP.signum} {what}; what was finished is kept; continue with "
            f"`flexora-jax run --resume{hint}`",
            STOP.signum,
        )


@contextlib.contextmanager
def stop_on_signals(where: str = "") -> Iterator[None]:
    """While active, SIGTERM / SIGINT set :data:`STOP` (checked at safe points); outside the main thread a no-op.

    Blocks nest: an inner block (a stage inside the command) keeps the outer one's handlers and any signal
    already pending, and only names ``where`` the work lives while it runs; the outermost block installs the
    handlers, clears the flag on entry and on exit, and restores the previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_where = STOP.where
    if STOP.depth:
        STOP.depth += 1
        STOP.where = where or outer_where
        try:
            yield
        finally:
            STOP.depth -= 1
            STOP.where = outer_where
        return
    STOP.signum, STOP.where = None, where

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        if STOP.signum is None:
            STOP.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP.depth = 1
    try:
        yield
    finally:
        STOP.depth = 0
        for s, h in old.items():
            signal.signal(s, h)
        STOP.signum, STOP.where = None, ""
