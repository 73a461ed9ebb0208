"""docker-compose.yml: validated statically, and its services' commands run against the local PostgreSQL."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cycle_optuna.cli import build_parser
from workers_helpers import ROOT, wait_for, worker_env, write_study

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$."""
    def one(m: re.Match) -> str:
        if env.get(m["name"]):
            return env[m["name"]]
        if m["op"] == ":-":
            return m["arg"]
        raise KeyError(f"{m['name']} is required: {m['arg']}")
    return _VAR.sub(one, value).replace("$$", "$")


def test_services_volumes_and_healthcheck():
    assert set(SERVICES) == {"postgres", "worker", "dashboard"}
    pg = SERVICES["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert SERVICES["worker"]["build"] == "."
    assert SERVICES["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    shared = {v.split(":")[0] for v in SERVICES["worker"]["volumes"]} & {v.split(":")[0] for v in SERVICES["dashboard"]["volumes"]}
    assert shared == {"artifacts", "./studies"} and "artifacts" in COMPOSE["volumes"]
    assert SERVICES["worker"]["environment"]["CYCLE_OPTUNA_ARTIFACT_DIR"] == "/artifacts"
    assert "ports" not in SERVICES["worker"]  # scales: no fixed host port
    assert (ROOT / "Dockerfile").is_file() and "download.pytorch.org/whl/cpu" in (ROOT / "Dockerfile").read_text()


def test_dashboard_published_on_localhost_only():
    assert all(str(p).startswith("127.0.0.1:") for p in SERVICES["dashboard"]["ports"])
    for name, svc in SERVICES.items():
        assert not [p for p in svc.get("ports", []) if not str(p).startswith("127.0.0.1:")], name


def test_credentials_only_from_env_file():
    text = (ROOT / "docker-compose.yml").read_text()
    example = env_example()
    assert example["POSTGRES_PASSWORD"] not in text
    assert re.search(r"POSTGRES_PASSWORD:\s*\$\{POSTGRES_PASSWORD", text)
    for m in _VAR.finditer(text):
        assert m["name"] in example, f"{m['name']} is used by docker-compose.yml but missing from .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split() and ".env" in (ROOT / ".dockerignore").read_text().split()


def test_worker_command_is_a_real_cli_invocation():
    argv = [interpolate(a, env_example()) for a in SERVICES["worker"]["command"]]
    args = build_parser().parse_args(argv)
    assert args.command == "worker" and (ROOT / args.study).is_file()
    assert interpolate(SERVICES["worker"]["environment"]["CYCLE_OPTUNA_STORAGE"], env_example()).startswith("postgresql+psycopg://")


def test_gpu_variant_reserves_the_gpus_and_runs_workers_on_each():
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) == {"worker"}  # an override: everything else comes from docker-compose.yml
    devices = gpu["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    args = build_parser().parse_args([interpolate(a, env_example()) for a in gpu["worker"]["command"]])
    assert args.command == "run" and args.workers_per_gpu == 4 and (ROOT / args.study).is_file()
    assert "download.pytorch.org/whl/cu" in interpolate(gpu["worker"]["build"]["args"]["TORCH_INDEX"], {})
    assert "--index-url ${TORCH_INDEX}" in (ROOT / "Dockerfile").read_text()


def test_dashboard_command_is_a_real_cli_invocation_without_the_password():
    svc = SERVICES["dashboard"]
    assert "entrypoint" not in svc  # the image's: cycle-optuna
    argv = [interpolate(a, env_example()) for a in svc["command"]]
    args = build_parser().parse_args(argv)
    assert args.command == "dashboard" and args.port == 8080
    assert not any("://" in a or "PASSWORD" in a for a in svc["command"])  # nothing secret in `ps`
    assert "CYCLE_OPTUNA_STORAGE" in svc["environment"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.postgres
def test_services_end_to_end_on_local_postgres(tmp_path: Path, pg_url: str):
    """The worker and dashboard commands of the compose file, 3 workers, against the local server."""
    study = write_study(tmp_path, name="compose", n_trials=6, epochs=2)
    user_host, db = pg_url.removeprefix("postgresql+psycopg://").rsplit("/", 1)
    env = {**env_example(), "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "unused-by-trust-auth",
           "POSTGRES_DB": db, "STUDY": str(study)}
    local = lambda s: interpolate(s, env).replace("@postgres:5432/", "@127.0.0.1:5432/")  # noqa: E731
    wk = SERVICES["worker"]
    wenv = worker_env(**{**{k: local(v) for k, v in wk["environment"].items()},
                         "CYCLE_OPTUNA_ARTIFACT_DIR": str(tmp_path / "artifacts"),  # /artifacts in the image
                         "CYCLE_OPTUNA_GRACE_SECONDS": "30"})  # 3 workers on 2 cores: no live trial taken as stale
    cli = [sys.executable, "-m", "cycle_optuna.cli"]
    workers = [subprocess.Popen(cli + [local(a) for a in wk["command"]], env=wenv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    dashboard = None
    try:
        outs = [w.communicate(timeout=240)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0], outs
        # started once the tables exist (in compose, its restart policy covers that race)
        port = _free_port()
        dash = SERVICES["dashboard"]
        dargv = [local(a) for a in dash["command"]]
        dargv[dargv.index("--port") + 1] = str(port)
        dargv[dargv.index("--host") + 1] = "127.0.0.1"
        denv = worker_env(**{**{k: local(v) for k, v in dash["environment"].items()},
                             "CYCLE_OPTUNA_ARTIFACT_DIR": str(tmp_path / "artifacts")})
        dashboard = subprocess.Popen(cli + dargv, env=denv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listed():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    return json.load(r)["study_summaries"]
            except OSError:
                return None
        summaries = wait_for(listed, 60, "the dashboard's API")
        ours = [s for s in summaries if s["study_name"] == "compose"]
        assert ours, summaries
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{ours[0]['study_id']}", timeout=10) as r:
            detail = json.load(r)
        states = [t["state"] for t in detail["trials"]]
        assert states.count("Complete") == 6 and len(states) == 6, states
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
        for w in workers:
            if w.poll() is None:
                w.kill()
