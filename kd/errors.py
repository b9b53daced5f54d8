"""User-facing errors.

Anything the user can fix (a bad config key, an unreadable data row, a cache from another teacher) is raised as
a :class:`UserError`. The CLI prints its message as one line on stderr and exits with code 2, without a
traceback. Programming errors stay ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, key or sample and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override is wrong (unknown name, syntax, unknown key, wrong type, missing value)."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class DataError(UserError):
    """A data file or row is wrong (unreadable file, malformed JSON, missing field, answer without ####)."""


class TeacherConfigError(UserError, ValueError):
    """The teacher settings do not fit the model or the engine (the one-line message says what to fix)."""


class BackendUnavailableError(UserError, RuntimeError):
    """The requested engine's library cannot be imported on this machine (the message gives the install hint)."""


class TeacherServerError(UserError, RuntimeError):
    """A teacher server cannot be reached or refuses the work (the message names the URL and what to do)."""
