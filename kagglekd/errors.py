"""User-facing error types.

A user error names the field or file, what was wrong and how to fix it. Code that catches these
(the CLI, diagnostics) shows the message as one line and exits with code 2.
"""


class KaggleKDError(Exception):
    """Base class of every error the kit raises on purpose."""


class ConfigError(KaggleKDError, ValueError):
    """A configuration value (or combination of values) that cannot be used.

    ``field`` names the config key the error is about, when there is one.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(KaggleKDError, ValueError):
    """Input data (a file, a column, a corpus) that cannot be used. The message names it."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class RegistryUnavailable(KaggleKDError):
    """A file the kit fetches from the Python package registry (a real model or tokenizer shipped in a
    package) could not be downloaded. The message names the package and how to supply it offline."""

    def __init__(self, message: str, package: str | None = None):
        super().__init__(message)
        self.package = package
