"""One exception family for every user-facing mistake.

Each message says what is wrong and how to fix it; the command line prints the message
alone (no traceback) and exits with status 2.
"""


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
