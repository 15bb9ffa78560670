"""The errors a user can cause, the interruptions they can send, and their exit codes."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable

# The signals that stop a run cleanly: the step in progress finishes and the run is saved.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NoodleError(Exception):
    """A bad input or a failed run: one line `error: ...` on stderr and exit code 1."""

    exit_code = 1


class UsageError(NoodleError):
    """A wrong option or argument value: exit code 2."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the command: exit code 128 + the signal number.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up
    (e.g. around a library call that reads a file) mistakes it for a failure of its own.

    `resume_step` is the step whose resume state was saved before this was raised, or None
    when the command stopped without saving one (e.g. a second signal, or before training).
    """

    def __init__(self, signum: int, resume_step: int | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.resume_step = resume_step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """The hint `; did you mean 'soba'?` when `value` looks like a typo of one of `choices`,
    else an empty string."""
    close = difflib.get_close_matches(value.lower(), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
