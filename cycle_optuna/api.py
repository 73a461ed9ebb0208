"""Python queries on a study: load it, its best params/trial/model, and one record per cycle."""

from __future__ import annotations

import logging
import math
import operator
import os
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from cycle_optuna import optuna_internals as internals
from cycle_optuna.attrs import (  # noqa: F401 - re-exported: api.CONFIG_ATTR etc.
    BASELINES_ATTR, CONFIG_ATTR, MODEL_ATTR, REFIT_ATTR, REFIT_PENDING_ATTR, SEARCH_ATTR, STATS_ATTR,
)
from cycle_optuna import redact
from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.config import PARAM_NAMES, StudyConfig
from cycle_optuna.errors import ConfigError, DataError, StorageError
from cycle_optuna.jsonvalues import finite_or_none

if TYPE_CHECKING:
    from cycle_optuna.best_model import CycleModel

_log = logging.getLogger(__name__)


StudyLike = Union[optuna.Study, str, os.PathLike]


def load_study(path_or_name: StudyLike, storage: str | BaseStorage | None = None) -> optuna.Study:
    """The study of a .toml study file, or the study of that name in `storage` / $CYCLE_OPTUNA_STORAGE."""
    check_storage_arg(storage)
    if isinstance(path_or_name, optuna.Study):
        # a study handed over is read as one loaded by name: the queries rank by lowest value
        check_readable(path_or_name, "the given study", from_file=False)
        return path_or_name
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"study: expected a study file path, a study name or an optuna.Study, "
                        f"got {type(path_or_name).__name__}")
    path, cfg = Path(path_or_name), None
    if path.is_file() and _is_sqlite_file(path):  # the database, not the study file
        raise ConfigError(f"{path}: that is a database, not a study file; load_study(<study file .toml>) or "
                          f"load_study(<study name>, storage='sqlite:///{path}')")
    if path.suffix.lower() == ".toml" or path.is_file():
        cfg = config_mod.load(path, check_files=False)  # a read: the data file may have moved
        name = cfg.study.name
        url = storage if isinstance(storage, BaseStorage) else storage_mod.resolve_url(cfg, storage)
    else:
        name = str(path_or_name)
        url = storage or os.environ.get(storage_mod.ENV_VAR)
        redact.remember(url)
        if not url:
            raise ConfigError(
                f"{name!r} is not a study file; to load a study by name pass storage=URL "
                f"or set ${storage_mod.ENV_VAR}"
            )
    store = url if isinstance(url, BaseStorage) else _open(url)
    where = "the given storage" if isinstance(url, BaseStorage) else storage_mod.mask(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False))
        held = f"it holds: {', '.join(names)}" if names else "it holds no studies"
        raise StorageError(f"no study named {name!r} in {where} ({held})") from None
    check_readable(study, where, from_file=cfg is not None)
    if cfg is not None:
        _STUDY_FILE[study] = cfg  # this machine's paths, for data and artifacts kept elsewhere than the creator's
    return study


def check_readable(study: optuna.Study, where: str, *, from_file: bool) -> None:
    """Refuse what the queries would misread: a study that does not minimise one value (they rank
    by lowest value), or, named by a study file, a study with trials made by other code (its
    parameters are not the file's)."""
    directions = study.directions
    if len(directions) > 1 or directions[0] != optuna.study.StudyDirection.MINIMIZE:
        what = f"has {len(directions)} objectives" if len(directions) > 1 else "maximises its value"
        raise StorageError(f"study {study.study_name!r} in {where} {what}: cycle-optuna reads studies that "
                           "minimise one value (a validation loss)")
    if from_file and study.user_attrs.get(CONFIG_ATTR) is None and (held := len(study.get_trials(deepcopy=False))):
        raise StorageError(f"study {study.study_name!r} in {where} holds {held} trial(s) that cycle-optuna did not "
                           "make (no study config stored on it); give [study] name another name")


def check_storage_arg(storage: object, *, objects: bool = True) -> None:
    """TypeError naming `storage` when it is neither None, a URL string nor (where taken) an Optuna storage."""
    if storage is None or isinstance(storage, str) or (objects and isinstance(storage, BaseStorage)):
        return
    hint = f" (a SQLite file: 'sqlite:///{os.fspath(storage)}')" if isinstance(storage, os.PathLike) else ""
    raise TypeError(f"storage: expected a URL string{' or an Optuna storage' if objects else ''}{hint}, "
                    f"got {type(storage).__name__}")


def run_study(path: str | os.PathLike, storage: str | None = None, *, n_trials: int | None = None,
              timeout: float | None = None) -> optuna.Study:
    """Run a study file's trials in this process until the study holds its total (none when it already
    does); with ``timeout`` (seconds, as `run --timeout`), start no trial after that long: the one
    running then finishes, and a later call goes on from there."""
    from cycle_optuna import preflight, totals
    from cycle_optuna.worker import run_worker

    began = time.monotonic()
    check_storage_arg(storage, objects=False)
    if n_trials is not None:  # checked as --n-trials is, before anything is read or written
        config_mod.check_n_trials(n_trials, "n_trials")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise ValueError(f"timeout: expected a number of seconds above 0, got {timeout!r}")
    cfg = config_mod.load(path)
    url = storage_mod.resolve_url(cfg, storage)
    if storage_mod.in_memory(url):  # each connection would get its own empty database, gone with it
        raise StorageError(f"storage {storage_mod.mask(url)} is an in-memory database: the study's results "
                           "would be lost; give a file, e.g. sqlite:///study.db")
    data = preflight.for_run(cfg, url)  # what `run` checks first: the device, the artifact folder, the data
    try:
        held = load_study(path, url)
    except StorageError:
        held = None  # not created yet
    total = totals.resolve(held, flag=n_trials, file=cfg.study.n_trials)
    if held is not None:
        counted, waiting = totals.count_and_waiting(held)
        # the CLI says so too: a silent return reads as a finished run. A running trial (maybe a lost
        # worker's, which this worker fails and retries) or a waiting retry still needs a worker.
        running = held.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if counted >= total else ()
        if counted >= total and not waiting and not running:
            _log.warning("study %r already holds %d trial%s and its total is %d: nothing to run; pass n_trials=%d or "
                         "more to grow it", held.study_name, counted, "" if counted == 1 else "s", total, counted + 1)
    import torch

    # the caller's process, e.g. a notebook: its thread count and random streams are as it left them
    # (training seeds torch's global generators, every CUDA device's too, and picks its own thread
    # count). The CUDA streams are saved only where the study trains there: reading them starts CUDA.
    threads = torch.get_num_threads()
    on_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()  # "auto" or "cuda" where there is one
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if on_cuda else []):
        try:
            return run_worker(config_mod.override(cfg, n_trials=total), url, data=data,
                              deadline=None if timeout is None else began + timeout)
        finally:
            torch.set_num_threads(threads)


def _is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _open(url: str) -> BaseStorage:
    """Open for reading: a missing SQLite file is an error, not a new empty database."""
    storage_mod.check_url(url)
    db = storage_mod.sqlite_path(url)  # any SQLite driver's URL (sqlite+pysqlite:// too)
    if db is not None:
        if not db.is_file():
            raise StorageError(f"no study database at {db} (run the study first)")
    return storage_mod.open_storage(url, heartbeat=False, create=False)


# The study file a study was loaded from (load_study), by study object
_STUDY_FILE: weakref.WeakKeyDictionary[optuna.Study, StudyConfig] = weakref.WeakKeyDictionary()


def study_config(study: StudyLike) -> StudyConfig | None:
    """The config stored on the study when it was created; None for studies made elsewhere
    (`study`: a loaded study, or what :func:`load_study` takes).

    A study loaded from a study file on a machine that keeps the data or the artifacts at other
    paths than the study's creator gets this machine's paths, where the stored ones do not exist (a
    data file only when its content is the one the study was made with).
    """
    if not isinstance(study, optuna.Study):  # a study file's path, as every other query takes
        study = load_study(study)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if not stored:
        return None
    from cycle_optuna.digests import DIGESTS_ATTR, relocate

    return relocate(config_mod.from_dict(stored), _STUDY_FILE.get(study), study.user_attrs.get(DIGESTS_ATTR) or {})


def search_settings(study: optuna.Study) -> list[dict[str, Any]]:
    """The sampler and pruner each stretch of cycles ran with, first to last: [{"from_cycle": n,
    "sampler": type, "pruner": type}] ([] for a study made elsewhere)."""
    history = study.user_attrs.get(SEARCH_ATTR)
    if isinstance(history, list) and history:
        return history
    cfg = study_config(study)
    return [{"from_cycle": 1, "sampler": cfg.sampler.type, "pruner": cfg.pruner.type}] if cfg is not None else []


def baseline_params(study: StudyLike) -> dict[str, Any]:
    """Every hyperparameter's baseline value (the stored config's); {} for a study cycle-optuna did not
    make, whose trials' own parameters are all there is (this project's defaults are not its baseline)."""
    cfg = study_config(study)
    return {name: getattr(cfg.baseline, name) for name in PARAM_NAMES} if cfg is not None else {}


def best_trial(study: StudyLike, storage: str | BaseStorage | None = None) -> FrozenTrial:
    """The completed trial with the lowest validation loss."""
    return _completed(load_study(study, storage))[0]


def _no_completed(study: optuna.Study) -> str:
    """Why a study has no best trial: none has finished yet, or every one that finished was pruned or failed."""
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    ended = {s: n for s, n in states.items() if s in (TrialState.PRUNED, TrialState.FAIL)}
    if not ended or states.get(TrialState.RUNNING) or states.get(TrialState.WAITING):
        return f"study {study.study_name!r} has no completed trials yet"
    what = " and ".join(f"{ended[s]} {word}" for s, word in ((TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed"))
                        if s in ended)
    return (f"study {study.study_name!r} has no completed trial: all {sum(ended.values())} were stopped early or "
            f"failed ({what}); see `status` for why, then run more trials (`run --n-trials N`; sampler and pruner may change) "
            "or a changed study under a new [study] name")


def best_params(study: StudyLike, storage: str | BaseStorage | None = None) -> dict[str, Any]:
    """All hyperparameters of the best trial: its searched params over the baseline for the rest."""
    study = load_study(study, storage)
    return {**baseline_params(study), **best_trial(study).params}


@dataclass(frozen=True)
class Cycle:
    """One improvement cycle (one trial): what was tried, what came out, and why."""

    cycle: int  # trial.number + 1
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # best validation loss (the objective)
    params: dict[str, Any]  # every hyperparameter (searched ones over the baseline)
    searched: dict[str, Any]  # trial.params: only the searched ones
    key_change: str
    curve: list[float] = field(repr=False)  # validation loss per epoch
    metrics: dict[str, Any] = field(repr=False)  # the trial's numeric user attrs
    diagnosis: str | None = None
    reason: str | None = None  # why it was pruned / failed, or the sampler's explanation
    retried_as: int | None = None  # a failed (interrupted, lost) cycle's retry: that cycle's number
    retry_of: int | None = None  # a retry: the cycle it resumes
    resumed_epochs: int = 0  # a retry: the epochs its checkpoint held (trained by the cycle it resumes)

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics.get("val_accuracy")

    @property
    def improvement_pct(self) -> float | None:
        """First-to-best validation loss over the cycle's epochs, in %."""
        return self.metrics.get("improvement_pct")

    @property
    def epochs_run(self) -> int:
        return int(self.metrics.get("epochs_run") or len(self.curve))

    @property
    def epochs_trained(self) -> int:
        """Epochs this cycle trained itself: a retry's epochs run less those its checkpoint held."""
        return max(0, self.epochs_run - self.resumed_epochs)

    @property
    def n_params(self) -> int | None:
        return self.metrics.get("n_params")

    @property
    def diverged(self) -> bool:
        return self.diagnosis == "diverged"


def cycles(study: StudyLike, storage: str | BaseStorage | None = None) -> list[Cycle]:
    """One record per trial, in trial order."""
    study = load_study(study, storage)
    base = baseline_params(study)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    by_number = {t.number: t for t in trials}
    retries = {r: t.number for t in trials if (r := _retry_of(t)) is not None}  # failed trial -> its retry
    out = []
    for i, t in enumerate(trials):
        attrs = t.user_attrs
        curve = [float(t.intermediate_values[s]) for s in sorted(t.intermediate_values)]
        metrics = {k: v for k, v in attrs.items() if finite_number(v) is not None}
        if "improvement_pct" not in metrics and len(curve) >= 2 and curve[0] > 0:
            metrics["improvement_pct"] = round(100.0 * (curve[0] - min(curve)) / curve[0], 3)
        params = {**base, **_planned(t), **t.params}
        parent = attrs.get("cycle_parent")
        ref = by_number.get(parent - 1) if isinstance(parent, int) else (trials[i - 1] if i else None)
        retry_of = _retry_of(t)
        if t.state == TrialState.FAIL:
            reason = failure_cause(t)
            if t.number in retries:
                reason += f"; retried as cycle {retries[t.number] + 1}"
        else:
            reason = attrs.get("prune_reason") or attrs.get("cycle_reason")
            if retry_of is not None and not attrs.get("prune_reason"):  # the reason it copied is its original's
                reason = f"retry of cycle {retry_of + 1}, from its last checkpoint"
        out.append(Cycle(
            cycle=t.number + 1, number=t.number, state=t.state.name, value=t.value, params=params,
            searched=dict(t.params), key_change=_key_change(t, ref, base), curve=curve, metrics=metrics,
            diagnosis=attrs.get("diagnosis"), reason=reason,
            retried_as=retries[t.number] + 1 if t.number in retries else None,
            retry_of=None if retry_of is None else retry_of + 1,
            resumed_epochs=_resumed_epochs(attrs.get(storage_mod.RESUMED_ATTR)),
        ))
    return out


def _planned(t: FrozenTrial) -> dict[str, Any]:
    """What the trial was to run: the cycle sampler's proposal and any enqueued values. A trial
    that failed while suggesting holds only the parameters suggested before the failure; the rest
    are these, not the baseline's."""
    from cycle_optuna.sampler._history import FIXED_ATTR, PROPOSAL_ATTR

    proposal = t.system_attrs.get(PROPOSAL_ATTR)
    planned = dict(proposal.get("params") or {}) if isinstance(proposal, dict) else {}
    fixed = t.system_attrs.get(FIXED_ATTR)
    return {**planned, **(fixed if isinstance(fixed, dict) else {})}


def _resumed_epochs(resumed: object) -> int:
    """The epoch count in a retry's "trial N epoch E" (storage.RESUMED_ATTR), else 0."""
    words = resumed.split() if isinstance(resumed, str) else []
    return int(words[3]) if len(words) == 4 and words[2] == "epoch" and words[3].isdigit() else 0


def _retry_of(t: FrozenTrial) -> int | None:
    """The trial number a retry resumes (Optuna's retry callback writes it), else None."""
    number = t.system_attrs.get("failed_trial")
    return number if isinstance(number, int) else None


def key_change(study: optuna.Study, t: FrozenTrial) -> str:
    """One trial's "key changes" (as in :func:`cycles`), reading only it and its parent."""
    parent = t.user_attrs.get("cycle_parent")  # a cycle number (trial number + 1), as everywhere it is shown
    number = parent - 1 if isinstance(parent, int) else t.number - 1
    ref = None
    if number >= 0:
        try:
            storage = internals.storage_of(study)
            ref = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(internals.study_id_of(study), number))
        except KeyError:
            ref = None
    return _key_change(t, ref, baseline_params(study))


def failure_cause(t: FrozenTrial) -> str:
    """Why a FAILED trial failed: its fail_cause (or the objective's error), else says none was recorded."""
    attrs = t.user_attrs
    cause = attrs.get(storage_mod.FAIL_CAUSE_ATTR) or attrs.get("error")
    return str(cause) if cause else "no cause recorded"


def baselines(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The study's reference baselines (name -> label, val_accuracy, test_accuracy); {} when it has none."""
    stored = study.user_attrs.get(BASELINES_ATTR)
    if not isinstance(stored, dict):
        return {}
    return {k: v for k, v in stored.items() if isinstance(v, dict) and isinstance(v.get("val_accuracy"), (int, float))}


def _key_change(t: FrozenTrial, ref: FrozenTrial | None, base: dict[str, Any]) -> str:
    retried = _retry_of(t)
    if retried is not None and not isinstance(t.user_attrs.get("cycle_parent"), int):
        # it reruns that cycle's configuration; without a cycle parent to compare with (the cycle
        # sampler's moves name one, and a retry keeps it), the trial before it is that cycle itself
        return f"retry of cycle {retried + 1}"
    move = t.user_attrs.get("cycle_move")
    if move == "baseline" or (ref is None and {**base, **t.params} == base):
        return "baseline configuration"
    before = {**base, **(ref.params if ref is not None else {})}
    diff = ", ".join(  # the first trial of another program's study: its parameters are not ours to compare
        f"{k} {_fmt(before.get(k))} -> {_fmt(v)}" for k, v in t.params.items()
        if before.get(k) != v and (ref is not None or k in base)
    )
    if move:
        if not diff or str(move).replace(" ", "") == diff.replace(" ", ""):
            return diff or str(move)  # a move that names its one change (a switch flipped) says it once
        return f"{move}: {diff}"
    return diff or ("first trial" if ref is None else "no change")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def study_artifact_dir(study: StudyLike) -> Path | None:
    """Where the study's artifacts live: $CYCLE_OPTUNA_ARTIFACT_DIR, else the stored config's dir."""
    env = os.environ.get(storage_mod.ARTIFACTS_ENV_VAR)
    if env:
        return Path(env)
    cfg = study_config(study)
    return config_mod.resolve_artifact_dir(cfg) if cfg is not None else None


def load_best_model(
    study: StudyLike, storage: str | BaseStorage | None = None, *, artifact_dir: str | os.PathLike | None = None,
    ensemble: int | None = None, refit: bool | None = None,
) -> CycleModel:
    """The best model, in eval mode on CPU, normalising raw input itself.

    It averages the class probabilities of the `ensemble` best completed trials' models (lowest
    validation loss first; default: the study's `[study] ensemble`, 3 unless set) — fewer when
    fewer trials completed or kept a model, or a runner-up's model file is gone (a logged warning);
    ``ensemble=1`` is the best trial's model alone.
    ``model.trial_numbers`` lists the trials it averages, best first.

    ``refit``: None (default) takes the models `refit` trained on all training series when they
    are of exactly these trials, else the trials' own; True requires them (StorageError when there
    are none, or when they are of other trials than the best now); False never takes them.
    ``model.refit`` says which it is.
    """
    if refit is not None and not isinstance(refit, bool):  # "no" would read as True
        raise TypeError(f"refit: expected None, True or False, got {refit!r}")
    if artifact_dir is not None and not isinstance(artifact_dir, (str, os.PathLike)):
        raise TypeError(f"artifact_dir: expected a folder path, got {type(artifact_dir).__name__}")
    study = load_study(study, storage)
    return _model_of(study, _completed(study), artifact_dir=artifact_dir, ensemble=ensemble, refit=refit)


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials, best first (lowest value, then earliest): one read, so that what a
    command shows of the best trial and its model comes from one moment of a running study."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (t.value, t.number))
    if not done:
        raise StorageError(_no_completed(study))
    return done


def _model_of(study: optuna.Study, done: list[FrozenTrial], *, artifact_dir: str | os.PathLike | None,
              ensemble: int | None, refit: bool | None = None) -> CycleModel:
    """load_best_model on the completed trials `done` (best first)."""
    members = _members(study, done, ensemble)
    rec = refit_state(study, members)
    if refit and rec["state"] != "current":
        raise StorageError(rec["note"])
    use = refit is not False and rec["state"] == "current"
    where = Path(artifact_dir) if artifact_dir is not None else study_artifact_dir(study)
    if where is None or not where.is_dir():
        moved = "" if artifact_dir is not None else (f" (moved? set ${storage_mod.ARTIFACTS_ENV_VAR} to where it is "
                                                     "now)")
        raise StorageError(f"artifact directory of study {study.study_name!r} not found: {where}{moved}")
    store = optuna.artifacts.FileSystemArtifactStore(where)
    if use:
        named = [(a, f"refit model of cycle {t.number + 1}") for a, t in zip(rec["artifacts"], members)]
        try:
            payloads = [_download_model(store, where, artifact_id, what) for artifact_id, what in named]
        except StorageError as e:
            if refit:
                raise
            # the cycles' own models still serve: a lost refit file costs the refit, not the best model
            _log.warning("%s; using the cycles' own models instead (run 'cycle-optuna refit STUDY.toml' to "
                         "train them again on all training series)", e)
            use = False
    if not use:
        named = [(t.user_attrs[MODEL_ATTR], f"model artifact {t.user_attrs[MODEL_ATTR]} of cycle {t.number + 1}")
                 for t in members]
        payloads = [_download_model(store, where, *named[0])]  # the best cycle's own: nothing stands in for it
        kept = [0]
        for i in range(1, len(members)):
            try:
                payloads.append(_download_model(store, where, *named[i]))
                kept.append(i)
            except StorageError as e:  # a runner-up's file lost: the model averages the others, as for one never saved
                _log.warning("%s; the best model averages the other cycles' models", e)
        members, named = [members[i] for i in kept], [named[i] for i in kept]
    from cycle_optuna.best_model import CycleModel, Ensemble

    nets = [_net_of(payload, what, where) for payload, (_, what) in zip(payloads, named)]
    params = {**baseline_params(study), **payloads[0].get("params", members[0].params)}
    net = nets[0] if len(nets) == 1 else Ensemble(nets)
    return CycleModel(net, payloads[0]["mean"], payloads[0]["std"], params=params, trial_number=members[0].number,
                      trial_numbers=[t.number for t in members], refit=use).eval()


# a runner-up joins the best model only with a validation loss at most this far above the best's (mean
# cross-entropy, nats: 0.25 is a model that gives the true class about a fifth less probability): in a
# short study the second best can be a cycle that lost the signal (a switch that hurt: 0.85 against
# 0.15), and averaging it in pulls every prediction toward it. Runners-up within the noise of the
# best stay in (docs/model.md)
ENSEMBLE_SPREAD = 0.25


def _members(study: optuna.Study, done: list[FrozenTrial], ensemble: int | None) -> list[FrozenTrial]:
    """The trials the best model averages: the best, then the next best that kept a model and whose
    validation loss is at most ENSEMBLE_SPREAD above the best's, `ensemble` in all."""
    trial = done[0]
    if not trial.user_attrs.get(MODEL_ATTR):
        why = trial.user_attrs.get("model_save_error", "it ran without an artifact store, or was added to the study by other code")
        raise StorageError(f"best trial (cycle {trial.number + 1}) has no saved model: {why}")
    if ensemble is None:
        cfg = study_config(study)
        ensemble = cfg.study.ensemble if cfg is not None else 1
    given = ensemble
    try:
        ensemble = None if isinstance(ensemble, bool) else operator.index(ensemble)  # numpy ints too
    except TypeError:
        ensemble = None
    if ensemble is None or ensemble < 1:
        raise ConfigError(f"ensemble: expected a whole number >= 1, got {given!r}")
    near = [t for t in done[1:] if t.user_attrs.get(MODEL_ATTR) and t.value <= trial.value + ENSEMBLE_SPREAD]
    return [trial, *near][:ensemble]


def refit_state(study: optuna.Study, members: list[FrozenTrial]) -> dict[str, Any]:
    """Whether the study's refit models are those of `members`: {"state": "none" | "current" |
    "stale", "note": why not, "artifacts": their ids}."""
    rec = study.user_attrs.get(REFIT_ATTR)
    cycles = ", ".join(str(t.number + 1) for t in members)
    if not isinstance(rec, dict) or not rec.get("artifacts"):
        return {"state": "none", "note": f"study {study.study_name!r} has no refit model: run 'cycle-optuna refit "
                                         f"STUDY.toml' to train {'cycles' if len(members) > 1 else 'cycle'} {cycles} on all training series"}
    if rec.get("trials") != [t.number for t in members]:
        done = ", ".join(str(n + 1) for n in rec.get("trials") or [])
        return {"state": "stale", "artifacts": rec["artifacts"],
                "note": f"the refit model is of cycles {done}, but the best model averages cycles {cycles}: "
                        "run 'cycle-optuna refit STUDY.toml' again"}
    return {"state": "current", "artifacts": rec["artifacts"], "note": ""}


def _net_of(payload: dict[str, Any], what: str, where: Path) -> Any:
    """The network a model payload describes, with its weights."""
    import torch

    from cycle_optuna.best_model import Ensemble
    from cycle_optuna.model import TransformerClassifier

    try:
        folds = int(payload.get("folds", 1))  # a cross-validated trial's model: its folds' models averaged
        with torch.random.fork_rng(devices=[]):  # the initial weights, replaced at once, draw from the caller's stream
            net = TransformerClassifier(**payload["model_kwargs"]) if folds == 1 else \
                Ensemble([TransformerClassifier(**payload["model_kwargs"]) for _ in range(folds)])
        net.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:  # weights of another shape, kwargs of another version
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StorageError(f"{what} in {where} does not fit the model it describes ({first})") from None
    return net


def _download_model(store: optuna.artifacts.FileSystemArtifactStore, where: Path, artifact_id: str,
                    what: str) -> dict[str, Any]:
    """The payload of model artifact `artifact_id` (`what` names it in errors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        try:
            optuna.artifacts.download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact_id)
        except (FileNotFoundError, optuna.artifacts.exceptions.ArtifactNotFound):
            raise StorageError(f"{what} is missing from {where}") from None
        except OSError as e:  # not readable by this user (workers ran as another), a folder, ...
            raise StorageError(f"{what} in {where} cannot be read: {e.strerror or e}") from None
        import torch  # here, not at the top: queries and `status` must not pay for importing torch

        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, overwritten or not a model: torch raises many kinds
            text = str(e).strip()
            first = text.splitlines()[0].split(". ")[0][:160] if text else ""
            first = f"{type(e).__name__}: {first}" if len(first) < 20 else first  # "101" alone says nothing
            raise StorageError(f"{what} in {where} cannot be read (corrupt or truncated: {first})") from None
        if not isinstance(payload, dict) or not {"state_dict", "mean", "std", "model_kwargs"} <= payload.keys():
            raise StorageError(f"{what} in {where} is not a cycle-optuna model")
        return payload


@dataclass(frozen=True)
class HeldOutScore:
    """The best model on the held-out test split (never used to select it)."""

    loss: float
    accuracy: float
    n: int
    cycle: int  # the best trial's cycle
    cycles: tuple[int, ...] = ()  # the cycles whose models the best model averages, best first
    refit: bool = False  # their configurations trained on all training series (`refit`)
    # per class of the test split: (share of its series predicted right, its series), in class order;
    # accuracy alone can hide a class the model never predicts (a 95/5 split: 95% for "majority")
    class_recall: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def balanced_accuracy(self) -> float | None:
        """The mean of the per-class recalls over the classes in the test split."""
        return float(np.mean([r for r, _ in self.class_recall.values()])) if self.class_recall else None

    @property
    def lowest_recall(self) -> tuple[str, float, int] | None:
        """(class, recall, its series) of the class the model gets right least often."""
        if not self.class_recall:
            return None
        name = min(self.class_recall, key=lambda k: self.class_recall[k][0])
        return (name, *self.class_recall[name])


def held_out_score(study: StudyLike, storage: str | BaseStorage | None = None, *, model: CycleModel | None = None,
                   data: Any = None) -> HeldOutScore:
    """Held-out test loss and accuracy of the best model (see load_best_model), on the study's own
    split (``data``: the study's splits as `study_data` returned them, to score several models on
    one read of the data files)."""
    from cycle_optuna.best_model import CycleModel

    if model is not None and not isinstance(model, CycleModel):
        raise TypeError(f"model: expected a CycleModel (load_best_model's), got {type(model).__name__}")
    if data is not None and not all(hasattr(data, k) for k in ("x_test", "y_test", "class_names")):
        raise TypeError(f"data: expected the study's splits (study_data's), got {type(data).__name__}")
    study = load_study(study, storage)
    cfg = study_config(study)
    if cfg is None:
        raise StorageError(f"study {study.study_name!r} has no stored cycle-optuna config; cannot rebuild its test split")
    model = model if model is not None else load_best_model(study)
    data = data if data is not None else study_data(study, cfg, "its test split cannot be rebuilt")
    # the split is normalised already, so evaluate the inner network
    loss, acc, recall = _test_pass(model.net, data, cfg.train.eval_batch_size)
    return HeldOutScore(loss=loss, accuracy=acc, n=int(data.y_test.shape[0]), cycle=model.trial_number + 1,
                        cycles=tuple(n + 1 for n in model.trial_numbers), refit=bool(getattr(model, "refit", False)),
                        class_recall=recall)


def _test_pass(net: Any, data: Any, batch_size: int) -> tuple[float, float, dict[str, tuple[float, int]]]:
    """(mean cross-entropy, accuracy, per class present: (recall, its series) by the class's name) of
    ``net`` on the test split, in one pass (train.evaluate's figures, plus the classes)."""
    import torch
    import torch.nn.functional as F

    x, y = data.x_test, data.y_test
    if len(y) == 0:
        return math.nan, math.nan, {}
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            logits = torch.cat([net(x[i:i + batch_size]).float() for i in range(0, len(y), batch_size)])
    finally:
        net.train(was_training)
    pred = logits.argmax(dim=1)
    loss = float(F.cross_entropy(logits, y, reduction="sum").double() / len(y))
    names = data.class_names or tuple(str(k) for k in range(data.n_classes))
    out = {}
    for k in range(data.n_classes):
        of_k = y == k
        if n := int(of_k.sum()):
            out[names[k]] = (float((pred[of_k] == k).double().mean()), n)
    return loss, float((pred == y).double().mean()), out


def study_data(study: optuna.Study, cfg: StudyConfig, consequence: str) -> Any:
    """The study's splits (TaskData) rebuilt from its data, refused (StorageError ending with
    `consequence`) when the data changed since the study ran."""
    from cycle_optuna.data import as_it_ran, load_study_data
    from cycle_optuna.digests import DIGESTS_ATTR, changed

    # by content, since a changed test file changes no stored statistic
    if found := changed(cfg, _STUDY_FILE.get(study), study.user_attrs.get(DIGESTS_ATTR) or {}):
        key, path = found
        raise StorageError(f"data of study {study.study_name!r} changed since it ran ({path}: other content "
                           f"than data.{key} had); {consequence}")
    with as_it_ran():  # a check added since the study ran refuses new cycles, not reading these
        data = load_study_data(cfg)
    stats = study.user_attrs.get(STATS_ATTR)
    if stats and not np.allclose(stats["mean"], data.mean, rtol=1e-4, atol=1e-5):
        raise StorageError(f"data of study {study.study_name!r} changed since it ran; {consequence}")
    return data



def reference_baselines(study: StudyLike, storage: str | BaseStorage | None = None) -> dict[str, dict[str, Any]] | None:
    """The study's reference baselines, {key: {label, val_accuracy, test_accuracy}}; None before a worker ran.

    Computed once by the first worker on the study's own split (see docs/data.md).
    """
    return load_study(study, storage).user_attrs.get(BASELINES_ATTR)


def best_record(study: StudyLike, storage: str | BaseStorage | None = None, *, with_test: bool = True) -> dict[str, Any]:
    """The best trial as JSON-ready data, with the field names of ``optuna best-trial -f json``."""
    if not isinstance(with_test, bool):  # "no" or 0.0 would read as its truth value
        raise TypeError(f"with_test: expected True or False, got {with_test!r}")
    study = load_study(study, storage)
    done = _completed(study)  # one snapshot: the trial, its hyperparameters and its model agree while workers run
    t = done[0]
    fmt = "%Y-%m-%d %H:%M:%S"  # optuna CLI's datetime format
    rec: dict[str, Any] = {
        "number": t.number,
        "value": t.value,
        "datetime_start": t.datetime_start.strftime(fmt) if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.strftime(fmt) if t.datetime_complete else None,
        "duration": str(t.duration) if t.duration is not None else None,
        "duration_s": t.duration.total_seconds() if t.duration is not None else None,  # as `export` names it
        "params": dict(t.params),
        "user_attrs": {k: _json(v) for k, v in t.user_attrs.items()},
        "state": t.state.name,
        "study_name": study.study_name,
        "cycle": t.number + 1,
        "hyperparams": {**baseline_params(study), **t.params},
        # 1: value and val_accuracy are on the validation split; k: k-fold cross-validated ([data] folds)
        "folds": int((study.user_attrs.get(STATS_ATTR) or {}).get("folds", 1)),
        # "balanced": value is the class-balanced validation loss (each class's mean loss, averaged)
        "class_weights": str(((study.user_attrs.get(CONFIG_ATTR) or {}).get("train") or {}).get("class_weights", "none")),
    }
    if with_test:
        try:
            score = held_out_score(study, model=_model_of(study, done, artifact_dir=None, ensemble=None))
            rec.update(test_accuracy=score.accuracy, test_loss=score.loss, n_test=score.n,
                       test_balanced_accuracy=score.balanced_accuracy,
                       test_class_recall={k: {"recall": r, "n": n} for k, (r, n) in score.class_recall.items()},
                       model_cycles=list(score.cycles), model_refit=score.refit)
        except (StorageError, DataError) as e:  # the best trial is shown all the same
            rec.update(test_accuracy=None, test_loss=None, test_error=str(e))
    try:
        refit = refit_state(study, _members(study, done, None))
    except (StorageError, ConfigError):  # no model: said by the test figure's error
        refit = {"state": "unavailable"}
    if refit["state"] == "stale":
        rec["refit_note"] = refit["note"]
    from cycle_optuna.references import compare, model_name

    stored = study.user_attrs.get(BASELINES_ATTR)
    sizes = {r["n"] for r in (rec.get("test_class_recall") or {}).values()}
    rec["baselines"] = compare(stored, val_accuracy=finite_number(t.user_attrs.get("val_accuracy")),
                               test_accuracy=rec.get("test_accuracy"), val_model=model_name([t.number + 1]),
                               test_model=model_name(rec.get("model_cycles"), bool(rec.get("model_refit"))),
                               # test classes of different sizes: accuracy alone flatters the majority
                               test_balanced_accuracy=rec.get("test_balanced_accuracy") if len(sizes) > 1 else None)
    if stored is None:
        rec["baselines_note"] = "no reference baselines stored yet: the next worker on this study computes them"
    return finite_or_none(rec)  # strict JSON: a value of inf (a trial added by hand) reads as null


def _json(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, list, dict)) or v is None else str(v)  # NaN/inf: finite_or_none


def finite_number(v: Any) -> float | int | None:
    """`v` when it is a finite real number a figure can be made of (not a bool, a string, NaN or inf), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v if abs(v) < 2**53 else None


def __getattr__(name: str) -> Any:
    if name == "CycleModel":  # defined beside torch, imported only when asked for
        from cycle_optuna.best_model import CycleModel

        return CycleModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
