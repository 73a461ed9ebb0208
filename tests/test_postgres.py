"""PostgreSQL and MariaDB storages: heartbeats, status, exact cap across worker processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cycle_optuna import storage
from cycle_optuna.cli import main
from workers_helpers import trials, worker_env, write_study

pytestmark = pytest.mark.postgres


def test_postgres_storage_has_heartbeats_and_a_small_pre_pinged_pool(pg_url: str):
    st = storage.open_storage(pg_url)
    assert st.get_heartbeat_interval() == storage.HEARTBEAT_SECONDS
    assert st.engine.pool._pre_ping and st.engine.pool.size() == 2


def test_two_processes_meet_the_cap_exactly(tmp_path: Path, pg_url: str):
    study = write_study(tmp_path, n_trials=5)
    procs = [subprocess.Popen([sys.executable, "-m", "cycle_optuna.cli", "worker", str(study), "--storage", pg_url],
                              env=worker_env(CYCLE_OPTUNA_GRACE_SECONDS="30"),  # no live trial taken as stale
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [t.state for t in trials(pg_url)] == [TrialState.COMPLETE] * 5


def test_status_shows_states_running_worker_and_heartbeat(tmp_path: Path, pg_url: str, capsys):
    study = write_study(tmp_path, n_trials=2)
    assert main(["worker", str(study), "--storage", pg_url]) == 0
    st = storage.open_storage(pg_url)
    s = optuna.load_study(study_name="tiny", storage=st)
    trial = s.ask()
    trial.set_user_attr(storage.WORKER_ATTR, "box:123")
    st.record_heartbeat(trial._trial_id)
    capsys.readouterr()
    assert main(["status", str(study), "--storage", pg_url]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 trials finished" in out and "box:123" in out and "s ago" in out and "best so far" in out


MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def _mariadb_storage():
    """The local MariaDB's test database as a storage, or the test skipped saying why."""
    try:
        return storage.open_storage(MARIADB_URL)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MariaDB not usable: {e}")


def test_mariadb_storage_when_reachable():
    url = MARIADB_URL
    st = _mariadb_storage()
    name = "cycle-mysql-lock"
    with storage.cap_lock(st, url, name):
        pass
    assert st.get_heartbeat_interval() == storage.HEARTBEAT_SECONDS


def test_a_mariadb_cap_lock_waits_past_get_locks_timeout(monkeypatch):
    """GET_LOCK gives up with 0 after its wait: cap_lock must not go on without the lock."""
    import hashlib
    import threading

    import sqlalchemy

    url = MARIADB_URL
    st = _mariadb_storage()
    monkeypatch.setattr(storage, "MYSQL_LOCK_WAIT_S", 1)
    study_name = "cycle-mysql-wait"
    name = hashlib.sha256(f"cycle-optuna:{study_name}@test".encode()).hexdigest()[:60]
    holder = sqlalchemy.create_engine(url)
    entered = threading.Event()

    def take() -> None:
        with storage.cap_lock(st, url, study_name):
            entered.set()

    try:
        with holder.connect() as other:
            assert other.exec_driver_sql(f"SELECT GET_LOCK('{name}', 5)").scalar() == 1
            t = threading.Thread(target=take, daemon=True)
            t.start()
            assert not entered.wait(3.5), "cap_lock went on while another session held the lock"
            other.exec_driver_sql(f"SELECT RELEASE_LOCK('{name}')")
            assert entered.wait(30), "cap_lock did not take the lock once it was free"
            t.join(30)
    finally:
        holder.dispose()


def test_a_mariadb_cap_lock_held_by_a_silent_session_is_freed_by_the_server(monkeypatch):
    """A worker whose host vanished inside the cap lock sends nothing more; the server cannot tell it
    from an idle one and kept the lock until its wait_timeout, 8 hours by default, while every other
    worker of the study waited. The lock's session now carries its own idle limit: a holder silent
    for MYSQL_LOCK_IDLE_S loses it (the session's view is the same whether the holder's host is gone
    or the holder sits idle, as here), and its own release then fails quietly."""
    import threading

    import sqlalchemy

    url = MARIADB_URL
    st = _mariadb_storage()
    monkeypatch.setattr(storage, "MYSQL_LOCK_IDLE_S", 2)
    holding, release, entered, left = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:  # a worker gone silent while it holds the lock
        try:
            with storage.cap_lock(st, url, "silent-holder") as conn:
                holding.set()
                release.wait(60)
                with pytest.raises(sqlalchemy.exc.OperationalError):  # its session was closed under it
                    conn.exec_driver_sql("SELECT 1")
            left.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    def take() -> None:  # another worker of the study
        with storage.cap_lock(st, url, "silent-holder"):
            entered.set()

    holder = threading.Thread(target=hold, daemon=True)
    taker = threading.Thread(target=take, daemon=True)
    try:
        holder.start()
        assert holding.wait(20)
        taker.start()
        assert entered.wait(30), "the lock stayed with a session that had sent nothing for longer than its idle limit"
        taker.join(10)
    finally:
        release.set()
        holder.join(30)
    assert not errors and left.is_set()
    # a lock taken and given back in time leaves its pooled session with the server's own idle limit
    monkeypatch.setattr(storage, "MYSQL_LOCK_IDLE_S", 120)
    st.engine.dispose()  # a pool of one session from here on
    with storage.cap_lock(st, url, "silent-holder") as conn:
        inside, limit = conn.exec_driver_sql("SELECT CONNECTION_ID(), @@SESSION.wait_timeout").one()
        assert limit == 120
    with st.engine.connect() as conn:
        ids = {conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()}
        session, server = conn.exec_driver_sql("SELECT @@SESSION.wait_timeout, @@GLOBAL.wait_timeout").one()
    st.engine.dispose()
    assert inside in ids and session == server


def test_status_ages_heartbeats_by_the_database_clock_in_any_time_zone(tmp_path: Path, pg_url: str, capsys):
    """PostgreSQL stamps a beat in the database's own time zone (a naive local time)."""
    from conftest import pg_admin_connect

    with pg_admin_connect() as admin:
        admin.execute(f"ALTER DATABASE \"{pg_url.rsplit('/', 1)[1]}\" SET timezone TO 'America/New_York'")
    study = write_study(tmp_path, n_trials=1)
    s = optuna.create_study(study_name="tiny", storage=storage.open_storage(pg_url))
    storage.register_trial(s, s.ask(), "box:123")  # its first beat, stamped now
    capsys.readouterr()
    assert main(["status", str(study), "--storage", pg_url]) == 0
    out = capsys.readouterr().out
    assert "box:123" in out and "s ago" in out and "worker lost" not in out


def test_a_mariadb_cap_lock_is_one_databases_not_the_servers():
    """GET_LOCK names are server-wide: a same-named study in another database waited for this one's lock."""
    import threading

    import sqlalchemy

    url = MARIADB_URL
    here = _mariadb_storage()
    admin = sqlalchemy.create_engine(url)
    other_db = "cycle_test_lock_other"
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS {other_db}")
    other_url = url.rsplit("/", 1)[0] + "/" + other_db
    other = storage.open_storage(other_url)
    holding, release, entered = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:  # a worker of the study on `test`, counting its trials
        with storage.cap_lock(here, url, "same-name"):
            holding.set()
            release.wait(30)

    def take() -> None:  # a worker of the same-named study in the other database
        with storage.cap_lock(other, other_url, "same-name"):
            entered.set()

    holder = threading.Thread(target=hold, daemon=True)
    try:
        holder.start()
        assert holding.wait(20)
        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert entered.wait(10), "a study in another database waited for this database's lock"
        taker.join(10)
    finally:
        release.set()
        holder.join(30)
        for s in (here, other):
            s.engine.dispose()
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {other_db}")
        admin.dispose()
