"""Storage URL -> configured Optuna storage (heartbeat, retry, SQLite timeouts), masked for printing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from cycle_optuna.config import StudyConfig, resolve_artifact_dir, study_dir
from cycle_optuna.errors import StorageError

ENV_VAR = "CYCLE_OPTUNA_STORAGE"
HEARTBEAT_SECONDS = 10  # a killed worker's trial is failed after GRACE_SECONDS without a beat
GRACE_SECONDS = 30
MAX_RETRY = 3  # a trial failed by a dead worker is retried this many times
SQLITE_TIMEOUT_SECONDS = 120  # SQLite writers wait this long for the lock instead of failing

_PASSWORD = re.compile(r"(?P<head>[a-z0-9+]+://[^:/@]*:)(?P<pw>[^@]*)(?P<tail>@)", re.IGNORECASE)


def mask(text: str) -> str:
    """`text` with any password inside a URL replaced by ***."""
    return _PASSWORD.sub(lambda m: m["head"] + "***" + m["tail"], text)


def resolve_url(cfg: StudyConfig, flag: str | None = None) -> str:
    """Storage URL by precedence: flag > $CYCLE_OPTUNA_STORAGE > study file > local SQLite."""
    for url in (flag, os.environ.get(ENV_VAR), cfg.study.storage):
        if url:
            return url
    return f"sqlite:///{study_dir(cfg) / (cfg.study.name + '.db')}"


def artifact_store(cfg: StudyConfig) -> FileSystemArtifactStore:
    """Optuna's filesystem artifact store at :func:`artifact_dir` (created if missing)."""
    path = resolve_artifact_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def open_storage(url: str, *, heartbeat: bool = True) -> BaseStorage:
    """An Optuna storage for `url`; one clear StorageError (password masked) when it cannot be used."""
    if url.startswith("journal:"):
        return _journal(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise StorageError(
            f"bad storage URL {mask(url)!r}: expected e.g. sqlite:///studies/x.db, "
            "postgresql+psycopg://user:pass@host/db, mysql+pymysql://..., or journal:///path/x.log"
        ) from None
    engine_kwargs: dict = {}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    elif backend in ("postgresql", "mysql", "mariadb"):
        # pre-ping + recycle let workers survive a database restart; a worker needs few connections
        engine_kwargs.update(pool_pre_ping=True, pool_size=2, max_overflow=2, pool_recycle=300)
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    beat = dict(
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRY),
    ) if heartbeat else {}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False, **beat)
    except ModuleNotFoundError as e:
        extra = " (pip install 'cycle-optuna[mysql]')" if backend in ("mysql", "mariadb") else ""
        raise StorageError(f"storage {mask(url)}: driver not installed: {e.name}{extra}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {mask(url)}: {mask(reason)}") from None


def _journal(url: str) -> BaseStorage:
    path = url.removeprefix("journal:").removeprefix("//")
    if not path:
        raise StorageError(f"bad storage URL {url!r}: expected journal:///path/to/study.log")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(path))
