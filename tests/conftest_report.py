"""Fabricated studies for the report, API, dashboard and browser tests (no training: seconds).

Each study follows the trial contract: stored config and data stats on the study, val loss per epoch
as intermediate values, the objective's user attrs, the sampler's cycle attrs (variant "cycle"),
and a real model.pt artifact (untrained weights) on the best trial.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from cycle_optuna import config, space
from cycle_optuna.data import load_task
from cycle_optuna.model import TransformerClassifier, count_params

DATA = """
[data]
source = "synthetic"
n_samples = 90
folds = 1
seq_len = 6
n_features = 3
n_classes = 3

[train]
epochs = 4
"""

STUDY_FILES = {
    # Reference-like: the cycle sampler doubles lr and grows capacity; the baseline stays best.
    "cycle": """
[study]
name = "refcycles"
[sampler]
type = "cycle"
[baseline]
lr = 5e-4
batch_size = 32
hidden_dim = 64
n_layers = 2
n_heads = 4
dropout = 0.1
[space]
lr = { low = 1e-4, high = 1e-2, log = true }
n_layers = { low = 1, high = 6 }
hidden_dim = { choices = [32, 64, 128] }
""",
    # TPE-like: no cycle attrs; larger models and the highest lr win (lr at the edge of its range).
    "tpe": """
[study]
name = "tpewide"
[sampler]
type = "tpe"
[baseline]
lr = 5e-4
batch_size = 32
hidden_dim = 16
n_layers = 1
n_heads = 2
dropout = 0.1
[space]
lr = { low = 1e-4, high = 4e-3, log = true }
n_layers = { low = 1, high = 3 }
hidden_dim = { choices = [16, 32] }
dropout = { low = 0.0, high = 0.3 }
""",
}

_R = "fell behind other trials"
CYCLES: dict[str, list[dict[str, Any]]] = {
    "cycle": [
        dict(params=dict(lr=5e-4, n_layers=2, hidden_dim=64), curve=[0.927, 0.921, 0.9192, 0.9195],
             acc=0.4709, diag="converged", cyc=(None, "baseline", "cycle 1: baseline configuration")),
        dict(params=dict(lr=1e-3, n_layers=3, hidden_dim=64), curve=[0.924, 0.9206, 0.9210, 0.9220],
             acc=0.4609, diag="converged", cyc=(1, "lr x2", "cycle 2: trying lr x2 from cycle 1")),
        dict(params=dict(lr=2e-3, n_layers=4, hidden_dim=128), curve=[0.9513, 0.9213, 0.925],
             acc=0.4768, diag="unstable", cyc=(2, "n_layers +1", "cycle 3: more layers")),
        dict(params=dict(lr=4e-3, n_layers=5, hidden_dim=128), curve=[1.31, float("nan")], state="PRUNED",
             acc=0.33, diag="diverged", reason="diverged: the loss became non-finite and stayed so",
             cyc=(3, "lr x2", "cycle 4: lr x2 again")),
        dict(params=dict(lr=1e-3, n_layers=6, hidden_dim=128), curve=[0.99, 0.97], state="PRUNED",
             acc=0.41, diag=None, reason=f"val loss 0.9700 at epoch 2 {_R}", cyc=(1, "n_layers +1", "cycle 5: capacity up")),
        dict(params=dict(lr=2.5e-4, n_layers=2, hidden_dim=32), curve=[], state="FAIL", error="CUDA out of memory",
             cyc=(1, "lr /2", "cycle 6: lr /2")),
    ],
    "tpe": [
        dict(params=dict(lr=5e-4, n_layers=1, hidden_dim=16, dropout=0.1), curve=[1.08, 1.02, 0.99, 0.97], acc=0.52,
             diag="converging"),
        dict(params=dict(lr=1e-3, n_layers=2, hidden_dim=16, dropout=0.1), curve=[1.05, 0.95, 0.90, 0.88], acc=0.58,
             diag="converging"),
        dict(params=dict(lr=2e-3, n_layers=2, hidden_dim=32, dropout=0.05), curve=[1.01, 0.86, 0.80, 0.77], acc=0.66,
             diag="converging"),
        dict(params=dict(lr=1.5e-4, n_layers=1, hidden_dim=16, dropout=0.3), curve=[1.10, 1.09], state="PRUNED",
             acc=0.35, reason=f"val loss 1.0900 at epoch 2 {_R}"),
        dict(params=dict(lr=3.9e-3, n_layers=3, hidden_dim=32, dropout=0.0), curve=[0.98, 0.80, 0.70, 0.64], acc=0.74,
             diag="converging"),
    ],
}


def _finite(curve: list[float]) -> list[float]:
    return [v for v in curve if v == v]


def make_study(tmp_path: Path, variant: str, *, with_model: bool = True, name: str | None = None) -> Path:
    """Write the variant's study file into tmp_path and fill its SQLite study; returns the file."""
    text = STUDY_FILES[variant] + DATA
    if name:
        text = re.sub(r'name = "[^"]*"', f'name = "{name}"', text, count=1)
    path = tmp_path / f"{name or variant}.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    cfg = config.load(path)
    data = load_task(cfg.data, cfg.study.seed)
    # built in memory, then copied to SQLite in a few commits (one commit per write costs seconds)
    study = optuna.create_study(study_name=cfg.study.name)
    study.set_user_attr("cycle_optuna_config", cfg.to_dict())
    study.set_user_attr("data_stats", data.stats())
    dists = space.distributions(cfg)
    store = FileSystemArtifactStore(config.resolve_artifact_dir(cfg))
    config.resolve_artifact_dir(cfg).mkdir(parents=True, exist_ok=True)
    spec = CYCLES[variant]
    best = min((i for i, s in enumerate(spec) if s.get("state", "COMPLETE") == "COMPLETE"),
               key=lambda i: min(spec[i]["curve"]))
    for i, s in enumerate(spec):
        study.enqueue_trial(s["params"])
        trial = study.ask(dists)
        hp = space.to_hyperparams(cfg, trial.params)
        kwargs = dict(n_features=data.n_features, n_classes=data.n_classes, seq_len=data.seq_len,
                      hidden_dim=hp.hidden_dim, n_layers=hp.n_layers, n_heads=hp.n_heads, dropout=hp.dropout,
                      init_gain=cfg.train.init_gain)
        torch.manual_seed(i)
        model = TransformerClassifier(**kwargs)
        if s.get("cyc"):
            for key, value in zip(("cycle_parent", "cycle_move", "cycle_reason"), s["cyc"]):
                trial.set_user_attr(key, value)
        for epoch, v in enumerate(s["curve"]):
            if v == v:
                trial.report(v, epoch)
        state = TrialState[s.get("state", "COMPLETE")]
        if state == TrialState.FAIL:
            trial.set_user_attr("error", s["error"])
            study.tell(trial, state=state)
            continue
        finite = _finite(s["curve"])
        attrs = dict(val_accuracy=s["acc"], train_loss=finite[-1] * 0.97, epochs_run=len(s["curve"]),
                     improvement_pct=round(100 * (finite[0] - min(finite)) / finite[0], 3), n_params=count_params(model),
                     train_seconds=1.5 + i, samples_per_second=900.0 - 50 * i, nan_batches=3 if s.get("diag") == "diverged" else 0)
        if s.get("diag"):
            attrs["diagnosis"] = s["diag"]
        if s.get("reason"):
            attrs["prune_reason"] = s["reason"]
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if with_model and i == best:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "model.pt"
                torch.save({"state_dict": model.state_dict(), "model_kwargs": kwargs,
                            "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std],
                            "params": dict(trial.params)}, file)
                trial.set_user_attr("model_artifact_id",
                                    upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=trial))
        study.tell(trial, min(finite) if state == TrialState.COMPLETE else None, state=state)
    optuna.copy_study(from_study_name=cfg.study.name, from_storage=study._storage,
                      to_storage=f"sqlite:///{tmp_path / (cfg.study.name + '.db')}")
    return path
