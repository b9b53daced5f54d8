"""Writing files so a reader never sees half of one: the one atomic-write helper."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8, or bytes) to ``path`` through a temporary sibling and a rename.

    The rename is atomic on one filesystem: a kill leaves either the old file or the new one (plus, at worst, a
    stray ``<name>.tmp`` that the next write replaces), never a torn file.
    """
    target = Path(path)
    staging = target.with_name(target.name + ".tmp")
    if isinstance(content, str):
        staging.write_text(content, encoding="utf-8")
    else:
        staging.write_bytes(content)
    os.replace(staging, target)
    return target
