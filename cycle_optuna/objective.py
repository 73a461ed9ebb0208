"""Trial -> params -> train -> report/prune -> value and the trial contract's user attrs."""

from __future__ import annotations

import io
import logging
import math
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from cycle_optuna import baselines, pack, space
from cycle_optuna import storage as storage_mod
from cycle_optuna.attrs import MODEL_ATTR
from cycle_optuna.config import Hyperparams, PrunerConfig, StudyConfig, warmup_steps
from cycle_optuna.data import TaskData
from cycle_optuna.jsonvalues import finite_or_none
from cycle_optuna.model import count_params
from cycle_optuna.pruners import ParentCurvePruner
from cycle_optuna.train import EpochMetrics, TrainResult, model_kwargs, train_and_evaluate

DIAGNOSES = ("diverged", "unstable", "underfit", "overfit", "below_baseline", "converging", "converged")
MODEL_FILE = "model.pt"
CHECKPOINT_ATTR = "checkpoint_artifact_id"  # user attr: the trial's latest epoch checkpoint
RESUMED_ATTR = storage_mod.RESUMED_ATTR  # user attr on a retry: "trial N epoch E"

_log = logging.getLogger(__name__)


class ModelNotSaved(OSError):
    """The model of a trial that beat every finished trial could not be stored."""


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner named in [pruner]; epochs bound the resource of the halving pruners."""
    median = dict(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=warmup_steps(cfg, epochs))
    halving = dict(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(**median)
    if cfg.type == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, **median)
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**halving)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=epochs, **halving)
    if cfg.type == "parent":
        return ParentCurvePruner(
            n_steps=epochs, warmup_fraction=cfg.warmup_fraction, margin=cfg.margin,
            early_margin=cfg.early_margin,
            patience=cfg.patience, n_startup_trials=cfg.n_startup_trials,
        )
    if cfg.type == "patient":
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(**median), patience=cfg.patience, min_delta=cfg.min_delta
        )
    return optuna.pruners.NopPruner()


def prior_loss(y: torch.Tensor, n_classes: int, class_weights: str = "none") -> float:
    """Cross-entropy of a model that learned nothing but the best constant answer: the labels' class
    frequencies, whose loss is the entropy of the class prior (log(n_classes) for balanced classes,
    less for imbalanced ones). Under `[train] class_weights = "balanced"` every class weighs the same
    in the training and the validation loss, so the best constant answer is uniform over the classes
    present: log of their number, whatever their sizes."""
    p = torch.bincount(y.flatten().long(), minlength=n_classes).double()
    p = p[p > 0] / p.sum()
    if len(p) <= 1:
        return 0.0
    return math.log(len(p)) if class_weights == "balanced" else float(-(p * p.log()).sum())


def diagnose(result: TrainResult, n_classes: int, *, reference: float | None = None,
             chance: float | None = None) -> str:
    """Name what the learning curves show; the sampler uses it to order its moves.

    ``reference``: the best reference baseline's validation accuracy. A result below it is never
    `converged` or `converging`: it is `underfit` when the model fits its training data no better
    than the validation data (capacity or optimisation is the limit), else `below_baseline`.
    ``chance``: the loss of predicting the class prior (`prior_loss`; default log(n_classes), the
    balanced case): a model near it learned the class frequencies only, on 95/5 classes as well.
    """
    hist = [h for h in result.history if math.isfinite(h.val_loss)]
    if result.diverged or not hist:
        return "diverged"
    vals = [h.val_loss for h in hist]
    if result.nan_batches or _rises(vals) > max(2, len(vals) // 3):
        return "unstable"
    chance = math.log(n_classes) if chance is None else chance
    best = result.best_val_loss
    last = hist[-1]
    if best > 0.9 * chance and last.train_loss > 0.9 * chance:
        return "underfit"
    if last.val_loss > best * 1.05 and last.train_loss < 0.8 * last.val_loss:
        return "overfit"
    # the reference is stored rounded to 6 decimals: a tie with it (40/45 against 0.888889) is not below it
    if reference is not None and result.best_val_accuracy < reference - 1e-6:
        return "underfit" if result.final_train_loss >= 0.9 * best else "below_baseline"
    if result.best_epoch == hist[-1].epoch and len(vals) >= 2 and vals[-1] < vals[-2] * 0.99:
        return "converging"
    return "converged"


def _rises(vals: list[float]) -> int:
    """How many epochs raised val loss by more than 2%."""
    return sum(b > a * 1.02 for a, b in zip(vals, vals[1:]))


class Objective:
    """Callable objective: trains one configuration per trial and reports every epoch."""

    def __init__(
        self,
        cfg: StudyConfig,
        data: TaskData,
        *,
        artifact_store: optuna.artifacts.FileSystemArtifactStore | None = None,
        on_epoch: Callable[[optuna.Trial, EpochMetrics], None] | None = None,
        defer_cleanup: bool = False,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.artifact_store = artifact_store
        self.on_epoch = on_epoch
        # True under the worker loop: a trial's checkpoints go only once its outcome is stored
        # (trial_ended), so a kill in between still leaves its retry something to resume from
        self.defer_cleanup = defer_cleanup
        self._pending: dict[int, TrialCheckpoints] = {}
        self._reference: float | None | bool = False  # False: not read from the study yet
        self._chance: float | None = None

    @property
    def pack(self) -> int:
        """Trials a worker may hand to :meth:`run_pack` at once ([train] pack)."""
        return self.cfg.train.pack

    def __call__(self, trial: optuna.Trial) -> float:
        hp = self._suggest(trial)
        ckpt = self._checkpoints(trial)
        return self._run_alone(trial, hp, ckpt, ckpt.resume_state() if ckpt else None)

    def run_pack(self, trials: list[optuna.Trial]) -> list[float | Exception]:
        """Several trials at once: those of one shape as a packed population, the rest alone.

        Per trial, its value or the exception it ended with (what __call__ would have raised).
        A retry resumes alone from its checkpoint.
        """
        outcomes: dict[int, float | Exception] = {}
        ready: list[tuple[optuna.Trial, Hyperparams]] = []
        for trial in trials:
            try:
                ready.append((trial, self._suggest(trial)))
            except Exception as e:
                outcomes[trial.number] = e
        ckpts = {t.number: self._checkpoints(t) for t, _ in ready}
        resumes = {n: c.resume_state() if c else None for n, c in ckpts.items()}
        # a cross-validated trial trains its folds' models side by side: it is not packed with others
        fresh = [i for i, (t, _) in enumerate(ready) if resumes[t.number] is None and self.data.n_folds == 1]
        batches = [[i] for i in range(len(ready)) if i not in fresh] + [
            [fresh[j] for j in group]
            for group in pack.groups([ready[i][1] for i in fresh], self.data, self.cfg.train, size=self.pack)]
        for batch in batches:
            if len(batch) == 1:
                trial, hp = ready[batch[0]]
                try:
                    outcomes[trial.number] = self._run_alone(trial, hp, ckpts[trial.number], resumes[trial.number])
                except Exception as e:
                    outcomes[trial.number] = e
            else:
                outcomes.update(self._run_packed([ready[i] for i in batch], ckpts))
        return [outcomes[t.number] for t in trials]

    def _run_packed(self, members: list[tuple[optuna.Trial, Hyperparams]],
                    ckpts: dict[int, TrialCheckpoints | None]) -> dict[int, float | Exception]:
        trials = [t for t, _ in members]
        try:
            results: list = pack.train_pack(
                self.data, [hp for _, hp in members], self.cfg.train, seed=self.cfg.study.seed,
                reports=[self._reporter(t) for t in trials],
                checkpoints=[ckpts[t.number].save if ckpts[t.number] else None for t in trials])
        except Exception as e:  # the population itself failed: every member ends with it
            results = [e] * len(trials)
        out: dict[int, float | Exception] = {}
        for trial, result in zip(trials, results):
            self._end_checkpoints(ckpts[trial.number], result if isinstance(result, Exception) else None)
            if isinstance(result, Exception):
                out[trial.number] = result
                continue
            try:
                out[trial.number] = self._finish(trial, result, save=False)
            except Exception as e:
                out[trial.number] = e
        # uploads after the pack: members finish together, so each is ranked behind its better packmates
        done = [(out[t.number], t, r) for t, r in zip(trials, results) if not isinstance(out[t.number], Exception)]
        for ahead, (_, trial, result) in enumerate(sorted(done, key=lambda d: (d[0], d[1].number))):
            self._save_if_ranked(trial, result, ckpts[trial.number], ahead=ahead)
        return out

    def _suggest(self, trial: optuna.Trial) -> Hyperparams:
        try:
            return space.suggest(trial, self.cfg)
        except space.InvalidCombination as e:
            trial.set_user_attr("error", f"impossible combination: {e}")
            raise

    def _reporter(self, trial: optuna.Trial) -> Callable[[EpochMetrics], None]:
        def report(m: EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial, m)
            if not math.isfinite(m.val_loss):
                return  # the loop stops as diverged; a non-finite value would poison the pruner
            trial.report(m.val_loss, m.epoch)
            if m.epoch + 1 >= self.cfg.train.epochs:
                return  # stopping after the last epoch saves nothing and would throw a finished result away
            if trial.should_prune():
                trial.set_user_attr("epochs_run", m.epoch + 1)
                trial.set_user_attr("val_accuracy", m.val_accuracy)
                trial.set_user_attr("train_loss", m.train_loss)
                pop_reason = getattr(trial.study.pruner, "pop_reason", None)
                why = pop_reason(trial.number) if callable(pop_reason) else None
                trial.set_user_attr("prune_reason", f"val loss {m.val_loss:.4f} at epoch {m.epoch + 1}"
                                    + (f": {why}" if why else " fell behind other trials"))
                raise optuna.TrialPruned(f"epoch {m.epoch + 1}: val loss {m.val_loss:.4f}")

        return report

    def _checkpoints(self, trial: optuna.Trial) -> TrialCheckpoints | None:
        if self.artifact_store is None:
            return None
        ckpt = TrialCheckpoints(self.artifact_store, trial)
        if self.defer_cleanup:
            self._pending[trial.number] = ckpt
        return ckpt

    def _end_checkpoints(self, ckpt: TrialCheckpoints | None, error: Exception | None = None) -> None:
        # under the worker loop they go once the outcome is stored (trial_ended); an interrupted
        # trial, or one cut off by the database, is retried from its checkpoint
        if ckpt is not None and not self.defer_cleanup and (error is None or not storage_mod.is_connection_error(error)):
            ckpt.discard()

    def trial_ended(self, number: int) -> None:
        """The trial's outcome is stored: delete its checkpoints and its ancestors'."""
        ckpt = self._pending.pop(number, None)
        if ckpt is not None:
            ckpt.discard()

    def trial_abandoned(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A failed trial gets no retry: delete its checkpoints and its ancestors'."""
        self._pending.pop(trial.number, None)
        if self.artifact_store is not None:
            TrialCheckpoints.remove_lineage(self.artifact_store, study, trial)

    def sweep_checkpoints(self, study: optuna.Study) -> int:
        """Delete checkpoints that no running or waiting trial can resume from; how many.

        They are left when a worker dies after its trial's outcome is stored but before the
        checkpoint goes; a worker sweeps once when it starts.
        """
        if self.artifact_store is None:
            return 0
        trials = study.get_trials(deepcopy=False)
        live = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
                or storage_mod.retry_missing(t, trials)]  # its retry is queued by the next stale check
        by_number = {t.number: t for t in trials}
        keep = {by_number[n].user_attrs.get(CHECKPOINT_ATTR) for t in live for n in [t.number, *_ancestors(t)]
                if n in by_number}
        stale = {t.user_attrs[CHECKPOINT_ATTR] for t in trials if CHECKPOINT_ATTR in t.user_attrs} - keep
        for artifact_id in stale:
            _remove(self.artifact_store, artifact_id)
        return len(stale)

    def _run_alone(self, trial: optuna.Trial, hp: Hyperparams, ckpt: TrialCheckpoints | None,
                   resume: dict | None) -> float:
        try:
            result = train_and_evaluate(
                self.data, hp, self.cfg.train, seed=self.cfg.study.seed, report=self._reporter(trial),
                checkpoint=ckpt.save if ckpt else None, resume=resume,
            )
        except Exception as e:
            self._end_checkpoints(ckpt, e)
            raise
        self._end_checkpoints(ckpt)
        return self._finish(trial, result, save=True, ckpt=ckpt)

    def _finish(self, trial: optuna.Trial, result: TrainResult, *, save: bool,
                ckpt: TrialCheckpoints | None = None) -> float:
        """The trial contract's user attrs; PRUNED (raised) when it diverged; the value otherwise."""
        if self._chance is None:  # the training labels' prior: the loss of a model that learned nothing else
            self._chance = prior_loss(torch.cat([self.data.y_train, self.data.y_val]), self.data.n_classes,
                                      self.cfg.train.class_weights)
        diagnosis = diagnose(result, self.data.n_classes, reference=self._reference_accuracy(trial), chance=self._chance)
        first = next((h.val_loss for h in result.history if math.isfinite(h.val_loss)), math.nan)
        attrs = {
            "val_accuracy": result.best_val_accuracy,
            "train_loss": result.final_train_loss,
            "epochs_run": result.epochs_run,
            "improvement_pct": _improvement(first, result.best_val_loss),
            "diagnosis": diagnosis,
            "n_params": count_params(getattr(result.model, "nets", [result.model])[0]),  # one fold's model
            "train_seconds": round(result.train_seconds, 3),
            "samples_per_second": round(result.samples_per_second, 1),
            "nan_batches": result.nan_batches,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, finite_or_none(value))
        if diagnosis == "diverged":
            trial.set_user_attr("prune_reason", "diverged: the loss became non-finite and stayed so")
            raise optuna.TrialPruned("diverged")
        if save:
            self._save_if_ranked(trial, result, ckpt)
        return result.best_val_loss

    def _reference_accuracy(self, trial: optuna.Trial) -> float | None:
        """The best reference baseline's validation accuracy, read from the study once per worker."""
        if self._reference is False:
            best = baselines.best_reference(trial.study.user_attrs.get(baselines.BASELINES_ATTR))
            self._reference = best[1]["val_accuracy"] if best else None
        return self._reference  # type: ignore[return-value]

    def _save_if_ranked(self, trial: optuna.Trial, result: TrainResult, ckpt: TrialCheckpoints | None,
                      *, ahead: int = 0) -> None:
        """Upload the model only when it ranks among the `[study] ensemble` best finished trials, so
        disk stays bounded and every model of the final top N (the best model's ensemble) is kept;
        `ahead` counts better trials not yet complete (packmates).

        The artifact store writes it whole and synced, or not at all. A new best whose model cannot
        be stored fails (ModelNotSaved) rather than completing as a best without a model; its value
        stays in the `unsaved_val_loss` attr. Any other top-N trial completes with `model_save_error`.
        """
        if self.artifact_store is None:
            return
        done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        better = ahead + sum(t.value <= result.best_val_loss for t in done)
        if better >= self.cfg.study.ensemble:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            kwargs = model_kwargs(self.data, space.to_hyperparams(self.cfg, trial.params), self.cfg.train.init_gain)
            torch.save(model_payload(result.model, kwargs, self.data, trial.params), path)
            for attempt in (1, 2):
                try:
                    artifact_id = upload_artifact(
                        artifact_store=self.artifact_store, file_path=str(path), study_or_trial=trial,
                        mimetype="application/octet-stream",  # a guess from ".pt" names a game cartridge format
                    )
                    break
                except (OSError, ArtifactNotFound) as e:
                    if attempt == 1 and ckpt is not None:
                        ckpt.discard()  # the trial has finished training: its checkpoints' space is free
                        continue
                    if better:  # not the best: the best model averages the others it has
                        trial.set_user_attr("model_save_error", _reason(e))
                        _log.warning("cycle %d (trial %d): model not saved: %s; it completes, and the best model "
                                     "averages the best trials whose models were kept", trial.number + 1, trial.number, _reason(e))
                        return
                    trial.set_user_attr("unsaved_val_loss", finite_or_none(result.best_val_loss))
                    raise ModelNotSaved(f"model of trial {trial.number} (a new best, val loss "
                                        f"{result.best_val_loss:.4f}) not saved: {_reason(e)}") from e
        trial.set_user_attr(MODEL_ATTR, artifact_id)


class TrialCheckpoints:
    """A trial's epoch checkpoints in the artifact store; a retry resumes from its failed parent's.

    One file per trial, named before its first write (the trial's CHECKPOINT_ATTR) and replaced
    whole each epoch by the store, so no kill leaves an orphan or a truncated file. It is deleted,
    with its failed ancestors', once the trial ends, so disk stays bounded.
    """

    def __init__(self, store: optuna.artifacts.FileSystemArtifactStore, trial: optuna.Trial) -> None:
        self.store, self.trial = store, trial
        self.latest: str | None = None
        self.inherited: list[str] = []  # failed ancestors' checkpoints, deleted when this trial ends
        self.failed = False  # a write failed (reported once per trial)

    def resume_state(self) -> dict | None:
        """The newest checkpoint of the trial this one retries (RetryFailedTrialCallback's
        `failed_trial`/`retry_history` system attrs), or None to start from scratch."""
        trials = {t.number: t for t in self.trial.study.get_trials(deepcopy=False)}
        ancestors = _ancestors(trials[self.trial.number])
        self.inherited = [trials[n].user_attrs[CHECKPOINT_ATTR] for n in ancestors
                          if n in trials and CHECKPOINT_ATTR in trials[n].user_attrs]
        for number in reversed(ancestors):
            artifact_id = trials[number].user_attrs.get(CHECKPOINT_ATTR) if number in trials else None
            if artifact_id is None:
                continue
            try:
                with self.store.open_reader(artifact_id) as f:
                    state = torch.load(io.BytesIO(f.read()), weights_only=True)
            except ArtifactNotFound:
                continue  # that trial died before its first checkpoint was written
            except (OSError, RuntimeError, ValueError) as e:
                self.trial.set_user_attr("resume_error", f"checkpoint of trial {number}: {e}")
                continue
            self.trial.set_user_attr(RESUMED_ATTR, f"trial {number} epoch {state['epoch'] + 1}")
            return state
        return None

    def save(self, epoch: int, state: dict) -> None:
        """checkpoint= hook of train_and_evaluate: replace the trial's checkpoint with `state`."""
        if self.latest is None:
            # named on the trial before the first write, so a kill during it leaves no orphan
            self.latest = f"checkpoint-{uuid.uuid4().hex}"
            self.trial.set_user_attr(CHECKPOINT_ATTR, self.latest)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            self.store.write(self.latest, buf)
        except OSError as e:  # a full disk costs resumability, not the trial
            self.trial.set_user_attr("checkpoint_error", _reason(e))
            if not self.failed:
                _log.warning("cycle %d (trial %d): epoch checkpoint not saved: %s; the trial goes on, but a "
                             "retry of it would start over", self.trial.number + 1, self.trial.number, _reason(e))
            self.failed = True

    def discard(self) -> None:
        """Delete this trial's and its ancestors' checkpoints (the trial has ended)."""
        for artifact_id in dict.fromkeys([*self.inherited, *([self.latest] if self.latest else [])]):
            _remove(self.store, artifact_id)
        self.inherited = []

    @staticmethod
    def remove_lineage(store: optuna.artifacts.FileSystemArtifactStore, study: optuna.Study,
                       trial: optuna.trial.FrozenTrial) -> None:
        """Delete the checkpoints of a failed trial that gets no retry, and of its ancestors."""
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        lineage = [trials[n] for n in _ancestors(trial) if n in trials] + [trial]
        for artifact_id in dict.fromkeys(t.user_attrs[CHECKPOINT_ATTR] for t in lineage if CHECKPOINT_ATTR in t.user_attrs):
            _remove(store, artifact_id)


def _ancestors(trial: optuna.trial.FrozenTrial) -> list[int]:
    attrs = trial.system_attrs
    return list(attrs.get("retry_history") or ([attrs["failed_trial"]] if "failed_trial" in attrs else []))


def _remove(store: optuna.artifacts.FileSystemArtifactStore, artifact_id: str) -> None:
    try:
        if isinstance(store, storage_mod.DurableArtifactStore):
            store.remove_all(artifact_id)  # with any temporary file a killed writer left
        else:
            store.remove(artifact_id)
    except (OSError, ArtifactNotFound):
        pass


def _reason(e: BaseException) -> str:
    """An OSError as "No space left on device: /path" (the file, not a Python repr)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def model_payload(model: torch.nn.Module, kwargs: dict, data: TaskData, params: dict) -> dict:
    """What load_best_model needs: weights, constructor kwargs and input normalisation."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    nets = getattr(model, "nets", None)  # a cross-validated trial: an Ensemble of its folds' models
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "folds": len(nets) if nets is not None else 1,
        "model_kwargs": kwargs,
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "params": dict(params),
    }


def _improvement(first: float, best: float) -> float:
    if not (math.isfinite(first) and math.isfinite(best)) or first <= 0:
        return 0.0
    return round(100.0 * (first - best) / first, 3)
