"""Dashboard: optuna-dashboard serves the study (and its artifacts) over HTTP, loopback by default."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cycle_optuna import dashboard
from cycle_optuna.errors import CycleOptunaError
from conftest_report import make_study


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
        return r.status, (json.loads(body) if "json" in r.headers.get("Content-Type", "") else body)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = make_study(tmp_path_factory.mktemp("dash"), "cycle")
    dash = dashboard.make_dashboard(path, port=0)
    dash.start()
    yield dash
    dash.close()


def test_reads_the_study_through_the_http_api(served):
    base = f"http://127.0.0.1:{served.port}"
    _, studies = _get(f"{base}/api/studies")
    (summary,) = [s for s in studies["study_summaries"] if s["study_name"] == "refcycles"]
    assert served.url == f"{base}/dashboard/studies/{summary['study_id']}"
    _, detail = _get(f"{base}/api/studies/{summary['study_id']}")
    assert detail["name"] == "refcycles"
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete", "Complete", "Pruned", "Pruned", "Fail"]
    assert detail["best_trials"][0]["number"] == 0
    assert detail["trials"][0]["intermediate_values"][0] == {"step": 0, "value": 0.927}
    assert "cycle_optuna_config" in {a["key"] for a in detail["user_attrs"]}
    # the artifact store is wired: the best trial's model.pt downloads through the dashboard
    (artifact,) = detail["trials"][0]["artifacts"]
    status, body = _get(f"{base}/artifacts/{summary['study_id']}/{detail['trials'][0]['trial_id']}/{artifact['artifact_id']}")
    assert status == 200 and artifact["filename"] == "model.pt" and len(body) > 10_000
    status, page = _get(served.url)
    assert status == 200 and b"<html" in page.lower()


def test_binds_loopback_by_default_without_warning(served):
    assert served.server.server_address[0] == "127.0.0.1"
    assert served.warning is None
    assert dashboard.DEFAULT_HOST == "127.0.0.1"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("myhost.example", False)])
def test_is_loopback(host, loopback):
    assert dashboard.is_loopback(host) is loopback
    assert (dashboard.exposure_warning(host, 8080) is None) is loopback


def test_warns_when_bound_beyond_loopback(served):
    dash = dashboard.make_dashboard(Path(served.artifact_dir).parent / "cycle.toml", host="0.0.0.0", port=0)
    try:
        assert "no authentication" in dash.warning and f"0.0.0.0:{dash.port}" in dash.warning
        assert dash.url.startswith(f"http://127.0.0.1:{dash.port}/")  # a URL that opens, not 0.0.0.0
    finally:
        dash.server.server_close()


@pytest.mark.parametrize("host", ["127.1", "0x7f.0.0.1", "localhost"])
def test_loopback_written_another_way_gets_no_warning(served, host):
    """Judged by the address the server bound, not the text: 127.1 is 127.0.0.1."""
    dash = dashboard.make_dashboard(Path(served.artifact_dir).parent / "cycle.toml", host=host, port=0)
    try:
        assert dash.server.server_address[0] == "127.0.0.1"
        assert dash.warning is None
    finally:
        dash.server.server_close()


def test_port_in_use_is_a_clear_error(served):
    with pytest.raises(CycleOptunaError, match=f"cannot listen on 127.0.0.1:{served.port}"):
        dashboard.make_dashboard(Path(served.artifact_dir).parent / "cycle.toml", port=served.port)


def test_launch_prints_the_url_and_serves(tmp_path):
    path = make_study(tmp_path, "tpe")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from cycle_optuna.dashboard import launch; launch({str(path)!r}, port={port})"
    env = {k: v for k, v in os.environ.items() if k != "CYCLE_OPTUNA_STORAGE"}
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("open ") or not line:
                break
        out = "".join(lines)
        m = re.search(r"open (http://127\.0\.0\.1:\d+/dashboard/studies/\d+)", out)
        assert m, out
        assert "warning" not in out and f"artifacts: {tmp_path / 'tpewide-artifacts'}" in out
        assert _get(m.group(1))[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_notes_carry_cycle_move_reason_and_failure_cause(tmp_path):
    """Trial and study notes written through optuna-dashboard's note API, read back over its HTTP API."""
    import optuna_dashboard

    from cycle_optuna import api, report

    path = make_study(tmp_path, "cycle", with_model=False)
    study = api.load_study(path)
    study.set_user_attr("cycle_optuna_baselines", {"majority": {"label": "majority class", "val_accuracy": 0.3333,
                                                                "test_accuracy": 0.3333}})
    report.write_report(path, tmp_path / "out", test=False)  # the report refreshes the notes
    dash = dashboard.make_dashboard(path, port=0)
    dash.start()
    try:
        base = f"http://127.0.0.1:{dash.port}"
        study_id = dash.url.rsplit("/", 1)[1]
        _, detail = _get(f"{base}/api/studies/{study_id}")
    finally:
        dash.close()
    notes = [t["note"]["body"] for t in detail["trials"]]
    assert notes[1].startswith("### Cycle 2 (trial 1)")
    assert "- **Move:** lr x2" in notes[1] and "- **Reason:** cycle 2: trying lr x2 from cycle 1" in notes[1]
    assert "- **Outcome:** complete, val loss 0.9206, accuracy 46.09%" in notes[1]
    assert "- **Outcome:** pruned: val loss 0.9700 at epoch 2 fell behind other trials" in notes[4]
    assert "- **Outcome:** failed" in notes[5] and "- **Failure cause:** CUDA out of memory" in notes[5]
    summary = detail["note"]["body"]
    assert "**Best: cycle 1**, val loss 0.9192" in summary
    assert "majority class 33.3%" in summary and "**Next:** Keep the learning rate below 0.004" in summary
    assert optuna_dashboard.get_note(study) == summary
    # refreshing an unchanged study rewrites nothing
    assert dashboard.write_notes(study, summary=summary) == 0


def test_a_read_only_database_and_artifact_folder_are_served(tmp_path):
    """docker-compose mounts the artifacts read-only into the dashboard: it reads them, and creates nothing."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    src, ro = tmp_path / "src", tmp_path / "ro"
    path = make_study(src, "cycle")
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to bind-mount")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        before = sorted(p.name for p in src.iterdir())
        dash = dashboard.make_dashboard(ro / path.name, port=0)
        dash.start()
        try:
            base = f"http://127.0.0.1:{dash.port}"
            study_id = dash.url.rsplit("/", 1)[1]
            _, detail = _get(f"{base}/api/studies/{study_id}")
            (artifact,) = detail["trials"][0]["artifacts"]
            status, body = _get(f"{base}/artifacts/{study_id}/{detail['trials'][0]['trial_id']}/{artifact['artifact_id']}")
            assert status == 200 and len(body) > 10_000
        finally:
            dash.close()
        assert sorted(p.name for p in src.iterdir()) == before
    finally:
        subprocess.run(["umount", "--lazy", str(ro)], check=False)  # lazy: a connection still open must not keep it


def test_sigterm_stops_the_dashboard_and_leaves_no_sqlite_side_files(tmp_path):
    # made in another process: a connection this one kept open would keep the side files itself
    subprocess.run([sys.executable, "-c", "from pathlib import Path; from conftest_report import make_study; "
                    f"make_study(Path({str(tmp_path)!r}), 'tpe')"],
                   cwd=Path(__file__).parent, check=True, capture_output=True)
    path = tmp_path / "tpe.toml"
    db = tmp_path / "tpewide.db"
    assert not db.with_name(db.name + "-wal").exists()
    env = {k: v for k, v in os.environ.items() if k != "CYCLE_OPTUNA_STORAGE"}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "cycle_optuna.cli", "dashboard", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out = ""
        while "open http" not in out and (line := proc.stdout.readline()):
            out += line
        m = re.search(r"open (http://\S+)", out)
        assert m, out
        assert _get(m.group(1))[0] == 200
        assert db.with_name(db.name + "-wal").exists()  # WAL mode: side files while it is open
        proc.send_signal(15)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.glob("*.db*")) == [db.name]


@pytest.mark.postgres
def test_an_empty_server_database_is_one_line_and_gets_no_tables(tmp_path, pg_url):
    """A reader creates nothing: on an empty PostgreSQL database the dashboard made Optuna's 13 tables."""
    import sqlalchemy

    from cycle_optuna.errors import StorageError

    path = make_study(tmp_path, "cycle")
    with pytest.raises(StorageError, match="holds no studies"):
        dashboard.make_dashboard(path, port=0, storage=pg_url)
    engine = sqlalchemy.create_engine(pg_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_the_notes_run_writes_at_its_end_load_no_plotting_library(tmp_path):
    """`run` ends by writing the dashboard notes, whose study note is the report's summary: drawing
    nothing, they imported matplotlib (a second of every run's end) through the report's plots."""
    from workers_helpers import write_study

    path = write_study(tmp_path, n_trials=1, epochs=1)
    code = ("import sys\nfrom cycle_optuna import api, dashboard\n"
            f"study = api.run_study({str(path)!r})\n"
            "assert dashboard.write_notes(study) >= 0\n"
            "print('matplotlib' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "CYCLE_OPTUNA_STORAGE"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
