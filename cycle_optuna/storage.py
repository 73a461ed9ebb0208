"""Storage URL -> configured Optuna storage (heartbeat, retry, SQLite timeouts), masked for printing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from cycle_optuna.config import StudyConfig, resolve_artifact_dir, study_dir
from cycle_optuna.errors import StorageError

ENV_VAR = "CYCLE_OPTUNA_STORAGE"
ARTIFACTS_ENV_VAR = "CYCLE_OPTUNA_ARTIFACT_DIR"  # overrides [study] artifact_dir (a volume shared by machines)
# A killed worker's trial is failed after GRACE_SECONDS without a beat and retried; both can be
# lowered through the environment (tests, fast-preempting clusters).
HEARTBEAT_SECONDS = int(os.environ.get("CYCLE_OPTUNA_HEARTBEAT_SECONDS", 10))
GRACE_SECONDS = int(os.environ.get("CYCLE_OPTUNA_GRACE_SECONDS", 30))
MAX_RETRY = 3  # a trial failed by a dead worker is retried this many times
SQLITE_TIMEOUT_SECONDS = 120  # SQLite writers wait this long for the lock instead of failing
WORKER_ATTR = "worker"  # user attr "host:pid" of the worker running a trial

_log = logging.getLogger(__name__)

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


def worker_id() -> str:
    """This process as "host:pid", written on the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def artifact_store(cfg: StudyConfig) -> FileSystemArtifactStore:
    """Optuna's filesystem artifact store at the study's artifact_dir (created if missing)."""
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
        grace_period=max(GRACE_SECONDS, HEARTBEAT_SECONDS + 1),
        # the retry keeps the dead trial's learning curve, so pruning and resuming agree
        heartbeat_stale_trial_callback=retry_callback(),
    ) if heartbeat else {}
    try:
        for attempt in range(5):
            try:
                storage = _Storage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False, **beat)
                if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
                    _use_wal(storage.engine)
                return storage
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together on an empty database race to create Optuna's tables
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ModuleNotFoundError as e:
        extra = " (pip install 'cycle-optuna[mysql]')" if backend in ("mysql", "mariadb") else ""
        raise StorageError(f"storage {mask(url)}: driver not installed: {e.name}{extra}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {mask(url)}: {mask(reason)}") from None


def _use_wal(engine: sqlalchemy.Engine) -> None:
    """SQLite in write-ahead-log mode: readers (the dashboard, `status`) never block the writer,
    and a commit is one append instead of a rollback journal's several syncs. WAL needs every
    process on one machine, which a SQLite study already assumes; `synchronous = NORMAL` is
    WAL's recommended pairing (a crash of the machine may lose the last commits, never the file).
    """

    def on_connect(dbapi_conn: object, record: object) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while Optuna set up its tables reconnect with the pragmas


def _journal(url: str) -> BaseStorage:
    path = url.removeprefix("journal:").removeprefix("//")
    if not path:
        raise StorageError(f"bad storage URL {url!r}: expected journal:///path/to/study.log")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Re-queues a failed trial (same params, same learning curve) as a WAITING retry."""
    return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


class _Storage(RDBStorage):
    """RDBStorage whose heartbeat survives a database restart."""

    def record_heartbeat(self, trial_id: int) -> None:
        # An exception here would end Optuna's heartbeat thread for good, and the trial would be
        # failed as stale although its worker is alive; a missed beat is harmless, so skip it.
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            _log.warning("heartbeat of trial %d skipped: %s", trial_id, mask(str(e).splitlines()[0]))


def is_connection_error(e: BaseException) -> bool:
    """True when `e`, or what it arose from, means the database went away (restart, network)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        # e.g. Optuna's trial runner fails with UnboundLocalError while handling a lost connection
        if _is_connection_error(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, optuna.exceptions.StorageInternalError):
        e = e.__cause__ or e
        if not isinstance(e, sqlalchemy.exc.SQLAlchemyError):
            return True
    if isinstance(e, sqlalchemy.exc.DBAPIError):
        return e.connection_invalidated or isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    return isinstance(e, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError))


@contextlib.contextmanager
def cap_lock(storage: BaseStorage, url: str, study_name: str) -> Iterator[sqlalchemy.Connection | None]:
    """Serialise "count the study's trials, then create one" across workers, so n_trials is exact.

    PostgreSQL: a session advisory lock; MySQL/MariaDB: GET_LOCK; SQLite and journal files: an
    flock beside the file (their workers share one machine). Held only while a trial is created.
    Yields the database connection that holds the lock (autocommit), for :func:`count_trials` and
    :func:`register_trial` to reuse, or None for a file lock.
    """
    key = f"cycle-optuna:{study_name}"
    storage = _unwrap(storage)
    if isinstance(storage, RDBStorage):
        backend = make_url(storage.url).get_backend_name()
        if backend in ("postgresql", "mysql", "mariadb"):
            if backend == "postgresql":
                number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
                lock, unlock = f"SELECT pg_advisory_lock({number})", f"SELECT pg_advisory_unlock({number})"
            else:
                name = hashlib.sha256(key.encode()).hexdigest()[:60]
                lock, unlock = f"SELECT GET_LOCK('{name}', 600)", f"SELECT RELEASE_LOCK('{name}')"
            with storage.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql(lock)
                try:
                    yield conn
                finally:
                    with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                        conn.exec_driver_sql(unlock)
            return
        path = make_url(storage.url).database
    else:
        path = url.removeprefix("journal:").removeprefix("//")
    if not path or path == ":memory:":
        yield None
        return
    import fcntl

    # "<db>-<hash>.lock": beside the file, and matched by the studies/*.db-* ignore rule
    with open(f"{path}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _connection(storage: RDBStorage, conn: sqlalchemy.Connection | None) -> Iterator[sqlalchemy.Connection]:
    """`conn` (the cap lock's, autocommit) or a new one committed on exit."""
    if conn is not None:
        yield conn
        return
    with storage.engine.begin() as new:
        yield new


def _unwrap(storage: BaseStorage) -> BaseStorage:
    # optuna.Study wraps an RDBStorage in its private caching layer
    return getattr(storage, "_backend", storage)


def count_trials(storage: BaseStorage, study: optuna.Study,
                 conn: sqlalchemy.Connection | None = None) -> tuple[int, bool] | None:
    """(trials toward the cap, whether any trial is WAITING) in one query; None where not an RDB.

    Same rule as :func:`cycle_optuna.worker.trials_counted` (every trial except failures that a
    retry's retry_history names), but reads only each trial's number, state and retry_history
    instead of building every trial. Callers must hold :func:`cap_lock` for an exact count.
    """
    storage = _unwrap(storage)
    if not isinstance(storage, RDBStorage):
        return None
    sql = sqlalchemy.text(
        "SELECT t.number, t.state, a.value_json FROM trials t LEFT OUTER JOIN trial_system_attributes a "
        "ON a.trial_id = t.trial_id AND a.key = 'retry_history' WHERE t.study_id = :sid"
    )
    with _connection(storage, conn) as c:
        rows = c.execute(sql, {"sid": study._study_id}).all()
    retried = {int(n) for _, _, history in rows if history for n in json.loads(history)}
    failed = sum(1 for number, state, _ in rows if state == "FAIL" and number in retried)
    return len(rows) - failed, any(state == "WAITING" for _, state, _ in rows)


def last_heartbeats(storage: BaseStorage, study: optuna.Study) -> dict[int, datetime]:
    """Trial number -> last heartbeat (UTC) of the study's running trials; empty without heartbeats."""
    storage = _unwrap(storage)
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return {}
    sql = sqlalchemy.text(
        "SELECT t.number, h.heartbeat FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
        "WHERE t.study_id = :sid AND t.state = 'RUNNING'"
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(sql, {"sid": study._study_id}).all()
    # SQLite hands back text; the others datetimes (naive UTC, as Optuna writes them)
    return {int(n): datetime.fromisoformat(hb) if isinstance(hb, str) else hb for n, hb in rows}


def register_trial(study: optuna.Study, trial: optuna.Trial, worker: str,
                   conn: sqlalchemy.Connection | None = None) -> None:
    """Mark a trial this worker just took: the `worker` user attr and its first heartbeat.

    On a database: one INSERT each through Optuna's own table definitions (Optuna would spend a
    session per write, each with a pre-ping and several statements), on the cap lock's connection
    when given, right after the trial exists, so a worker killed at once still leaves a trial the
    stale check finds. The beat goes first: it is what gets a dead worker's trial retried. A retry
    carries its dead worker's attr and is renamed through Optuna; journal files have no
    heartbeats and take the attr through Optuna.
    """
    backend = _unwrap(study._storage)
    if not isinstance(backend, RDBStorage):
        trial.set_user_attr(WORKER_ATTR, worker)
        return
    inherited = WORKER_ATTR in trial.user_attrs
    if inherited:
        trial.set_user_attr(WORKER_ATTR, worker)
    with _connection(backend, conn) as c:
        if backend.get_heartbeat_interval() is not None:
            c.execute(rdb_models.TrialHeartbeatModel.__table__.insert(), {"trial_id": trial._trial_id})
        if not inherited:
            c.execute(rdb_models.TrialUserAttributeModel.__table__.insert(),
                      {"trial_id": trial._trial_id, "key": WORKER_ATTR, "value_json": json.dumps(worker)})


class Heartbeat:
    """One thread per worker that beats for whichever trial the worker runs.

    Optuna's optimize starts and joins a thread per trial and beats on entry; here the first beat
    is written by :func:`register_trial`, and this thread beats every interval while a trial runs.
    """

    def __init__(self, storage: BaseStorage) -> None:
        backend = _unwrap(storage)
        self.storage = backend
        self.interval = backend.get_heartbeat_interval() if isinstance(backend, RDBStorage) else None
        self._trial_id: int | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="cycle-optuna-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat_for(self, trial_id: int | None) -> None:
        """Beat for this trial from now on (None: the worker runs no trial)."""
        self._trial_id = trial_id

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            trial_id = self._trial_id
            if trial_id is None:
                continue
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception as e:  # a missed beat is harmless; a dead thread would fail the trial
                _log.warning("heartbeat of trial %d skipped: %s", trial_id, mask(str(e).splitlines()[0]))
