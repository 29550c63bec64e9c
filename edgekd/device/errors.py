"""The one error type the library raises. The CLI prints its message as one line and exits."""


EXIT_CODES = {
    0: "success: every gate passed",
    1: "the run failed: a gate, or the training diverged (the message names which)",
    2: "bad input or usage: a path, a file, a setting, a full disk or a read-only folder (the message names it)",
    3: "an unexpected internal error (a bug: EDGEKD_DEBUG=1 shows the traceback)",
    130: "interrupted (Ctrl-C); 143 and 129 stopped by SIGTERM or SIGHUP, cleaned up the same way",
}
INTERNAL_ERROR = 3


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message (or its type's name when it has none), cut to
    ``limit`` characters: what a one-line error quotes from a library's long message."""
    text = str(e).strip()
    fallback = "" if isinstance(e, str) else type(e).__name__
    return (text.splitlines() or [fallback])[0][:limit]


class EdgekdError(Exception):
    """Something went wrong that the user can act on; the message says what to do.

    ``exit_code`` is what the CLI exits with (``EXIT_CODES``): 1 for a failed run (a gate, a
    diverged loss), 2 for bad input (usage); anything unforeseen exits with 3.
    """

    exit_code = 1


class UsageError(EdgekdError):
    """Bad input from the user: a missing path, a malformed file, an invalid option."""

    exit_code = 2
