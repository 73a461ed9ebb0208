"""Storage URLs: clear one-line errors with masked passwords, SQLite under 4 workers, journal files."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna import storage
from cycle_optuna.cli import main
from workers_helpers import fill_disk, small_tmpfs, start_cli, wait_for, worker_env, write_study


@pytest.mark.parametrize("url, secret, words", [
    ("nosuchdb://u:s3cret@h/x", "s3cret", "unknown storage scheme 'nosuchdb'"),
    ("redis://:s3cret@127.0.0.1:6379", "s3cret", "unknown storage scheme 'redis'"),
    ("postgresql+nodriver://u:s3cret@127.0.0.1:1/x", "s3cret", "unknown database driver 'nodriver' for postgresql"),
    ("postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "s3cret", "cannot open storage"),
    ("postgresql+psycopg://nosuchuser:s3cret@127.0.0.1:5432/postgres", "s3cret", "cannot open storage"),
    ("not a url", "s3cret", "bad storage URL"),
    # too malformed for the URL pattern: the password is still never shown
    ("postgresql+psycopg//u:m4lf0rmed@127.0.0.1:1/x", "m4lf0rmed", "bad storage URL"),
    ("postgresql+psycopg:/u:m4lf0rmed@127.0.0.1:1/x", "m4lf0rmed", "bad storage URL"),
    ("u:m4lf0rmed@127.0.0.1:1/x", "m4lf0rmed", "bad storage URL"),
    ("postgresql+psycopg://u:bl4nk pw@127.0.0.1:1/x", "bl4nk pw", "cannot open storage"),
    ("postgresql+psycopg://u:qu0te'pw@127.0.0.1:1/x", "qu0te'pw", "cannot open storage"),
    ("postgresql+psycopg://u:line\nbreak@127.0.0.1:1/x", "break", "cannot open storage"),
    ("journal://u:j0urnalpw@host/x.log", "j0urnalpw", "no study database"),
    # an unencoded '@' in the password: a driver would take its second half for the host and print it
    ("postgresql+psycopg://u:abc@S3cr3t@127.0.0.1:1/x", "S3cr3t", "holds an '@'; write it as %40"),
    ("mysql+pymysql://u:abc@S3cr3t@127.0.0.1:1/x", "S3cr3t", "holds an '@'; write it as %40"),
    ("postgresql+psycopg://u:n0h0st", "n0h0st", "bad storage URL"),  # "user:password" with no host
    # a SQLite URL with a host: the driver would drop it and read (or create) another file
    ("sqlite://studies/x.db", "n0secret", "a SQLite URL has no host ('studies' would be dropped); write sqlite:///studies/x.db"),
    ("sqlite+pysqlcipher://:C1pherKey@/x.db", "C1pherKey", "a SQLite URL has no host (':***@' would be dropped)"),
    # a query-string password, quoted or holding blanks (the URL pattern stops at a quote or a blank)
    ("postgresql+psycopg://u@127.0.0.1:1/x?password='Qu0tedPW'", "Qu0tedPW", "cannot open storage"),
    ("postgresql+psycopg://u@127.0.0.1:1/x?password=c0rrect horse battery", "horse battery", "?password=***: "),
    # an option the driver does not know: one line, not pymysql's TypeError
    ("mysql+pymysql://root@127.0.0.1:3306/x?b0gus=1", "n0secret", "the driver has no connection option 'b0gus'"),
])
def test_bad_storage_is_one_masked_line_and_exit_2(tmp_path: Path, capsys, url: str, secret: str, words: str):
    study = write_study(tmp_path)
    assert main(["status", str(study), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert words in err and secret not in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3  # one message (rich may wrap it)


@pytest.mark.parametrize("flag", ["--storge", "--storage-url="])
def test_a_mistyped_flag_does_not_show_its_urls_password(tmp_path: Path, capsys, flag: str):
    url = "postgresql+psycopg://u:'Typ0Secret@127.0.0.1:1/x"  # a quote: the URL pattern alone stops before it
    args = [f"{flag}{url}"] if flag.endswith("=") else [flag, url]
    with pytest.raises(SystemExit) as e:  # argparse's error exits
        main(["status", str(write_study(tmp_path)), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "Typ0Secret" not in err


def test_api_errors_are_masked_for_callers_that_print_them(tmp_path: Path):
    from cycle_optuna import api
    from cycle_optuna.errors import StorageError

    with pytest.raises(StorageError) as e:
        api.load_study(write_study(tmp_path), storage="sqlite://user:Ap1Secret@host/x.db")
    assert "a SQLite URL has no host" in str(e.value) and "Ap1Secret" not in str(e.value)


def test_a_malformed_url_in_the_environment_is_masked_too(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv(storage.ENV_VAR, "postgresql+psycopg//u:env5ecret@127.0.0.1:1/x")
    assert main(["status", str(write_study(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "bad storage URL" in err and "env5ecret" not in err


@pytest.mark.slow
def test_sqlite_four_workers_forty_trials_never_locked(tmp_path: Path):
    study = write_study(tmp_path, n_trials=40)
    proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "run", str(study), "--workers", "4"],
                          env=worker_env(CYCLE_OPTUNA_GRACE_SECONDS="30"),  # no live trial taken as stale
                          capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("tiny-worker-*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "locked" not in logs.lower()
    states = sqlite3.connect(tmp_path / "tiny.db").execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    assert states == [("COMPLETE", 40)]


def test_journal_storage_runs_a_study(tmp_path: Path):
    study = write_study(tmp_path, n_trials=2)
    assert main(["worker", str(study), "--storage", f"journal:///{tmp_path / 'tiny.log'}"]) == 0
    assert (tmp_path / "tiny.log").stat().st_size > 0



def _journal_trials(log: Path) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not log.exists():
        return []
    try:
        return optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(log)))).trials
    except KeyError:
        return []


@pytest.mark.parametrize("tail", ["?password=hunter2", "?mode=ro"])
def test_a_journal_url_with_options_is_refused_and_names_no_file_after_them(tmp_path: Path, capsys, tail: str):
    """A journal URL is a path: '?password=...' became part of the journal's file name (a secret in
    `ls`) and was masked in every message, so the user never saw the real name."""
    study = write_study(tmp_path, n_trials=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    url = f"journal:///{tmp_path / 'x.log'}{tail}"
    for command in (["run"], ["status"]):
        assert main([*command, str(study), "--storage", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a journal URL is a file path only, without '?key=value' options" in err, err
        assert "hunter2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_journal_beside_a_study_in_a_folder_named_with_a_hash_is_opened(tmp_path: Path):
    """'#' and '?' are file-name characters: a relative journal path resolved into such a folder is no option."""
    folder = tmp_path / "run#1?"
    folder.mkdir()
    study = write_study(folder, n_trials=1)
    study.write_text(study.read_text().replace("[study]\n", "[study]\nstorage = \"journal:tiny.log\"\n", 1))
    assert main(["worker", str(study)]) == 0
    assert (folder / "tiny.log").stat().st_size > 0


def test_a_killed_workers_trial_on_a_journal_file_is_retried_from_its_checkpoint(tmp_path: Path):
    """A journal file has no heartbeats: a trial whose worker process has ended (kill -9) is failed
    by the next worker on the machine and retried from its last epoch checkpoint."""
    from cycle_optuna.objective import RESUMED_ATTR
    from workers_helpers import running_with_checkpoint, start_cli, wait_for

    study, log = write_study(tmp_path, n_trials=1, epochs=4), tmp_path / "tiny.log"
    url = f"journal:///{log}"
    victim = start_cli(["worker", str(study), "--storage", url], pause=1.0)
    hit = wait_for(lambda: running_with_checkpoint(_journal_trials(log), tmp_path), 90, "a trial with an epoch checkpoint")
    victim.kill()
    victim.wait()
    rescuer = start_cli(["worker", str(study), "--storage", url])
    out, _ = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, out
    ts = _journal_trials(log)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE]
    assert ts[0].user_attrs[storage.FAIL_CAUSE_ATTR] == (
        f"worker lost ({hit.user_attrs[storage.WORKER_ATTR]}: its process has ended)")
    retry = ts[1]
    assert retry.system_attrs["failed_trial"] == hit.number and retry.params == ts[0].params
    assert retry.user_attrs[RESUMED_ATTR].startswith(f"trial {hit.number} epoch ")
    assert storage.FAIL_CAUSE_ATTR not in retry.user_attrs and retry.user_attrs["epochs_run"] == 4


def test_a_journal_worker_at_the_cap_waits_for_a_live_local_trial_and_retries_it_if_its_worker_dies(tmp_path: Path):
    """Two workers, one trial: the second finds the cap met by the first's running trial and waits
    (without heartbeats it looks at the process); when the first is killed it takes the retry."""
    import time

    from workers_helpers import start_cli, wait_for

    study, log = write_study(tmp_path, n_trials=1, epochs=4), tmp_path / "tiny.log"
    url = f"journal:///{log}"
    first = start_cli(["worker", str(study), "--storage", url], pause=3.0)  # 4 epochs: 12 s at least
    wait_for(lambda: any(t.state == TrialState.RUNNING for t in _journal_trials(log)), 90, "the first worker's trial")
    second = start_cli(["worker", str(study), "--storage", url])
    time.sleep(4)  # the second worker starts and finds the cap met
    assert second.poll() is None  # waiting for the live trial, not done
    first.kill()
    first.wait()
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, out
    assert [t.state for t in _journal_trials(log)] == [TrialState.FAIL, TrialState.COMPLETE]

def test_a_journal_trial_of_a_live_or_remote_worker_is_left_running(tmp_path: Path):
    """Only a process of this machine that has ended is a lost worker: a live one, or a worker on
    another machine sharing the journal file, is not."""
    import socket

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    backend = JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="tiny", storage=backend)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        for worker in (f"{host}:{live.pid}", "elsewhere.example:1", f"{host}:not-a-pid"):
            study.ask().set_user_attr(storage.WORKER_ATTR, worker)
        assert storage.fail_stale(study) == []
        assert [t.state for t in study.trials] == [TrialState.RUNNING] * 3
        assert storage.running_here(study)
    finally:
        live.kill()
        live.wait()


def test_a_journal_trial_whose_workers_pid_was_reused_is_failed(tmp_path: Path):
    """A dead worker's host:pid may name a live process (a restarted container's worker is PID 1
    again): this process, which runs only the trials its worker beats for, or another process,
    which started later than the worker recorded on the trial."""
    import os
    import socket

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    beat = storage.Heartbeat(internals.storage_of(study))
    try:
        mine, dead_mine, theirs, dead_theirs = (study.ask() for _ in range(4))
        for trial in (mine, dead_mine):
            storage.register_trial(study, trial, storage.worker_id())
        # dead_theirs: recorded by a process that started before `other` (this one), under other's pid
        for trial, started in ((theirs, other.pid), (dead_theirs, os.getpid())):
            trial.set_user_attr(storage.WORKER_ATTR, f"{socket.gethostname()}:{other.pid}")
            trial.set_user_attr(storage.WORKER_START_ATTR, storage.process_start(started))
        beat.beat_for(mine._trial_id)  # this process runs `mine`, not `dead_mine`
        assert storage.fail_stale(study) == [dead_mine.number, dead_theirs.number]
        assert [t.state for t in study.trials[:4]] == [TrialState.RUNNING, TrialState.FAIL] * 2
        cause = study.trials[1].user_attrs[storage.FAIL_CAUSE_ATTR]
        assert cause == f"worker lost ({storage.worker_id()}: its process has ended)"
        assert storage.local_workers(study) == 2  # this process and `other`, each for its own trial
        beat.beat_for(None)
        other.kill()
        other.wait()
        assert not storage.running_here(study)
    finally:
        beat.beat_for(None)
        other.kill()


def _container(study: Path, log: Path, pause: float) -> subprocess.Popen:
    """A worker on the journal file `log` as PID 1 of a PID namespace of its own, as in a container
    (skipped where unshare cannot make one); --kill-child: a kill of unshare kills the worker too."""
    from workers_helpers import SLOW_EPOCHS

    if not shutil.which("unshare") or subprocess.run(["unshare", "-pf", "--mount-proc", "true"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare needs root)")
    cli = [sys.executable, "-c", SLOW_EPOCHS.format(pause=pause), "worker", str(study), "--storage", f"journal:///{log}"]
    return subprocess.Popen(["unshare", "-pf", "--kill-child", "--mount-proc", *cli], env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_restarted_container_whose_worker_has_the_dead_workers_pid_retries_its_trial(tmp_path: Path):
    """A journal file on a volume, its worker's container killed and restarted: same hostname, and
    the new worker is PID 1 like the dead one (a PID namespace, as a container's)."""
    import signal
    import socket

    from workers_helpers import running_with_checkpoint

    study, log = write_study(tmp_path, n_trials=1, epochs=4), tmp_path / "tiny.log"
    first = _container(study, log, 1.0)
    hit = wait_for(lambda: running_with_checkpoint(_journal_trials(log), tmp_path), 90, "a trial with an epoch checkpoint")
    assert hit.user_attrs[storage.WORKER_ATTR] == f"{socket.gethostname()}:1"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = _container(study, log, 0.0)
    try:
        out, _ = second.communicate(timeout=120)  # without the check it waits at the cap for good
    finally:
        second.kill()
    assert second.returncode == 0, out
    ts = _journal_trials(log)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE]
    assert ts[0].user_attrs[storage.FAIL_CAUSE_ATTR] == f"worker lost ({socket.gethostname()}:1: its process has ended)"
    assert ts[1].system_attrs["failed_trial"] == hit.number


def test_containers_sharing_the_hosts_name_leave_each_others_trials_alone(tmp_path: Path):
    """Two live workers on one journal file, each PID 1 of its own PID namespace on one machine
    (containers with the host's network): same "host:1", neither may take the other for dead."""
    import signal

    study, log = write_study(tmp_path, n_trials=2, epochs=3), tmp_path / "tiny.log"
    slow = _container(study, log, 2.0)  # its one trial takes a few seconds
    try:
        wait_for(lambda: any(t.state == TrialState.RUNNING for t in _journal_trials(log)), 90, "the slow trial")
        fast = _container(study, log, 0.0)  # runs the other trial, then waits at the cap, checking the slow one
        fast_out, _ = fast.communicate(timeout=120)
        slow_out, _ = slow.communicate(timeout=120)
    finally:
        for p in (slow, locals().get("fast")):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert slow.returncode == 0 and fast.returncode == 0, slow_out + fast_out
    ts = _journal_trials(log)
    assert [t.state for t in ts] == [TrialState.COMPLETE, TrialState.COMPLETE], [t.user_attrs for t in ts]
    assert "taken over" not in slow_out


def test_a_journal_trial_its_worker_never_named_is_failed_once_it_is_old(tmp_path: Path, monkeypatch):
    """A worker killed between creating a trial and writing its worker attr (both under the cap
    lock, milliseconds apart) leaves a trial nobody names: failed and retried once it is older
    than storage.ORPHAN_SECONDS, left alone before."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    assert storage.fail_stale(study) == []  # just created: its worker may be naming itself right now
    monkeypatch.setattr(storage, "ORPHAN_SECONDS", 0.0)
    assert storage.fail_stale(study) == [0]
    lost, retry = study.trials
    assert lost.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert lost.user_attrs[storage.FAIL_CAUSE_ATTR].startswith("worker lost (it ended between creating the trial")
    assert retry.params == lost.params and storage.FAIL_CAUSE_ATTR not in retry.user_attrs

def test_a_lost_trial_given_its_last_retry_keeps_its_checkpoints(tmp_path: Path, monkeypatch):
    """on_exhausted (which deletes a trial's checkpoints and its ancestors') gets a lost trial only
    when it gets no retry: the last retry resumes from those checkpoints."""
    import socket

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    monkeypatch.setattr(storage, "MAX_RETRY", 2)
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    gone = []
    for _ in range(3):  # the trial, then each of its retries, lost by a process that has ended
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # the waiting retry first
        trial.set_user_attr(storage.WORKER_ATTR, f"{socket.gethostname()}:999999999")
        assert storage.fail_stale(study, on_exhausted=lambda s, t: gone.append(t.number)) == [trial.number]
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert [t.system_attrs.get("retry_history") for t in study.trials] == [None, [0], [0, 1]]
    assert gone == [2]  # not trial 1, whose retry (trial 2) resumed from its checkpoint


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'beat.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _fast_beats(monkeypatch) -> None:
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(storage, "GRACE_SECONDS", 1)  # open_storage makes it interval + 1 = 2 s


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return study.ask()


def test_a_trial_whose_worker_died_before_or_after_its_first_beat_is_failed_and_retried(any_url: str, monkeypatch):
    _fast_beats(monkeypatch)
    st = storage.open_storage(any_url)
    study = optuna.create_study(study_name="beat", storage=st)
    registered = _ask(study)
    storage.register_trial(study, registered, "deadhost:1")  # then the worker is killed
    bare = _ask(study)  # killed before registering: no beat, which Optuna's own check never fails
    assert storage.fail_stale(study) == []  # too early: the bare trial is adopted (given a beat)
    assert set(storage.last_heartbeats(st, study)) == {registered.number, bare.number}
    time.sleep(3)
    assert sorted(storage.fail_stale(study)) == [registered.number, bare.number]
    trials = study.get_trials()
    assert trials[registered.number].state == trials[bare.number].state == TrialState.FAIL
    cause = trials[registered.number].user_attrs["fail_cause"]
    assert cause.startswith("worker lost (deadhost:1, last heartbeat 20"), cause
    assert trials[bare.number].user_attrs["fail_cause"].startswith("worker lost (?, last heartbeat ")
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [registered.number, bare.number]
    assert all("fail_cause" not in t.user_attrs for t in retries)  # a retry does not inherit the cause
    assert storage.fail_stale(study) == []  # each only once


def test_a_trial_out_of_retries_is_handed_to_on_exhausted(tmp_path: Path, monkeypatch):
    _fast_beats(monkeypatch)
    monkeypatch.setattr(storage, "MAX_RETRY", 0)
    study = optuna.create_study(study_name="beat", storage=storage.open_storage(f"sqlite:///{tmp_path / 'x.db'}"))
    storage.register_trial(study, _ask(study), "deadhost:1")
    time.sleep(3)
    gone = []
    assert storage.fail_stale(study, on_exhausted=lambda s, t: gone.append(t.number)) == [0]
    assert gone == [0] and [t.state for t in study.get_trials()] == [TrialState.FAIL]


@pytest.mark.parametrize("text, secret", [
    ("postgresql+psycopg://alice:s3cret@db:5432/optuna", "s3cret"),
    ("postgresql+psycopg://alice:s3c@r:et@db/optuna", "s3c@r:et"),  # '@' and ':' inside the password
    ("postgresql+psycopg://alice:p/w@db/optuna", "p/w"),
    ("postgresql+psycopg://alice@db/optuna?sslmode=require&password=s3cret", "s3cret"),
    ("cannot open 'mysql+pymysql://bob:s3cret@h:1/x': refused", "s3cret"),
    ("host=db user=alice password=s3cret dbname=x", "s3cret"),
    ("postgresql://:s3cret@db/x", "s3cret"),
    ("postgresql+psycopg://alice@db/x?password='s3cret pw'&sslmode=require", "s3cret pw"),
    ("host=db user=alice password=\"s3cret pw\" dbname=x", "s3cret pw"),
])
def test_mask_hides_passwords_in_every_form(text: str, secret: str):
    masked = storage.mask(text)
    assert secret not in masked and "***" in masked
    assert "alice" in masked or "bob" in masked or "://:" in masked  # the user stays, to tell URLs apart


def test_a_remembered_password_is_masked_as_a_word_not_inside_other_words(monkeypatch):
    from cycle_optuna import redact
    from cycle_optuna.redact import remember

    monkeypatch.setattr(redact, "_KNOWN", set())

    remember("postgresql+psycopg://alice@db/optuna?password=w0rd")
    assert storage.mask("data.w0rd_source: the w0rd file; x://alice:w0rd@db; 'w0rd'") == (
        "data.w0rd_source: the *** file; x://alice:***@db; '***'")


def test_an_empty_setting_does_not_swallow_the_text_after_it():
    assert storage.mask("cannot open 'x://u@h/x?password=': refused") == "cannot open 'x://u@h/x?password=***': refused"
    assert storage.mask('{"note": "set token=", "seed": 1}') == '{"note": "set token=***", "seed": 1}'


@pytest.mark.parametrize("text, secret", [
    ("invalid dsn: \"host=x password='q1uoted9'\"", "q1uoted9"),  # a DSN quoted inside a quoted message
    ("password='q1uoted9'.", "q1uoted9"),
    ("password='q1 uoted9'!", "uoted9"),
    ("password='q1uoted9", "q1uoted9"),  # never closed
    ("{\"s\": \"password='q1 uoted9'\"}", "uoted9"),
])
def test_quoted_settings_are_masked_whatever_follows_them(text: str, secret: str):
    assert secret not in storage.mask(text) and "password=***" in storage.mask(text)


def test_mask_keeps_urls_without_a_password():
    for text in ("sqlite:///studies/a@b.db", "postgresql+psycopg://alice@db/x", "journal:///x.log",
                 "postgresql://db:5432/x", "postgresql://[::1]:5432/x", "http://127.0.0.1:8080/",
                 "cannot open storage bogus://x: refused"):  # a colon after the host, then the reason
        assert storage.mask(text) == text


def test_a_password_in_the_study_file_is_never_stored_on_the_study(tmp_path: Path, pg_url: str):
    """The study's stored config is served by the dashboard: its storage URL has no password."""
    import urllib.request

    from cycle_optuna import dashboard

    secret_url = pg_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores the password
    study = write_study(tmp_path, n_trials=1)
    study.write_text(study.read_text().replace("[study]\n", f'[study]\nstorage = "{secret_url}"\n'))
    assert main(["worker", str(study)]) == 0
    stored = optuna.load_study(study_name="tiny", storage=pg_url)
    assert "s3cret" not in str(stored.user_attrs) and "s3cret" not in str([t.user_attrs for t in stored.trials])
    assert stored.user_attrs["cycle_optuna_config"]["study"]["storage"].startswith("postgresql+psycopg://postgres:***@")
    dash = dashboard.make_dashboard(study, port=0)
    dash.start()
    try:
        sid = optuna.load_study(study_name="tiny", storage=pg_url)._study_id
        with urllib.request.urlopen(f"http://127.0.0.1:{dash.port}/api/studies/{sid}", timeout=10) as r:
            served = r.read().decode()
    finally:
        dash.close()
    assert "cycle_optuna_config" in served and "s3cret" not in served


def test_scrubbing_a_stored_config_touches_its_storage_url_only(tmp_path: Path, monkeypatch):
    """A remembered password that is a word of a key ("test") must not rename data.test_source."""
    from cycle_optuna import config, redact, worker
    from cycle_optuna.redact import remember

    monkeypatch.setattr(redact, "_KNOWN", set())  # "test" is forgotten after this test

    remember("postgresql+psycopg://alice@db/optuna?password=test")
    cfg = config.load(write_study(tmp_path, n_trials=1))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    worker.open_study(cfg, url, data=None)
    stored = optuna.load_study(study_name="tiny", storage=url).user_attrs["cycle_optuna_config"]
    old = {**stored, "study": {**stored["study"], "storage": "postgresql+psycopg://alice:test@db/optuna"}}
    study = optuna.load_study(study_name="tiny", storage=url)
    study.set_user_attr("cycle_optuna_config", old)  # as an older release stored it
    worker.open_study(cfg, url, data=None)
    again = optuna.load_study(study_name="tiny", storage=url).user_attrs["cycle_optuna_config"]
    assert again["study"]["storage"] == "postgresql+psycopg://alice:***@db/optuna"
    assert {k: v for k, v in again.items() if k != "study"} == {k: v for k, v in old.items() if k != "study"}
    assert "test_source" in again["data"]


def test_a_study_stored_with_a_password_by_an_older_release_is_scrubbed(tmp_path: Path):
    from cycle_optuna import config, worker

    cfg = config.load(write_study(tmp_path, n_trials=1))
    url = storage.resolve_url(cfg)
    old = optuna.create_study(study_name="tiny", storage=url)
    leaked = {**cfg.to_dict(), "study": {**cfg.to_dict()["study"], "storage": "postgresql://u:s3cret@h/db"}}
    old.set_user_attr(worker.CONFIG_ATTR, leaked)
    study = worker.open_study(cfg, url)
    assert "s3cret" not in str(study.user_attrs)


def test_the_heartbeat_thread_beats_only_for_the_running_trial(tmp_path: Path, monkeypatch):
    _fast_beats(monkeypatch)
    st = storage.open_storage(f"sqlite:///{tmp_path / 'beat.db'}")
    study = optuna.create_study(study_name="beat", storage=st)
    trial = _ask(study)
    storage.register_trial(study, trial, "box:1")
    first = storage.last_heartbeats(st, study)[trial.number]
    with storage.Heartbeat(st) as beat:
        beat.beat_for(trial._trial_id)
        time.sleep(2.5)
        beat.beat_for(None)
        time.sleep(0.5)  # a beat begun before beat_for(None) lands
        later = storage.last_heartbeats(st, study)[trial.number]
        time.sleep(1.5)
        assert storage.last_heartbeats(st, study)[trial.number] == later
    assert later > first


def test_sqlite_studies_use_write_ahead_logging(tmp_path: Path):
    storage.open_storage(f"sqlite:///{tmp_path / 'wal.db'}").get_all_studies()
    assert sqlite3.connect(tmp_path / "wal.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_journal_record_cut_off_by_a_full_disk_is_dropped_before_the_next_append(tmp_path: Path):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        url, log = f"journal://{disk / 'j.log'}", disk / "j.log"
        study = optuna.create_study(study_name="j", storage=storage.open_storage(url))
        filler = fill_disk(disk)
        with pytest.raises(OSError, match="No space left"):
            study.set_user_attr("cut", "x" * 20000)
        assert not log.read_bytes().endswith(b"\n")  # the torn record: written up to the full disk
        reader = optuna.load_study(study_name="j", storage=storage.open_storage(url, create=False))
        assert reader.user_attrs == {}  # readers skip it
        filler.unlink()
        study.set_user_attr("after", 1)
        assert optuna.load_study(study_name="j", storage=storage.open_storage(url, create=False)).user_attrs == {
            "after": 1}


# The real CLI in a new process, its SQLite writers waiting one second for a lock instead of 120.
_SHORT_LOCK_WAIT = ("import sys, cycle_optuna.storage as s\ns.SQLITE_TIMEOUT_SECONDS = 1\n"
                    "from cycle_optuna.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def _worker(study: Path, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SHORT_LOCK_WAIT, "worker", str(study), "--storage", url],
                          env=worker_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_storage_on_a_full_disk_is_one_line_naming_it_before_the_first_trial(tmp_path: Path, kind: str):
    study = write_study(tmp_path, n_trials=1)
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        url = f"sqlite:///{disk / 'tiny.db'}" if kind == "sqlite" else f"journal://{disk / 'tiny.log'}"
        held = None
        if kind == "sqlite":  # a database in WAL mode with its -wal and -shm files, as a worker leaves it
            st = storage.open_storage(url)
            st.get_all_studies()
            st.engine.dispose()
            held = sqlite3.connect(disk / "tiny.db")
            held.execute("SELECT COUNT(*) FROM studies").fetchall()
        try:
            fill_disk(disk)
            proc = _worker(study, url)
            left = sorted(p.name for p in disk.iterdir())
        finally:
            if held is not None:
                held.close()
    assert proc.returncode == 2, proc.stderr
    # one line, before the banner, and no empty journal left behind
    assert proc.stderr.strip().splitlines() == [f"error: cannot write {disk}: No space left on device "
                                                "(free space and run again)"], proc.stderr
    assert kind == "sqlite" or left == ["filler"]


def test_a_database_another_process_keeps_locked_is_one_line_after_a_note(tmp_path: Path):
    study, db = write_study(tmp_path, n_trials=1), tmp_path / "tiny.db"
    url = f"sqlite:///{db}"
    optuna.create_study(study_name="tiny", storage=storage.open_storage(url))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = _worker(study, url)
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert f"waiting up to 1s for {db}: another process holds its write lock" in lines
    assert lines[-1] == (f"error: storage {url}: database is locked (another process holds its write lock; a "
                         "writer waits up to 1s for it)")


@contextlib.contextmanager
def _read_only_view(directory: Path, at: Path):
    """`directory` as read-only media: a read-only bind mount at `at` as root, else `directory` chmod 555."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
        return
    at.mkdir()
    if subprocess.run(["mount", "--bind", str(directory), str(at)], capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to bind-mount a directory")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True)
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=False)


def test_a_finished_sqlite_study_in_wal_mode_on_read_only_media_can_be_read(tmp_path: Path):
    rw = tmp_path / "rw"
    rw.mkdir()
    write_study(rw, n_trials=1)
    st = storage.open_storage(f"sqlite:///{rw / 'tiny.db'}")
    optuna.create_study(study_name="tiny", storage=st).add_trial(
        optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    st.engine.dispose()
    with contextlib.closing(sqlite3.connect(rw / "tiny.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert sorted(p.name for p in rw.iterdir()) == ["tiny.db", "tiny.toml"]  # no -wal, no -shm: all closed
    with _read_only_view(rw, tmp_path / "ro") as ro:
        proc = subprocess.run([sys.executable, "-m", "cycle_optuna.cli", "status", str(ro / "tiny.toml")],
                              env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = " ".join(proc.stdout.split())  # the title may wrap
    # the study was made by plain Optuna here (no cycle-optuna config on it): no total is claimed for it
    assert "1 trial finished (no total" in shown and "val loss 0.5000" in shown


def test_a_lock_file_the_worker_cannot_write_is_one_line_naming_it(tmp_path: Path, capsys):
    import hashlib

    study = write_study(tmp_path, n_trials=1)
    lock = tmp_path / f"tiny.db-{hashlib.sha256(b'cycle-optuna:tiny').hexdigest()[:8]}.lock"
    lock.touch()
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(lock)], capture_output=True).returncode != 0:
        pytest.skip(f"cannot make {lock} immutable (chattr) on this filesystem")
    if not root:
        lock.chmod(0o444)
    try:
        assert main(["worker", str(study)]) == 2
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(lock)], check=False)
    reason = "Operation not permitted" if root else "Permission denied"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {lock}: {reason} (the lock file the study's workers share)")


def test_a_journal_disk_that_fills_mid_run_is_one_line_and_loses_no_trial(tmp_path: Path):
    # three trials: the journal's last page may hold a few more records once the disk is full, but
    # not the rest of the study's (the write the disk cuts may be a report, a trial's end or a new one)
    study = write_study(tmp_path, n_trials=3, epochs=3)
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        url = f"journal://{disk / 'tiny.log'}"
        victim = start_cli(["worker", str(study), "--storage", url], pause=1.0, cwd=tmp_path)
        wait_for(lambda: b'"op_code":7,' in (disk / "tiny.log").read_bytes() if (disk / "tiny.log").exists() else False,
                 90, "the first epoch in the journal")
        filler = fill_disk(disk)
        out, _ = victim.communicate(timeout=120)
        assert victim.returncode == 2, out
        # the failed trial's traceback is logged as any trial's is; the worker's last word is one line
        assert out.splitlines()[-1] == "error: No space left on device; free space and run again (a trial cut off is retried)", out
        filler.unlink()
        again = start_cli(["worker", str(study), "--storage", url], cwd=tmp_path)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0, out
        ts = optuna.load_study(study_name="tiny", storage=storage.open_storage(url, create=False)).trials
    finished = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state) for t in ts]  # the study's total, none lost
    for cut in (t for t in ts if t.state == TrialState.FAIL):  # a trial the disk cut off: retried
        assert any(t.system_attrs.get("failed_trial") == cut.number for t in finished)


def test_a_journal_write_cut_by_a_full_disk_mid_trial_is_not_the_trials_failure(tmp_path: Path, monkeypatch):
    """A store that raises ENOSPC on the trial's first epoch report: the worker stops with the trial
    still running, rather than failing it for good in the bytes the cut-off record freed."""
    import errno

    from optuna.storages.journal import JournalFileBackend

    from cycle_optuna import worker

    url = f"journal://{tmp_path / 'j.log'}"
    study = optuna.create_study(study_name="s", storage=storage.open_storage(url))
    append, torn = JournalFileBackend.append_logs, []

    def full_once(self, logs):
        if logs[0].get("op_code") == 7 and not torn:  # the first intermediate value, cut short
            torn.append(1)
            with open(self._file_path, "ab") as f:
                f.write(b'{"op_code":7,"wor')
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(self, logs)

    monkeypatch.setattr(JournalFileBackend, "append_logs", full_once)

    def objective(t):
        x = t.suggest_float("x", 0, 1)
        t.report(x, 0)
        return x

    with pytest.raises(OSError, match="No space left"):
        worker.run_trials(study, url, 2, objective)
    (cut,) = optuna.load_study(study_name="s", storage=storage.open_storage(url, create=False)).trials
    assert cut.state == TrialState.RUNNING  # not FAIL: the next worker retries it
    worker.run_trials(study, url, 2, objective)  # space again: this process no longer runs it
    ts = optuna.load_study(study_name="s", storage=storage.open_storage(url, create=False)).trials
    assert ts[0].state == TrialState.FAIL and any(t.system_attrs.get("failed_trial") == 0 for t in ts[1:])


def test_a_worker_that_ends_its_trial_while_a_stale_check_fails_it_leaves_its_own_outcome(tmp_path: Path, monkeypatch):
    """The stale check writes "worker lost", then fails the trial; its worker, silent past the grace
    period but alive, ends it in between. The trial keeps its own outcome: no false cause, no retry."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    st = storage.open_storage(url)
    study = optuna.create_study(study_name="r", storage=st)
    for ending in ("complete", "fail"):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        frozen = study.get_trials(deepcopy=False)[-1]
        real = type(internals.storage_of(study)).set_trial_state_values

        def its_worker_first(self, trial_id, state, values=None, _ending=ending, _real=real):
            monkeypatch.undo()  # the worker's own tell goes through the real storage
            if _ending == "complete":
                study.tell(trial_id_to_trial[trial_id], 0.5)
            else:
                study.tell(trial_id_to_trial[trial_id], state=TrialState.FAIL)
                storage.write_fail_cause(study, trial_id, "ValueError: its own failure")  # was a UNIQUE violation
            return _real(self, trial_id, state, values)

        trial_id_to_trial = {internals.trial_id_of(trial): trial}
        monkeypatch.setattr(type(internals.storage_of(study)), "set_trial_state_values", its_worker_first)
        assert storage._fail_lost(study, frozen, "worker lost (host:1: no heartbeat)", None) is False
        trials = optuna.load_study(study_name="r", storage=storage.open_storage(url, create=False)).trials
        ended = trials[frozen.number]
        if ending == "complete":
            assert ended.state == TrialState.COMPLETE and "fail_cause" not in ended.user_attrs
        else:
            assert ended.state == TrialState.FAIL and ended.user_attrs["fail_cause"] == "ValueError: its own failure"
            assert not storage.retry_missing(ended, trials)
    assert not [t for t in trials if t.state == TrialState.WAITING]


def test_an_append_only_journal_file_can_be_written(tmp_path: Path):
    """`chattr +a`: appending, as Optuna does, is allowed; opening the file to write in place is not."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +a needs root and e2fsprogs")
    log = tmp_path / "a.log"
    study = optuna.create_study(study_name="a", storage=storage.open_storage(f"journal://{log}"))
    if subprocess.run(["chattr", "+a", str(log)], capture_output=True).returncode != 0:
        pytest.skip(f"this file system ({tmp_path}) takes no append-only flag")
    try:
        study.set_user_attr("after", 1)
    finally:
        subprocess.run(["chattr", "-a", str(log)], check=True)
    assert optuna.load_study(study_name="a", storage=storage.open_storage(f"journal://{log}", create=False)).user_attrs == {
        "after": 1}


def test_workers_in_their_own_pid_namespaces_create_one_sqlite_database_together(tmp_path):
    """Containers sharing a folder may all be PID 1: a new database's temporary name must not be the pid
    (each creator deleted the others' half-made file: disk I/O errors, no database)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a PID namespace needs root and unshare")
    code = ("import optuna, sys; from cycle_optuna import storage; optuna.logging.set_verbosity(optuna.logging.WARNING); "
            "optuna.create_study(study_name='x', storage=storage.open_storage(sys.argv[1]), load_if_exists=True); "
            "import os; print('pid', os.getpid())")
    url = f"sqlite:///{tmp_path / 'c.db'}"
    procs = [subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    if any("unshare failed" in o or "Operation not permitted" in o for o in outs):
        pytest.skip("running as root without permission to make a PID namespace")
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert all("pid 1" in o for o in outs), outs  # each was PID 1 in its namespace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["x"]


def test_a_mysql_server_that_takes_the_connection_and_never_answers_is_one_line_not_a_hang(tmp_path, capsys,
                                                                                            monkeypatch):
    """pymysql's connect_timeout covers the TCP connect only: a server (or a frozen proxy) that accepts
    and says nothing held `status` and `worker` forever, --wait-for-storage included."""
    import socket
    import threading

    pytest.importorskip("pymysql")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(iter(lambda: silent.accept()[0], None)), daemon=True).start()
    monkeypatch.setattr(storage, "MYSQL_READ_TIMEOUT_S", 2)
    study = write_study(tmp_path, n_trials=1)
    url = f"mysql+pymysql://u:hunter22@127.0.0.1:{silent.getsockname()[1]}/db"
    try:
        assert main(["status", str(study), "--storage", url]) == 2
    finally:
        silent.close()
    err = capsys.readouterr().err
    assert "cannot open storage mysql+pymysql://u:***@127.0.0.1" in err and "timed out" in err
    assert "hunter22" not in err


def test_the_retry_callback_shows_the_caller_no_experimental_warning():
    """An interrupted run_study showed Optuna's notice that the retry callback is experimental."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        storage.retry_callback()
    assert not [w for w in seen if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
