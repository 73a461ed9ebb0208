"""Per-trial log lines from real worker processes: a start line with the move, an end line with the outcome."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from workers_helpers import ROOT, worker_env, write_study

CYCLE = """
[sampler]
type = "cycle"
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycle_optuna.cli", *args], cwd=cwd, env=worker_env(),
                          capture_output=True, text=True, timeout=300)


def test_worker_writes_json_lines_per_trial(tmp_path):
    path = write_study(tmp_path, n_trials=3, epochs=2)
    path.write_text(path.read_text().replace('[sampler]\ntype = "random"', '[sampler]\ntype = "cycle"'))
    proc = _cli("worker", str(path), "--log-json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    starts = [r for r in records if r["event"] == "trial_start"]
    ends = [r for r in records if r["event"] == "trial_end"]
    assert [r["cycle"] for r in starts] == [1, 2, 3] and [r["cycle"] for r in ends] == [1, 2, 3]
    assert starts[0]["move"] == "baseline" and starts[1]["move"] and starts[1]["reason"].startswith("cycle 2")
    for r in ends:
        assert r["state"] in ("COMPLETE", "PRUNED") and r["epochs"] >= 1 and r["duration_s"] > 0
        assert re.fullmatch(r".+:\d+", r["worker"]) and r["time"].endswith("+00:00")
        assert r["state"] != "COMPLETE" or isinstance(r["value"], float)


def test_run_without_a_terminal_prints_text_lines(tmp_path):
    path = write_study(tmp_path, n_trials=2, epochs=2)
    proc = _cli("run", str(path), cwd=tmp_path)  # stdout is a pipe, as under nohup, SLURM or CI
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    started = [line for line in lines if re.search(r" cycle \d started on ", line)]
    ended = [line for line in lines if re.search(r" cycle \d (complete|pruned): (last )?val loss \d\.\d{4}", line)]
    assert len(started) == 2 and len(ended) == 2, proc.stdout
    assert re.search(r"cycle 1 complete: val loss \d\.\d{4}, acc \d+\.\d%, 2 epochs, \d+\.\ds$", ended[0])
    assert not re.search(r"trials +━", proc.stdout)  # no progress-bar frames in a log
    assert "cycles of tiny" in proc.stdout


def test_run_with_workers_without_a_terminal_prints_the_workers_lines(tmp_path):
    path = write_study(tmp_path, n_trials=3, epochs=2)
    proc = _cli("run", str(path), "--workers", "2", cwd=tmp_path)  # stdout a pipe: no live view
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = re.findall(r" cycle (\d) started on (\S+:\d+)", proc.stdout)
    ended = re.findall(r" cycle (\d) (?:complete|pruned): ", proc.stdout)
    assert sorted(c for c, _ in started) == ["1", "2", "3"] and sorted(ended) == ["1", "2", "3"], proc.stdout
    assert len({w for _, w in started}) == 2  # both workers' lines, as they wrote them
    assert not re.search(r"trials +━", proc.stdout)  # no frame of a live view in a log
    assert re.search(r"(?m)^ *cycles of tiny *$", proc.stdout)  # the table's title on a line of its own
    assert re.search(r"(?m)^best: cycle \d, val loss \d\.\d{4}.*'cycle-optuna best \S+' gives its held-out test accuracy "
                     r"and the model$", proc.stdout), proc.stdout  # under it, as a single worker's run closes
    # the data's note once, from `run`; each worker's log keeps its own copy, which is not echoed
    note = [line for line in proc.stdout.splitlines() if line.startswith("note: the validation split holds 6 series")]
    assert len(note) == 1, proc.stdout
    assert all(note[0] in log.read_text() for log in tmp_path.glob("tiny-worker-*.log"))


def test_each_trial_gets_its_dashboard_note_as_it_ends(tmp_path):
    import optuna
    import optuna_dashboard

    path = write_study(tmp_path, n_trials=2, epochs=1)
    proc = _cli("worker", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    system = study._storage.get_study_system_attrs(study._study_id)
    from optuna_dashboard._note import get_note_from_system_attrs

    for t in study.trials:
        body = get_note_from_system_attrs(system, t._trial_id)["body"]
        assert body.startswith(f"### Cycle {t.number + 1} (trial {t.number})") and "- **Outcome:** " in body
    assert optuna_dashboard.get_note(study) == ""  # the study note comes with `run` and `report`


def test_run_with_workers_passes_log_json_to_each_worker(tmp_path):
    path = write_study(tmp_path, n_trials=2, epochs=1)
    proc = _cli("run", str(path), "--workers", "2", "--log-json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = sorted(tmp_path.rglob("tiny-worker-*.log"))
    assert len(logs) == 2, list(tmp_path.rglob("*"))
    records = [json.loads(line) for log in logs for line in log.read_text().splitlines() if line.startswith("{")]
    assert sorted(r["cycle"] for r in records if r["event"] == "trial_end") == [1, 2], [log.read_text() for log in logs]


def test_run_starts_no_more_workers_than_trials_left(tmp_path):
    path = write_study(tmp_path, n_trials=2, epochs=1)
    proc = _cli("run", str(path), "--workers", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: 2 trial(s) left to run: starting 2 worker(s), not 5" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("tiny-worker-*.log")) == ["tiny-worker-1.log", "tiny-worker-2.log"]


def test_a_long_trial_writes_its_epochs_at_most_once_an_interval(tmp_path):
    """Without a terminal a slow cycle (8 series under 4 folds: 100 s) printed nothing from its start
    line to its end line; now an epoch line once the interval has passed, none for a quick trial."""
    from cycle_optuna import config, worker
    from cycle_optuna.trial_log import PROGRESS_EVERY_S, TrialLog

    path = write_study(tmp_path, n_trials=1, epochs=3)
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    lines: list[str] = []
    log = TrialLog(echo=lines.append, every_s=0.0)  # every epoch of this one
    hooks = worker.Hooks(on_trial_begin=log.begin, on_epoch=log.epoch, on_trial_end=log.end)
    study = worker.run_worker(config.load(path), url, hooks=hooks)
    epochs = [re.search(r" cycle 1 epoch (\d+): val loss \d\.\d{4}, acc \d+\.\d%, \d+s so far$", line)
              for line in lines if " epoch " in line]
    assert all(epochs) and [int(m[1]) for m in epochs] == list(range(1, len(study.trials[0].intermediate_values) + 1))
    assert " cycle 1 started " in lines[0] and " cycle 1 complete" in lines[-1]

    assert PROGRESS_EVERY_S >= 10  # the default: a trial of a second writes its start and end only
    lines.clear()
    log = TrialLog(echo=lines.append)
    hooks = worker.Hooks(on_trial_begin=log.begin, on_epoch=log.epoch, on_trial_end=log.end)
    worker.run_worker(config.override(config.load(path), n_trials=2), url, hooks=hooks)
    assert len(lines) == 2 and " cycle 2 started " in lines[0], lines


def test_a_packing_worker_logs_each_trial_start_before_the_pack_trains(tmp_path):
    # a pack trains its trials together; their start lines came only once the pack had finished,
    # each just before its end line, with a duration of a few milliseconds
    import optuna

    path = write_study(tmp_path, n_trials=2, epochs=3, n_samples=60)
    path.write_text(path.read_text().replace("threads = 1", "threads = 1\npack = 2"))
    proc = _cli("worker", str(path), "--log-json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    events = [(r["event"], r["cycle"]) for r in records if r["event"] in ("trial_start", "trial_end")]
    assert events == [("trial_start", 1), ("trial_start", 2), ("trial_end", 1), ("trial_end", 2)]
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}").trials
    for r in (r for r in records if r["event"] == "trial_end"):
        assert r["duration_s"] >= trials[r["trial"]].user_attrs["train_seconds"]  # it covers the training


def test_a_retrys_start_line_says_retry_once():
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from cycle_optuna.sampler import CycleSampler
    from cycle_optuna.storage import retry_callback
    from cycle_optuna.trial_log import TrialLog

    space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    study = optuna.create_study(sampler=CycleSampler(baseline={"lr": 1e-3}, seed=0))
    study.tell(study.ask(space), 1.0)
    lost = study.ask(space)
    study.tell(lost, state=TrialState.FAIL)
    retry_callback()(study, study.trials[lost.number])
    lines: list[str] = []
    log = TrialLog(echo=lines.append, worker="w:1")
    log.begin(study.ask(space))
    assert lines[0].endswith(f"cycle 3 started on w:1 (retry of cycle 2): lr x2 (cycle 3: "
                             f"{lost.user_attrs['cycle_reason'].split(': ', 1)[1]})"), lines
    assert lines[0].count("retry of cycle 2") == 1
