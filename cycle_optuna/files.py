"""Output files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write; renamed over `path` when the block ends normally,
    removed when it raises (Ctrl-C included), so a reader never sees a truncated file.

    A device or pipe (``-o /dev/stdout``, ``/dev/null``, a FIFO) is written in place: renaming a
    file over it would replace the device itself. A symbolic link is written through, so the link
    stays a link to the new file."""
    if path.exists() and not path.is_file() and not path.is_dir():
        yield path
        return
    if path.is_symlink():
        path = path.resolve()
    # same suffix, so writers that pick a format from the name (matplotlib) still do
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)

