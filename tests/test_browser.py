"""Browser: headless Debian chromium loads optuna-dashboard and shows the study's trials.

Under CI=true the session installs chromium with apt-get when it is missing and fails if it still
cannot; elsewhere the test is skipped without chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from cycle_optuna import dashboard
from conftest_report import make_study

IN_CI = os.environ.get("CI") == "true"
APT_TIMEOUT_S = 900
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900", "--virtual-time-budget=8000"]


def _find() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)


def _apt_install() -> str:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        try:
            proc = subprocess.run(sudo + cmd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env)
            log.append(f"{' '.join(cmd)}: exit {proc.returncode} {proc.stderr[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as e:
            log.append(f"{' '.join(cmd)}: {e}")
    return "; ".join(log)


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _find()
    log = ""
    if path is None and IN_CI:
        log = _apt_install()
        path = _find()
    if path is None:
        if IN_CI:
            pytest.fail(f"chromium is not installed and apt-get could not install it: {log}")
        pytest.skip("chromium not installed (apt-get install -y chromium chromium-driver); required under CI=true")
    return path


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_dashboard_page_shows_the_trials(chromium, tmp_path):
    dash = dashboard.make_dashboard(make_study(tmp_path, "cycle"), port=0)
    dash.start()
    try:
        url = f"{dash.url}/trials"  # the trial list of the study
        shot = tmp_path / "dashboard-trials.png"
        proc = _run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", url)
        assert shot.exists(), proc.stderr[-2000:]
        dom = _run(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    finally:
        dash.close()
    assert 20_000 < shot.stat().st_size < 5_000_000
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (900, 1280) and image.std() > 0.05  # not a blank page
    text = _text(dom.stdout)
    assert "refcycles" in text and "6 Trials" in text, text[:2000]
    for label in ("Trial 0 Complete Best Trial", "Trial 3 Pruned", "Trial 4 Pruned", "Trial 5 Fail"):
        assert label in text
    assert "0.9192" in text and "model.pt" in text  # the best trial's value and its model artifact
    print(f"screenshot: {shot}")
