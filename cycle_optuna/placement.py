"""Where workers run: each spawned worker on one GPU through its CUDA_VISIBLE_DEVICES, or on the CPU,
with as many torch threads as the cores other processes leave free."""

from __future__ import annotations

import math
import os
import time

from cycle_optuna.errors import ConfigError

GPU_ENV_VAR = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES entries (ids or UUIDs), in torch's order.

    Counting them does not start a CUDA context, so workers spawned afterwards are unaffected.
    """
    env = os.environ.get(GPU_ENV_VAR)
    if env is not None:
        entries = [e.strip() for e in env.split(",")]
        # CUDA stops at the first invalid entry ("" or "-1" hide the rest)
        entries = entries[:next((i for i, e in enumerate(entries) if e in ("", "-1")), len(entries))]
        # and there are no more GPUs than torch sees through it: none on a machine without CUDA,
        # whatever the variable names
        return entries[:cuda_device_count()] if entries else []
    return [str(i) for i in range(cuda_device_count())]


def cuda_device_count() -> int:
    """The GPUs torch sees (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count()


def parse_gpus(text: str) -> list[int]:
    """``--gpus 0,2`` -> [0, 2]: indices into the visible GPUs."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus must be GPU numbers separated by commas, like 0,2, but got {text!r}.") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus must be distinct GPU numbers >= 0, but got {text!r}.")
    return ids


def plan(workers: int | None, *, available: list[str], gpus: list[int] | None = None,
         per_gpu: int | None = None) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES value (None: the CPU), round robin over the chosen GPUs.

    The chosen GPUs are ``gpus`` (indices into ``available``), else every available one. Without
    ``workers``, ``per_gpu`` workers go on each chosen GPU (one worker in all when there is none);
    with both, ``workers`` may not exceed ``per_gpu`` per GPU.
    """
    if not available and (gpus is not None or per_gpu is not None):
        raise ConfigError("--gpus/--workers-per-gpu: torch sees no CUDA device on this machine")
    if gpus is not None:
        missing = [g for g in gpus if g >= len(available)]
        if missing:
            raise ConfigError(f"--gpus: there is no GPU {missing[0]}; torch sees {len(available)} (0-{len(available) - 1})")
        chosen = [available[g] for g in gpus]
    else:
        chosen = list(available)
    if not chosen:
        return [None] * (workers or 1)
    if workers is None:
        workers = (per_gpu or 1) * len(chosen) if per_gpu is not None else 1
    if per_gpu is not None and workers > per_gpu * len(chosen):
        raise ConfigError(f"--workers {workers} is more than --workers-per-gpu {per_gpu} on {len(chosen)} GPU(s)")
    return [chosen[i % len(chosen)] for i in range(workers)]


def worker_env(gpu: str | None) -> dict[str, str]:
    """Environment entries that put one spawned worker on ``gpu`` (nothing for a CPU worker)."""
    return {} if gpu is None else {GPU_ENV_VAR: gpu}


def pin(gpus: list[int]) -> str:
    """``worker --gpus N``: restrict this process to one visible GPU, before CUDA starts; its entry."""
    if len(gpus) != 1:
        raise ConfigError(f"--gpus: a worker runs on one GPU, got {len(gpus)}; start one worker per GPU, "
                          "or use run --workers K --gpus ...")
    (gpu,) = plan(1, available=visible_gpus(), gpus=gpus)
    os.environ[GPU_ENV_VAR] = gpu
    return gpu


def device_label(device: str) -> str:
    """What ``status`` shows for a worker training on ``device`` ("cpu", "cuda"): "cpu" or "gpu <id>"."""
    if device != "cuda":
        return "cpu"
    ids = visible_gpus()
    return f"gpu {ids[0]}" if ids else "gpu"


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the machine's cores from /proc/stat; None without it."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    try:
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        ticks = [int(v) for v in fields[1:9]]
    except ValueError:
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


class CoreLoad:
    """How many cores other processes keep busy, measured between calls from the machine's CPU time
    (/proc/stat) less this process's own (Linux; elsewhere unknown).

    PyTorch's OpenMP threads wait for each other by spinning: one kept off its core by another job
    stalls every step (two threads on two busy cores ran a seed-sized trial about 12x slower than one).
    """

    MIN_WINDOW = 0.25  # seconds: a shorter window is a few clock ticks, too coarse to tell

    def __init__(self) -> None:
        self._mark = self._now()
        self.last: float | None = None  # the last measurement, kept while windows are too short

    @staticmethod
    def _now() -> tuple[float, float, tuple[int, int] | None]:
        return time.monotonic(), time.process_time(), _cpu_jiffies()

    def others(self, *, wait: bool = False) -> float | None:
        """Cores busy with other processes, on average since the last measurement; the previous
        figure while less than MIN_WINDOW has passed (``wait``: sleep out the window instead)."""
        if self._mark[2] is None:
            return None
        elapsed = time.monotonic() - self._mark[0]
        if elapsed < self.MIN_WINDOW:
            if not wait:
                return self.last
            time.sleep(self.MIN_WINDOW - elapsed)
        now = self._now()
        (wall0, own0, (busy0, _)), (wall1, own1, jiffies) = self._mark, now
        if jiffies is None:
            return None
        self._mark = now
        busy = (jiffies[0] - busy0) / os.sysconf("SC_CLK_TCK") - (own1 - own0)
        self.last = max(0.0, busy / max(wall1 - wall0, 1e-9))
        return self.last


def threads_beside(share: int, cores: int, others: float | None) -> int:
    """Threads for a worker whose share of the cores is `share`, while other processes keep `others`
    cores busy: never more than the cores they leave free (a quarter of a core busy elsewhere already
    takes one), at least 1."""
    if others is None:
        return share
    return max(1, min(share, math.floor(cores - others + 0.25)))
