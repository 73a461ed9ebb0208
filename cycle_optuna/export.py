"""A study's cycles as a table: one row per cycle (params, state, value, user attrs, reason) to CSV or Parquet."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna

from cycle_optuna import api, files
from cycle_optuna.errors import ConfigError, StorageError
from cycle_optuna.preflight import check_output_file

FIRST = ["cycle", "number", "state", "value", "reason", "key_change", "datetime_start", "datetime_complete",
         "duration_s"]


def _cell(v: Any) -> Any:
    """Scalars stay as they are; lists and dicts become JSON so every column is one plain type."""
    if isinstance(v, (list, dict, tuple)):
        return json.dumps(v, default=str)
    return v


def frame(study: api.StudyLike, storage: str | None = None):
    """The study's cycles as a pandas DataFrame: params as `params_<name>`, user attrs as `user_attrs_<name>`."""
    import pandas as pd

    study = api.load_study(study, storage)
    cycles = {c.number: c for c in api.cycles(study)}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        c = cycles[t.number]
        row: dict[str, Any] = {
            "cycle": c.cycle, "number": t.number, "state": t.state.name, "value": t.value,
            "reason": c.reason, "key_change": c.key_change,
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
        }
        row.update({f"params_{k}": v for k, v in c.params.items()})
        row.update({f"user_attrs_{k}": _cell(v) for k, v in sorted(t.user_attrs.items())})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=FIRST)
    rest = sorted(c for c in df.columns if c not in FIRST)
    return df[FIRST + [c for c in rest if c.startswith("params_")] + [c for c in rest if not c.startswith("params_")]]


def _not_the_studys_own(path: Path, given: api.StudyLike, storage: str | None, study: optuna.Study) -> None:
    """The output is no file the study reads (its database, study file, data, models): it would be
    replaced by the table, as `cycle-optuna export` refuses."""
    from cycle_optuna import config as config_mod
    from cycle_optuna import optuna_internals as internals
    from cycle_optuna import storage as storage_mod
    from cycle_optuna.preflight import not_an_input

    if isinstance(given, (str, os.PathLike)) and Path(given).is_file():  # a study file: it is one of them
        cfg = config_mod.load(Path(given), check_files=False)
        url = storage_mod.resolve_url(cfg, storage if isinstance(storage, str) else None)
    else:  # a study or a name: its stored config, and the database or journal it was loaded from
        cfg = api.study_config(study)
        store = internals.storage_of(study)
        url = storage if isinstance(storage, str) else getattr(internals.backend_of(store), "url", None)
        if not isinstance(url, str) and (journal := storage_mod.journal_file(store)) is not None:
            url = f"journal:{journal}"
    not_an_input(path, cfg, url if isinstance(url, str) else None, None, flag="path")


def write(study: api.StudyLike, path: str | os.PathLike, *, storage: str | None = None, fmt: str | None = None) -> Path:
    """Write the cycle table to `path` as CSV or Parquet (by `fmt`, else the file's suffix); returns the path."""
    path = Path(path)
    if fmt is not None:
        if not isinstance(fmt, str) or fmt.lower().lstrip(".") not in ("csv", "parquet"):
            raise ConfigError(f"fmt: unknown export format {fmt!r} (use 'csv' or 'parquet')")
        fmt = fmt.lower().lstrip(".")
    fmt = fmt or {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"{path}: unknown export format {path.suffix or '(no suffix)'!r} (use .csv or .parquet)")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401 - pandas needs it for Parquet
        except ImportError:
            raise ConfigError("Parquet export needs pyarrow: pip install 'cycle-optuna[parquet]' "
                              "(or export --csv FILE)") from None
    # the output path before the study is read: a path it cannot write is one line, nothing written
    check_output_file(path, what="export output directory", example=f"cycles.{fmt}")
    loaded = api.load_study(study, storage)
    _not_the_studys_own(path, study, storage, loaded)
    df = frame(loaded)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.replacing(path) as tmp:  # a failed write leaves no truncated file
            if fmt == "csv":
                df.to_csv(tmp, index=False)
            else:
                df.to_parquet(tmp, index=False)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
    return path

