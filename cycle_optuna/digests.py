"""A study's data files known by their content, so a copy kept at another path is the same file."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from cycle_optuna import config as config_mod
from cycle_optuna.config import StudyConfig
from cycle_optuna.errors import DataError

DIGESTS_ATTR = "cycle_optuna_data_digests"  # {[data] key: sha256 of the file it named when the study was made}
KEYS = ("source", "test_source")


def data_paths(cfg: StudyConfig) -> dict[str, Path | None]:
    return {"source": config_mod.resolve_data_path(cfg), "test_source": config_mod.resolve_test_path(cfg)}


def sha256(path: Path) -> str:
    """The file's sha256, read once per version of the file (a command asks for it several times)."""
    try:
        st = os.stat(path)
        return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except OSError as e:  # not readable by this user: the data checks' one line, not a traceback
        raise DataError(f"{path}: cannot read data file: {e.strerror or e}") from None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a file rewritten is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digests(cfg: StudyConfig, keys: tuple[str, ...] = KEYS) -> dict[str, str]:
    """sha256 of the study's data files named by `keys` ({} for the synthetic task), by [data] key."""
    paths = data_paths(cfg)
    return {key: sha256(path) for key in keys if (path := paths[key]) is not None and path.is_file()}


def relocate(stored: StudyConfig, local: StudyConfig | None, digests: Mapping[str, str]) -> StudyConfig:
    """The stored config with the paths this machine has: a data file or artifact folder the study's
    creator named but this machine lacks is taken from the local study file `local`, a data file only
    when its content is the one the study was made with (its digest; without one, the caller's own
    check of the data applies)."""
    if local is None:
        return stored
    data: dict[str, Any] = {}
    mine = data_paths(local)
    for key, path in data_paths(stored).items():
        here = mine[key]
        if path is None or path.is_file() or here is None or not here.is_file():
            continue
        if key in digests and sha256(here) != digests[key]:
            continue  # another file under the same name: the stored path's error says what is missing
        data[key] = str(here.resolve())
    out = dataclasses.replace(stored, data=dataclasses.replace(stored.data, **data)) if data else stored
    artifacts, here = config_mod.resolve_artifact_dir(stored), config_mod.resolve_artifact_dir(local)
    if not artifacts.is_dir() and here.is_dir():
        out = dataclasses.replace(out, study=dataclasses.replace(out.study, artifact_dir=str(here.resolve())))
    return out


def changed(cfg: StudyConfig, local: StudyConfig | None, digests: Mapping[str, str]) -> tuple[str, Path] | None:
    """The first data file of `cfg` (the relocated config) whose content is not the one the study was
    made with, by [data] key; where `cfg`'s path does not exist, the local study file's copy, which
    `relocate` did not take because it differs."""
    here = data_paths(local) if local is not None else {}
    for key, path in data_paths(cfg).items():
        if path is None or key not in digests:
            continue
        if not path.is_file() and (copy := here.get(key)) is not None and copy.is_file():
            path = copy
        if path.is_file() and sha256(path) != digests[key]:
            return key, path
    return None
