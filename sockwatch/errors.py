"""Errors that reach the user as one line and an exit status, never a traceback."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class SockwatchError(Exception):
    """Anything sockwatch reports to the user; ``exit_code`` is the process status."""

    exit_code = EXIT_FAILURE


class UsageError(SockwatchError):
    """Bad arguments or configuration: nothing was loaded."""

    exit_code = EXIT_USAGE


class NotPrivilegedError(SockwatchError):
    """BPF needs root or CAP_BPF + CAP_PERFMON."""


class BpfObjectError(SockwatchError):
    """The compiled BPF objects are missing or do not match this sockwatch."""


class AttachError(SockwatchError):
    """An essential hook could not be attached in any variant."""
