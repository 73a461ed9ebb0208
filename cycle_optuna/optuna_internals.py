"""Every use of Optuna's private API, in one place.

Each function here leans on something Optuna does not promise to keep; tests/test_optuna_internals.py
exercises every one against the installed release, so an Optuna upgrade that changes one fails there,
by name, instead of somewhere inside a worker.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, TypeVar

import optuna
import sqlalchemy
from optuna.storages import BaseStorage
from optuna.storages._rdb import models as _models
from optuna.study._tell import _tell_with_warning
from optuna.trial import TrialState


_S = TypeVar("_S")
_open_lock = threading.Lock()


class _NoSchemaVersions:
    """Stands in for RDBStorage's schema-version bookkeeping (`_VersionManager`) on read-only
    opens: that bookkeeping imports alembic (a quarter of `status`'s start-up) and writes a
    version row into a database that lacks one, which a read-only command must not do."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"storage opened read-only: its schema version is not available ({name})")


def open_rdb(make: Callable[[], _S], *, read_only: bool) -> _S:
    """`make()` builds an RDBStorage; read-only, it skips Optuna's schema-version bookkeeping
    (`optuna.storages._rdb.storage._VersionManager`, swapped for the construction only). Every
    open in this package goes through the one lock, so a writer never gets the stand-in."""
    from optuna.storages._rdb import storage as rdb

    with _open_lock:
        if not read_only or not hasattr(rdb, "_VersionManager"):
            return make()
        real = rdb._VersionManager
        rdb._VersionManager = _NoSchemaVersions
        try:
            return make()
        finally:
            rdb._VersionManager = real


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (`Study._storage`)."""
    return study._storage


def backend_of(storage: BaseStorage) -> BaseStorage:
    """The storage under Optuna's private caching wrapper (`_CachedStorage._backend`), if any."""
    return getattr(storage, "_backend", storage)


def journal_path_of(backend: Any) -> str:
    """The file a JournalFileBackend appends to (`JournalFileBackend._file_path`)."""
    return backend._file_path


def study_id_of(study: optuna.Study) -> int:
    """The study's row id in its storage (`Study._study_id`)."""
    return study._study_id


def trial_id_of(trial: optuna.Trial) -> int:
    """The trial's row id in its storage (`Trial._trial_id`)."""
    return trial._trial_id


def insert_heartbeat(conn: sqlalchemy.Connection, trial_id: int) -> None:
    """One INSERT into Optuna's heartbeat table (the database's clock stamps it, as Optuna's does)."""
    conn.execute(_models.TrialHeartbeatModel.__table__.insert(), {"trial_id": trial_id})


def insert_user_attr(conn: sqlalchemy.Connection, trial_id: int, key: str, value: Any) -> None:
    """One INSERT into Optuna's trial user attr table; it also works on a finished trial."""
    conn.execute(_models.TrialUserAttributeModel.__table__.insert(),
                 {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})


def replace_user_attr(conn: sqlalchemy.Connection, trial_id: int, key: str, value: Any) -> None:
    """The trial user attr `key` set to `value` whether or not it exists (DELETE, then INSERT: the
    caller's transaction makes it one write); it also works on a finished trial."""
    delete_user_attr(conn, trial_id, key)
    insert_user_attr(conn, trial_id, key, value)


def delete_user_attr(conn: sqlalchemy.Connection, trial_id: int, key: str, value: Any = None) -> None:
    """Remove the trial user attr `key` (only while it holds `value`, when one is given)."""
    table = _models.TrialUserAttributeModel.__table__
    where = (table.c.trial_id == trial_id) & (table.c.key == key)
    if value is not None:
        where &= table.c.value_json == json.dumps(value)
    conn.execute(table.delete().where(where))


def table_names() -> list[str]:
    """The tables Optuna's RDB storage keeps (of its installed version)."""
    return sorted(_models.BaseModel.metadata.tables)


def missing_tables(present: set[str]) -> list[str]:
    """Optuna's tables not among `present`."""
    return [name for name in table_names() if name not in present]


def has_tables(conn: sqlalchemy.Connection) -> bool:
    """Whether the database holds Optuna's tables (its `studies` table); creates nothing."""
    return sqlalchemy.inspect(conn).has_table(_models.StudyModel.__tablename__)


def trial_states_and_retries(conn: sqlalchemy.Connection, study_id: int) -> list[tuple[int, str, str | None]]:
    """(number, state name, retry_history JSON or None) of every trial, read from Optuna's tables."""
    sql = sqlalchemy.text(
        "SELECT t.number, t.state, a.value_json FROM trials t LEFT OUTER JOIN trial_system_attributes a "
        "ON a.trial_id = t.trial_id AND a.key = 'retry_history' WHERE t.study_id = :sid"
    )
    return [tuple(row) for row in conn.execute(sql, {"sid": study_id}).all()]


def running_trials_and_beats(conn: sqlalchemy.Connection, study_id: int) -> list[tuple[int, int, Any]]:
    """(trial id, number, last heartbeat or None) of every RUNNING trial, from Optuna's tables."""
    sql = sqlalchemy.text(
        "SELECT t.trial_id, t.number, h.heartbeat FROM trials t LEFT OUTER JOIN trial_heartbeats h "
        "ON h.trial_id = t.trial_id WHERE t.study_id = :sid AND t.state = 'RUNNING'"
    )
    return [tuple(row) for row in conn.execute(sql, {"sid": study_id}).all()]


def tell(study: optuna.Study, trial: optuna.Trial, value: object,
         state: TrialState | None) -> tuple[TrialState, str | None]:
    """Tell a trial's outcome: (its final state, why a returned value was refused, if it was).

    Optuna's own trial runner tells through `_tell_with_warning`, which does not read the whole
    trial back afterwards as the public `Study.tell` does. A trial that has finished meanwhile
    (another worker failed it as stale) raises UpdateFinishedTrialError, as any write to it does,
    rather than Optuna's ValueError.
    """
    try:
        # positional: the value argument's name differs between Optuna releases
        final, _values, refusal = _tell_with_warning(study, trial, value, state, suppress_warning=True)
    except ValueError:
        if not storage_of(study).get_trial(trial_id_of(trial)).state.is_finished():
            raise
        raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} has already finished") from None
    return final, refusal
