"""Refit: the best cycles' configurations trained again on all training series.

A cycle's model learns from the training split only: the validation split (or, under k-fold
cross-validation, each fold's held-out part) chose it. Once the study has chosen, `refit` trains
the configurations of the cycles the best model averages again on the training and validation
series together, with the study's seed, epochs and schedule, and keeps each one's last epoch
(nothing is held out to choose another). A refit model has as many networks as the cycle's own:
one, or under k-fold cross-validation k (seeds seed..seed+k-1) whose probabilities it averages as
the cycle's model averaged its folds'. The models are stored beside the cycles' in the study's
artifact store and named in the study attr ``refit_model``; `load_best_model`, `best`, `predict` and
the report then use them for as long as they are of the cycles the best model averages (the test
split stays out of both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import torch

from cycle_optuna import api, space
from cycle_optuna.best_model import Ensemble
from cycle_optuna import storage as storage_mod
from cycle_optuna.errors import StorageError, TrainingError
from cycle_optuna.objective import model_payload
from cycle_optuna.placement import CoreLoad, threads_beside
from cycle_optuna.train import EpochMetrics, model_kwargs, train_and_evaluate
from cycle_optuna.worker import available_cores, given_threads

EVAL_SERIES = 1024  # the training series scored after each epoch (progress, and the divergence guard)


def refit(study: api.StudyLike, storage: str | None = None, *, ensemble: int | None = None,
          say: Callable[[str], None] = lambda line: None,
          on_epoch: Callable[[int, EpochMetrics], None] | None = None) -> Any:
    """Train the best model's cycles (`ensemble` of them, default the study's) on all training
    series, store the models and return the best model made of them (a CycleModel, ``refit``).

    ``say`` receives a line per model; ``on_epoch(k, metrics)`` each epoch of the k-th (from 0).
    Nothing is recorded until every model is stored: an interrupted refit leaves the study as it was.
    """
    say = say if say is not None else (lambda line: None)  # None: silent, as the default
    for name, fn in (("say", say), ("on_epoch", on_epoch)):
        if fn is not None and not callable(fn):  # found out after the study is marked as being refit, it locked others out
            raise TypeError(f"{name}: expected a function, got {type(fn).__name__}")
    load = CoreLoad()  # other processes' use of the cores, measured over the start-up
    study = api.load_study(study, storage)
    cfg = api.study_config(study)
    if cfg is None:
        raise StorageError(f"study {study.study_name!r} has no stored cycle-optuna config; it cannot be refit")
    asked = ensemble if ensemble is not None else cfg.study.ensemble  # checked by _members
    members = api._members(study, api._completed(study), asked)
    where = api.study_artifact_dir(study)
    if where is None:
        raise StorageError(f"study {study.study_name!r} names no artifact directory; it cannot be refit")
    from cycle_optuna.preflight import check_writable_dir

    check_writable_dir(where, what="artifact directory", room=1 << 20)  # before any training
    data = api.study_data(study, cfg, "it cannot be refit")
    store = storage_mod.DurableArtifactStore(where)
    left = _left_behind(study)
    ids = [f"refit-{uuid.uuid4().hex}" for _ in members]
    try:  # named before the first write, so that a refit killed half-way leaves files the next one finds
        study.set_user_attr(api.REFIT_PENDING_ATTR, {"artifacts": ids, "worker": storage_mod.worker_id(),
                                                     "started": storage_mod.process_start(os.getpid())})
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # before any training
        raise StorageError(f"cannot write study {study.study_name!r} (a refit records its models on the study): "
                           f"{storage_mod.describe(e)}") from None
    written: list[str] = []
    threads = torch.get_num_threads()
    try:  # from here on, whatever fails (a `say` that raises included) ends the refit's claim on the study
        _remove_left(store, left, say)
        with torch.random.fork_rng(devices=[]):  # training seeds torch's generator: the caller's stays as it was
            old = _refit_models(study, cfg, data, members, asked, where, store, ids, written, load, say, on_epoch)
    except BaseException:
        for artifact_id in written:  # not named anywhere yet: an interrupted refit leaves nothing behind
            with contextlib.suppress(OSError):
                store.remove_all(artifact_id)
        with contextlib.suppress(Exception):  # the storage may be what failed: then the next refit sweeps
            study.set_user_attr(api.REFIT_PENDING_ATTR, None)
        raise
    finally:
        torch.set_num_threads(threads)
    study.set_user_attr(api.REFIT_PENDING_ATTR, None)
    if isinstance(old, dict):  # the refit these replace: no reader can reach them any more
        for artifact_id in old.get("artifacts") or ():
            if artifact_id not in written:
                with contextlib.suppress(OSError, optuna.artifacts.exceptions.ArtifactNotFound):
                    store.remove_all(artifact_id)
    return api.load_best_model(study, ensemble=len(members), refit=True)


def _refit_models(study: optuna.Study, cfg: Any, data: Any, members: list, asked: int, where: Path, store: Any,
                  ids: list[str], written: list[str], load: CoreLoad, say: Callable[[str], None],
                  on_epoch: Callable[[int, EpochMetrics], None] | None) -> Any:
    """Train and store the refit models (their ids appended to `written` as each is written) and
    record them on the study; returns the refit record they replace."""
    if not where.is_dir():  # lost with the cycles' models: the refit ones make the study's best model again
        say(f"the artifact directory {where} is missing (the cycles' models with it): the refit models go to a new one")
    x, y = data.pooled()
    scored = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.study.seed))[:EVAL_SERIES]
    full = dataclasses.replace(data, x_train=x, y_train=y, x_val=x[scored], y_val=y[scored], fold_ids=None)
    train_cfg = dataclasses.replace(cfg.train, early_stopping_patience=0)
    cycles = ", ".join(str(t.number + 1) for t in members)
    fewer = (f" (of the {asked} asked for, the study has {len(members)} completed cycle{'s' if len(members) > 1 else ''} "
             "that saved a model)") if len(members) < asked else ""
    say(f"refit of study {study.study_name}: cycle{'s' if len(members) > 1 else ''} {cycles}{fewer} trained on all "
        f"{len(y)} training series ({len(data.y_train)} training + {len(data.y_val)} validation), "
        f"{train_cfg.epochs} epochs each")
    nets = data.n_folds  # as many networks as each cycle's own model averages, each on every series
    if nets > 1:
        say(f"the cycles were cross-validated: each refit model averages {nets} networks, as each cycle's own "
            f"averaged its {nets} folds' (seeds {cfg.study.seed}..{cfg.study.seed + nets - 1})")
    chosen = given_threads(cfg)
    if chosen:
        torch.set_num_threads(chosen)
    else:  # as a worker on its own: the cores other jobs leave free (a spinning thread kept off its core stalls every step)
        cores = available_cores()
        torch.set_num_threads(threads_beside(cores, cores, load.others(wait=True)))
    for k, t in enumerate(members):
        hp = space.to_hyperparams(cfg, t.params)
        t0 = time.perf_counter()
        results = []
        for j in range(nets):
            result = train_and_evaluate(full, hp, train_cfg, seed=cfg.study.seed + j, last_weights=True,
                                        report=(lambda m, k=k: on_epoch(k, m)) if on_epoch else None)
            if result.diverged:
                raise TrainingError(f"cycle {t.number + 1} diverged when trained on all training series (epoch "
                                    f"{result.epochs_run}); nothing was stored: the best model stays the cycles' own")
            results.append(result)
        model = results[0].model if nets == 1 else Ensemble([r.model for r in results])
        buf = io.BytesIO()
        torch.save(model_payload(model, model_kwargs(full, hp, cfg.train.init_gain), data, t.params), buf)
        buf.seek(0)
        artifact_id = ids[k]
        where.mkdir(parents=True, exist_ok=True)
        written.append(artifact_id)
        store.write(artifact_id, buf)
        storage_mod.pause_for_tests("refit model written")
        last = [r.history[-1] for r in results]
        say(f"cycle {t.number + 1} refit ({k + 1} of {len(members)}): training loss "
            f"{sum(m.val_loss for m in last) / nets:.4f}, accuracy {sum(m.val_accuracy for m in last) / nets:.2%} "
            f"on {len(full.y_val)} of its series{' (mean of its networks)' if nets > 1 else ''}, "
            f"{time.perf_counter() - t0:.0f} s")
    old = study.user_attrs.get(api.REFIT_ATTR)
    study.set_user_attr(api.REFIT_ATTR, {"trials": [t.number for t in members], "artifacts": written,
                                         "series": int(len(y)), "epochs": train_cfg.epochs})
    return old


def _left_behind(study: optuna.Study) -> dict[str, Any]:
    """The model files of a refit killed before it finished (the study attr ``refit_pending`` names
    them before they are written): {"artifacts", "worker"}, with "elsewhere" (no files) when its
    process ran on another machine; refuses while that refit still runs here."""
    rec = study.user_attrs.get(api.REFIT_PENDING_ATTR)
    if not isinstance(rec, dict) or not rec.get("artifacts"):
        return {"artifacts": []}
    worker = rec.get("worker")
    alive = storage_mod.process_alive(worker, rec.get("started"))
    if alive is None:  # its process cannot be seen from here: it may still be writing
        return {"artifacts": [], "elsewhere": f"a refit by {worker} did not finish, or is still running: "
                                              "its files are left in place"}
    if alive and worker != storage_mod.worker_id():
        raise StorageError(f"study {study.study_name!r} is being refit by process {worker} on this machine; "
                           "wait for it to finish, or stop it")
    named = set((study.user_attrs.get(api.REFIT_ATTR) or {}).get("artifacts") or ())
    return {"artifacts": [a for a in rec["artifacts"] if a not in named], "worker": worker}  # named: killed after naming


def _remove_left(store: storage_mod.DurableArtifactStore, left: dict[str, Any], say: Callable[[str], None]) -> None:
    if left.get("elsewhere"):
        say(left["elsewhere"])
    removed = 0
    for artifact_id in left["artifacts"]:
        with contextlib.suppress(OSError):
            removed += store.remove_all(artifact_id)
    if removed:
        say(f"removed {removed} model file{'s' if removed > 1 else ''} of a refit that was stopped before it "
            f"finished ({left['worker']})")
