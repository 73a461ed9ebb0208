"""The cycle report: gather a study's cycles and measurements, then write report.md and its plots.

The reasoning (samples, common-epoch comparisons, trends, recommendations, the stop rule) lives in
`cycle_optuna.analysis` as pure functions, the words in `cycle_optuna.report_markdown`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import BaseStorage

from cycle_optuna import analysis as an
from cycle_optuna import api
from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.analysis import Analysis
from cycle_optuna.api import Cycle
from cycle_optuna.config import StudyConfig
from cycle_optuna.errors import CycleOptunaError, StorageError
from cycle_optuna.report_markdown import render, summary

__all__ = ["Analysis", "analyse", "default_dir", "render", "summary", "write_report"]


def analyse(study: api.StudyLike, storage: str | BaseStorage | None = None, *, test: bool = True) -> Analysis:
    """Load the study and compute everything the report shows."""
    url = None
    if not isinstance(study, optuna.Study) and Path(study).suffix.lower() == ".toml":
        url = storage_mod.mask(storage_mod.resolve_url(config_mod.load(study, check_files=False), storage if isinstance(storage, str) else None))
    study = api.load_study(study, storage)
    cyc = api.cycles(study)
    complete = [c for c in cyc if c.state == "COMPLETE" and c.value is not None]
    best = min(complete, key=lambda c: c.value) if complete else None
    a = Analysis(study.study_name, api.study_config(study), study.user_attrs.get(api.STATS_ATTR), cyc, best,
                 storage=url, baselines=api.baselines(study), search=api.search_settings(study))
    a.bayes = _bayes(a.cfg, folds=(a.stats or {}).get("folds", 1))
    if best is not None and test:
        try:
            a.test = api.held_out_score(study)
        except CycleOptunaError as e:
            a.test_note = str(e)
    elif best is not None:
        a.test_note = "not computed (report run without the test evaluation)"
    a.importance, a.importance_note = _importances(study, cyc)
    a.importance_warning = an.importance_warning(len(complete)) if a.importance else ""
    return a


def _bayes(cfg: StudyConfig | None, *, folds: int = 1) -> dict[str, float] | None:
    """The Bayes-optimal accuracy on the series the cycles are scored on (the val split, or under
    cross-validation the train and val series its folds pool) and on the test split, for the
    built-in synthetic task."""
    if cfg is None or cfg.data.source != "synthetic" or config_mod.resolve_data_path(cfg) is not None:
        return None
    from cycle_optuna.data import BAYES_MAX_DIM, n_informative

    if cfg.data.seq_len * n_informative(cfg.data.n_features) > BAYES_MAX_DIM:
        return None  # its covariance would take minutes and gigabytes: the report goes without it
    try:
        from cycle_optuna.data import bayes_predict, make_synthetic, stratified_split

        x, y = make_synthetic(cfg.data, cfg.study.seed)
        tr, va, te = stratified_split("<synthetic task>", y, cfg.data.n_classes, cfg.data.val_fraction,
                                      cfg.data.test_fraction, cfg.study.seed)
        scored = np.concatenate([tr, va]) if isinstance(folds, int) and folds > 1 else va
        return {name: float(np.mean(bayes_predict(cfg.data, x[idx]) == y[idx])) for name, idx in (("val", scored), ("test", te))}
    except Exception:  # noqa: BLE001 - context only: a task the oracle does not cover is reported without it
        return None


def _importances(study: optuna.Study, cycles: list[Cycle]) -> tuple[dict[str, float], str]:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 complete cycles, the study has {len(done)}"
    names = sorted({k for t in done for k in t.params})
    moved = an.varied(cycles, names)
    if not moved:
        return {}, f"no parameter varied across the {len(done)} complete cycles"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # PED-ANOVA (needs no extra packages), over the parameters that varied only: one held
            # constant would otherwise get a share of the variance it cannot explain
            values = optuna.importance.get_param_importances(study, params=moved)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return {}, f"not computable: {e}"
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    return values, "" if values else "no parameter varied across complete cycles"


# -- helpers ---------------------------------------------------------------------------------------

def default_dir(study: api.StudyLike, name: str) -> Path:
    """Beside the study file when given one, else ./<name>-report."""
    if not isinstance(study, optuna.Study) and Path(study).suffix.lower() == ".toml":
        return Path(study).parent / f"{name}-report"
    return Path(f"{name}-report")


def write_report(
    study: api.StudyLike,
    out_dir: str | os.PathLike | None = None,
    storage: str | BaseStorage | None = None,
    *,
    test: bool = True,
) -> Path:
    """Write report.md and its PNG plots into `out_dir`; returns the report's path."""
    a = analyse(study, storage, test=test)
    out = Path(out_dir) if out_dir is not None else default_dir(study, a.name)
    path = out / "report.md"
    made = not out.exists()
    stage = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        # every file is written in a folder beside the report first, then renamed in, report.md
        # last: a full disk leaves the folder as it was, not new plots beside an old report.md
        stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
        from cycle_optuna import plots  # matplotlib: only where plots are drawn (the dashboard's notes draw none)

        pngs = plots.write_all(a.cycles, a.importance, stage, note=a.importance_note, warning=a.importance_warning)
        (stage / "report.md").write_text(render(a, {k: p.name for k, p in pngs.items()}))
        for p in [*pngs.values(), stage / "report.md"]:
            os.replace(p, out / p.name)
    except BaseException as e:  # Ctrl-C included: a folder this call made goes with it
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: one line naming where, as `export` and `predict` say it
            raise StorageError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    from cycle_optuna import dashboard

    try:
        dashboard.write_notes(api.load_study(study, storage), summary=summary(a))
    except (optuna.exceptions.StorageInternalError, OSError) as e:  # a read-only database or journal: the report stands
        cause = str(e.__cause__ or e).strip().splitlines()[0] if str(e.__cause__ or e).strip() else type(e).__name__
        logging.getLogger(__name__).warning("%s written; the study's dashboard notes were not refreshed: %s", path,
                                            storage_mod.mask(cause))
    return path
