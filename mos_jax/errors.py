"""One exception family for every user-facing mistake.

Each message says what is wrong and how to fix it; the command line prints the message
alone (no traceback) and exits with status 2. `note` is the one printer of a line for
the user on stderr.
"""

import sys


def note(message: str) -> None:
    """Print a line for the user on stderr, flushed (a note, a warning, a step of
    set-up): what the commands pass as `log` where stdout is kept for results."""
    print(message, file=sys.stderr, flush=True)


class MosJaxError(Exception):
    """Base class of all errors mos-jax raises for bad input or state."""


class DataError(MosJaxError):
    """A corpus is missing, malformed, or does not fit the request."""


class DownloadError(DataError):
    """No mirror delivered a file with the expected checksum."""


class ConfigError(MosJaxError):
    """A configuration key or value is wrong."""


class CheckpointError(MosJaxError):
    """A checkpoint or weight file is missing, corrupt, or incompatible."""
