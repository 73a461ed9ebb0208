"""The cycle report: every number, insight and recommendation computed from the study alone."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage

from cycle_optuna import api, plots
from cycle_optuna import config as config_mod
from cycle_optuna import storage as storage_mod
from cycle_optuna.api import Cycle, HeldOutScore
from cycle_optuna.config import StudyConfig
from cycle_optuna.errors import CycleOptunaError

LABELS = {"lr": "Learning rate", "batch_size": "Batch size", "hidden_dim": "Hidden dimension",
          "n_layers": "Layers", "n_heads": "Heads", "dropout": "Dropout", "weight_decay": "Weight decay"}
CORRELATION = 0.3  # |Spearman rho| from which a relation is called a trend
EDGE = 0.1  # best value within this fraction of a range's ends is "at the edge"


@dataclass
class Analysis:
    """What the report says, as data (the markdown is rendered from this)."""

    name: str
    cfg: StudyConfig | None
    stats: dict[str, Any] | None
    cycles: list[Cycle]
    best: Cycle | None
    test: HeldOutScore | None = None
    test_note: str = ""
    importance: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""
    storage: str | None = None

    @property
    def complete(self) -> list[Cycle]:
        return [c for c in self.cycles if c.state == "COMPLETE" and c.value is not None]

    @property
    def diverged(self) -> list[Cycle]:
        return [c for c in self.cycles if c.diverged]

    @property
    def pruned(self) -> list[Cycle]:
        return [c for c in self.cycles if c.state == "PRUNED" and not c.diverged]

    @property
    def failed(self) -> list[Cycle]:
        return [c for c in self.cycles if c.state == "FAIL"]

    @property
    def epochs(self) -> int | None:
        return self.cfg.train.epochs if self.cfg else None


def analyse(study: api.StudyLike, storage: str | BaseStorage | None = None, *, test: bool = True) -> Analysis:
    """Load the study and compute everything the report shows."""
    url = None
    if not isinstance(study, optuna.Study) and Path(study).suffix.lower() == ".toml":
        url = storage_mod.mask(storage_mod.resolve_url(config_mod.load(study), storage if isinstance(storage, str) else None))
    study = api.load_study(study, storage)
    cyc = api.cycles(study)
    complete = [c for c in cyc if c.state == "COMPLETE" and c.value is not None]
    best = min(complete, key=lambda c: c.value) if complete else None
    a = Analysis(study.study_name, api.study_config(study), study.user_attrs.get(api.STATS_ATTR), cyc, best, storage=url)
    if best is not None and test:
        try:
            a.test = api.held_out_score(study)
        except CycleOptunaError as e:
            a.test_note = str(e)
    elif best is not None:
        a.test_note = "not computed (report run without the test evaluation)"
    a.importance, a.importance_note = _importances(study)
    return a


def _importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 complete cycles, the study has {len(done)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study)  # PED-ANOVA, needs no extra packages
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return {}, f"not computable: {e}"
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    return values, "" if values else "no parameter varied across complete cycles"


# -- helpers ---------------------------------------------------------------------------------------

def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None

    def ranks(v: list[float]) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in set(v):  # ties share their mean rank
            idx = [i for i, w in enumerate(v) if w == val]
            r[idx] = r[idx].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _loss(c: Cycle) -> float | None:
    return plots._loss(c)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _arch(c: Cycle) -> str:
    p = c.params
    return f"hidden {p.get('hidden_dim')}, {p.get('n_layers')} layers, {p.get('n_heads')} heads"


def _state(c: Cycle) -> str:
    if c.diverged:
        return "diverged"
    if c.state == "PRUNED":
        return f"pruned at epoch {c.epochs_run}"
    if c.state == "COMPLETE":
        return f"complete ({c.diagnosis})" if c.diagnosis else "complete"
    return c.state.lower()


def _space(cfg: StudyConfig | None) -> dict[str, config_mod.ParamSpace]:
    return {p.name: p for p in cfg.space} if cfg else {}


# -- sections --------------------------------------------------------------------------------------

def _overview(a: Analysis) -> list[str]:
    n = Counter(c.state for c in a.cycles)
    parts = [f"{n['COMPLETE']} complete", f"{len(a.pruned)} pruned", f"{len(a.diverged)} diverged", f"{len(a.failed)} failed"]
    if n["RUNNING"] or n["WAITING"]:
        parts.append(f"{n['RUNNING'] + n['WAITING']} running or waiting")
    epochs = sum(c.epochs_run for c in a.cycles)
    secs = sum(c.metrics.get("train_seconds", 0) or 0 for c in a.cycles)
    lines = ["## Overview", "", f"Study **{a.name}** ran {len(a.cycles)} improvement cycles ({', '.join(parts)})"
             + (f" with sampler `{a.cfg.sampler.type}` and pruner `{a.cfg.pruner.type}`" if a.cfg else "")
             + f": {epochs} epochs trained in {secs:.1f} s of training time."]
    if a.storage:
        lines.append(f"Storage: `{a.storage}`.")
    if a.stats:
        s = a.stats
        task = a.cfg.data.source if a.cfg else "data"
        split = "/".join(str(s.get(k, "?")) for k in ("n_train", "n_val", "n_test"))
        lines.append(f"Task: {task} with {split} train/val/test sequences of {s['seq_len']} steps x "
                     f"{s['n_features']} features, {s['n_classes']} classes (chance loss {math.log(s['n_classes']):.4f}).")
    first = a.cycles[0] if a.cycles else None
    if a.best is not None:
        line = f"Best validation loss **{a.best.value:.4f}** in cycle {a.best.cycle}"
        if first is not None and first.state == "COMPLETE" and first.value and first is not a.best:
            line += f", {100 * (first.value - a.best.value) / first.value:.2f}% below cycle 1 ({first.value:.4f})"
        elif first is a.best:
            line += ": no later cycle beat the baseline"
        lines.append(line + ".")
    else:
        lines.append("No cycle has completed yet.")
    return lines + [""]


def _best(a: Analysis) -> list[str]:
    b = a.best
    if b is None:
        return []
    space = _space(a.cfg)
    lines = [f"## Best configuration (cycle {b.cycle})", "",
             f"- **Validation loss:** {b.value:.4f}",
             f"- **Validation accuracy:** {_pct(b.val_accuracy)}"]
    if a.test is not None:
        lines.append(f"- **Held-out test accuracy:** {_pct(a.test.accuracy)} (test loss {a.test.loss:.4f}, "
                     f"{a.test.n} sequences never used to select this model)")
    else:
        lines.append(f"- **Held-out test accuracy:** unavailable ({a.test_note})")
    lines.append(f"- **Model:** {_arch(b)}, {b.n_params or '?'} trainable parameters, {b.epochs_run} epochs"
                 + (f", diagnosis {b.diagnosis}" if b.diagnosis else ""))
    lines.append("- **Configuration:**")
    for k, v in b.params.items():
        lines.append(f"  - {LABELS.get(k, k)}: {_fmt(v)}" + ("" if k in space else " (fixed)"))
    return lines + [""]


def _table(a: Analysis) -> list[str]:
    lines = ["## Performance metrics across cycles", "",
             "| Cycle | Final val loss | Accuracy | Improvement | Key changes | State |",
             "|------:|---------------:|---------:|------------:|-------------|-------|"]
    for c in a.cycles:
        loss = _loss(c)
        imp = c.improvement_pct
        mark = " **best**" if c is a.best else ""
        lines.append(f"| {c.cycle} | {'-' if loss is None else f'{loss:.4f}'}{mark} | {_pct(c.val_accuracy)} | "
                     f"{'-' if imp is None else f'{imp:.2f}%'} | {_cell(c.key_change)} | {_state(c)} |")
    lines += ["", "Final val loss is the best validation loss the cycle reached (the objective); improvement is "
              "first-to-best validation loss within the cycle's epochs.", ""]
    return lines


def _capacity(a: Analysis) -> list[str]:
    done = [c for c in a.complete if c.n_params]
    lines = ["### 1. Model capacity vs performance", ""]
    rho = _spearman([float(c.n_params) for c in done], [c.value for c in done])
    if rho is None:
        return lines + [f"- Too few complete cycles with different capacities to relate them ({len(done)}).", ""]
    finding = ("Smaller models performed better" if rho > CORRELATION else
               "Larger models performed better" if rho < -CORRELATION else "Capacity made little difference")
    sizes = sorted(c.n_params for c in done)
    lines += [f"- **Finding:** {finding} (Spearman rho of parameters vs loss = {rho:+.2f} over {len(done)} complete cycles)",
              f"- **Best** used {_arch(a.best)} ({a.best.n_params} parameters); complete cycles ranged "
              f"{sizes[0]} - {sizes[-1]} parameters"]
    median = float(np.median(sizes))
    big = [c for c in a.cycles if c.n_params and c.n_params > median]
    small = [c for c in a.cycles if c.n_params and c.n_params <= median]
    for label, group in (("larger", big), ("smaller", small)):
        losses = [c.value for c in group if c.state == "COMPLETE" and c.value is not None]
        bad = sum(c.diverged or c.diagnosis == "unstable" for c in group)
        if losses:
            lines.append(f"- The {label} half (>{median:.0f} parameters)" if label == "larger" else
                         f"- The {label} half (<={median:.0f} parameters)")
            lines[-1] += f": mean loss {np.mean(losses):.4f}, {bad} unstable or diverged of {len(group)}"
    return lines + [""]


def _lr(a: Analysis) -> list[str]:
    lines = ["### 2. Learning rate impact", ""]
    seq: list[float] = []
    for c in a.cycles:
        lr = c.params.get("lr")
        if lr is not None and (not seq or seq[-1] != lr):
            seq.append(lr)
    if len(seq) > 1:
        shown = seq if len(seq) <= 12 else seq[:6] + ["..."] + seq[-5:]
        lines.append("- **Sequence:** " + " -> ".join(_fmt(v) for v in shown))
    else:
        lines.append(f"- The learning rate stayed at {_fmt(seq[0]) if seq else '?'} in every cycle")
    done = [c for c in a.complete if c.params.get("lr")]
    rho = _spearman([math.log(c.params["lr"]) for c in done], [c.value for c in done])
    if rho is not None:
        trend = ("higher learning rates gave higher loss" if rho > CORRELATION else
                 "higher learning rates gave lower loss" if rho < -CORRELATION else "no clear relation to loss")
        lines.append(f"- **Relation:** {trend} (Spearman rho = {rho:+.2f})")
        imp = [c for c in done if c.improvement_pct is not None]
        rho_i = _spearman([math.log(c.params["lr"]) for c in imp], [c.improvement_pct for c in imp])
        if rho_i is not None and abs(rho_i) > CORRELATION:
            lines.append(f"- Higher learning rates showed {'more' if rho_i > 0 else 'less'} within-cycle improvement "
                         f"(rho = {rho_i:+.2f})")
    if done:
        top = sorted(done, key=lambda c: c.value)[:max(2, len(done) // 4)]
        lrs = sorted(c.params["lr"] for c in top)
        lines.append(f"- **Best range:** {_fmt(lrs[0])} - {_fmt(lrs[-1])} (the best {len(top)} complete cycles); "
                     f"best cycle used {_fmt(a.best.params['lr'])}")
    div = sorted(c.params["lr"] for c in a.diverged if c.params.get("lr"))
    if div:
        lines.append(f"- **Diverged** at learning rates {', '.join(_fmt(v) for v in div)}")
    return lines + [""]


def _dynamics(a: Analysis) -> list[str]:
    lines = ["### 3. Training dynamics", ""]
    acc = [c for c in a.cycles if c.val_accuracy is not None and c.state == "COMPLETE"]
    if acc:
        top = max(acc, key=lambda c: c.val_accuracy)
        note = " (also the best loss)" if top is a.best else " despite not having the best loss"
        lines.append(f"- **Cycle {top.cycle}** had the best accuracy ({_pct(top.val_accuracy)}){note}")
    imp = [c for c in a.cycles if c.improvement_pct is not None]
    if imp and max(c.improvement_pct for c in imp) > 0:
        top = max(imp, key=lambda c: c.improvement_pct)
        lines.append(f"- **Cycle {top.cycle}** had the highest within-cycle improvement ({top.improvement_pct:.2f}%)")
    diag = Counter(c.diagnosis for c in a.cycles if c.diagnosis)
    if diag:
        lines.append("- **Diagnoses:** " + ", ".join(f"{k} {v}" for k, v in diag.most_common()))
    nan = sum(int(c.metrics.get("nan_batches") or 0) for c in a.cycles)
    lines.append(f"- **Non-finite batches** skipped: {nan}")
    if a.epochs and a.complete:
        early = [c for c in a.complete if c.epochs_run < a.epochs]
        lines.append(f"- **Early stopping** ended {len(early)} of {len(a.complete)} complete cycles before "
                     f"{a.epochs} epochs (mean {np.mean([c.epochs_run for c in a.complete]):.1f} epochs)")
    sps = [c.metrics["samples_per_second"] for c in a.cycles if c.metrics.get("samples_per_second")]
    if sps:
        lines.append(f"- **Throughput:** {np.mean(sps):.0f} samples/s on average")
    return lines + [""]


def _importance(a: Analysis) -> list[str]:
    lines = ["### 4. Parameter importances", ""]
    if not a.importance:
        return lines + [f"- Not available: {a.importance_note}", ""]
    lines += ["Optuna's PED-ANOVA importance evaluator over the complete cycles:", "",
              "| Parameter | Importance |", "|-----------|-----------:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in a.importance.items()]
    top = next(iter(a.importance))
    return lines + ["", f"- **{top}** explains the most variation in validation loss.", ""]


def _pruning(a: Analysis) -> list[str]:
    lines = ["### 5. Epochs saved by pruning", ""]
    stopped = a.pruned + a.diverged
    if not a.epochs:
        return lines + [f"- {len(stopped)} cycles were stopped early (epoch budget unknown).", ""]
    saved = sum(max(0, a.epochs - c.epochs_run) for c in stopped)
    early = sum(max(0, a.epochs - c.epochs_run) for c in a.complete)
    budget = a.epochs * max(1, len(a.cycles))
    return lines + [f"- Pruning stopped {_n(len(stopped), 'cycle')} and saved **{saved} epochs** "
                    f"({100 * saved / budget:.1f}% of the {budget}-epoch budget of {len(a.cycles)} cycles)",
                    f"- Early stopping saved another {_n(early, 'epoch')} in complete cycles", ""]


def _worked(a: Analysis) -> list[str]:
    lines = ["## What worked and what failed", "", "### What worked", ""]
    best, wins, misses = math.inf, [], []
    for c in a.cycles:
        if c.state != "COMPLETE" or c.value is None:
            continue
        if c.value < best:
            if math.isfinite(best):
                wins.append(f"- Cycle {c.cycle}: {c.key_change} lowered the best loss {best:.4f} -> {c.value:.4f} "
                            f"({100 * (best - c.value) / best:.2f}%)")
            best = c.value
        else:
            misses.append(c)
    lines += wins or ["- No cycle improved on the first complete cycle."]
    lines += ["", "### What failed", ""]
    lines.append(f"- **Did not improve:** {_n(len(misses), 'complete cycle')}"
                 + (": " + "; ".join(f"cycle {c.cycle} ({c.key_change})" for c in misses[:8]) if misses else ""))
    for label, group in (("Diverged", a.diverged), ("Pruned", a.pruned), ("Failed", a.failed)):
        lines.append(f"- **{label}:** {len(group)}")
        for c in group[:10]:
            lines.append(f"  - cycle {c.cycle} (lr {_fmt(c.params.get('lr'))}, {_arch(c)}): {c.reason or 'no reason recorded'}")
    return lines + [""]


def _widen(p: config_mod.ParamSpace, end: float, sign: int) -> float:
    """A suggested new range end: x2 (log) or half the span further, kept an int for int ranges."""
    new = end * 2.0 ** sign if p.log else end + sign * (p.high - p.low) / 2
    if isinstance(p.low, int):
        new = math.ceil(new) if sign > 0 else math.floor(new)
        return max(new, 1) if p.log else new
    return max(new, 0.0) if p.low >= 0 else new


def _recommendations(a: Analysis) -> list[str]:
    recs: list[str] = []
    b = a.best
    if b is None:
        return ["## Recommendations for the next run", "", "1. Run the study: no cycle has completed yet.", ""]
    for name, p in _space(a.cfg).items():
        v = b.params.get(name)
        if p.choices is not None:
            nums = sorted(c for c in p.choices if isinstance(c, (int, float)))
            if len(nums) > 1 and v in (nums[0], nums[-1]):
                side = "largest" if v == nums[-1] else "smallest"
                recs.append(f"Best {name} {_fmt(v)} is the {side} choice of {list(p.choices)}: add a "
                            f"{'larger' if side == 'largest' else 'smaller'} choice")
        elif p.low is not None and p.high > p.low:
            pos = ((math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low)) if p.log
                   else (v - p.low) / (p.high - p.low))
            if pos >= 1 - EDGE and _widen(p, p.high, +1) != p.high:
                recs.append(f"Best {name} {_fmt(v)} sits at the upper edge of [{_fmt(p.low)}, {_fmt(p.high)}]: "
                            f"widen the range upwards (e.g. high = {_fmt(_widen(p, p.high, +1))})")
            elif pos <= EDGE and _widen(p, p.low, -1) != p.low:
                recs.append(f"Best {name} {_fmt(v)} sits at the lower edge of [{_fmt(p.low)}, {_fmt(p.high)}]: "
                            f"widen the range downwards (e.g. low = {_fmt(_widen(p, p.low, -1))})")
    div = [c.params["lr"] for c in a.diverged if c.params.get("lr")]
    if div:
        recs.append(f"Keep the learning rate below {_fmt(min(div))}: {_n(len(div), 'cycle')} diverged at or above it")
    advice = {"converging": "the best cycle was still improving at its last epoch: raise train.epochs",
              "underfit": "the best cycle underfits (loss near chance): raise capacity or epochs",
              "overfit": "the best cycle overfits: raise dropout or weight_decay, or add data",
              "unstable": "the best cycle's loss was unstable: lower the learning rate or add warmup"}
    if b.diagnosis in advice:
        recs.append(advice[b.diagnosis][0].upper() + advice[b.diagnosis][1:])
    stopped = len(a.pruned) + len(a.diverged)
    if a.cycles and stopped / len(a.cycles) > 0.5:
        recs.append(f"The pruner stopped {stopped} of {len(a.cycles)} cycles: raise pruner.n_warmup_steps if it "
                    "prunes slow starters")
    if a.test is not None and b.val_accuracy is not None and b.val_accuracy - a.test.accuracy > 0.05:
        recs.append(f"Test accuracy ({_pct(a.test.accuracy)}) trails validation accuracy ({_pct(b.val_accuracy)}): "
                    "selection overfits the validation split; enlarge data.val_fraction")
    since = len(a.cycles) - b.cycle
    if since >= max(3, len(a.cycles) // 3):
        recs.append(f"No new best in the last {since} cycles: the search has plateaued; stop, or widen the space")
    elif since == 0 and len(a.cycles) > 1:
        recs.append("The last cycle set the best loss: run more cycles (raise study.n_trials)")
    if a.importance:
        top, *rest = a.importance.items()
        weak = [k for k, v in rest if v < 0.05]
        if top[1] >= 0.5:
            recs.append(f"Focus on {top[0]} (importance {top[1]:.2f})"
                        + (f"; fix {', '.join(weak)} at the best values to shrink the space" if weak else ""))
    toml = ", ".join(f"{k} = {_fmt(v)}" for k, v in b.params.items())
    recs.append(f"Use cycle {b.cycle} as the next baseline: `[baseline] {toml}`")
    return ["## Recommendations for the next run", ""] + [f"{i}. {r}" for i, r in enumerate(recs, 1)] + [""]


def _loss_reduction(a: Analysis) -> list[str]:
    lines = ["## Loss reduction analysis", ""]
    imp = [c for c in a.cycles if c.improvement_pct is not None]
    if imp:
        top = max(imp, key=lambda c: c.improvement_pct)
        lines += [f"- **Best improvement:** {top.improvement_pct:.2f}% (cycle {top.cycle})",
                  f"- **Average improvement:** {np.mean([c.improvement_pct for c in imp]):.2f}% per cycle"]
    done = a.complete
    if len(done) >= 2:
        xs, ys = np.array([c.cycle for c in done], float), np.array([c.value for c in done])
        slope = float(np.polyfit(xs, ys, 1)[0])
        rel = slope / float(np.mean(ys))
        trend = ("loss fell with later cycles" if rel < -0.001 else
                 "loss rose with later cycles (diminishing returns)" if rel > 0.001 else "flat")
        lines.append(f"- **Overall trend:** {trend} ({slope:+.4f} per cycle)")
        cv = float(np.std(ys) / np.mean(ys))
        lines.append(f"- **Stability:** loss of complete cycles in {ys.min():.4f} - {ys.max():.4f} "
                     f"(std {np.std(ys):.4f}, {'narrow' if cv < 0.01 else 'wide'} at {100 * cv:.2f}% of the mean)")
    elif not imp:
        lines.append("- Not enough complete cycles.")
    return lines + [""]


def _conclusion(a: Analysis) -> list[str]:
    if a.best is None:
        return []
    b = a.best
    test = f", {_pct(a.test.accuracy)} held-out test accuracy" if a.test else ""
    return ["## Conclusion", "",
            f"**Key takeaway:** cycle {b.cycle} ({_arch(b)}, lr {_fmt(b.params.get('lr'))}, batch "
            f"{b.params.get('batch_size')}, dropout {_fmt(b.params.get('dropout'))}) reached validation loss "
            f"{b.value:.4f} and accuracy {_pct(b.val_accuracy)}{test} after {len(a.cycles)} cycles.", ""]


def render(a: Analysis, images: dict[str, str] | None = None) -> str:
    """The report as markdown; `images` maps plot names to paths relative to the report."""
    lines = [f"# Training improvement cycle analysis: {a.name}", ""]
    lines += _overview(a) + _best(a) + _table(a)
    lines += ["## Key insights", ""] + _capacity(a) + _lr(a) + _dynamics(a) + _importance(a) + _pruning(a)
    lines += _worked(a) + _recommendations(a) + _loss_reduction(a)
    if images:
        titles = {"history": "Optimisation history", "curves": "Validation loss per epoch",
                  "lr": "Learning rate vs loss", "capacity": "Capacity vs loss", "importances": "Parameter importances"}
        lines += ["## Plots", ""] + [f"![{titles.get(k, k)}]({v})" for k, v in images.items()] + [""]
    lines += _conclusion(a)
    return "\n".join(lines).rstrip() + "\n"


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
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots.write_all(a.cycles, a.importance, out, note=a.importance_note)
    path = out / "report.md"
    path.write_text(render(a, {k: p.name for k, p in pngs.items()}))
    return path
