"""The base class of the errors a user can fix: a missing or damaged file, a bad flag, an engines folder that
does not hold what it should. Each module raises its own subclass (CheckpointError, DataError, ExportError,
ParityError, BuildError); the command line prints any of them as one `error: ...` line and exits with status 2.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and, where it can, how."""
