"""The exceptions a user can act on.

`UserError` and its subclasses carry a message that names the file, flag or
config key at fault and says what to do. The command line prints them as one
`error: ...` line and exits with status 2, without a traceback (`--verbose`
shows it); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for or gave (arguments, files, configs)."""


class ConfigError(UserError):
    """An unknown config name, argument or key, or a value of the wrong type."""


class RunFailed(RuntimeError):
    """A run that started correctly and then could not go on (for example a
    diverged loss). The command line prints the message without a traceback
    and exits with status 1."""
