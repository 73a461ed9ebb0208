"""Trial -> params -> train -> report/prune -> value and the trial contract's user attrs."""

from __future__ import annotations

import io
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

from cycle_optuna import space
from cycle_optuna import storage as storage_mod
from cycle_optuna.config import Hyperparams, PrunerConfig, StudyConfig
from cycle_optuna.data import TaskData
from cycle_optuna.model import count_params
from cycle_optuna.train import EpochMetrics, TrainResult, train_and_evaluate

DIAGNOSES = ("diverged", "unstable", "underfit", "overfit", "converging", "converged")
MODEL_FILE = "model.pt"
CHECKPOINT_ATTR = "checkpoint_artifact_id"  # user attr: the trial's latest epoch checkpoint
RESUMED_ATTR = "resumed_from"  # user attr on a retry: "trial N epoch E"


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner named in [pruner]; epochs bound the resource of the halving pruners."""
    median = dict(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    halving = dict(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(**median)
    if cfg.type == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, **median)
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**halving)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=epochs, **halving)
    if cfg.type == "patient":
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(**median), patience=cfg.patience, min_delta=cfg.min_delta
        )
    return optuna.pruners.NopPruner()


def diagnose(result: TrainResult, n_classes: int) -> str:
    """Name what the learning curves show; the sampler uses it to order its moves."""
    hist = [h for h in result.history if math.isfinite(h.val_loss)]
    if result.diverged or not hist:
        return "diverged"
    vals = [h.val_loss for h in hist]
    if result.nan_batches or _rises(vals) > max(2, len(vals) // 3):
        return "unstable"
    chance = math.log(n_classes)
    best = result.best_val_loss
    last = hist[-1]
    if best > 0.9 * chance and last.train_loss > 0.9 * chance:
        return "underfit"
    if last.val_loss > best * 1.05 and last.train_loss < 0.8 * last.val_loss:
        return "overfit"
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
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.artifact_store = artifact_store
        self.on_epoch = on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            hp = space.suggest(trial, self.cfg)
        except space.InvalidCombination as e:
            trial.set_user_attr("error", f"impossible combination: {e}")
            raise

        def report(m: EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial, m)
            if not math.isfinite(m.val_loss):
                return  # the loop stops as diverged; a non-finite value would poison the pruner
            trial.report(m.val_loss, m.epoch)
            if trial.should_prune():
                trial.set_user_attr("epochs_run", m.epoch + 1)
                trial.set_user_attr("val_accuracy", m.val_accuracy)
                trial.set_user_attr("train_loss", m.train_loss)
                trial.set_user_attr(
                    "prune_reason", f"val loss {m.val_loss:.4f} at epoch {m.epoch + 1} fell behind other trials"
                )
                raise optuna.TrialPruned(f"epoch {m.epoch + 1}: val loss {m.val_loss:.4f}")

        ckpt = TrialCheckpoints(self.artifact_store, trial) if self.artifact_store is not None else None
        try:
            result = train_and_evaluate(
                self.data, hp, self.cfg.train, seed=self.cfg.study.seed, report=report,
                checkpoint=ckpt.save if ckpt else None, resume=ckpt.resume_state() if ckpt else None,
            )
        except Exception as e:
            # an interrupted trial, or one cut off by the database, is retried from its checkpoint
            if ckpt is not None and not storage_mod.is_connection_error(e):
                ckpt.discard()
            raise
        if ckpt is not None:
            ckpt.discard()
        diagnosis = diagnose(result, self.data.n_classes)
        first = next((h.val_loss for h in result.history if math.isfinite(h.val_loss)), math.nan)
        attrs = {
            "val_accuracy": result.best_val_accuracy,
            "train_loss": result.final_train_loss,
            "epochs_run": result.epochs_run,
            "improvement_pct": _improvement(first, result.best_val_loss),
            "diagnosis": diagnosis,
            "n_params": count_params(result.model),
            "train_seconds": round(result.train_seconds, 3),
            "samples_per_second": round(result.samples_per_second, 1),
            "nan_batches": result.nan_batches,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, _json_safe(value))
        if diagnosis == "diverged":
            trial.set_user_attr("prune_reason", "diverged: the loss became non-finite and stayed so")
            raise optuna.TrialPruned("diverged")
        self._save_if_best(trial, result)
        return result.best_val_loss

    def _save_if_best(self, trial: optuna.Trial, result: TrainResult) -> None:
        """Upload the model only when it beats every finished trial, so disk stays bounded."""
        if self.artifact_store is None:
            return
        done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done and min(t.value for t in done) <= result.best_val_loss:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            kwargs = model_kwargs(self.data, space.to_hyperparams(self.cfg, trial.params), self.cfg.train.init_gain)
            torch.save(model_payload(result.model, kwargs, self.data, trial.params), path)
            try:
                artifact_id = upload_artifact(
                    artifact_store=self.artifact_store, file_path=str(path), study_or_trial=trial
                )
            except (OSError, ArtifactNotFound) as e:  # a full or unshared disk must not lose the trial
                trial.set_user_attr("model_save_error", str(e))
                return
        trial.set_user_attr("model_artifact_id", artifact_id)


class TrialCheckpoints:
    """A trial's epoch checkpoints in the artifact store; a retry resumes from its failed parent's.

    Only the latest checkpoint is kept (its id is the trial's CHECKPOINT_ATTR, written after the
    file is complete), and all of them go once the trial finishes, so disk stays bounded.
    """

    def __init__(self, store: optuna.artifacts.FileSystemArtifactStore, trial: optuna.Trial) -> None:
        self.store, self.trial = store, trial
        self.latest: str | None = None
        self.inherited: list[str] = []  # failed ancestors' checkpoints, deleted when this trial ends

    def resume_state(self) -> dict | None:
        """The newest checkpoint of the trial this one retries (RetryFailedTrialCallback's
        `failed_trial`/`retry_history` system attrs), or None to start from scratch."""
        trials = {t.number: t for t in self.trial.study.get_trials(deepcopy=False)}
        me = trials[self.trial.number].system_attrs
        ancestors = list(me.get("retry_history") or ([me["failed_trial"]] if "failed_trial" in me else []))
        self.inherited = [trials[n].user_attrs[CHECKPOINT_ATTR] for n in ancestors
                          if n in trials and CHECKPOINT_ATTR in trials[n].user_attrs]
        for number in reversed(ancestors):
            artifact_id = trials[number].user_attrs.get(CHECKPOINT_ATTR) if number in trials else None
            if artifact_id is None:
                continue
            try:
                with self.store.open_reader(artifact_id) as f:
                    state = torch.load(io.BytesIO(f.read()), weights_only=True)
            except (OSError, ArtifactNotFound, RuntimeError, ValueError) as e:
                self.trial.set_user_attr("resume_error", f"checkpoint of trial {number}: {e}")
                continue
            self.trial.set_user_attr(RESUMED_ATTR, f"trial {number} epoch {state['epoch'] + 1}")
            return state
        return None

    def save(self, epoch: int, state: dict) -> None:
        """checkpoint= hook of train_and_evaluate: store `state`, then drop the previous one."""
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        artifact_id = f"checkpoint-{uuid.uuid4().hex}"
        try:
            self.store.write(artifact_id, buf)
        except OSError as e:  # a full disk costs resumability, not the trial
            self.trial.set_user_attr("checkpoint_error", str(e))
            return
        self.trial.set_user_attr(CHECKPOINT_ATTR, artifact_id)
        previous, self.latest = self.latest, artifact_id
        if previous is not None:
            self._remove(previous)

    def discard(self) -> None:
        """Delete this trial's and its ancestors' checkpoints (the trial has ended)."""
        for artifact_id in dict.fromkeys([*self.inherited, *([self.latest] if self.latest else [])]):
            self._remove(artifact_id)
        self.inherited, self.latest = [], None

    def _remove(self, artifact_id: str) -> None:
        try:
            self.store.remove(artifact_id)
        except (OSError, ArtifactNotFound):
            pass


def model_kwargs(data: TaskData, hp: Hyperparams, init_gain: float) -> dict:
    """TransformerClassifier's constructor arguments for `hp` on `data`."""
    return dict(
        n_features=data.n_features, n_classes=data.n_classes, seq_len=data.seq_len,
        hidden_dim=hp.hidden_dim, n_layers=hp.n_layers, n_heads=hp.n_heads,
        dropout=hp.dropout, init_gain=init_gain,
    )


def model_payload(model: torch.nn.Module, kwargs: dict, data: TaskData, params: dict) -> dict:
    """What load_best_model needs: weights, constructor kwargs and input normalisation."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_kwargs": kwargs,
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "params": dict(params),
    }


def _improvement(first: float, best: float) -> float:
    if not (math.isfinite(first) and math.isfinite(best)) or first <= 0:
        return 0.0
    return round(100.0 * (first - best) / first, 3)


def _json_safe(value: float | int | str) -> float | int | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
