"""Failures of the machine rather than of the input — a full disk, a read-only path — as one-line user errors.

The stages write through many libraries (zarr, torch, accelerate, safetensors); any of them may hit a full or
read-only filesystem. :func:`named_os_errors` turns those OSErrors into a :class:`kd.errors.UserError` that
names the path (the file the OS named, else the directory the command writes under) and what to do. Nothing
is rolled back because nothing needs to be: cache parts and checkpoints become visible only when complete, so
the same command run again continues from what was committed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from kd.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def describe_os_error(exc: OSError, writes_under: str) -> str | None:
    """The one line for a full or unwritable filesystem, or None for any other OSError."""
    where = exc.filename or writes_under
    if exc.errno in _NO_SPACE:
        return (f"{where}: no space left on the device; free some space and run the same command again "
                "(committed cache parts and checkpoints are kept, the run continues from them)")
    if exc.errno in _NOT_WRITABLE:
        return (f"{where}: cannot write there ({exc.strerror or 'read-only'}); make it writable or choose another "
                "path — nothing already written was changed")
    return None


@contextmanager
def named_os_errors(writes_under: str) -> Iterator[None]:
    """Within the block, a full or read-only filesystem becomes a UserError naming the path."""
    try:
        yield
    except OSError as exc:
        line = describe_os_error(exc, writes_under)
        if line is None:
            raise
        raise UserError(line) from None
