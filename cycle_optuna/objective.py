"""Trial -> params -> train -> report/prune -> value and the trial contract's user attrs."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from cycle_optuna import space
from cycle_optuna.config import Hyperparams, PrunerConfig, StudyConfig
from cycle_optuna.data import TaskData
from cycle_optuna.model import count_params
from cycle_optuna.train import EpochMetrics, TrainResult, train_and_evaluate

DIAGNOSES = ("diverged", "unstable", "underfit", "overfit", "converging", "converged")
MODEL_FILE = "model.pt"


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

        result = train_and_evaluate(self.data, hp, self.cfg.train, seed=self.cfg.study.seed, report=report)
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
