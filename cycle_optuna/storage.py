"""Storage URL -> configured Optuna storage (heartbeat, retry, SQLite timeouts), masked for printing."""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import json
import logging
import glob
import os
import re
import shutil
import socket
import sqlite3
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
import sqlalchemy.pool
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from cycle_optuna import optuna_internals as internals
from cycle_optuna.config import StudyConfig, resolve_artifact_dir, sqlite_host_problem, study_dir
from cycle_optuna.errors import ConfigError, StorageError
from cycle_optuna.redact import mask, remember

_T = TypeVar("_T")

ENV_VAR = "CYCLE_OPTUNA_STORAGE"
ARTIFACTS_ENV_VAR = "CYCLE_OPTUNA_ARTIFACT_DIR"  # overrides [study] artifact_dir (a volume shared by machines)
# A killed worker's trial is failed after GRACE_SECONDS without a beat and retried; both can be
# lowered through the environment (tests, fast-preempting clusters).
# A bad value falls back to the default here, so importing never fails; `check_environment`, which
# the CLI calls first, refuses it in one line.
ENV_WHOLE_NUMBERS = {  # variable: (default, least allowed, most allowed)
    "CYCLE_OPTUNA_HEARTBEAT_SECONDS": (10, 1, 86_400),  # beyond a day the beat thread's wait overflows in time
    "CYCLE_OPTUNA_GRACE_SECONDS": (30, 1, 7 * 86_400),
    # intra-op threads `run --workers K` gives its children; 0 = cores // workers; more than the cores only slows
    "CYCLE_OPTUNA_THREADS": (0, 0, os.cpu_count() or 1),
    # a PostgreSQL server gone without a word (host down, network cut): the worker calls the database
    # lost after this long, not when TCP gives up (unanswered writes: about 15 minutes; idle: 2 hours)
    "CYCLE_OPTUNA_PG_TIMEOUT_SECONDS": (60, 3, 3_600),
}


def _env_value(name: str) -> int | None:
    """The variable as a whole number in range; None when unset or not one."""
    raw = os.environ.get(name, "").strip()
    _, least, most = ENV_WHOLE_NUMBERS[name]
    return int(raw) if raw.isascii() and raw.isdigit() and least <= int(raw) <= most else None


def env_whole_number(name: str) -> int:
    """The variable's value; its default when unset or not a whole number in range."""
    value = _env_value(name)
    return ENV_WHOLE_NUMBERS[name][0] if value is None else value


def check_environment() -> None:
    """Every CYCLE_OPTUNA_* whole-number variable that is set holds one in range."""
    for name, (_, least, most) in ENV_WHOLE_NUMBERS.items():
        if name in os.environ and _env_value(name) is None:
            raise ConfigError(f"${name}: {os.environ[name]!r} is not a whole number from {least} to {most}")
    if ARTIFACTS_ENV_VAR in os.environ and os.environ[ARTIFACTS_ENV_VAR] and not os.environ[ARTIFACTS_ENV_VAR].strip():
        raise ConfigError(f"${ARTIFACTS_ENV_VAR}: {os.environ[ARTIFACTS_ENV_VAR]!r} is blank; unset it to use the "
                          "study file's artifact_dir, or give a folder")


HEARTBEAT_SECONDS = env_whole_number("CYCLE_OPTUNA_HEARTBEAT_SECONDS")
GRACE_SECONDS = env_whole_number("CYCLE_OPTUNA_GRACE_SECONDS")


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial's worker counts as lost (at least one beat)."""
    return max(GRACE_SECONDS, HEARTBEAT_SECONDS + 1)
MAX_RETRY = 3  # a trial failed by a dead worker is retried this many times
SQLITE_TIMEOUT_SECONDS = 120  # SQLite writers wait this long for the lock instead of failing
WORKER_ATTR = "worker"  # user attr "host:pid" of the worker running a trial
# user attr beside it: when that process started ("<boot id>:<clock ticks since boot>", None off
# Linux), which tells a dead worker from a later process given its pid (a restarted container)
WORKER_START_ATTR = "worker_start"
# journal files: the lock file a worker holds while it lives, beside the journal (see local_alive)
WORKER_LOCK_ATTR = "worker_lock"
DEVICE_ATTR = "device"  # user attr beside it: "cpu" or "gpu <id>"
FAIL_CAUSE_ATTR = "fail_cause"  # user attr on a failed trial: why it failed, in one line
RESUMED_ATTR = "resumed_from"  # user attr on a retry that resumed a checkpoint: "trial N epoch E"
LOST_CAUSE = "worker lost"  # how fail_cause starts on a trial failed because its worker was gone
ORPHAN_SECONDS = 60.0  # a journal file's running trial still without a worker attr this long after it began: lost
# drivers SQLAlchemy may ask for that this package does not install: what to install instead
_DRIVER_HINTS = {
    "psycopg2": "pip install psycopg2-binary, or use postgresql+psycopg:// (installed)",
    "pymysql": "pip install 'cycle-optuna[mysql]'",
    "mysqldb": "pip install mysqlclient, or use mysql+pymysql:// (pip install 'cycle-optuna[mysql]')",
    "asyncpg": "use postgresql+psycopg:// (installed); workers need a synchronous driver",
    "pg8000": "pip install pg8000, or use postgresql+psycopg:// (installed)",
}

_log = logging.getLogger(__name__)

__all__ = ["mask"]  # re-exported: callers mask through this module


def resolve_url(cfg: StudyConfig, flag: str | None = None) -> str:
    """Storage URL by precedence: flag > $CYCLE_OPTUNA_STORAGE > study file > local SQLite."""
    # the study file's URL is resolved only when it is the one used: a flag overrides it untouched
    url = flag or os.environ.get(ENV_VAR) or _beside_study(cfg, cfg.study.storage)
    if url:
        remember(url)
        check_url(url)  # before any path is taken from it
        return url
    return default_url(cfg)


def _sqlite_url(url: str | None):
    """The parsed URL when it names SQLite through any driver (`sqlite://`, `sqlite+pysqlite://`), else None."""
    if not url:
        return None
    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: the storage check names it
        return None
    return parsed if parsed.get_backend_name() == "sqlite" else None


def in_memory(url: str) -> bool:
    """Whether a SQLite URL names no file (`sqlite://`, `sqlite:///:memory:`, a `file:` URI in memory
    mode such as `sqlite:///file:db?mode=memory&cache=shared&uri=true`): gone with its process."""
    parsed = _sqlite_url(url)
    if parsed is None:
        return False
    database = parsed.database or ":memory:"
    if database == ":memory:":
        return True
    return database.startswith("file:") and (
        database.removeprefix("file:").startswith(":memory:") or parsed.query.get("mode") == "memory"
    )


def _beside_study(cfg: StudyConfig, url: str | None) -> str | None:
    """A study file's SQLite or journal URL with a relative path, taken from the study file's
    folder (as `[data] source` and the default database are): a worker started from another
    directory must find the same database, not create an empty one. A flag's or the environment's
    URL stays relative to the current directory, as a path typed in a shell is."""
    if (parsed := _sqlite_url(url)) is not None:
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:") and not Path(path).is_absolute():
            beside = _moved_from_here(url, study_dir(cfg) / path, Path(path))
            _, sep, query = url.partition("?")  # the options as written, not re-encoded
            return f"{parsed.drivername}:///{beside}{sep}{query}"
    elif url and url.startswith("journal:"):
        path = url.removeprefix("journal:").removeprefix("//")
        if path and not Path(path).is_absolute():
            return f"journal://{_moved_from_here(url, study_dir(cfg) / path, Path(path))}"
    return url


def _moved_from_here(url: str, beside: Path, here: Path) -> Path:
    """`beside`, unless only `here` (where releases before this one put the file: the current
    directory) holds it: then a worker would start the study over, so that is one line instead."""
    if not beside.exists() and here.exists() and beside.resolve() != here.resolve():
        raise StorageError(f"[study] storage {mask(url)}: a relative path is taken from the study file's folder, "
                           f"where {beside} does not exist; {here} in the current directory does: move it "
                           "beside the study file or give an absolute path")
    return beside


def default_url(cfg: StudyConfig) -> str:
    """The embedded default: a SQLite file named after the study, beside the study file."""
    return f"sqlite:///{study_dir(cfg) / (cfg.study.name + '.db')}"


def worker_id() -> str:
    """This process as "host:pid", written on the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class DurableArtifactStore(FileSystemArtifactStore):
    """Optuna's filesystem artifact store, but a file appears whole or not at all.

    Each write goes to a temporary name, is flushed to disk and renamed over the final name, so a
    kill, a full disk or a power cut never leaves a truncated or empty artifact (a failed write
    removes its temporary file and raises). Readers see the same files as Optuna's own store.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(content_body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(path.parent)

    def remove_all(self, artifact_id: str) -> bool:
        """Remove an artifact and any temporary file a killed writer left for it; whether there was any."""
        path = self._get_filepath(artifact_id)
        removed = False
        for p in (path, *path.parent.glob(f"{glob.escape(path.name)}.tmp-*")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
                removed = True
        return removed


def _fsync_dir(path: Path) -> None:
    # the rename itself is durable only once the directory is synced
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def artifact_store(cfg: StudyConfig) -> DurableArtifactStore:
    """The study's artifact store at its artifact_dir (created if missing)."""
    path = resolve_artifact_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return DurableArtifactStore(path)


def describe(e: BaseException) -> str:
    """One masked line for a storage error: the database's own reason, not Optuna's wrapper text."""
    while isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__  # Optuna's text guesses "e.g. exceeding max length" for any failed commit
    reason = str(getattr(e, "orig", None) or e).strip()
    return mask(reason.splitlines()[0] if reason else type(e).__name__)


@contextlib.contextmanager
def named_errors(url: str) -> Iterator[None]:
    """Optuna's calls on the storage, whose failure is one StorageError naming the storage and the
    real reason: Optuna's own text blames "invalid data, e.g. exceeding max length" for any failed
    commit, a full disk and a lock held by another process included."""
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise StorageError(f"storage {mask(url)}: {_reason(e)}") from None
    except OSError as e:  # a journal file's append; reading the data or the artifacts never fills a disk
        if file_path(url) is None or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageError(f"storage {mask(url)}: {e.strerror}") from None


def _reason(e: BaseException) -> str:
    reason = describe(e)
    if "database is locked" in reason:  # SQLite's whole text, after a wait that said nothing
        # not "for 120s": SQLite also says it at once (a read transaction that cannot become a write)
        reason += f" (another process holds its write lock; a writer waits up to {SQLITE_TIMEOUT_SECONDS}s for it)"
    return reason


def note_if_locked(url: str, say: Callable[[str], None]) -> None:
    """For a SQLite file whose write lock another process holds (an open `BEGIN EXCLUSIVE`, a long
    write): say so once, as writers then wait for it silently for up to SQLITE_TIMEOUT_SECONDS.
    Workers' own commits take milliseconds, so a lock still held after a second is worth a line."""
    path = sqlite_path(url)
    if path is None or not path.is_file():
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=1.0, isolation_level=None)
    except sqlite3.Error:
        return  # opening it for real names the trouble
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.Error as e:  # any other trouble: opening it for real names it
        if "locked" in str(e):
            say(f"waiting up to {SQLITE_TIMEOUT_SECONDS}s for {path}: another process holds its write lock")
    finally:
        conn.close()


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:// URL (None for other URLs and in-memory databases)."""
    parsed = _sqlite_url(url)
    database = parsed.database if parsed is not None else None
    return Path(database) if database and database != ":memory:" and not database.startswith("file:") else None


def file_path(url: str) -> Path | None:
    """The file of a SQLite or journal URL (None for a server or an in-memory database)."""
    if url.startswith("journal:"):
        path = url.removeprefix("journal:").removeprefix("//")
        return Path(path) if path else None
    return sqlite_path(url)


def check_file_location(url: str, path: Path, *, create: bool) -> None:
    """A study file's database or journal: its directory must exist (and be writable to create
    or write it); a reader needs the file itself. Nothing is created here."""
    if not create:
        if not path.is_file():
            raise StorageError(f"storage {mask(url)}: no study database at {path} (nothing has run on it yet)")
        return
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise StorageError(f"storage {mask(url)}: {parent} is a file, not a directory")
        raise StorageError(f"storage {mask(url)}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StorageError(f"cannot write {path}: read-only (check its permissions and mount)")


def check_url(url: str) -> None:
    """Refuse a database URL the driver would misread: an unencoded '@' in its user name or password
    (split at the first '@', the rest of the password taken for the host, and printed), or a SQLite
    URL with a host (`sqlite://studies/x.db` opens x.db in the current directory), or a journal URL
    with '?key=value' options (they would become part of the file's name, a password with them)."""
    if url.startswith("journal:") and re.search(r"\?[^/]*=", url):
        raise StorageError(f"bad storage URL {mask(url)!r}: a journal URL is a file path only, without '?key=value' "
                           "options; expected journal:///path/to/study.log")
    if "://" not in url:
        return
    authority = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if authority.count("@") > 1:
        raise StorageError("bad storage URL: its user name or password holds an '@'; write it as %40 "
                           "(the URL is not shown: it holds a password)")
    if problem := sqlite_host_problem(url):
        raise StorageError(f"bad storage URL {mask(url)!r}: {problem}")


def open_storage(url: str, *, heartbeat: bool = True, create: bool = True, versions: bool = False) -> BaseStorage:
    """An Optuna storage for `url`; one clear StorageError (password masked) when it cannot be used.

    `create=False` (read-only commands) never creates a file: a missing SQLite or journal file is
    an error. A missing directory is always an error, never created. `versions` keeps Optuna's
    schema-version bookkeeping on such a read-only open (it only reads a database that has it):
    optuna-dashboard asks for the schema version.
    """
    check_url(url)
    if url.startswith("journal:"):
        return _journal(url, create=create)
    try:
        parsed = make_url(url)
        parsed.get_dialect()  # the dialect's module only: the driver is imported when the engine starts
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        what = ""
        if isinstance(e, sqlalchemy.exc.NoSuchModuleError):  # a scheme or driver SQLAlchemy does not know
            backend, plus, driver = parsed.drivername.partition("+")
            what = f"unknown database driver {driver!r} for {backend}; " if plus else f"unknown storage scheme {backend!r}; "
        raise StorageError(
            f"bad storage URL {mask(url)!r}: {what}expected e.g. sqlite:///studies/x.db, "
            "postgresql+psycopg://user:pass@host/db, mysql+pymysql://..., or journal:///path/x.log"
        ) from None
    engine_kwargs: dict = {}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            check_file_location(url, path, create=create)
            if path.is_file():
                _check_sqlite_schema(url, path)
            elif create:
                _create_sqlite(url, parsed, path)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
        if path is not None and not create and not os.access(path.parent, os.W_OK):
            engine_kwargs["creator"] = _read_only_sqlite(path)
    elif backend in ("postgresql", "mysql", "mariadb"):
        # pre-ping + recycle let workers survive a database restart; a worker needs few connections
        engine_kwargs.update(pool_pre_ping=True, pool_size=2, max_overflow=2, pool_recycle=300)
        engine_kwargs["connect_args"] = {"connect_timeout": 10, **_read_timeouts(parsed)}
    with warnings.catch_warnings():  # Optuna calls heartbeats experimental: this package's choice, not the caller's
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open_rdb(url, parsed, backend, engine_kwargs, heartbeat=heartbeat, create=create, versions=versions)


def _open_rdb(url: str, parsed, backend: str, engine_kwargs: dict, *, heartbeat: bool, create: bool,
              versions: bool) -> BaseStorage:
    beat = dict(
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=grace_period(),
        # the retry keeps the dead trial's learning curve, so pruning and resuming agree
        heartbeat_stale_trial_callback=retry_callback(),
    ) if heartbeat else {}
    try:
        for attempt in range(5):
            try:
                # read-only commands skip creating tables and Optuna's schema-version bookkeeping
                # (alembic: a third of `status`'s start-up); a worker that writes does both
                storage = internals.open_rdb(
                    lambda: _Storage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=not create,
                                     skip_table_creation=not create, **beat),
                    read_only=not create and not versions)
                if not create:
                    # nothing above connected to the server or read the file: fail here, as "cannot
                    # open", not at the first read; a database without Optuna's tables holds no study
                    with storage.engine.connect() as conn:
                        if not internals.has_tables(conn):
                            raise StorageError(f"storage {mask(url)} holds no studies "
                                               "(no Optuna tables in it: nothing has run on it yet)")
                elif backend == "sqlite" and parsed.database and parsed.database != ":memory:":
                    # a writer's switch only: the pragma writes the file, and WAL persists in it for readers
                    _use_wal(storage.engine)
                elif backend == "postgresql":
                    # writers only (they take the study's lock); a reader's start-up keeps its connection
                    _server_keepalives(storage.engine)
                return storage
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together on an empty database race to create Optuna's tables
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ImportError:  # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError
        driver = parsed.get_driver_name()
        hint = _DRIVER_HINTS.get(driver, f"pip install {driver}")
        raise StorageError(f"storage {mask(url)}: database driver {driver!r} is not installed ({hint})") from None
    except TypeError as e:
        if (option := _unknown_option(e)) is None or option not in parsed.query:
            raise
        raise StorageError(f"cannot open storage {mask(url)}: the driver has no connection option {option!r} "
                           "(from the URL's query string)") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        reason = _reason(e)
        if "readonly database" in reason or "read-only" in reason:
            raise StorageError(f"cannot write {sqlite_path(url) or mask(url)}: read-only ({reason})") from None
        raise StorageError(f"cannot open storage {mask(url)}: {reason}") from None


def _unknown_option(e: TypeError) -> str | None:
    """The option a driver's connect() refused (pymysql: "got an unexpected keyword argument 'x'"), else None."""
    m = re.search(r"unexpected keyword argument '([^']*)'", str(e))
    return m[1] if m else None


NEW_SQLITE_PREFIX = ".cycle-optuna-new-"  # a SQLite database being made, beside its place (a hidden file)
NEW_SQLITE_STALE_S = 3600  # one older than this was left by a creator that died: removed


def _create_sqlite(url: str, parsed: sqlalchemy.URL, path: Path) -> None:
    """A new SQLite study database, made whole beside its place and then linked in: SQLite creates
    Optuna's tables one commit at a time, and a worker killed among them (kill -9, Ctrl-C, a closed
    terminal in its first second) left a file of some tables that no command could open again.
    Workers starting together each make their own under a random name (containers sharing the
    folder may all be PID 1); the first link wins, the others use it. One clear StorageError."""
    now = time.time()
    for old in path.parent.glob(f"{NEW_SQLITE_PREFIX}*"):  # what creators that died left, once surely stale
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > NEW_SQLITE_STALE_S:
                old.unlink()
    tmp = path.with_name(f"{NEW_SQLITE_PREFIX}{os.urandom(8).hex()}.db")
    try:
        made = RDBStorage(parsed.set(database=str(tmp)).render_as_string(hide_password=False),
                          engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}})
        made.engine.dispose()
        pause_for_tests("sqlite made")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another worker's is in place: use it
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            if not path.exists():  # a file system without hard links: moved in whole (two creators at
                os.replace(tmp, path)  # the same instant there: the later one's empty database wins)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as e:
        raise StorageError(f"cannot create {path}: {_reason(e) if not isinstance(e, OSError) else e.strerror}") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _check_sqlite_schema(url: str, path: Path) -> None:
    """A SQLite file with some of Optuna's tables but not all: a first start cut off among them
    (before this release made it whole first). One line, not the commit error Optuna raises."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_SECONDS)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # Optuna writes its version once every table is made: an older Optuna's complete
            # database (fewer tables; `optuna storage upgrade` updates it) has it
            versioned = "version_info" in names and con.execute("SELECT COUNT(*) FROM version_info").fetchone()[0] > 0
        finally:
            con.close()
    except sqlite3.Error:
        return  # not a database, locked, ...: opening it says so
    if not versioned and (missing := internals.missing_tables(names)):
        if len(missing) < len(internals.table_names()):
            raise StorageError(f"storage {mask(url)}: {path} holds only part of Optuna's tables (missing: "
                               f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): its first start "
                               "was cut off before it held a study; delete the file and run again")


def _read_only_sqlite(path: Path) -> Callable[[], sqlite3.Connection]:
    """Connections for a reader of a SQLite file in a directory it cannot write (read-only media or
    mount): in WAL mode SQLite must create `-shm` beside the file even to read ("unable to open
    database file"). With a `-wal` beside it (writers have it open elsewhere) the file is read
    read-only through their files; without one (the last writer folded the log into the file) it
    is opened immutable, which needs no file beside it."""
    wal = path.with_name(f"{path.name}-wal").exists()
    uri = f"{path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    return functools.partial(sqlite3.connect, uri, uri=True, timeout=SQLITE_TIMEOUT_SECONDS, check_same_thread=False)


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


def _server_keepalives(engine: sqlalchemy.Engine) -> None:
    """The server's side of a worker gone without a word: its session, and the study's lock if it
    held it (`cap_lock`), stayed until the server's TCP gave up (2 hours by default), every other
    worker waiting at the lock meanwhile. Each session asks the server to probe this end as this end
    probes it ($CYCLE_OPTUNA_PG_TIMEOUT_SECONDS). A SET, not libpq's `options` (a pooler such as
    PgBouncer refuses that start-up parameter); a server that knows no such setting is left as it is."""
    limit, idle, interval, count = _keepalive_timing()
    keepalives = {"tcp_keepalives_idle": idle, "tcp_keepalives_interval": interval, "tcp_keepalives_count": count}
    # and for what the server sent that the worker never acknowledged (a reply in flight at the cut;
    # PostgreSQL 12 and later)
    unacknowledged = {"tcp_user_timeout": limit * 1000}

    def on_connect(dbapi_conn: Any, record: object) -> None:
        cursor = dbapi_conn.cursor()
        try:
            # one round trip (and the commit's) for the lot on a server that knows every setting
            for settings in ({**keepalives, **unacknowledged}, keepalives):
                try:
                    cursor.execute("SELECT " + ", ".join(f"set_config('{k}', '{int(v)}', false)" for k, v in settings.items()))
                    dbapi_conn.commit()  # a session setting made in a transaction that is rolled back is undone
                    break
                except Exception:  # noqa: BLE001 - a server (older, or PostgreSQL-like) without these settings
                    dbapi_conn.rollback()
        finally:
            cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while Optuna set up its tables reconnect with the settings


def _journal(url: str, *, create: bool) -> BaseStorage:
    path = url.removeprefix("journal:").removeprefix("//")
    if not path:
        raise StorageError(f"bad storage URL {mask(url)!r}: expected journal:///path/to/study.log")
    check_file_location(url, Path(path), create=create)
    _check_journal_tail(Path(path))
    try:
        return JournalStorage(JournalFileBackend(path, _TornTailCuttingLock(path)))  # reads the whole file
    except OSError as e:
        raise StorageError(f"cannot open storage {mask(url)}: {e.strerror or e}") from None
    except ValueError:  # a line that is not UTF-8 JSON, or not ended by a newline
        raise StorageError(f"{path}: not a journal file (a line is not JSON)") from None
    except (KeyError, TypeError, AssertionError):  # Optuna asserts on an operation it does not know
        raise StorageError(f"{path}: not a journal file (a line is not an Optuna journal operation)") from None


JOURNAL_TAIL_BYTES = 1 << 20  # enough for the last records of any journal


def _check_journal_tail(path: Path) -> None:
    """The end of an existing journal file looks like records, before a worker appends to it.
    Optuna's reader parses every line itself but forgives a bad last one (a torn write), so a file
    of some other kind was opened, written to and broken for good. Only the end is read: a last
    line without its newline that starts like a record is left alone here (another worker may be
    writing it); the next append cuts it off if it is a dead one (:class:`_TornTailCuttingLock`)."""
    try:
        with path.open("rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - JOURNAL_TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return  # missing (a new journal) or unreadable: opening it says which
    body, newline, tail = data.rpartition(b"\n")
    earlier, _, last = body.rpartition(b"\n")
    whole = bool(newline) and (start == 0 or bool(earlier))  # `last` is a whole line, not a cut one
    if (tail and not tail.startswith(b"{")) or (whole and not _is_record(last)):
        raise StorageError(f"{path}: not a journal file (its last line is not an Optuna journal record)")


class _TornTailCuttingLock(JournalFileSymlinkLock):
    """Optuna's own journal lock (the one its appends take by default), which on acquiring cuts
    off a torn last record: one a full disk cut short ends without its newline, and the next
    append would glue itself to it into a corrupt line that breaks the journal for good. Readers
    skip such a line; under the lock no writer is part-way through one, so it is a dead write."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._journal = Path(path)

    def acquire(self) -> bool:
        acquired = super().acquire()
        try:
            _cut_torn_tail(self._journal)
        except BaseException:
            self.release()
            raise
        return acquired


def _cut_torn_tail(path: Path) -> None:
    # read-only first: an append-only file (chattr +a) can be appended to, as Optuna does, but not
    # opened for writing in place, which only a torn record needs
    end = keep = 0
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        end = keep = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return  # the common case: one byte read per append
        while keep > 0:  # back to just after the last newline (the start of the file if none)
            start = max(0, keep - 65536)
            f.seek(start)
            cut = f.read(keep - start).rfind(b"\n")
            keep = start + cut + 1 if cut >= 0 else start
            if cut >= 0:
                break
    if keep == end:
        return
    _log.warning("%s: cut off a torn last record of %d bytes (a write cut short, e.g. by a full disk)",
                 path, end - keep)
    with path.open("r+b") as f:
        f.truncate(keep)
        os.fsync(f.fileno())


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Re-queues a failed trial (same params, same learning curve) as a WAITING retry."""
    with warnings.catch_warnings():  # the package's choice, as the heartbeat's: Optuna's notice is noise to a caller
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


class _Storage(RDBStorage):
    """RDBStorage whose heartbeat survives a database restart."""

    def record_heartbeat(self, trial_id: int) -> None:
        # An exception here would end Optuna's heartbeat thread for good, and the trial would be
        # failed as stale although its worker is alive; a missed beat is harmless, so skip it.
        try:
            super().record_heartbeat(trial_id)
            self._beat_failing = False
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if not getattr(self, "_beat_failing", False):  # one line per outage, not one per beat
                _log.warning("heartbeat of the trial with storage id %d skipped: %s", trial_id, describe(e))
            self._beat_failing = True


def error_chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and what it arose from (cause, else context), each once."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        yield e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def is_connection_error(e: BaseException) -> bool:
    """True when `e`, or what it arose from, means the database went away (restart, network)."""
    # e.g. Optuna's trial runner fails with UnboundLocalError while handling a lost connection
    return any(_is_connection_error(link) for link in error_chain(e))


def lost_server(e: BaseException) -> BaseException | None:
    """The link of `e`'s chain that says a database server stopped answering (restart, network),
    else None. Not SQLite's: its OperationalError is any fault of the file (a schema, a full disk)."""
    for link in error_chain(e):
        if isinstance(link, sqlalchemy.exc.DBAPIError):
            if type(getattr(link, "orig", None)).__module__.startswith("sqlite3"):
                return None
            if _is_connection_error(link):
                return link
        elif isinstance(link, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)):
            return link
    return None


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, optuna.exceptions.StorageInternalError):
        e = e.__cause__ or e
        if not isinstance(e, sqlalchemy.exc.SQLAlchemyError):
            return True
    if isinstance(e, sqlalchemy.exc.DBAPIError):
        return e.connection_invalidated or isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    return isinstance(e, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError))


_NOT_TRANSIENT = ("authentication", "password", "does not exist", "unknown database", "access denied")


def wait_until_answers(url: str, seconds: float, say: Callable[[str], None]) -> bool:
    """For a database server: poll until it accepts a connection, for up to `seconds`.

    For workers launched while the server restarts or is still coming up. It only waits on
    "not answering" (refused, reset, starting up); a wrong password, a missing database or a
    missing driver return at once, and so does the time running out: opening the storage next
    reports what is wrong as usual. File storages return at once.
    True when it waited and the server then answered (what failed meanwhile is worth trying again).
    """
    if seconds <= 0 or url.startswith(("sqlite", "journal:")):
        return False
    check_url(url)
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        args = {"connect_timeout": 5, **_read_timeouts(parsed, 5)} if backend in ("postgresql", "mysql", "mariadb") else {}
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=args)
    except (sqlalchemy.exc.ArgumentError, ValueError, ImportError):
        return False
    deadline, said, pause = time.monotonic() + seconds, False, 0.25
    try:
        while True:
            try:
                with engine.connect():
                    pass
            except TypeError as e:  # an option the driver does not know: opening the storage says which
                if (option := _unknown_option(e)) is None or option not in parsed.query:
                    raise
                return False
            except sqlalchemy.exc.SQLAlchemyError as e:
                reason = describe(e)
                if not is_connection_error(e) or any(w in reason.lower() for w in _NOT_TRANSIENT):
                    return False
                if time.monotonic() >= deadline:
                    return False
                if not said:
                    say(f"waiting up to {seconds:.0f}s for the database at {mask(url)}: {reason}")
                    said = True
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 2.0)
                continue
            if said:
                say(f"the database at {mask(url)} answers")
            return said
    finally:
        engine.dispose()


class StorageWait:
    """`--wait-for-storage SECONDS`: one allowance of waiting for a database server that does not
    answer, spent across a command's start-up: the wait before the storage is first opened, an
    outage while the storage or the study is opened after it, and what `run --workers K` hands its
    workers. Only the time spent waiting counts."""

    def __init__(self, url: str, seconds: float, say: Callable[[str], None]) -> None:
        self.url, self.left, self.say = url, max(0.0, float(seconds)), say

    def until_answers(self) -> bool:
        """:func:`wait_until_answers` with what is left of the allowance; True when it waited and
        the server then answered."""
        start = time.monotonic()
        try:
            return wait_until_answers(self.url, self.left, self.say)
        finally:
            self.left = max(0.0, self.left - (time.monotonic() - start))

    def call(self, fn: Callable[[], _T]) -> _T:
        """`fn()`; when it fails on the storage while the server does not answer, wait for the
        server (within what is left) and call it again. Any other failure, or the time running
        out, is raised as it came."""
        while True:
            try:
                return fn()
            except (StorageError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
                if self.left <= 0 or not self.until_answers():
                    raise


MYSQL_LOCK_WAIT_S = 30  # one GET_LOCK call's wait; cap_lock calls it again until it holds the lock
# The lock's session closes when it sends nothing for this long while it holds the lock (its
# wait_timeout): the server cannot tell a worker whose host vanished from an idle one, and its own
# limit, 8 hours by default, would keep every other worker of the study waiting. The holder's work
# under the lock (count, ask, register) takes well under a second; a holder silent this long (paused,
# cut off) gives the lock up, and on waking finds its session gone: a lost database, ridden out. (The
# reference baselines, scored once per study under the lock, may take longer on a large data set:
# a worker starting meanwhile may then score them too, to the same values.)
MYSQL_LOCK_IDLE_S = 120
MYSQL_READ_TIMEOUT_S = 60  # a MySQL server that takes a connection and never answers: a lost database, not a hang


def _read_timeouts(parsed: sqlalchemy.URL, seconds: float | None = None) -> dict:
    """pymysql and mysqlclient wait forever on a server that accepted the connection and says nothing
    (connect_timeout covers the TCP connect only): bound each read and write. Longer than a GET_LOCK
    wait. PostgreSQL's connect_timeout covers its whole start-up; after it, libpq waits on a server
    that vanished (host down, network cut) until the kernel gives up: TCP keepalives bound an idle
    wait (a query blocked on a lock included: a live server's kernel answers the probes) and
    tcp_user_timeout a write left unacknowledged. The URL's own settings of these win."""
    if parsed.get_backend_name() in ("mysql", "mariadb") and parsed.get_driver_name() in ("pymysql", "mysqldb"):
        seconds = MYSQL_READ_TIMEOUT_S if seconds is None else seconds
        return {"read_timeout": seconds, "write_timeout": seconds}
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        limit, idle, interval, count = _keepalive_timing()
        libpq = {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": interval, "keepalives_count": count}
        if _libpq_version(parsed.get_driver_name()) >= 120000:  # an older libpq refuses the option
            libpq["tcp_user_timeout"] = limit * 1000
        return {k: v for k, v in libpq.items() if k not in parsed.query}
    return {}


def _keepalive_timing() -> tuple[int, int, int, int]:
    """$CYCLE_OPTUNA_PG_TIMEOUT_SECONDS, and the TCP keepalives that call a silent peer gone by then
    (seconds idle before the first probe, seconds between probes, probes): three unanswered probes
    after about half the limit idle."""
    limit = env_whole_number("CYCLE_OPTUNA_PG_TIMEOUT_SECONDS")
    interval = max(1, limit // 6)
    return limit, max(1, limit - 3 * interval), interval, 3


def _libpq_version(driver: str) -> int:
    """The libpq the driver runs on (e.g. 180006), 0 when it cannot tell."""
    try:
        if driver == "psycopg":
            import psycopg

            return psycopg.pq.version()
        import psycopg2

        return psycopg2.__libpq_version__
    except (ImportError, AttributeError):
        return 0


@contextlib.contextmanager
def cap_lock(storage: BaseStorage, url: str, study_name: str) -> Iterator[sqlalchemy.Connection | None]:
    """Serialise "count the study's trials, then create one" across workers, so n_trials is exact.

    PostgreSQL: a session advisory lock; MySQL/MariaDB: GET_LOCK, its session closed by the server
    after MYSQL_LOCK_IDLE_S silent; SQLite and journal files: an flock beside the file (their
    workers share one machine). Held only while a trial is created or
    a lost trial is failed and its retry queued (stale checks, hand-backs).
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
            else:  # GET_LOCK's names are the server's, not one database's: the database is part of it
                name = hashlib.sha256(f"{key}@{make_url(storage.url).database}".encode()).hexdigest()[:60]
                lock, unlock = f"SELECT GET_LOCK('{name}', {MYSQL_LOCK_WAIT_S})", f"SELECT RELEASE_LOCK('{name}')"
            with storage.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                try:
                    after = []
                    if backend != "postgresql":  # the session's own idle limit while it holds the lock, put back after
                        conn.exec_driver_sql("SET @cycle_optuna_wait_timeout = @@SESSION.wait_timeout, "
                                             f"SESSION wait_timeout = {int(MYSQL_LOCK_IDLE_S)}")
                        after.append("SET SESSION wait_timeout = @cycle_optuna_wait_timeout")
                    got = conn.exec_driver_sql(lock).scalar()
                    # GET_LOCK gives up after its wait with 0 (and NULL on an error); pg_advisory_lock
                    # only returns once it holds the lock. Wait as long as PostgreSQL would.
                    while backend != "postgresql" and got != 1:
                        if got is None:
                            raise sqlalchemy.exc.OperationalError(lock, None, Exception("GET_LOCK returned NULL"))
                        got = conn.exec_driver_sql(lock).scalar()
                    yield conn
                    with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                        # a session the server closed meanwhile (MYSQL_LOCK_IDLE_S) holds nothing: both fail,
                        # and SQLAlchemy drops the connection from the pool
                        for statement in (unlock, *after):
                            conn.exec_driver_sql(statement)
                except BaseException:
                    # cut off anywhere (a signal between two statements): close the session, which
                    # ends its lock, rather than pool a connection that may still hold it
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                    raise
            return
        path = make_url(storage.url).database
    else:
        path = url.removeprefix("journal:").removeprefix("//")
    if not path or path == ":memory:":
        yield None
        return
    import fcntl

    # "<db>-<hash>.lock": beside the file, and matched by the studies/*.db-* ignore rule
    lock = f"{path}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.lock"
    try:
        f = open(lock, "a")
    except OSError as e:  # e.g. made immutable or another user's: every worker needs it
        raise StorageError(f"cannot write {lock}: {e.strerror or e} (the lock file the study's workers share)") from None
    with f:
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
    return internals.backend_of(storage)


def count_trials(storage: BaseStorage, study: optuna.Study,
                 conn: sqlalchemy.Connection | None = None) -> tuple[int, bool] | None:
    """(trials toward the cap, whether any trial is WAITING) in one query; None where not an RDB.

    Same rule as :func:`cycle_optuna.worker.trials_counted` (every trial except those a retry's
    retry_history names), but reads only each trial's number, state and retry_history
    instead of building every trial. Callers must hold :func:`cap_lock` for an exact count.
    """
    storage = _unwrap(storage)
    if not isinstance(storage, RDBStorage):
        return None
    with _connection(storage, conn) as c:
        rows = internals.trial_states_and_retries(c, internals.study_id_of(study))
    retried = {int(n) for _, _, history in rows if history for n in json.loads(history)}
    return (sum(1 for number, _, _ in rows if number not in retried),
            any(state == "WAITING" for _, state, _ in rows))


def last_heartbeats(storage: BaseStorage, study: optuna.Study) -> dict[int, datetime]:
    """Trial number -> last heartbeat of the study's running trials, as the database stamped it
    (naive, on its own clock and time zone); empty without heartbeats."""
    return _beats(storage, study)[0]


def heartbeat_ages(storage: BaseStorage, study: optuna.Study) -> dict[int, float]:
    """Trial number -> seconds since the last heartbeat of the study's running trials, by the
    database's clock, which stamps the beats: right whatever its time zone (PostgreSQL stamps a
    naive local time) or its skew from this machine, as :func:`fail_stale` judges them."""
    beats, now = _beats(storage, study)
    return {n: max(0.0, (now - beat).total_seconds()) for n, beat in beats.items()}


def _beats(storage: BaseStorage, study: optuna.Study) -> tuple[dict[int, datetime], datetime | None]:
    """(last_heartbeats, the database's time now), read on one connection."""
    storage = _unwrap(storage)
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return {}, None
    with storage.engine.connect() as conn:
        rows = [(n, beat) for _, n, beat in internals.running_trials_and_beats(conn, internals.study_id_of(study))
                if beat is not None]
        now = _as_naive(conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()) if rows else None
    return {int(n): _as_naive(beat) for n, beat in rows}, now


def register_trial(study: optuna.Study, trial: optuna.Trial, worker: str,
                   conn: sqlalchemy.Connection | None = None, *, device: str | None = None) -> None:
    """Mark a trial this worker just took: the `worker` user attr and its first heartbeat.

    On a database: one INSERT each through Optuna's own table definitions (Optuna would spend a
    session per write, each with a pre-ping and several statements), on the cap lock's connection
    when given. A worker killed between creating the trial and this call leaves a trial without a
    beat: :func:`fail_stale` adopts it. A retry carries its dead worker's attr and is renamed
    through Optuna; journal files have no heartbeats and take the attr through Optuna. ``device``
    (where the worker trains) and when this process started go beside the worker attr the same way.
    """
    attrs = {WORKER_ATTR: worker, WORKER_START_ATTR: process_start(os.getpid()),
             **({DEVICE_ATTR: device} if device is not None else {})}
    backend = _unwrap(internals.storage_of(study))
    if not isinstance(backend, RDBStorage):
        journal = journal_file(backend)
        if journal is not None and (token := _hold_alive_lock(journal)) is not None:
            attrs[WORKER_LOCK_ATTR] = token
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    inherited = {key for key in attrs if key in trial.user_attrs}
    for key in inherited:
        trial.set_user_attr(key, attrs[key])
    trial_id = internals.trial_id_of(trial)
    with _connection(backend, conn) as c:
        if backend.get_heartbeat_interval() is not None:
            internals.insert_heartbeat(c, trial_id)
        for key in attrs.keys() - inherited:
            internals.insert_user_attr(c, trial_id, key, attrs[key])


def fail_stale(study: optuna.Study, conn: sqlalchemy.Connection | None = None, *,
               on_exhausted: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> list[int]:
    """Fail the study's running trials whose worker is gone, queue their retries; their numbers.

    A trial is gone when its last heartbeat is older than the grace period (clock: the database's,
    which stamps the beats). A running trial with no heartbeat at all (its worker died between
    creating it and writing its first beat) is given one now, so it goes stale the same way
    unless a live worker beats for it. Callers hold :func:`cap_lock`, under which every worker
    creates and registers its trials, so no live trial is ever caught between the two. Each failed
    trial gets `fail_cause` "worker lost (host:pid, last heartbeat <time>)"; `on_exhausted` gets
    those whose retries are used up. A trial failed so by a worker that died before queuing its
    retry gets the retry now (its number is returned too).
    """
    storage = internals.storage_of(study)
    backend = _unwrap(storage)
    if isinstance(storage, JournalStorage):
        failed = _fail_gone_local(study, storage, on_exhausted)
    elif isinstance(backend, RDBStorage) and backend.get_heartbeat_interval() is not None:
        failed = _fail_silent(study, backend, conn, on_exhausted)
    else:
        return []
    return failed + _queue_missing_retries(study)


def _fail_silent(study: optuna.Study, backend: RDBStorage, conn: sqlalchemy.Connection | None,
                 on_exhausted: Callable[[optuna.Study, FrozenTrial], None] | None) -> list[int]:
    """fail_stale on a database: the running trials without a heartbeat for the grace period."""
    grace = backend.grace_period or 2 * backend.get_heartbeat_interval()
    with _connection(backend, conn) as c:
        rows = internals.running_trials_and_beats(c, internals.study_id_of(study))
        if not rows:
            return []
        now = _as_naive(c.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar())
        stale = []
        for trial_id, number, beat in rows:
            if beat is None:
                internals.insert_heartbeat(c, trial_id)  # adopted: stale after the grace period
            elif (now - _as_naive(beat)).total_seconds() > grace:
                stale.append((trial_id, _as_naive(beat)))
    failed = []
    for trial_id, beat in stale:
        trial = backend.get_trial(trial_id)
        cause = f"{LOST_CAUSE} ({trial.user_attrs.get(WORKER_ATTR, '?')}, last heartbeat {beat.isoformat(timespec='seconds')})"
        if _fail_lost(study, trial, cause, on_exhausted):
            failed.append(trial.number)
    return failed


def _fail_lost(study: optuna.Study, trial: FrozenTrial, cause: str,
               on_exhausted: Callable[[optuna.Study, FrozenTrial], None] | None) -> bool:
    """Fail a running trial whose worker is gone, recording ``cause`` as its `fail_cause`, and queue
    its retry; False when it had ended already (its worker finished it, or another worker failed it
    first). The cause is written first (a journal drops attrs written to a finished trial), then the
    failure, the one write that checks the trial still runs: its worker may be alive after all
    (paused) and end it in between, and then the cause is taken back. Queuing the retry comes last:
    a worker that dies before it leaves a failed trial with the cause and no retry, which
    :func:`_queue_missing_retries` finds; a trial whose own worker queued its retry before it was
    cut off (a hand-back) gets no second one."""
    storage, trial_id = internals.storage_of(study), internals.trial_id_of(trial)
    try:
        # the cause first: a journal drops attrs written to a finished trial
        storage.set_trial_user_attr(trial_id, FAIL_CAUSE_ATTR, cause)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            _take_back_cause(storage, trial_id, cause)
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        _take_back_cause(storage, trial_id, cause)
        return False
    if not retried(study.get_trials(deepcopy=False), trial.number):
        pause_for_tests("failing lost")  # a test kills the worker here, or races a hand-back with it
        queue_retry(study, trial)
    if retries_exhausted(trial) and on_exhausted is not None:
        on_exhausted(study, storage.get_trial(trial_id))
    return True


def _take_back_cause(storage: BaseStorage, trial_id: int, cause: str) -> None:
    """Remove the "worker lost" cause a stale check wrote on a trial that its worker, alive after
    all, ended in between: a finished trial keeps no false cause (nor, when it failed, a retry it
    should not get). A database only: on a journal, where the cause goes first too, a live worker
    is never judged lost (its process is checked on its own machine)."""
    backend = _unwrap(storage)
    if isinstance(backend, RDBStorage):
        with _connection(backend, None) as c:
            internals.delete_user_attr(c, trial_id, FAIL_CAUSE_ATTR, cause)


def retried(trials: list[FrozenTrial], number: int) -> bool:
    """Whether a retry of trial ``number`` is among ``trials`` (one names it in its retry_history)."""
    return any(number in t.system_attrs.get("retry_history", ()) for t in trials)


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a retry of a failed (or failing) trial: same params, learning curve and attrs, without
    its `fail_cause`; none once it had MAX_RETRY retries."""
    # a copy: Optuna's callback appends to the trial's own retry_history list, which would make a
    # trial given its last retry look out of retries (and a cached trial look retried by itself)
    trial = copy.deepcopy(trial)
    trial.user_attrs.pop(FAIL_CAUSE_ATTR, None)
    retry_callback()(study, trial)


def _queue_missing_retries(study: optuna.Study) -> list[int]:
    """Queue the retries of trials failed for a lost worker by a worker that died before it queued
    them (see :func:`_fail_lost`); their numbers."""
    trials = study.get_trials(deepcopy=False)
    missing = [t for t in trials if retry_missing(t, trials)]
    for trial in missing:
        queue_retry(study, trial)
    return [t.number for t in missing]


def retry_missing(trial: FrozenTrial, trials: list[FrozenTrial]) -> bool:
    """Whether ``trial`` was failed for a lost worker by a worker that died before queuing its retry."""
    cause = str(trial.user_attrs.get(FAIL_CAUSE_ATTR, ""))
    return (trial.state == TrialState.FAIL and cause.startswith(f"{LOST_CAUSE} (") and not retries_exhausted(trial)
            and not retried(trials, trial.number))


def _fail_gone_local(study: optuna.Study, storage: JournalStorage,
                     on_exhausted: Callable[[optuna.Study, FrozenTrial], None] | None) -> list[int]:
    """fail_stale for a journal file, which has no heartbeats: a running trial whose worker was a
    process of this machine that no longer runs it (see :func:`local_alive`) is failed and retried
    the same way. A worker on another machine (a journal on a shared disk) cannot be checked from
    here and is left alone."""
    failed = []
    for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker is None and _orphaned(trial):
            cause = f"{LOST_CAUSE} (it ended between creating the trial and naming itself on it)"
        elif local_alive(trial, journal_file(storage)) is False:
            cause = f"{LOST_CAUSE} ({worker}: its process has ended)"
        else:
            continue
        if _fail_lost(study, trial, cause, on_exhausted):
            failed.append(trial.number)
    return failed


def _orphaned(trial: FrozenTrial) -> bool:
    """A running trial without a worker attr whose worker is gone: every worker creates a trial and
    names itself on it under the cap lock within milliseconds, so one still unnamed ORPHAN_SECONDS
    later (its creator killed in between) has no worker to finish it."""
    started = trial.datetime_start
    return started is not None and (datetime.now() - started).total_seconds() > ORPHAN_SECONDS


def local_alive(trial: FrozenTrial, journal: Path | None = None, *, tidy: bool = True) -> bool | None:
    """Whether the process a running trial's "host:pid" worker attr names still runs it; None when
    it is not a process of this machine (another host's cannot be checked from here).

    On a journal file a worker holds a lock file beside it while it lives (`worker_lock`): held,
    the worker runs, on this machine's kernel whatever PID namespace it is in (containers sharing
    the host's name are each PID 1); free, it has ended. Without one (older workers, other
    storages) by its pid: a dead worker's pid may belong to a live process by now (a restarted
    container's worker is PID 1 again), so this process runs only the trials its workers beat for,
    and another process is not the trial's worker when it started at another time than the one
    recorded beside the worker attr (where both are known).
    """
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR)).rpartition(":")
    if host != socket.gethostname() or not (pid.isascii() and pid.isdigit()):
        return None
    token = trial.user_attrs.get(WORKER_LOCK_ATTR)
    if journal is not None and isinstance(token, str) and token and Path(token).name == token:  # a name, no path
        if token == _ALIVE_TOKENS.get(journal):
            return internals.trial_id_of(trial) in _RUNNING_HERE
        return _lock_held(_alive_dir(journal) / f"{token}.lock", remove=tidy)
    if int(pid) == os.getpid():
        return internals.trial_id_of(trial) in _RUNNING_HERE
    return process_alive(trial.user_attrs.get(WORKER_ATTR), trial.user_attrs.get(WORKER_START_ATTR))


def process_alive(worker: object, started: object) -> bool | None:
    """Whether the process a "host:pid" id (`worker_id`) names still runs, and is the one that
    started at `started` (`process_start`, where known: a pid is reused); None when it is not a
    process of this machine (another host's cannot be checked from here)."""
    host, _, pid = str(worker).rpartition(":")
    if host != socket.gethostname() or not (pid.isascii() and pid.isdigit()):
        return None
    now = process_start(int(pid))
    if started is not None and now is not None and started != now:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): it runs
        return True
    return True


_ALIVE_TOKENS: dict[Path, str] = {}  # journal -> the token of the lock file this process holds beside it
_ALIVE_FILES: list[BinaryIO] = []  # those lock files, open (and locked) until the process ends


def _alive_dir(journal: Path) -> Path:
    return journal.with_name(f"{journal.name}.workers")


def _hold_alive_lock(journal: Path) -> str | None:
    """This process's lock file beside `journal`, taken once and held until it ends; its token
    (None where it cannot be made: the journal then falls back to pids)."""
    import atexit
    import fcntl

    journal = journal.resolve()
    if journal in _ALIVE_TOKENS:
        return _ALIVE_TOKENS[journal]
    token = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(6).hex()}"
    path = _alive_dir(journal) / f"{token}.lock"
    try:
        path.parent.mkdir(exist_ok=True)
        f = open(path, "ab")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None
    _ALIVE_FILES.append(f)
    _ALIVE_TOKENS[journal] = token
    atexit.register(lambda: path.unlink(missing_ok=True))  # a clean exit leaves no file
    return token


def _lock_held(path: Path, *, remove: bool = True) -> bool | None:
    """Whether a live process holds the lock file at `path`; a free one (its holder ended) is
    removed, unless `remove` is False (a reader's look)."""
    import fcntl

    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            if remove:
                path.unlink(missing_ok=True)
            return False
    except FileNotFoundError:  # its worker ended cleanly, or another worker found it ended
        return False
    except OSError:
        return None


def journal_file(storage: BaseStorage) -> Path | None:
    """The file behind a journal storage (None for other storages)."""
    backend = _unwrap(storage)  # a JournalStorage's backend, or the backend itself
    return Path(internals.journal_path_of(backend)).resolve() if isinstance(backend, JournalFileBackend) else None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started: "<boot id>:<clock ticks since boot>" from /proc (so no two
    processes share it, across reboots too); None where that cannot be read (no such process, not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # field 22; the command name (field 2, in parentheses) may hold spaces
        ticks = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{ticks}"


def running_here(study: optuna.Study) -> bool:
    """A journal file's stand-in for live heartbeats: a running trial whose worker is a live process
    of this machine (a worker that has met the cap waits for it, to retry it should it die)."""
    return isinstance(internals.storage_of(study), JournalStorage) and local_workers(study) > 0


def local_workers(study: optuna.Study) -> int:
    """How many live processes of this machine run trials of the study (by the trials' worker attrs)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    journal = journal_file(internals.storage_of(study))
    return len({t.user_attrs.get(WORKER_ATTR) for t in running if local_alive(t, journal)})


def retries_exhausted(trial: FrozenTrial) -> bool:
    """True when a failed trial gets no retry: it already had MAX_RETRY of them."""
    return len(trial.system_attrs.get("retry_history", ())) >= MAX_RETRY


def write_fail_cause(study: optuna.Study, trial_id: int, cause: str) -> None:
    """Record why a trial failed; works on a trial that has already finished (journal: skipped)."""
    backend = _unwrap(internals.storage_of(study))
    if isinstance(backend, RDBStorage):
        with _connection(backend, None) as c:
            # replaced, not added: a stale check may have written "worker lost" on it just before its
            # own worker, silent past the grace period but alive, ended it
            internals.replace_user_attr(c, trial_id, FAIL_CAUSE_ATTR, mask(cause))


def pause_for_tests(point: str) -> None:
    """Test hook: $CYCLE_OPTUNA_TEST_PAUSE_<POINT> seconds at that point of a two-step write, said
    on stderr ("paused <point>"), so a test can kill or signal the worker there."""
    pause = os.environ.get(f"CYCLE_OPTUNA_TEST_PAUSE_{point.upper().replace(' ', '_')}")
    if pause:
        sys.stderr.write(f"paused {point}\n")
        sys.stderr.flush()
        time.sleep(float(pause))


def _as_naive(value: datetime | str) -> datetime:
    # SQLite hands back text; the others datetimes (naive, as Optuna writes them)
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value.replace(tzinfo=None)


_RUNNING_HERE: set[int] = set()  # ids of the trials this process's workers run (their Heartbeat's)


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
        self.beat_for(None)
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat_for(self, trial_id: int | list[int] | None) -> None:
        """Beat for this trial (or these, a packed worker's) from now on (None: the worker runs no trial)."""
        _RUNNING_HERE.difference_update(_ids(self._trial_id))
        _RUNNING_HERE.update(_ids(trial_id))
        self._trial_id = trial_id

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            for trial_id in _ids(self._trial_id):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a missed beat is harmless; a dead thread would fail the trial
                    _log.warning("heartbeat of the trial with storage id %d skipped: %s", trial_id, describe(e))


def _ids(trial_id: int | list[int] | None) -> list[int]:
    return [trial_id] if isinstance(trial_id, int) else trial_id or []
