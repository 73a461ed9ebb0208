"""Serve optuna-dashboard on a study's storage and artifact store (loopback by default)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna
from optuna.artifacts import FileSystemArtifactStore

from cycle_optuna import optuna_internals as internals
from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.errors import ConfigError, CycleOptunaError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    """True when `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str | None:
    """The warning to print when the dashboard listens beyond loopback; None on loopback."""
    if is_loopback(host):
        return None
    return (f"warning: the dashboard listens on {host}:{port}, beyond this machine, and optuna-dashboard has "
            "no authentication: anyone who can reach it can read the study and change it (tell trials, edit "
            "notes, upload artifacts). Prefer --host 127.0.0.1 with an SSH tunnel, or put it behind an "
            "authenticating proxy.")


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the dashboard polls every few seconds; a line per request would drown the URL


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser holding a connection must not keep Ctrl-C from exiting


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class Dashboard:
    """A bound (not yet serving) dashboard server."""

    server: WSGIServer
    url: str
    study_name: str
    storage_url: str  # masked
    artifact_dir: Path
    warning: str | None
    study_found: bool
    storage: object = None  # what it serves: closed with it, so SQLite's -wal/-shm files go


    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, notebooks)."""
        thread = threading.Thread(target=self.serve_forever, name="optuna-dashboard", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.server.shutdown()
        self.release()

    def release(self) -> None:
        """Close the socket and the storage's connections (the last SQLite one removes -wal/-shm)."""
        self.server.server_close()
        _dispose(self.storage)


def _dispose(storage: object) -> None:
    """Close a database storage's pooled connections (a journal file has none)."""
    engine = getattr(internals.backend_of(storage), "engine", None) if storage is not None else None
    if engine is not None:
        engine.dispose()


def _artifact_dir(cfg: config_mod.StudyConfig) -> Path:
    env = os.environ.get(storage_mod.ARTIFACTS_ENV_VAR)  # same override the workers honour
    return Path(env) if env else config_mod.resolve_artifact_dir(cfg)


def make_dashboard(
    study_path: str | os.PathLike,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    storage: str | None = None,
) -> Dashboard:
    """Bind optuna-dashboard for the study file's storage (flag > env > file > local SQLite)."""
    from optuna_dashboard import wsgi

    from cycle_optuna.api import check_storage_arg

    if not isinstance(study_path, (str, os.PathLike)):
        raise TypeError(f"study_path: expected a study file path, got {type(study_path).__name__}")
    check_storage_arg(storage, objects=False)
    if not isinstance(host, str):
        raise TypeError(f"host: expected a host name or address string, got {type(host).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected a port number 0-65535, got {port!r}")
    cfg = config_mod.load(study_path, check_files=False)
    url = storage_mod.resolve_url(cfg, storage)
    artifacts = _artifact_dir(cfg)
    if artifacts.exists() and not artifacts.is_dir():
        what = f"${storage_mod.ARTIFACTS_ENV_VAR}" if os.environ.get(storage_mod.ARTIFACTS_ENV_VAR) else "study.artifact_dir"
        raise ConfigError(f"{what} {artifacts}: a file, not a directory")
    # the dashboard reads the artifacts (models, checkpoints): a read-only folder serves, as a missing
    # one does until the workers create it; nothing is created here
    db = storage_mod.file_path(url)
    # a SQLite or journal file, or a database server, must already hold Optuna's tables: never created here
    reader = storage_mod.open_storage(url, heartbeat=False, create=False)
    # bound before the storage is opened for writing: a host or port it cannot listen on changes nothing
    server_class = _Server6 if ":" in host.strip("[]") else _Server
    try:
        server = server_class((host.strip("[]"), port), _Handler)
    except OSError as e:
        _dispose(reader)  # its SQLite -wal/-shm files would stay for the life of the process
        raise CycleOptunaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        # notes are written through it; a file in a folder this process cannot write is served read-only
        writable = db is None or os.access(db.parent, os.W_OK) and os.access(db, os.W_OK)
        _dispose(reader)
        store = storage_mod.open_storage(url, heartbeat=False, create=writable and db is not None, versions=True)
    except BaseException:
        server.server_close()
        raise
    server.set_app(wsgi(store, artifact_store=FileSystemArtifactStore(artifacts)))
    bound = server.server_address[1]
    shown = host if is_loopback(host) or host not in ("0.0.0.0", "::", "") else DEFAULT_HOST
    shown = f"[{shown.strip('[]')}]" if ":" in shown else shown
    try:
        study_id = store.get_study_id_from_name(cfg.study.name)
        path, found = f"/dashboard/studies/{study_id}", True
    except KeyError:
        path, found = "/dashboard", False
    return Dashboard(server=server, url=f"http://{shown}:{bound}{path}", study_name=cfg.study.name,
                     storage_url=storage_mod.mask(url), artifact_dir=artifacts,
                     warning=exposure_warning(server.server_address[0], bound), study_found=found, storage=store)


def launch(
    study_path: str | os.PathLike,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    storage: str | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> int:
    """Serve the dashboard until Ctrl-C; prints the URL (and the warning off loopback). Returns 0."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dash = make_dashboard(study_path, host=host, port=port, storage=storage)
    if dash.warning:
        warn(dash.warning)
    echo(f"optuna-dashboard for study {dash.study_name} on {dash.storage_url} (artifacts: {dash.artifact_dir})")
    if not dash.study_found:
        echo(f"study {dash.study_name} is not in the storage yet; it appears once a worker creates it")
    echo(f"open {dash.url}  (Ctrl-C to stop)")
    try:
        dash.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dash.release()
    return 0


# -- notes: what the dashboard shows beside each trial and the study ------------------------------

@dataclass(frozen=True)
class _TrialRef:
    """What optuna-dashboard's note API reads from a trial (a finished trial has no live optuna.Trial)."""

    storage: object
    study: optuna.Study
    _trial_id: int


def trial_note(t: optuna.trial.FrozenTrial, key_change: str) -> str:
    """A trial's note: its cycle number, move, reason, outcome, and the failure cause when it failed."""
    from cycle_optuna.api import failure_cause

    attrs = t.user_attrs
    lines = [f"### Cycle {t.number + 1} (trial {t.number})", ""]
    move = attrs.get("cycle_move")
    lines.append(f"- **Move:** {move}" if move else f"- **Change:** {key_change}")
    if attrs.get("cycle_reason"):
        lines.append(f"- **Reason:** {attrs['cycle_reason']}")
    if move:
        lines.append(f"- **Change:** {key_change}")
    state = t.state.name.lower()
    if t.state.name == "COMPLETE":
        acc = attrs.get("val_accuracy")
        lines.append(f"- **Outcome:** complete, val loss {t.value:.4f}"
                     + (f", accuracy {acc:.2%}" if isinstance(acc, (int, float)) else "")
                     + (f", diagnosis {attrs['diagnosis']}" if attrs.get("diagnosis") else ""))
    elif t.state.name == "PRUNED":
        why = attrs.get("prune_reason") or ("diverged" if attrs.get("diagnosis") == "diverged" else "")
        lines.append("- **Outcome:** pruned" + (f": {why}" if why else ""))
    elif t.state.name == "FAIL":
        lines.append("- **Outcome:** failed")
        lines.append(f"- **Failure cause:** {failure_cause(t)}")
    else:
        lines.append(f"- **Outcome:** {state}")
    if attrs.get("worker"):
        lines.append(f"- **Worker:** {attrs['worker']}")
    return "\n".join(lines) + "\n"


def write_notes(study: optuna.Study, *, summary: str | None = None) -> int:
    """Write each finished trial's note and the study note (the report's summary); returns notes written.

    Notes whose text is unchanged are not rewritten, so refreshing a large study costs one read.
    """
    from optuna_dashboard import save_note
    from optuna_dashboard._note import get_note_from_system_attrs  # one read for every note's current text

    from cycle_optuna import api

    if summary is None:
        from cycle_optuna import report

        summary = report.summary(report.analyse(study, test=False))
    current = internals.storage_of(study).get_study_system_attrs(internals.study_id_of(study))
    cycles = {c.number: c for c in api.cycles(study)}
    written = 0
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        body = trial_note(t, cycles[t.number].key_change)
        if get_note_from_system_attrs(current, internals.trial_id_of(t))["body"] != body:
            save_note(_TrialRef(internals.storage_of(study), study, internals.trial_id_of(t)), body)
            written += 1
    if get_note_from_system_attrs(current, None)["body"] != summary:
        save_note(study, summary)
        written += 1
    return written


def write_trial_note(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """Write one finished trial's note (workers call this as each trial ends, so the dashboard is live)."""
    from optuna_dashboard import save_note

    from cycle_optuna import api

    save_note(_TrialRef(internals.storage_of(study), study, internals.trial_id_of(t)), trial_note(t, api.key_change(study, t)))
