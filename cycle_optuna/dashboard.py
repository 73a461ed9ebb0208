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

from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.errors import CycleOptunaError

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
        self.server.server_close()


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

    cfg = config_mod.load(study_path)
    url = storage_mod.resolve_url(cfg, storage)
    store = storage_mod.open_storage(url, heartbeat=False)
    artifacts = _artifact_dir(cfg)
    artifacts.mkdir(parents=True, exist_ok=True)
    app = wsgi(store, artifact_store=FileSystemArtifactStore(artifacts))
    server_class = _Server6 if ":" in host.strip("[]") else _Server
    try:
        server = server_class((host.strip("[]"), port), _Handler)
    except OSError as e:
        raise CycleOptunaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.set_app(app)
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
                     warning=exposure_warning(host, bound), study_found=found)


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
        dash.server.server_close()
    return 0
