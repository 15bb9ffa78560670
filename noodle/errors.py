"""The errors a user can cause, and the exit codes they map to."""


class NoodleError(Exception):
    """A bad input or a failed run: one line `error: ...` on stderr and exit code 1."""

    exit_code = 1


class UsageError(NoodleError):
    """A wrong option or argument value: exit code 2."""

    exit_code = 2
