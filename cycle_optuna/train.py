"""Pure training loop: TaskData + Hyperparams + TrainConfig -> TrainResult. Knows nothing of Optuna.

Host syncs: the epoch's batches are slices of one shuffled copy of the in-memory tensors; losses,
sample counts and the non-finite guard's counters live on the device and are read once per epoch,
plus one boolean (has the run diverged?) every ``_guard_check_steps(device)`` steps: every step on
the CPU, where reading costs nothing, every GUARD_CHECK_STEPS on an accelerator. A skipped step must
leave the optimizer state untouched (masking the update would still advance Adam's moments and step
count), so the fused Adam/AdamW kernels get the step's verdict as ``found_inf`` (the tensor
GradScaler uses), which skips parameters, moments and step count on the device without a sync;
SGD, Lion and SophiaH have no such input and read the verdict on the host every step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cycle_optuna.config import Hyperparams, TrainConfig
from cycle_optuna.data import TaskData
from cycle_optuna.errors import ConfigError
from cycle_optuna.model import TransformerClassifier

CHECKPOINT_FORMAT = 1
SOPHIA_CLIP = 0.01  # SophiaH's clip threshold p (the paper's gamma); lr is divided by it, see make_optimizer
GUARD_CHECK_STEPS = 16  # accelerators: steps between host reads of the divergence flag


@dataclass
class EpochMetrics:
    """What one epoch produced; ``epoch`` is 0-based."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float  # lr of the epoch's last step
    nan_batches: int  # batches skipped this epoch for a non-finite loss or grad norm
    seconds: float


@dataclass
class TrainResult:
    """Outcome of one training run; ``model`` holds the best weights (on the training device)."""

    best_val_loss: float  # inf when no epoch validated to a finite loss
    best_val_accuracy: float  # 0.0 when none
    best_epoch: int  # -1 when none
    final_train_loss: float  # train loss at the best epoch (inf when none)
    epochs_run: int
    history: list[EpochMetrics]  # a diverged run's last entry may hold nan
    diverged: bool
    stopped_early: bool
    nan_batches: int
    train_seconds: float  # wall time of the whole loop, validation included
    samples_per_second: float  # training samples per second of training steps
    model: nn.Module = field(repr=False)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was requested but torch sees no CUDA device")
    return torch.device(name)


def build_model(data: TaskData, hp: Hyperparams, cfg: TrainConfig) -> TransformerClassifier:
    """The transformer sized for the task and the trial's hyperparameters."""
    return TransformerClassifier(n_features=data.n_features, n_classes=data.n_classes, seq_len=data.seq_len,
                                 hidden_dim=hp.hidden_dim, n_layers=hp.n_layers, n_heads=hp.n_heads,
                                 dropout=hp.dropout, init_gain=cfg.init_gain)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based, counted over all epochs).

    Linear warmup over ``cfg.warmup_epochs`` then constant | cosine (to ~0 at the last step) |
    cyclical (triangle starting at the peak, down to ``cyclical_low_ratio`` and back every
    ``cyclical_period_epochs``). ``onecycle`` follows torch's OneCycleLR (pct_start 0.3,
    div_factor 25, final_div_factor 1e4, cosine) and has its own warmup, so warmup_epochs is ignored.
    """
    total = steps_per_epoch * epochs
    if cfg.schedule == "onecycle":
        return _onecycle(step, total)
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    s = step - warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total - warm))))
    if cfg.schedule == "cyclical":
        period = max(1.0, cfg.cyclical_period_epochs * steps_per_epoch)
        u = (s % period) / period
        return cfg.cyclical_low_ratio + (1 - cfg.cyclical_low_ratio) * abs(1 - 2 * u)
    raise ValueError(f"unknown schedule, but got {cfg.schedule=}.")


def _onecycle(step: int, total: int, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))

    up_end = pct_start * total - 1
    if step <= up_end:
        return anneal(1 / div, 1.0, step / up_end if up_end > 0 else 1.0)
    down = total - 1 - up_end
    return anneal(1.0, 1 / (div * final_div), min(1.0, (step - up_end) / down) if down > 0 else 1.0)


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int, cfg: TrainConfig) -> float:
    """The learning rate at optimizer step ``step``."""
    return base_lr * lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs, cfg=cfg)


def make_optimizer(model: nn.Module, hp: Hyperparams, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, float]:
    """The optimizer and the factor from the schedule's lr to the optimizer's lr.

    Weight decay applies to matrices only (not biases, norms). ``sophia`` is pytorch_optimizer's
    SophiaH (Hutchinson Hessian estimates; the loop backpropagates with create_graph on its
    Hessian-update steps). Its update is lr * clip(m / h, p); with p = SOPHIA_CLIP the optimizer lr
    is hp.lr / p, which makes hp.lr the largest per-coordinate step, as for Adam and Lion.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    name = cfg.optimizer
    # The fused kernels (CPU and CUDA) take a third off the optimizer's share of a small model's step.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=hp.lr, fused=True), 1.0
    if name == "adam":
        # Adam's weight decay is L2 in the gradient, the classic coupled form.
        return torch.optim.Adam(groups, lr=hp.lr, fused=True), 1.0
    if name == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0), 1.0
    if name == "lion":
        from pytorch_optimizer import Lion

        return Lion(groups, lr=hp.lr), 1.0
    if name == "sophia":
        from pytorch_optimizer import SophiaH

        return SophiaH(groups, lr=hp.lr / SOPHIA_CLIP, p=SOPHIA_CLIP), 1.0 / SOPHIA_CLIP
    raise ValueError(f"unknown optimizer, but got {cfg.optimizer=}.")


class _MaybeCompiled(nn.Module):
    """Runs the torch.compile'd model, falling back to eager (with a warning) if compiling fails."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        try:
            compiled = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
            warnings.warn(f"torch.compile unavailable, training eagerly: {e}", RuntimeWarning, stacklevel=3)
            compiled = None
        object.__setattr__(self, "compiled", compiled)  # not a submodule: its parameters are model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"torch.compile failed, training eagerly: {e}", RuntimeWarning, stacklevel=2)
                object.__setattr__(self, "compiled", None)
        return self.model(x)


def _guard_check_steps(device: torch.device) -> int:
    """Steps between host reads of the divergence flag: 1 on the CPU (free), more on accelerators."""
    return 1 if device.type == "cpu" else GUARD_CHECK_STEPS


def _masks_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether opt.step() honours ``opt.found_inf`` (skip the whole update on the device)."""
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("fused") for g in opt.param_groups)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode under inference_mode."""
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            loss_sum = torch.zeros((), device=x.device)
            correct = torch.zeros((), device=x.device, dtype=torch.int64)
            for i in range(0, n, batch_size):
                logits = model(x[i:i + batch_size])
                yb = y[i:i + batch_size]
                loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
                correct += (logits.argmax(dim=1) == yb).sum()
            return (loss_sum / n).item(), (correct.double() / n).item()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers: everything becomes tensors, dicts, lists and numbers (torch.load weights_only).


def _clone(sd: Any) -> Any:
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    if isinstance(sd, dict):
        return {k: _clone(v) for k, v in sd.items()}
    if isinstance(sd, (list, tuple)):
        return type(sd)(_clone(v) for v in sd)
    return copy.copy(sd)


def _rng_state(shuffle: torch.Generator, device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8),
        "shuffle": shuffle.get_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
    }


def _set_rng_state(s: dict[str, Any], shuffle: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(s["torch"].cpu())
    if device.type == "cuda" and s["cuda"].numel():
        torch.cuda.set_rng_state(s["cuda"].cpu(), device)
    shuffle.set_state(s["shuffle"].cpu())
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), None))


# ---------------------------------------------------------------------------------------------


def _augment(xb: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.augment_jitter > 0:
        xb = xb + cfg.augment_jitter * torch.randn_like(xb)
    if cfg.augment_scale > 0:
        xb = xb * (1 + cfg.augment_scale * (2 * torch.rand(len(xb), 1, 1, device=xb.device) - 1))
    return xb


def train_and_evaluate(data: TaskData, hp: Hyperparams, cfg: TrainConfig, *, seed: int,
                       report: Callable[[EpochMetrics], None] | None = None,
                       checkpoint: Callable[[int, dict], None] | None = None,
                       resume: dict | None = None) -> TrainResult:
    """Train on ``data.x_train``, validate every epoch, early-stop on val loss, keep the best weights.

    ``report(metrics)`` runs after each finite validation; whatever it raises propagates (a prune
    signal, say). A diverged epoch (``cfg.max_bad_batches`` consecutive skipped batches, or a
    non-finite val loss) ends training with ``diverged=True`` and is not reported.
    ``checkpoint(epoch, state)`` receives, after each epoch, a self-contained copy of everything
    needed to continue; ``resume=state`` continues after ``state["epoch"]`` exactly as an
    uninterrupted run would (same seed, data and config).
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(data, hp, cfg).to(device)
    net: nn.Module = _MaybeCompiled(model) if cfg.compile else model
    opt, lr_scale = make_optimizer(model, hp, cfg)
    params = [p for p in model.parameters()]
    sophia = cfg.optimizer == "sophia"
    shuffle = torch.Generator().manual_seed(seed)

    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)
    n = len(x_tr)
    bs = max(1, min(hp.batch_size, n))
    steps_per_epoch = math.ceil(n / bs)

    # Run state; resume overwrites it.
    start_epoch, step, consecutive_bad, nan_total = 0, 0, 0, 0
    best = {"val_loss": math.inf, "val_accuracy": 0.0, "epoch": -1, "train_loss": math.inf}
    best_state: dict[str, torch.Tensor] | None = None
    patience_ref, bad_epochs = math.inf, 0
    history: list[EpochMetrics] = []
    train_seconds = step_seconds = 0.0
    samples = 0
    diverged = stopped_early = False
    if resume is not None:
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint, but got format={resume.get('format')!r}.")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(_clone(resume["optimizer"]))
        start_epoch, step = resume["epoch"] + 1, resume["step"]
        consecutive_bad, nan_total = resume["consecutive_bad"], resume["nan_batches"]
        best = dict(resume["best"])
        best_state = {k: v.to(device) for k, v in resume["best_state"].items()} or None
        patience_ref, bad_epochs = resume["patience_ref"], resume["bad_epochs"]
        history = [EpochMetrics(**h) for h in resume["history"]]
        train_seconds, step_seconds, samples = resume["train_seconds"], resume["step_seconds"], resume["samples"]
        diverged, stopped_early = resume["diverged"], resume["stopped_early"]
        _set_rng_state(resume["rng"], shuffle, device)
        if diverged or stopped_early:
            start_epoch = cfg.epochs

    masked = _masks_on_device(opt)
    check_every = _guard_check_steps(device)
    # Consecutive skipped batches, and whether they ever reached max_bad_batches (then every later
    # step is skipped too, so a late read of the flag trains exactly as a per-step read would).
    bad_run = torch.tensor(consecutive_bad, device=device)
    tripped = torch.zeros((), dtype=torch.bool, device=device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        perm = torch.randperm(n, generator=shuffle).to(device)
        xs, ys = x_tr[perm], y_tr[perm]  # one gather per epoch; batches below are views
        loss_sum = torch.zeros((), device=device)
        good_samples = torch.zeros((), dtype=torch.int64, device=device)
        epoch_bad = torch.zeros((), dtype=torch.int64, device=device)
        lr = 0.0
        for k, i in enumerate(range(0, n, bs)):
            xb = _augment(xs[i:i + bs], cfg)
            yb = ys[i:i + bs]
            lr = lr_at(step, base_lr=hp.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, cfg=cfg)
            step += 1
            # SophiaH estimates the Hessian from the gradient's graph on its update steps; CPU's fused
            # attention kernel has no double backward, so those steps use the math kernel.
            hessian_step = sophia and opt.param_groups[0].get("step", 0) % opt.update_period == 0
            with sdpa_kernel(SDPBackend.MATH) if hessian_step else contextlib.nullcontext():
                loss = F.cross_entropy(net(xb).float(), yb)
            if hessian_step:
                with warnings.catch_warnings():
                    # torch warns of a grad<->param cycle; zero_grad(set_to_none=True) below breaks it.
                    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
                    loss.backward(create_graph=True)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            live = ~tripped
            ok = torch.isfinite(loss) & torch.isfinite(gnorm)
            apply = ok & live
            for g in opt.param_groups:
                g["lr"] = lr * lr_scale
            if masked:
                opt.found_inf = (~apply).float()  # read by the fused kernel; no host sync
                opt.step()
            elif bool(apply):  # the host read for optimizers without found_inf
                opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += torch.where(apply, loss.detach() * len(yb), 0.0)
            good_samples += apply * len(yb)
            bad = ~ok & live
            epoch_bad += bad
            bad_run = torch.where(live, (bad_run + 1) * bad, bad_run)
            tripped = tripped | (bad_run >= cfg.max_bad_batches)
            if ((k + 1) % check_every == 0 or i + bs >= n) and bool(tripped):
                diverged = True
                break
        opt.__dict__.pop("found_inf", None)  # a later opt.step() elsewhere must not see a stale verdict
        step_seconds += time.perf_counter() - t0
        good_samples, epoch_bad, consecutive_bad = int(good_samples), int(epoch_bad), int(bad_run)
        samples += good_samples + epoch_bad * bs
        nan_total += epoch_bad
        train_loss = (loss_sum / good_samples).item() if good_samples else math.nan
        if diverged:
            val_loss = val_acc = math.nan
        else:
            val_loss, val_acc = evaluate(net, x_va, y_va, cfg.eval_batch_size)
            diverged = not math.isfinite(val_loss)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_acc, lr, epoch_bad, seconds)
        history.append(metrics)
        if diverged:
            break
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_acc, "epoch": epoch, "train_loss": train_loss}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if val_loss < patience_ref - cfg.min_delta:
            patience_ref, bad_epochs = val_loss, 0
        else:
            bad_epochs += 1
        if report is not None:
            report(metrics)
        stop = cfg.early_stopping_patience > 0 and bad_epochs >= cfg.early_stopping_patience and epoch < cfg.epochs - 1
        stopped_early = stop
        if checkpoint is not None:
            checkpoint(epoch, {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "step": step,
                "model": _clone(model.state_dict()),
                "optimizer": _clone(opt.state_dict()),
                "best": dict(best),
                "best_state": _clone(best_state) if best_state is not None else {},
                "patience_ref": patience_ref,
                "bad_epochs": bad_epochs,
                "consecutive_bad": consecutive_bad,
                "nan_batches": nan_total,
                "history": [asdict(h) for h in history],
                "train_seconds": train_seconds,
                "step_seconds": step_seconds,
                "samples": samples,
                "diverged": False,
                "stopped_early": stopped_early,
                "rng": _rng_state(shuffle, device),
            })
        if stop:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_val_loss=best["val_loss"],
        best_val_accuracy=best["val_accuracy"],
        best_epoch=best["epoch"],
        final_train_loss=best["train_loss"],
        epochs_run=len(history),
        history=history,
        diverged=diverged,
        stopped_early=stopped_early,
        nan_batches=nan_total,
        train_seconds=train_seconds,
        samples_per_second=samples / step_seconds if step_seconds > 0 else 0.0,
        model=model,
    )
