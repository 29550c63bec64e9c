"""The one error type the library raises. The CLI prints its message as one line and exits."""


class EdgekdError(Exception):
    """Something went wrong that the user can act on; the message says what to do.

    ``exit_code`` is what the CLI exits with: 1 for a failed run, 2 for bad input (usage).
    """

    exit_code = 1


class UsageError(EdgekdError):
    """Bad input from the user: a missing path, a malformed file, an invalid option."""

    exit_code = 2
