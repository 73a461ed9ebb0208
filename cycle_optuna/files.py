"""Output files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from cycle_optuna.errors import StorageError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write; renamed over `path` when the block ends normally,
    removed when it raises (Ctrl-C included), so a reader never sees a truncated file."""
    # same suffix, so writers that pick a format from the name (matplotlib) still do
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def check_creatable(path: Path) -> None:
    """New files can be made in directory `path` (where it is yet to be created, in its nearest
    existing parent), else one line naming `path`. Permissions do not show everything (root on
    /proc, a read-only mount), so this makes one real file: unnamed where the filesystem allows, and
    gone at once, so nothing is left behind."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise StorageError(f"cannot write {path}: {where} takes no new files ({e.strerror or e})") from None
