"""Pure training loop: TaskData + Hyperparams + TrainConfig -> TrainResult. Knows nothing of Optuna.

Host syncs: the epoch's batches are slices of one shuffled copy of the in-memory tensors; losses,
sample counts and the non-finite guard's counters live on the device and are read in one transfer
per epoch (and validation's in one more), plus one boolean (has the run diverged?) every
``_guard_check_steps(device)`` steps before the epoch's last: every step on the CPU, where reading
costs nothing, every GUARD_CHECK_STEPS on an accelerator. Host tensors (model, data, each epoch's
permutation) go to an accelerator as asynchronous copies, which do not wait for it. A skipped step must
leave the optimizer state untouched (masking the update would still advance Adam's moments and step
count), so the fused Adam/AdamW kernels get the step's verdict as ``found_inf`` (the tensor
GradScaler uses), which skips parameters, moments and step count on the device without a sync;
SGD, Lion and SophiaH have no such input and read the verdict on the host every step.

``train_and_evaluate`` is one loop over named steps (``run_epochs``: epoch, evaluate, guard, best
weights, report, early stop, checkpoint) driving an engine: ``_Single`` here, a vmapped population
of several trials in cycle_optuna.pack.
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

from cycle_optuna.config import COMPILE_CUDAGRAPHS, Hyperparams, TrainConfig
from cycle_optuna.data import TaskData
from cycle_optuna.errors import ConfigError
from cycle_optuna.model import TransformerClassifier

CHECKPOINT_FORMAT = 1
SOPHIA_CLIP = 0.01  # SophiaH's clip threshold p (the paper's gamma); lr is divided by it, see make_optimizer
GUARD_CHECK_STEPS = 16  # accelerators: steps between host reads of the divergence flag
# CUDA graphs pay back after this many optimizer steps of one shape in one worker: measured on an
# H200 with the seed model (docs/performance.md), compiling took 38-43 s and saved 4.2-4.8 ms a step
# of 32 samples, so about 7,900-10,300 steps. A worker compiles a shape once the trials it has
# trained of that shape, this one included, reach it; later trials of the shape reuse the compiled code.
CUDAGRAPH_MIN_STEPS = 8000
COMPILE_CACHE_SHAPES = 64  # compiled variants kept per code object (torch's default is 8)
SUMMARY_CHUNK_VALUES = 1 << 20  # series values per slice in summaries(): ~170 MB at the peak, as fast as 4x more


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


def model_kwargs(data: TaskData, hp: Hyperparams, init_gain: float) -> dict:
    """TransformerClassifier's constructor arguments for `hp` on `data`."""
    return dict(
        n_features=data.n_features, n_classes=data.n_classes, seq_len=data.seq_len,
        hidden_dim=hp.hidden_dim, n_layers=hp.n_layers, n_heads=hp.n_heads, dropout=hp.dropout,
        init_gain=init_gain, patch_len=hp.patch_len, conv_stem=hp.conv_stem, pos_encoding=hp.pos_encoding,
        pooling=hp.pooling, instance_norm=hp.instance_norm,
        summary_features=hp.summary_features, step_conv=hp.step_conv,
        summary_of_shape=hp.instance_norm and hp.summary_features,
    )


def build_model(data: TaskData, hp: Hyperparams, cfg: TrainConfig) -> TransformerClassifier:
    """The transformer sized for the task and the trial's hyperparameters (its summary branch, when
    on, standardised by the training series' statistics)."""
    model = TransformerClassifier(**model_kwargs(data, hp, cfg.init_gain))
    if model.summary_features and not model.summary_mu.is_meta:
        model.scale_summary(_training_statistics(model, data.x_train))
    return model


def epoch_passes(n: int, cfg: TrainConfig) -> int:
    """Passes over an `n`-sample training set per epoch: a small set is passed several times, so an
    epoch stays long enough to learn in ([train] min_epoch_samples)."""
    return max(1, math.ceil(cfg.min_epoch_samples / n))


def epoch_order(n: int, passes: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order: `passes` shuffled passes over the training set."""
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])


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

    def __init__(self, model: nn.Module, mode: str | None = None) -> None:
        super().__init__()
        self.model = model
        try:
            compiled = torch.compile(model, mode=mode)
        except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
            warnings.warn(f"torch.compile unavailable, training eagerly: {e}", RuntimeWarning, stacklevel=3)
            compiled = None
        object.__setattr__(self, "compiled", compiled)  # not a submodule: its parameters are model's

    def forward(self, x: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        args = (x,) if summary is None else (x, summary)
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"torch.compile failed, training eagerly: {e}", RuntimeWarning, stacklevel=2)
                object.__setattr__(self, "compiled", None)
        return self.model(*args)


def _compiled(model: nn.Module, cfg: TrainConfig, device: torch.device, steps: int,
              shape: tuple = ()) -> nn.Module:
    """The model as ``cfg.compile`` asks: inductor, inductor + CUDA graphs, or eager where graphs can't pay.

    Compiled code is cached per code object and shapes, not per model: parameters are graph inputs,
    so a later trial of a shape this process has compiled reuses it (a CUDA graph is re-recorded
    for the new parameters, not recompiled). The recompile limit is raised so that the handful of
    shapes a study revisits all stay cached instead of the ninth one falling back to eager.
    """
    if cfg.compile == COMPILE_CUDAGRAPHS and (device.type != "cuda" or not _graphs_pay(shape, steps)):
        return model  # CUDA graphs exist only on CUDA; a shape trained briefly does not earn back the capture
    import torch._dynamo

    limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SHAPES)
    torch._dynamo.config.cache_size_limit = limit
    return _MaybeCompiled(model, mode="reduce-overhead" if cfg.compile == COMPILE_CUDAGRAPHS else None)


_SHAPE_STEPS: dict[tuple, int] = {}  # per model shape: optimizer steps of CUDA-graph trials in this process


def _graphs_pay(shape: tuple, steps: int) -> bool:
    """Whether this process has now trained, or is about to train, enough steps of ``shape`` (its
    trials so far plus this one's ``steps``) for CUDA graphs to pay back their compilation.

    ``shape`` is what the compiled graphs depend on: every hyperparameter but the per-trial rates
    (lr, weight decay and dropout are inputs, not structure), whether dropout is on, and the
    batch's shape. Planned steps count, pruned trials' too: a shape the sampler keeps proposing is
    what the cache pays for.
    """
    _SHAPE_STEPS[shape] = _SHAPE_STEPS.get(shape, 0) + steps
    return _SHAPE_STEPS[shape] >= CUDAGRAPH_MIN_STEPS


def graph_shape(hp: Hyperparams, batch: tuple[int, ...]) -> tuple:
    """The key CUDA-graph compilation is counted under (see _graphs_pay)."""
    rates = ("lr", "weight_decay", "dropout")
    return (batch, *sorted((k, v) for k, v in asdict(hp).items() if k not in rates), hp.dropout > 0)


def _guard_check_steps(device: torch.device) -> int:
    """Steps between host reads of the divergence flag: 1 on the CPU (free), more on accelerators."""
    return 1 if device.type == "cpu" else GUARD_CHECK_STEPS


def _masks_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether opt.step() honours ``opt.found_inf`` (skip the whole update on the device)."""
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("fused") for g in opt.param_groups)


def class_weight(y: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    """The training loss's per-class weights: None for `[train] class_weights = "none"`; "balanced":
    a class of n_c of the split's n series weighs n / (K * n_c), K the classes present (one absent
    from this split, a cross-validation fold's: 0), so each class counts as much as an average-sized one."""
    if mode == "none":
        return None
    counts = torch.bincount(y.detach().cpu().long(), minlength=n_classes).double()
    present = counts > 0
    return torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), 0.0).float()


def training_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    """The batch's training loss: cross-entropy against targets smoothed by `smoothing`, each series
    weighed by its class's `weight` when given. Per series, not F.cross_entropy's `weight`: that one
    also weighs the smoothed targets' share of every other class by that class's weight, which pulls
    every series towards the small classes (at 99 to 1 the best answer for a large-class series
    became 84% the small class), and divides by the batch's weights, which under-weighs a batch
    without a small-class series. The mean over the batch keeps the expected loss the balanced one."""
    if weight is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
    return (F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing) * weight[y]).mean()


def validation_weight(y: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    """Each validation series' weight in the validation loss (the objective): None (a plain mean) for
    `[train] class_weights = "none"`; "balanced": its class's `class_weight` over `y`, so the
    weighted mean is the mean over the classes present of each class's mean loss, and cycles are
    ranked on the balance their training was asked for. Under cross-validation `y` is every fold's
    validation series pooled, so the folds' losses combine into that one balanced mean."""
    weight = class_weight(y, n_classes, mode)
    return None if weight is None else weight.to(y.device)[y.long()]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             summary: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode under inference_mode; ``summary``: the
    transformer's ``summary_of(x)`` where it was computed beforehand (see `summaries`); ``weight``:
    each series' weight in the mean cross-entropy (`validation_weight`), None for equal weights."""
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
                logits = model(x[i:i + batch_size]) if summary is None else model(x[i:i + batch_size],
                                                                                    summary[i:i + batch_size])
                yb = y[i:i + batch_size]
                if weight is None:
                    loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
                else:
                    loss_sum += (F.cross_entropy(logits.float(), yb, reduction="none") * weight[i:i + batch_size]).sum()
                correct += (logits.argmax(dim=1) == yb).sum()
            mean = loss_sum / n if weight is None else loss_sum / weight.sum()  # no host value made a device tensor
            loss, acc = torch.stack([mean.double(), correct.double() / n]).tolist()  # one host read
            return loss, acc
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


class RateDropout(nn.Dropout):
    """nn.Dropout whose rate is also a (non-persistent) buffer and whose mask comes from torch.rand.

    The buffer lets a packed population give each member its own rate (torch.func stacks buffers),
    and drawing the mask with torch.rand consumes the generator the same way alone and under
    ``vmap(randomness="same")``, so a trial packed with others draws exactly the masks it draws alone.
    """

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)
        self.register_buffer("scale", torch.tensor(1 / (1 - float(p))), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device, dtype=x.dtype) >= self.rate
        return x * keep * self.scale


def use_rate_dropout(model: nn.Module) -> nn.Module:
    """Replace every nn.Dropout inside ``model`` by a RateDropout of the same rate (in place)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, RateDropout(child.p))
    return model


def _augment(xb: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.augment_jitter > 0:
        xb = xb + cfg.augment_jitter * torch.randn_like(xb)
    if cfg.augment_scale > 0:
        xb = xb * (1 + cfg.augment_scale * (2 * torch.rand(len(xb), 1, 1, device=xb.device) - 1))
    return xb


def augments(cfg: TrainConfig) -> bool:
    """Whether training inputs are changed per step (then their summary statistics change too)."""
    return cfg.augment_jitter > 0 or cfg.augment_scale > 0


def summaries(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``model.summary_of`` for all of ``x``, in slices of bounded memory; None when the model has no
    summary branch. Engines compute a data set's once and slice it per batch: recomputed at every
    step, the statistics cost more than the step itself on long multichannel series."""
    if not getattr(model, "summary_features", False):
        return None
    rows = max(1, SUMMARY_CHUNK_VALUES // max(1, x.shape[1] * x.shape[2]))
    return torch.cat([model.summary_of(x[i:i + rows]) for i in range(0, len(x), rows)] or [model.summary_of(x)])


_training_statistics = summaries  # build_model's: the scaling is the model's, whatever an engine hands the branch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned first, so the copy is truly async)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# The loop shared by single and packed training: per epoch, train (the engine's steps), evaluate,
# guard against divergence, track the best weights, report, early stop, checkpoint.


@dataclass
class EpochStats:
    """What one trial's training steps of one epoch left on the host (one read per epoch)."""

    train_loss: float  # nan when no step applied
    good_samples: int
    bad_batches: int
    consecutive_bad: int
    lr: float
    diverged: bool
    step_seconds: float


class _Guard:
    """The non-finite guard's device state: one trial's (shape ()) or a population's (shape (m,)).

    A step is bad when its loss or gradient norm is not finite. A bad step is skipped, and once
    ``max_bad`` bad steps ran in a row the run has diverged ("tripped") and every later step is
    skipped too, so an accelerator that reads ``tripped`` only every few steps trains exactly as a
    per-step read would. Everything is counted on the device for the epoch's one host read, in 16
    small kernels a step (each a launch on an accelerator, which is what a small model's step costs
    there).
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, max_bad: int) -> None:
        self.max_bad = max_bad
        self.bad_run = torch.zeros(shape, device=device)  # bad steps in a row (a float: exact far past any limit)
        self.tripped = torch.zeros(shape, device=device)  # 1.0 once diverged
        self.new_epoch()

    def new_epoch(self) -> None:
        self.loss_sum = torch.zeros_like(self.bad_run)  # sum of applied steps' loss x batch size
        self.good = torch.zeros_like(self.bad_run, dtype=torch.float64)  # samples of applied steps
        self.skipped = torch.zeros_like(self.bad_run)  # steps skipped ...
        self.after_trip = torch.zeros_like(self.bad_run)  # ... of which after diverging (not counted as bad)

    def take(self, idx: torch.Tensor) -> None:
        """Keep the members at ``idx`` (a population whose members left)."""
        self.bad_run, self.tripped = self.bad_run.index_select(0, idx), self.tripped.index_select(0, idx)

    def step(self, loss: torch.Tensor, gnorm: torch.Tensor, n: int) -> torch.Tensor:
        """Judge a step of ``n`` samples; 1.0 where it must be skipped (fused Adam's ``found_inf``), else 0.0."""
        bad = (loss * 0).add_(gnorm * 0).nan_to_num_(1.0)  # inf * 0 and nan * 0 are nan
        skip = torch.maximum(bad, self.tripped)
        apply = 1 - skip
        self.loss_sum.addcmul_(loss.nan_to_num(0.0, 0.0, 0.0), apply, value=n)
        self.good.add_(apply, alpha=n)
        self.skipped.add_(skip)
        self.after_trip.add_(self.tripped)
        self.bad_run.add_(bad).mul_(bad)  # past a trip it runs on unread: the reads report max_bad
        torch.maximum(self.tripped, (self.bad_run >= self.max_bad).float(), out=self.tripped)
        return skip

    def read(self, *more: torch.Tensor) -> list[list[float]]:
        """The epoch's one host read: per member mean loss, good samples, bad steps, bad run,
        tripped, then ``more``'s values."""
        mean = self.loss_sum / self.good.clamp(min=1).to(self.loss_sum.dtype)
        cols = [mean, self.good, self.skipped - self.after_trip, self.bad_run, self.tripped, *more]
        rows = torch.stack([c.double() for c in cols], dim=-1)
        return rows.view(-1, len(cols)).tolist()

    def stats(self, row: list[float], lr: float, seconds: float) -> EpochStats:
        loss, good, bad, run, tripped = row[:5]
        return EpochStats(loss if good else math.nan, int(good), int(bad), self.max_bad if tripped else int(run), lr,
                          bool(tripped), seconds)


@dataclass
class Run:
    """One trial's progress through the loop; a checkpoint is this plus its weights and the RNG."""

    hp: Hyperparams
    report: Callable[[EpochMetrics], None] | None = None
    checkpoint: Callable[[int, dict], None] | None = None
    step: int = 0  # optimizer steps taken: the schedule's position
    consecutive_bad: int = 0
    nan_total: int = 0
    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "val_accuracy": 0.0, "epoch": -1,
                                                "train_loss": math.inf})
    best_state: dict[str, torch.Tensor] | None = None
    patience_ref: float = math.inf
    bad_epochs: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    train_seconds: float = 0.0
    step_seconds: float = 0.0
    samples: int = 0
    diverged: bool = False
    stopped_early: bool = False
    error: Exception | None = None  # what its report hook raised, when trials are isolated (packed)

    @property
    def finished(self) -> bool:
        return self.diverged or self.stopped_early or self.error is not None

    def load(self, state: dict, device: torch.device) -> int:
        """Continue from a checkpoint; the first epoch to run."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint, but got format={state.get('format')!r}.")
        self.step, self.consecutive_bad, self.nan_total = state["step"], state["consecutive_bad"], state["nan_batches"]
        self.best = dict(state["best"])
        self.best_state = {k: v.to(device) for k, v in state["best_state"].items()} or None
        self.patience_ref, self.bad_epochs = state["patience_ref"], state["bad_epochs"]
        self.history = [EpochMetrics(**h) for h in state["history"]]
        self.train_seconds, self.step_seconds = state["train_seconds"], state["step_seconds"]
        self.samples, self.diverged, self.stopped_early = state["samples"], state["diverged"], state["stopped_early"]
        return state["epoch"] + 1

    def state(self, epoch: int, model: dict, optimizer: dict, rng: dict) -> dict:
        """A self-contained checkpoint after ``epoch`` (tensors, dicts, lists and numbers only)."""
        return {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": self.step, "model": model, "optimizer": optimizer,
            "best": dict(self.best), "best_state": _clone(self.best_state) if self.best_state is not None else {},
            "patience_ref": self.patience_ref, "bad_epochs": self.bad_epochs,
            "consecutive_bad": self.consecutive_bad, "nan_batches": self.nan_total,
            "history": [asdict(h) for h in self.history], "train_seconds": self.train_seconds,
            "step_seconds": self.step_seconds, "samples": self.samples, "diverged": False,
            "stopped_early": self.stopped_early, "rng": rng,
        }

    def result(self, model: nn.Module) -> TrainResult:
        """The outcome, with the best weights loaded into ``model``."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        model.eval()
        return TrainResult(
            best_val_loss=self.best["val_loss"], best_val_accuracy=self.best["val_accuracy"],
            best_epoch=self.best["epoch"], final_train_loss=self.best["train_loss"],
            epochs_run=len(self.history), history=self.history, diverged=self.diverged,
            stopped_early=self.stopped_early, nan_batches=self.nan_total, train_seconds=self.train_seconds,
            samples_per_second=self.samples / self.step_seconds if self.step_seconds > 0 else 0.0, model=model,
        )


def run_epochs(engine: Any, runs: list[Run], cfg: TrainConfig, *, start_epoch: int = 0, isolate: bool = False) -> None:
    """The loop: every epoch each live trial trains, is evaluated, guarded, reported and checkpointed.

    ``engine`` trains the live trials together (one model, or a packed population) and answers
    for their weights; see _Single and pack.Population. With ``isolate`` a report hook's exception
    (a prune signal) ends its own trial only, which leaves the population at the next epoch.
    """
    for epoch in range(start_epoch, cfg.epochs):
        live = [r for r in runs if not r.finished]
        if not live:
            break
        engine.keep(live)
        t0 = time.perf_counter()
        stats = engine.train_epoch(live)
        evals = engine.evaluate([s.diverged for s in stats])
        seconds = time.perf_counter() - t0
        for i, (run, st, (val_loss, val_acc)) in enumerate(zip(live, stats, evals)):
            metrics = _record(run, epoch, st, val_loss, val_acc, seconds)
            if _guard(run, st, metrics):
                continue
            _track_best(run, metrics, cfg, engine, i)
            try:
                if run.report is not None:
                    run.report(metrics)
            except Exception as e:
                if not isolate:
                    raise
                run.error = e
                continue
            run.stopped_early = _early_stop(run, cfg, epoch)
            if run.checkpoint is not None:
                run.checkpoint(epoch, run.state(epoch, *engine.state_dicts(i), engine.rng_state()))


def _record(run: Run, epoch: int, st: EpochStats, val_loss: float, val_acc: float, seconds: float) -> EpochMetrics:
    run.step_seconds += st.step_seconds
    run.samples += st.good_samples + st.bad_batches * run.hp.batch_size
    run.nan_total += st.bad_batches
    run.consecutive_bad = st.consecutive_bad
    run.train_seconds += seconds
    metrics = EpochMetrics(epoch, st.train_loss, val_loss, val_acc, st.lr, st.bad_batches, seconds)
    run.history.append(metrics)
    return metrics


def _guard(run: Run, st: EpochStats, metrics: EpochMetrics) -> bool:
    """Whether the trial diverged: too many bad steps in a row, or a non-finite val loss."""
    run.diverged = st.diverged or not math.isfinite(metrics.val_loss)
    return run.diverged


def _track_best(run: Run, m: EpochMetrics, cfg: TrainConfig, engine: Any, i: int) -> None:
    if m.val_loss < run.best["val_loss"]:
        run.best = {"val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "epoch": m.epoch, "train_loss": m.train_loss}
        run.best_state = engine.weights(i)
    if m.val_loss < run.patience_ref - cfg.min_delta:
        run.patience_ref, run.bad_epochs = m.val_loss, 0
    else:
        run.bad_epochs += 1


def _early_stop(run: Run, cfg: TrainConfig, epoch: int) -> bool:
    return cfg.early_stopping_patience > 0 and run.bad_epochs >= cfg.early_stopping_patience and epoch < cfg.epochs - 1


# ---------------------------------------------------------------------------------------------


class _Single:
    """Engine of one trial: an nn.Module, a torch optimizer, and the hot loop the module doc describes."""

    def __init__(self, data: TaskData, hp: Hyperparams, cfg: TrainConfig, *, seed: int, device: torch.device) -> None:
        self.cfg, self.hp, self.device = cfg, hp, device
        torch.manual_seed(seed)
        self.model = use_rate_dropout(build_model(data, hp, cfg)).to(device, non_blocking=True)
        self.opt, self.lr_scale = make_optimizer(self.model, hp, cfg)
        self.params = list(self.model.parameters())
        self.shuffle = torch.Generator().manual_seed(seed)
        self.x_tr, self.y_tr = to_device(data.x_train, device), to_device(data.y_train, device)
        self.x_va, self.y_va = to_device(data.x_val, device), to_device(data.y_val, device)
        weight = class_weight(data.y_train, data.n_classes, cfg.class_weights)
        self.weight = None if weight is None else to_device(weight, device)
        # the validation loss's weights (a _Folds replaces them by the pooled folds')
        self.w_va = validation_weight(self.y_va, data.n_classes, cfg.class_weights)
        # the summary branch's inputs, once per trial; per step instead where augmentation changes the series
        self.f_tr = None if augments(cfg) else summaries(self.model, self.x_tr)
        self.f_va = summaries(self.model, self.x_va)
        self.n_data = len(self.x_tr)
        self.passes = epoch_passes(self.n_data, cfg)
        self.n = self.n_data * self.passes  # samples per epoch
        self.bs = max(1, min(hp.batch_size, self.n_data))
        self.steps_per_epoch = math.ceil(self.n / self.bs)
        steps = self.steps_per_epoch * cfg.epochs
        self.net = (_compiled(self.model, cfg, device, steps, graph_shape(hp, (self.bs, *self.x_tr.shape[1:])))
                    if cfg.compile else self.model)
        self.masked = _masks_on_device(self.opt)
        self.check_every = _guard_check_steps(device)
        self.guard = _Guard((), device, cfg.max_bad_batches)

    def resume(self, run: Run, state: dict) -> int:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(_clone(state["optimizer"]))
        start = run.load(state, self.device)
        self.guard.bad_run.fill_(run.consecutive_bad)
        _set_rng_state(state["rng"], self.shuffle, self.device)
        return self.cfg.epochs if run.finished else start

    def keep(self, live: list[Run]) -> None:
        pass

    def train_epoch(self, live: list[Run]) -> list[EpochStats]:
        run, cfg, opt, device, bs, n = live[0], self.cfg, self.opt, self.device, self.bs, self.n
        t0 = time.perf_counter()
        self.net.train()
        perm = to_device(epoch_order(self.n_data, self.passes, self.shuffle), device)
        xs, ys = self.x_tr[perm], self.y_tr[perm]  # one gather per epoch; batches below are views
        fs = None if self.f_tr is None else self.f_tr[perm]
        guard = self.guard
        guard.new_epoch()
        sophia = cfg.optimizer == "sophia"
        lr = 0.0
        for k, i in enumerate(range(0, n, bs)):
            xb = _augment(xs[i:i + bs], cfg)
            yb = ys[i:i + bs]
            lr = lr_at(run.step, base_lr=self.hp.lr, steps_per_epoch=self.steps_per_epoch, epochs=cfg.epochs, cfg=cfg)
            run.step += 1
            # SophiaH estimates the Hessian from the gradient's graph on its update steps; CPU's fused
            # attention kernel has no double backward, so those steps use the math kernel.
            hessian_step = sophia and opt.param_groups[0].get("step", 0) % opt.update_period == 0
            with sdpa_kernel(SDPBackend.MATH) if hessian_step else contextlib.nullcontext():
                logits = self.net(xb) if fs is None else self.net(xb, fs[i:i + bs])
                loss = training_loss(logits, yb, self.weight, cfg.label_smoothing)
            if hessian_step:
                with warnings.catch_warnings():
                    # torch warns of a grad<->param cycle; zero_grad(set_to_none=True) below breaks it.
                    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
                    loss.backward(create_graph=True)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            skip = guard.step(loss.detach(), gnorm, len(yb))
            for g in opt.param_groups:
                g["lr"] = lr * self.lr_scale
            if self.masked:
                opt.found_inf = skip  # read by the fused kernel; no host sync
                opt.step()
            elif not bool(skip):  # the host read for optimizers without found_inf
                opt.step()
            opt.zero_grad(set_to_none=True)
            # the epoch's last step is checked by the read below
            if (k + 1) % self.check_every == 0 and i + bs < n and bool(guard.tripped):
                break
        opt.__dict__.pop("found_inf", None)  # a later opt.step() elsewhere must not see a stale verdict
        seconds = time.perf_counter() - t0
        return [guard.stats(guard.read()[0], lr, seconds)]

    def evaluate(self, diverged: list[bool]) -> list[tuple[float, float]]:
        if diverged[0]:
            return [(math.nan, math.nan)]
        return [evaluate(self.net, self.x_va, self.y_va, self.cfg.eval_batch_size, self.f_va, self.w_va)]

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dicts(self, i: int) -> tuple[dict, dict]:
        return _clone(self.model.state_dict()), _clone(self.opt.state_dict())

    def rng_state(self) -> dict[str, Any]:
        return _rng_state(self.shuffle, self.device)


class _Folds:
    """Engine of one trial under k-fold cross-validation: a _Single per fold, stepped epoch by epoch.

    An epoch trains every fold's model for an epoch; the trial's val loss and accuracy are those of
    all the pooled series, each scored by the model that did not train on it, so the curve the
    pruner reads and the best epoch are the cross-validated ones. The trial's model is the folds'
    models at that epoch, averaged as an Ensemble.
    """

    def __init__(self, data: TaskData, hp: Hyperparams, cfg: TrainConfig, *, seed: int, device: torch.device) -> None:
        from cycle_optuna.best_model import Ensemble

        self.cfg, self.device = cfg, device
        self.parts = [_Single(view, hp, cfg, seed=seed + j, device=device) for j, view in enumerate(data.cv_views())]
        self.runs = [Run(hp) for _ in self.parts]  # each fold's schedule position
        self.model = Ensemble([p.model for p in self.parts])
        self.n_val = [len(p.y_va) for p in self.parts]
        # each fold's share of the pooled validation loss: its series, or under class weights the
        # pooled series' weights it holds (every fold's series weighed by the classes of all of them)
        self.w_val = [float(n) for n in self.n_val]
        pooled = validation_weight(torch.cat([p.y_va for p in self.parts]), data.n_classes, cfg.class_weights)
        if pooled is not None:
            for part, w in zip(self.parts, pooled.split(self.n_val)):
                part.w_va = w
            self.w_val = [float(w.sum()) for w in pooled.split(self.n_val)]

    def resume(self, run: Run, state: dict) -> int:
        self.model.load_state_dict(state["model"])
        folds = state["optimizer"]  # see state_dicts
        for part, fold_run, opt, step, bad, shuffle in zip(self.parts, self.runs, folds["optimizers"], folds["steps"],
                                                           folds["bad_runs"], state["rng"]["fold_shuffles"]):
            part.opt.load_state_dict(_clone(opt))
            fold_run.step, fold_run.consecutive_bad = step, bad
            part.guard.bad_run.fill_(bad)
            part.shuffle.set_state(shuffle.cpu())
        start = run.load(state, self.device)
        _set_rng_state(state["rng"], self.parts[0].shuffle, self.device)
        return self.cfg.epochs if run.finished else start

    def keep(self, live: list[Run]) -> None:
        pass

    def train_epoch(self, live: list[Run]) -> list[EpochStats]:
        stats = [part.train_epoch([r])[0] for part, r in zip(self.parts, self.runs)]
        for r, st in zip(self.runs, stats):
            r.consecutive_bad = st.consecutive_bad  # read by the epoch's one host read: no extra sync
        live[0].step = self.runs[0].step
        good = sum(st.good_samples for st in stats)
        loss = sum(st.train_loss * st.good_samples for st in stats if st.good_samples) / good if good else math.nan
        return [EpochStats(loss, good, sum(st.bad_batches for st in stats), max(st.consecutive_bad for st in stats),
                           stats[0].lr, any(st.diverged for st in stats), sum(st.step_seconds for st in stats))]

    def evaluate(self, diverged: list[bool]) -> list[tuple[float, float]]:
        if diverged[0]:
            return [(math.nan, math.nan)]
        scores = [part.evaluate([False])[0] for part in self.parts]
        return [(sum(w * loss for w, (loss, _) in zip(self.w_val, scores)) / sum(self.w_val),
                 sum(k * acc for k, (_, acc) in zip(self.n_val, scores)) / sum(self.n_val))]

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dicts(self, i: int) -> tuple[dict, dict]:
        """The folds' models (as the Ensemble), and as "optimizer" every fold's optimizer and schedule."""
        return _clone(self.model.state_dict()), {
            "optimizers": [_clone(p.opt.state_dict()) for p in self.parts], "steps": [r.step for r in self.runs],
            "bad_runs": [r.consecutive_bad for r in self.runs]}

    def rng_state(self) -> dict[str, Any]:
        state = _rng_state(self.parts[0].shuffle, self.device)
        state["fold_shuffles"] = [p.shuffle.get_state() for p in self.parts]
        return state


def train_and_evaluate(data: TaskData, hp: Hyperparams, cfg: TrainConfig, *, seed: int,
                       report: Callable[[EpochMetrics], None] | None = None,
                       checkpoint: Callable[[int, dict], None] | None = None,
                       resume: dict | None = None, last_weights: bool = False) -> TrainResult:
    """Train on ``data.x_train``, validate every epoch, early-stop on val loss, keep the best weights
    (``last_weights``: the last epoch's instead, for a refit where nothing is held out to choose one).

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
    engine = (_Folds if data.n_folds > 1 else _Single)(data, hp, cfg, seed=seed, device=device)
    run = Run(hp, report=report, checkpoint=checkpoint)
    start = engine.resume(run, resume) if resume is not None else 0
    run_epochs(engine, [run], cfg, start_epoch=start)
    if last_weights:
        run.best_state = None
    return run.result(engine.model)
