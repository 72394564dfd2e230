"""User-facing errors: the CLI prints their one-line message and exits with status 2."""


class SfddmError(Exception):
    """Bad input or an unusable resource; the message names the key or file and what was expected."""


class ConfigError(SfddmError, ValueError):
    """A bad setting in params.yaml or on the command line."""
