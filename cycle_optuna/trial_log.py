"""One log line per trial event (start with its move, end with state, value, epochs, duration;
an epoch's figures every PROGRESS_EVERY_S of a long trial), text or JSON.

Workers write these to their log, and `run` prints them when its output is not a terminal (nohup,
SLURM, CI), where a progress bar would show only its final frame.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from cycle_optuna import optuna_internals as internals
from cycle_optuna import storage as storage_mod
from cycle_optuna.jsonvalues import finite_or_none

MOVE_ATTR, REASON_ATTR = "cycle_move", "cycle_reason"  # written by the cycle samplers
# a trial running longer than this writes an epoch line at most this often: a log is never silent
# for minutes (8 series under 4 folds took 100 s a cycle), nor a line an epoch for fast ones
PROGRESS_EVERY_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrialLog:
    """Writes a line when a trial starts and when it ends, through `echo`."""

    def __init__(self, *, json_lines: bool = False, echo: Callable[[str], None] = print,
                 worker: str | None = None, every_s: float = PROGRESS_EVERY_S) -> None:
        self.json_lines, self.echo = json_lines, echo
        self.worker = worker or storage_mod.worker_id()
        self.every_s = every_s
        self.started: dict[int, float] = {}  # trial number -> monotonic start
        self.last_line: dict[int, float] = {}  # trial number -> monotonic time of its last line

    def _emit(self, record: dict[str, Any], text: str) -> None:
        if self.json_lines:
            self.echo(json.dumps({"time": _now(), **record}, default=str))
        else:
            self.echo(f"{_now()} {text}")

    def begin(self, trial: optuna.Trial) -> None:
        """The trial's start: cycle, worker, the sampler's move and reason when it wrote them."""
        self.started[trial.number] = time.monotonic()
        frozen = internals.storage_of(trial.study).get_trial(internals.trial_id_of(trial))  # the sampler's attrs and the retry mark
        move, reason = frozen.user_attrs.get(MOVE_ATTR), frozen.user_attrs.get(REASON_ATTR)
        retry = frozen.system_attrs.get("failed_trial")
        record = {"event": "trial_start", "cycle": trial.number + 1, "trial": trial.number, "worker": self.worker,
                  "move": move, "reason": reason, "retry_of": retry}
        text = f"cycle {trial.number + 1} started on {self.worker}"
        if retry is not None:
            text += f" (retry of cycle {retry + 1})"
        if move:
            text += f": {move}"
        if reason:  # said once: the reason of a retry begins with the same words
            text += f" ({reason.replace(f': retry of cycle {retry + 1}; ', ': ', 1) if retry is not None else reason})"
        self._emit(record, text)

    def epoch(self, trial: optuna.Trial, m: Any) -> None:
        """An epoch's validation figures, once `every_s` has passed since the trial's last line."""
        now = time.monotonic()
        start = self.started.get(trial.number)
        if start is None or now - self.last_line.get(trial.number, start) < self.every_s:
            return
        self.last_line[trial.number] = now
        record = {"event": "epoch", "cycle": trial.number + 1, "trial": trial.number, "worker": self.worker,
                  "epoch": m.epoch + 1, "val_loss": finite_or_none(m.val_loss), "val_accuracy": finite_or_none(m.val_accuracy),
                  "elapsed_s": round(now - start, 1)}
        self._emit(record, f"cycle {trial.number + 1} epoch {m.epoch + 1}: val loss {m.val_loss:.4f}, "
                           f"acc {m.val_accuracy:.1%}, {now - start:.0f}s so far")

    def end(self, study: optuna.Study, t: FrozenTrial) -> None:
        """The trial's end: state, value, epochs, duration; the failure cause when it failed."""
        self.last_line.pop(t.number, None)
        start = self.started.pop(t.number, None)
        secs = time.monotonic() - start if start is not None else (t.duration.total_seconds() if t.duration else None)
        attrs = t.user_attrs
        epochs = attrs.get("epochs_run", len(t.intermediate_values))
        state = t.state.name
        record = {"event": "trial_end", "cycle": t.number + 1, "trial": t.number, "worker": self.worker,
                  "state": state, "value": finite_or_none(t.value), "val_accuracy": finite_or_none(attrs.get("val_accuracy")),
                  "epochs": epochs, "duration_s": None if secs is None else round(secs, 3),
                  "diagnosis": attrs.get("diagnosis")}
        text = f"cycle {t.number + 1} {state.lower()}"
        if t.value is not None:
            text += f": val loss {t.value:.4f}"
        elif t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            text += f": last val loss {last:.4f}"
        acc = attrs.get("val_accuracy")
        if isinstance(acc, (int, float)):
            text += f", acc {acc:.1%}"
        text += f", {epochs} epochs" + ("" if secs is None else f", {secs:.1f}s")
        if t.state.name == "PRUNED" and attrs.get("prune_reason"):
            record["reason"] = attrs["prune_reason"]
            text += f" ({attrs['prune_reason']})"
        if t.state.name == "FAIL":
            from cycle_optuna.api import failure_cause

            record["fail_cause"] = failure_cause(t)
            text += f"; cause: {record['fail_cause']}"
        self._emit(record, text)
