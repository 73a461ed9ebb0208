"""A command's inputs checked before it prints or writes anything: one clear error, nothing created.

The CLI calls these first, so a bad study file, data file, storage or artifact directory is one
line and exit 2, with no banner, no progress bar, no database file and no directory left behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.config import StudyConfig
from cycle_optuna.errors import ConfigError, StorageError

if TYPE_CHECKING:  # data imports torch: read-only commands never need it
    from cycle_optuna.data import TaskData


def check_writable_dir(path: Path, *, what: str, room: int = 0) -> None:
    """`path` is a directory this process can write, or can be created as one, and takes `room`
    bytes now (a disk already full is refused before anything is created); leaves nothing behind."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {path}: read-only ({existing} is not writable)")
    try:  # what permissions do not show (root on /proc, a read-only mount): one real file, unnamed or gone at once
        with tempfile.TemporaryFile(dir=existing) as f:
            if room:
                f.write(b"\0" * room)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"cannot write {path}: {e.strerror} (free space and run again)") from None
        raise StorageError(f"cannot write {path}: {existing} takes no new files ({e.strerror or e})") from None


ROOM = 1 << 16  # bytes `run`/`worker` must be able to write where the study's files go before starting


def check_storage_location(url: str, *, create: bool) -> None:
    """A SQLite or journal file: its directory exists (writable, to create it), or for a reader
    the file itself exists. Server URLs are checked when opened."""
    path = storage_mod.file_path(url)  # an empty journal path is refused when the journal is opened
    if path is not None:
        storage_mod.check_file_location(url, path, create=create)


def artifact_dir(cfg: StudyConfig) -> Path:
    """The artifact directory the workers use ($CYCLE_OPTUNA_ARTIFACT_DIR over the study file)."""
    env = os.environ.get(storage_mod.ARTIFACTS_ENV_VAR)
    return Path(env) if env else config_mod.resolve_artifact_dir(cfg)


def for_run(cfg: StudyConfig, url: str, *, wait: storage_mod.StorageWait | None = None,
            say: Callable[[str], None] = print, logs: Path | None = None) -> TaskData:
    """Everything `run`/`worker` needs, checked in order of cost; the loaded data, to reuse.

    The storage is opened last (for a new SQLite file, that creates it): after it nothing but
    a study created with a different trial definition can be refused, and that writes nothing.
    With `wait` (`--wait-for-storage`), a database server that does not answer yet is waited for
    (saying so once) before it is opened, and again should it stop answering while it is opened,
    within the one allowance. `logs`: a folder that must take files too (`run --workers K`'s logs).
    """
    from cycle_optuna import worker
    from cycle_optuna.train import resolve_device

    where = f"{cfg.path}: " if cfg.path else ""
    try:
        device = resolve_device(cfg.train.device)  # a CUDA device the machine lacks fails here, not in every trial
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    if cfg.train.compile == config_mod.COMPILE_CUDAGRAPHS and device.type != "cuda":
        # CUDA graphs exist only on CUDA: on the CPU the setting would silently do nothing
        on = "train.device = 'cpu'" if cfg.train.device == "cpu" else "torch sees no CUDA device"
        raise ConfigError(f"{where}train.compile: {config_mod.COMPILE_CUDAGRAPHS!r} needs a CUDA device, and this run "
                          f"is on the CPU ({on}); use compile = true or false")
    cores = worker.available_cores()
    if cfg.train.threads > cores:  # more threads than cores only slows a trial down (and crashes torch when huge)
        raise ConfigError(f"{where}train.threads: {cfg.train.threads} is more than this machine's {cores} cores; at most "
                          "that, or 0 = cores / workers")
    _check_model_fits(cfg, device, where)
    _check_synthetic_fits(cfg, where)
    own = os.environ.get(storage_mod.ARTIFACTS_ENV_VAR)  # the variable overrides the file: name the one used
    check_writable_dir(artifact_dir(cfg), what=f"${storage_mod.ARTIFACTS_ENV_VAR}" if own else f"{where}study.artifact_dir",
                       room=ROOM)
    if logs is not None:  # `run --workers K` writes its workers' logs there
        check_writable_dir(logs, what="the workers' log folder (the study file's)")
    check_storage_location(url, create=True)
    if (db := storage_mod.file_path(url)) is not None:
        # a disk already full: one line now, not after the banner with an empty database file left behind
        check_writable_dir(db.parent, what="the storage file's folder", room=ROOM)
    from cycle_optuna.data import load_study_data

    data = load_study_data(cfg)  # with its test file, when [data] test_source names one
    config_mod.check_patch_len(cfg, data.seq_len)  # a file's length is known only once it is read
    wait = wait or storage_mod.StorageWait(url, 0, say)
    wait.until_answers()
    storage_mod.note_if_locked(url, say)
    reader = _existing_sqlite(url)
    if reader is not None:  # read first: a study it cannot join leaves the file untouched
        worker.check_joinable(cfg, reader, url, seq_len=data.seq_len)

    def open_writer() -> None:  # a read-only file or an unreachable server: one line, here
        writer = storage_mod.open_storage(url)
        if reader is None:
            worker.check_joinable(cfg, writer, url, seq_len=data.seq_len)

    wait.call(open_writer)
    return data


def _largest(cfg: StudyConfig, name: str) -> tuple[int, str]:
    """The largest value `name` takes in the study (baseline or space) and the key that allows it."""
    value, key = int(getattr(cfg.baseline, name)), f"baseline.{name}"
    for p in cfg.space:
        if p.name == name and (top := int(max(p.choices) if p.choices is not None else p.high)) > value:
            value, key = top, f"space.{name}"
    return value, key


def _check_model_fits(cfg: StudyConfig, device: Any, where: str) -> None:
    """The study's largest model must fit the device's memory: weights and gradients alone (8 bytes a
    parameter, a bound below what any optimizer needs). A hidden_dim of 16384 was otherwise killed by
    the kernel for memory after minutes, leaving a study behind."""
    from cycle_optuna.model import CONV_KERNELS

    h, key = _largest(cfg, "hidden_dim")
    layers, _ = _largest(cfg, "n_layers")
    stem, _ = _largest(cfg, "conv_stem")
    summary = any(config_mod.param_values(cfg, "summary_features"))
    params = (12 * layers + sum(CONV_KERNELS[:stem]) + 2 * summary) * h * h  # attention + MLP per layer, stem, summary
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        total, what = torch.cuda.get_device_properties(device).total_memory, "the GPU has"
    else:
        total, what = _memory(), "this machine has"
    if 8 * params > total:
        raise ConfigError(f"{where}{key}: a model of hidden_dim {h} with {layers} layer(s) has about {params:.2g} "
                          f"parameters; its weights and gradients alone take {8 * params / 2**30:,.0f} GiB, and {what} "
                          f"{total / 2**30:,.0f} GiB")


def _memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_synthetic_fits(cfg: StudyConfig, where: str) -> None:
    """The synthetic task is made in memory: one larger than this machine can hold is refused before
    anything is written (it was a MemoryError, or the kernel's kill, after the study existed)."""
    d = cfg.data
    if d.source != "synthetic" or config_mod.resolve_data_path(cfg) is not None:
        return
    need = d.n_samples * d.seq_len * d.n_features * config_mod.SYNTHETIC_BYTES_PER_VALUE
    if need > _memory():
        raise ConfigError(f"{where}data: a synthetic task of {d.n_samples} x {d.seq_len} x {d.n_features} values takes "
                          f"about {need / 2**30:,.0f} GiB to make, and this machine has {_memory() / 2**30:,.0f} GiB")


def _existing_sqlite(url: str):
    """A read-only storage on an existing SQLite file with Optuna's tables; None otherwise (a new
    file, another database, or one the writable open will name the trouble of)."""
    path = storage_mod.sqlite_path(url)
    if path is None or not path.is_file():
        return None
    try:
        return storage_mod.open_storage(url, heartbeat=False, create=False)
    except StorageError:
        return None


def for_read(url: str) -> None:
    """`status`, `best`, `report`: the storage must already hold something to read."""
    check_storage_location(url, create=False)


def check_output_file(path: Path, *, what: str, example: str) -> None:
    """`path` names a file this process can write (or create), not a directory; leaves nothing behind."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a file (name the file to write, e.g. {path / example})")
    if path.exists() and not path.is_file():  # a device or pipe (/dev/stdout): written in place (files.replacing)
        if not os.access(path, os.W_OK):
            raise StorageError(f"cannot write {path}: not writable")
        return
    check_writable_dir((path.resolve() if path.is_symlink() else path).parent, what=what)


def _artifacts_holding(path: Path, cfg: StudyConfig, *, itself: bool = False) -> Path | None:
    """The study's artifact folder ($CYCLE_OPTUNA_ARTIFACT_DIR over the study file's, as workers use)
    when `path` lies inside it (or, with `itself`, is it); else None."""
    artifacts, where = artifact_dir(cfg).resolve(), path.resolve()
    return artifacts if artifacts in where.parents or (itself and artifacts == where) else None


def for_report(out_dir: Path, cfg: StudyConfig) -> None:
    """`report`: its output directory can be written (or created), and is not the study's artifact
    folder (its models and checkpoints: the report's files would sit among them, served by the dashboard)."""
    artifacts = _artifacts_holding(out_dir, cfg, itself=True)
    if artifacts is not None:
        raise ConfigError(f"-o {out_dir}: that is the study's artifact folder {artifacts} (its models and "
                          "checkpoints); name a folder elsewhere")
    check_writable_dir(out_dir, what="report output directory")


def not_an_input(target: Path, cfg: StudyConfig | None, url: str | None, data_file: str | None, *, flag: str) -> None:
    """`predict -o`, `export --csv/--parquet`, `export.write`: the output is none of the files the
    command or the study reads (it would be replaced: a study database overwritten by a table is
    lost). `cfg` None: a study made elsewhere, of which only its database is known."""
    from cycle_optuna import config, storage

    db = storage.file_path(url) if url else None
    # SQLite's companions, whether there now or not: replacing one under a running worker loses its
    # commits, and SQLite deletes one it finds when the database closes (the output with it)
    if db is not None and target.resolve() in {Path(f"{db.resolve()}{end}") for end in ("-wal", "-shm", "-journal")}:
        raise ConfigError(f"{flag} {target}: that is a file of the study's database; name another file to write")
    if not target.is_file():
        return
    inputs = [(data_file, "the data file to predict on"), (db, "the study's database")]
    if cfg is not None:
        inputs += [(cfg.path, "the study file"), (config.resolve_data_path(cfg), "the study's data.source"),
                   (config.resolve_test_path(cfg), "the study's data.test_source")]
    for path, what in inputs:
        try:
            same = path is not None and os.path.samefile(target, path)
        except OSError:  # it does not exist: nothing to overwrite
            same = False
        if same:
            raise ConfigError(f"{flag} {target}: that is {what}; name another file to write")
    if cfg is None:
        return
    artifacts = _artifacts_holding(target, cfg)
    if artifacts is not None:  # the study's saved models and checkpoints
        raise ConfigError(f"{flag} {target}: that is in the study's artifact folder {artifacts} (its models and "
                          "checkpoints); name a file elsewhere")
