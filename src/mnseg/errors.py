"""User-facing errors.

Anything the user can fix (a bad file, a bad option) raises a subclass of
``MnsegError``; the CLI prints its message without a traceback and exits 2.
"""


class MnsegError(Exception):
    """An error caused by input or configuration the user can fix."""


class InputFileError(MnsegError):
    """A file cannot be read or does not hold what it should."""


class DatasetError(MnsegError):
    """A dataset folder is malformed; the message lists every problem found."""


class ConfigError(MnsegError):
    """A configuration value is unknown or out of range."""
