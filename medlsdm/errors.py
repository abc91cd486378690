"""The user-facing error type.

Anything a user can fix (a missing file, a bad label value, a wrong shape) raises :class:`UserError`
with one line naming the file and the problem. The CLI prints it as ``medlsdm: error: <message>``
and exits with status 2, without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
