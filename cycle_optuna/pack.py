"""Packed trials: several trials of one shape trained as one vmapped population on one device.

Trials that agree on every hyperparameter but lr, weight decay and dropout have parameters of the
same shapes. torch.func stacks them (``stack_module_state``) and one
``vmap(grad(functional_call(...)))`` step trains every member on the same batch. Each member keeps
its own lr and schedule position, weight decay, dropout rate, Adam moments, non-finite guard, best
weights, early stopping, report hook and checkpoints: the members run through the same loop as a
trial alone (``train.run_epochs``), and one whose report raises (a prune signal) stops updating
and leaves the population at the next epoch.

Members share the study seed, so they share the initial weights, the batch order and, under
``vmap(randomness="same")``, every random draw (dropout masks come from torch.rand, compared with
each member's own rate). A packed trial therefore trains as it would alone, up to the rounding of
batched kernels, and its checkpoints are ordinary single-trial checkpoints: a packed trial that is
interrupted resumes alone with ``train_and_evaluate``. Nothing here knows the model's layers: any
module the model factory builds works, and dropout varies per member where the model uses
nn.Dropout modules (otherwise the dropout rate is part of the shape).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from cycle_optuna import train
from cycle_optuna.config import Hyperparams, TrainConfig
from cycle_optuna.data import TaskData
from cycle_optuna.train import EpochMetrics, EpochStats, Run, TrainResult

PACKED_OPTIMIZERS = ("adamw", "adam")  # the update below is Adam's; other optimizers train trials alone
PER_MEMBER = ("lr", "weight_decay", "dropout")  # what the members of one pack may differ in
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which make_optimizer uses


def pack_key(hp: Hyperparams, *, dropout_per_member: bool = True) -> tuple:
    """Trials with equal keys can share a pack: every hyperparameter except the per-member ones.

    Whether dropout is on at all stays in the key: a trial without dropout draws no masks alone,
    so it would not train as it does alone in a population that draws them.
    """
    fields = dataclasses.asdict(hp)
    for name in PER_MEMBER:
        if name != "dropout" or dropout_per_member:
            fields.pop(name)
    fields["dropout_on"] = hp.dropout > 0
    return tuple(sorted(fields.items()))


def groups(hps: Sequence[Hyperparams], data: TaskData, cfg: TrainConfig, *, size: int) -> list[list[int]]:
    """Indices of ``hps`` split into packs of at most ``size`` trials of one shape, in first-seen order.

    With an optimizer the population cannot run, or size 1, every trial is its own group.
    """
    if size <= 1 or cfg.optimizer not in PACKED_OPTIMIZERS or len(hps) < 2:
        return [[i] for i in range(len(hps))]
    per_member = _dropout_is_modules(data, hps[0], cfg)
    by_key: dict[tuple, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, hp in enumerate(hps):
        chunks = by_key.setdefault(pack_key(hp, dropout_per_member=per_member), [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order


def _dropout_is_modules(data: TaskData, hp: Hyperparams, cfg: TrainConfig) -> bool:
    """Whether the factory's model applies dropout through nn.Dropout modules (per-member rates work)."""
    try:
        with torch.device("meta"):  # no memory, no init cost
            model = train.build_model(data, hp, cfg)
    except Exception:  # noqa: BLE001 - a factory that needs real tensors to build
        model = train.build_model(data, hp, cfg)
    return any(type(m) is nn.Dropout for m in model.modules())


def train_pack(data: TaskData, hps: Sequence[Hyperparams], cfg: TrainConfig, *, seed: int,
               reports: Sequence[Callable[[EpochMetrics], None] | None] | None = None,
               checkpoints: Sequence[Callable[[int, dict], None] | None] | None = None,
               ) -> list[TrainResult | Exception]:
    """Train trials of one shape together; per trial its TrainResult, or the exception its report raised.

    ``reports[i]`` and ``checkpoints[i]`` are trial i's hooks, as ``train_and_evaluate``'s
    ``report`` and ``checkpoint``; a checkpoint resumes with ``train_and_evaluate(resume=...)``.
    """
    if not hps:
        return []
    keys = {pack_key(hp, dropout_per_member=_dropout_is_modules(data, hps[0], cfg)) for hp in hps}
    if len(keys) > 1:
        raise ValueError(f"trials of one pack must share a shape, but got {len(keys)} shapes in {list(hps)=}.")
    if cfg.optimizer not in PACKED_OPTIMIZERS:
        raise ValueError(f"packed training runs {PACKED_OPTIMIZERS}, but got {cfg.optimizer=}.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    reports = list(reports) if reports is not None else [None] * len(hps)
    checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(hps)
    population = Population(data, list(hps), cfg, seed=seed, device=train.resolve_device(cfg.device))
    runs = [Run(hp, report=r, checkpoint=c) for hp, r, c in zip(hps, reports, checkpoints)]
    population.start(runs)
    train.run_epochs(population, runs, cfg, isolate=True)
    return [run.error if run.error is not None else run.result(population.final_model(run)) for run in runs]


class Population:
    """The engine ``train.run_epochs`` drives for a pack: stacked weights, per-member Adam, one step for all."""

    def __init__(self, data: TaskData, hps: list[Hyperparams], cfg: TrainConfig, *, seed: int,
                 device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.models: list[nn.Module] = []
        for hp in hps:  # each member starts from the weights it would start from alone
            torch.manual_seed(seed)
            self.models.append(train.use_rate_dropout(train.build_model(data, hp, cfg)).to(device, non_blocking=True))
        self.template = self.models[0]  # the structure functional_call runs; its own tensors are not used
        params, self.buffers = stack_module_state(self.models)
        m = len(hps)
        # Every member's parameters live in one row of a [members, P] tensor (self.params are views
        # of it), so the optimizer step is a dozen kernels over all parameters, not a dozen per tensor.
        self.shapes = {k: v.shape[1:] for k, v in params.items()}
        self.flat = torch.cat([v.detach().reshape(m, -1) for v in params.values()], dim=1)
        self.params = self._views(self.flat)
        # make_optimizer's rule: weight decay on each member's matrices, not on biases and norms
        self.decay = torch.cat([torch.full((v[0].numel(),), float(v.ndim >= 3), device=device)
                                for v in params.values()])
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        self.adam_steps = torch.zeros(m, device=device)
        # lr in float64 as the host computes it for a trial alone (reported); the update casts it to float32
        self.base_lr = train.to_device(torch.tensor([hp.lr for hp in hps], dtype=torch.float64), device)
        self.wd = train.to_device(torch.tensor([hp.weight_decay for hp in hps]), device)
        self.guard = train._Guard((m,), device, cfg.max_bad_batches)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.x_tr, self.y_tr = train.to_device(data.x_train, device), train.to_device(data.y_train, device)
        weight = train.class_weight(data.y_train, data.n_classes, cfg.class_weights)
        self.weight = None if weight is None else train.to_device(weight, device)
        self.x_va, self.y_va = train.to_device(data.x_val, device), train.to_device(data.y_val, device)
        self.w_va = train.validation_weight(self.y_va, data.n_classes, cfg.class_weights)
        # the summary branch's inputs, once for all members (as train._Single computes them)
        self.f_tr = None if train.augments(cfg) else train.summaries(self.template, self.x_tr)
        self.f_va = train.summaries(self.template, self.x_va)
        self.n_data = len(self.x_tr)
        self.passes = train.epoch_passes(self.n_data, cfg)
        self.n = self.n_data * self.passes  # samples per epoch
        self.bs = max(1, min(hps[0].batch_size, self.n_data))
        self.steps_per_epoch = math.ceil(self.n / self.bs)
        self.check_every = train._guard_check_steps(device)
        self._grad = vmap(grad_and_value(self._loss), in_dims=(0, 0, None, None, None), randomness="same")
        self._logits = vmap(self._forward, in_dims=(0, 0, None, None), randomness="same")
        self.order: list[Run] = []  # the member in each slot of the stacked tensors
        self.index: dict[int, int] = {}  # id(run) -> its model in self.models
        self.final: dict[int, dict[str, torch.Tensor]] = {}  # id(run) -> its weights when it left

    def start(self, runs: list[Run]) -> None:
        self.order = list(runs)
        self.index = {id(r): i for i, r in enumerate(runs)}

    # -- the engine interface of train.run_epochs ---------------------------------------------

    def keep(self, live: list[Run]) -> None:
        """Members that ended leave: their slots are dropped from every stacked tensor."""
        if [id(r) for r in live] == [id(r) for r in self.order]:
            return
        slots = {id(r): i for i, r in enumerate(self.order)}
        for r in self.order:
            if id(r) not in {id(x) for x in live}:
                self.final[id(r)] = self.weights(slots[id(r)])
        idx = train.to_device(torch.tensor([slots[id(r)] for r in live]), self.device)

        self.buffers = {k: v.index_select(0, idx) for k, v in self.buffers.items()}
        self.flat = self.flat.index_select(0, idx)
        self.params = self._views(self.flat)
        self.guard.take(idx)
        for name in ("exp_avg", "exp_avg_sq", "adam_steps", "base_lr", "wd"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.order = list(live)

    def train_epoch(self, live: list[Run]) -> list[EpochStats]:
        cfg, device, bs, n, m = self.cfg, self.device, self.bs, self.n, len(live)
        t0 = time.perf_counter()
        self.template.train()
        perm = train.to_device(train.epoch_order(self.n_data, self.passes, self.shuffle), device)
        xs, ys = self.x_tr[perm], self.y_tr[perm]
        fs = None if self.f_tr is None else self.f_tr[perm]
        guard = self.guard
        guard.new_epoch()
        last_lr = torch.zeros(m, dtype=torch.float64, device=device)
        for k, i in enumerate(range(0, n, bs)):
            xb = train._augment(xs[i:i + bs], cfg)  # one draw for all: members share the seed
            yb = ys[i:i + bs]
            factors = [train.lr_factor(run.step, steps_per_epoch=self.steps_per_epoch, epochs=cfg.epochs, cfg=cfg)
                       for run in live]
            for run in live:
                run.step += 1
            lr = self.base_lr * train.to_device(torch.tensor(factors, dtype=torch.float64), device)
            with self._attention():
                grads, loss = self._grad(self.params, self.buffers, xb, yb, None if fs is None else fs[i:i + bs])
            loss = loss.detach()
            grads = torch.cat([grads[k].reshape(m, -1) for k in self.shapes], dim=1)  # rows as self.flat's
            gnorm = grads.norm(dim=1)  # per member, the norm clip_grad_norm_ / get_total_norm compute
            if cfg.grad_clip > 0:
                grads.mul_((cfg.grad_clip / (gnorm + 1e-6)).clamp(max=1.0).unsqueeze(1))
            last_lr = torch.where(guard.tripped > 0, last_lr, lr)
            self._adam(grads, lr.float(), 1 - guard.step(loss, gnorm, len(yb)))
            if (k + 1) % self.check_every == 0 and i + bs < n and bool(guard.tripped.all()):
                break
        seconds = time.perf_counter() - t0
        return [guard.stats(row, row[5], seconds) for row in guard.read(last_lr)]  # the epoch's one host read

    def evaluate(self, diverged: list[bool]) -> list[tuple[float, float]]:
        n, m = len(self.x_va), len(self.order)
        if n == 0:
            return [(math.nan, math.nan)] * m
        self.template.eval()
        loss_sum = torch.zeros(m, device=self.device)
        correct = torch.zeros(m, dtype=torch.int64, device=self.device)
        with torch.no_grad(), self._attention():
            for i in range(0, n, self.cfg.eval_batch_size):
                sl = slice(i, i + self.cfg.eval_batch_size)
                fb = None if self.f_va is None else self.f_va[sl]
                logits = self._logits(self.params, self.buffers, self.x_va[sl], fb).float()  # [members, batch, classes]
                yb = self.y_va[sl]
                per_sample = F.cross_entropy(logits.flatten(0, 1), yb.repeat(m), reduction="none").view(m, -1)
                if self.w_va is not None:
                    per_sample = per_sample * self.w_va[sl]
                loss_sum += per_sample.sum(dim=1)
                correct += (logits.argmax(dim=2) == yb).sum(dim=1)
        total = n if self.w_va is None else self.w_va.sum()
        rows = torch.stack([(loss_sum / total).double(), correct.double() / n], dim=1).tolist()
        return [(math.nan, math.nan) if d else (loss, acc) for (loss, acc), d in zip(rows, diverged)]

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        """Slot i's state_dict (the keys of the model alone)."""
        stacked = {**self.buffers, **self.params}
        return {k: (stacked[k][i] if k in stacked else v).detach().clone()
                for k, v in self.template.state_dict().items()}

    def state_dicts(self, i: int) -> tuple[dict, dict]:
        """Slot i's model and optimizer state in the format of a trial trained alone."""
        run = self.order[i]
        model = self.models[self.index[id(run)]]
        model.load_state_dict(self.weights(i))
        opt, _ = train.make_optimizer(model, run.hp, self.cfg)
        step = self.adam_steps[i].detach().clone()
        exp_avg, exp_avg_sq = self._views(self.exp_avg), self._views(self.exp_avg_sq)
        for name, p in model.named_parameters():
            opt.state[p] = {"step": step.clone(), "exp_avg": exp_avg[name][i].clone(),
                            "exp_avg_sq": exp_avg_sq[name][i].clone()}
        return train._clone(model.state_dict()), opt.state_dict()

    def rng_state(self) -> dict:
        return train._rng_state(self.shuffle, self.device)

    # -----------------------------------------------------------------------------------------

    def final_model(self, run: Run) -> nn.Module:
        """The trial's own module holding the weights it ended with (its best are loaded by Run.result)."""
        model = self.models[self.index[id(run)]]
        if id(run) in self.final:
            model.load_state_dict(self.final[id(run)])
        else:
            model.load_state_dict(self.weights([id(r) for r in self.order].index(id(run))))
        return model

    def _forward(self, params: dict, buffers: dict, x: torch.Tensor, summary: torch.Tensor | None) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x, summary))

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor,
              summary: torch.Tensor | None) -> torch.Tensor:
        return train.training_loss(self._forward(params, buffers, x, summary), y, self.weight, self.cfg.label_smoothing)

    @staticmethod
    def _attention():
        # The fused attention kernels may lack a vmap batching rule (CPU's has none: vmap would
        # loop over the members); the math kernel batches as plain matmuls.
        return sdpa_kernel(SDPBackend.MATH)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter's [members, ...] view of a [members, P] tensor laid out as self.flat."""
        views, at = {}, 0
        for k, shape in self.shapes.items():
            n = shape.numel()
            views[k] = flat[:, at:at + n].view(len(flat), *shape)
            at += n
        return views

    def _adam(self, g: torch.Tensor, lr: torch.Tensor, apply: torch.Tensor) -> None:
        """One Adam/AdamW step per member on the [members, P] gradients ``g``, as torch's fused kernel
        computes it; members whose ``apply`` is 0.0 keep their weights, moments and step count (the
        fused kernel's found_inf). Updated in place: self.params stay views of self.flat."""
        b1, b2 = BETAS
        p, a = self.flat, apply.unsqueeze(1) > 0
        steps = self.adam_steps + apply
        step_size = (lr / (1 - b1 ** steps)).unsqueeze(1)
        bc2_sqrt = (1 - b2 ** steps).sqrt().unsqueeze(1)
        decay = self.wd.unsqueeze(1) * self.decay  # [members, P]: each member's rate on its matrices
        if self.cfg.optimizer == "adam":
            g = g + decay * p  # Adam's coupled L2
            new = p
        else:
            new = p * (1 - lr.unsqueeze(1) * decay)
        m = self.exp_avg.lerp(g, 1 - b1)
        v = torch.addcmul(self.exp_avg_sq * b2, g, g, value=1 - b2)
        new = new - step_size * m / (v.sqrt() / bc2_sqrt + EPS)
        torch.where(a, new, p, out=p)
        torch.where(a, m, self.exp_avg, out=self.exp_avg)
        torch.where(a, v, self.exp_avg_sq, out=self.exp_avg_sq)
        self.adam_steps = steps
