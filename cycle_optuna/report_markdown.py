"""The report as markdown (and its short summary for the dashboard), written from an `Analysis`."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from cycle_optuna import analysis as an
from cycle_optuna import config as config_mod
from cycle_optuna.analysis import Analysis
from cycle_optuna.api import Cycle
from cycle_optuna.config import StudyConfig

LABELS = {"lr": "Learning rate", "batch_size": "Batch size", "hidden_dim": "Hidden dimension",
          "n_layers": "Layers", "n_heads": "Heads", "dropout": "Dropout", "weight_decay": "Weight decay"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _loss(c: Cycle) -> float | None:
    return an.shown_loss(c)


def _model(a: Analysis) -> str:
    """The model the held-out score belongs to: the best cycle's, or the mean of the best cycles'."""
    from cycle_optuna.references import model_name

    cycles = list(a.test.cycles) if a.test and a.test.cycles else [a.best.cycle] if a.best else []
    refit = bool(a.test and a.test.refit)
    return f"the best model ({model_name(cycles, refit)})" if len(cycles) > 1 or refit else "its model"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _generic(c: Cycle) -> str:
    """A cycle of a study other code made: its own parameters, as they are."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in c.params.items()) or "no parameters"


def _arch(c: Cycle) -> str:
    p = c.params
    if not all(k in p for k in ("hidden_dim", "n_layers", "n_heads")):
        return _generic(c)
    layers, heads = p.get("n_layers"), p.get("n_heads")
    return (f"hidden {p.get('hidden_dim')}, {_n(layers, 'layer') if isinstance(layers, int) else f'{layers} layers'}, "
            f"{_n(heads, 'head') if isinstance(heads, int) else f'{heads} heads'}")


_OURS = ("lr", "hidden_dim", "n_layers", "n_heads", "batch_size", "dropout")


def _config(c: Cycle) -> str:
    """A cycle's configuration in a few words: lr and the model's shape; a study other code made has
    other parameters (or none), named as they are."""
    return f"lr {_fmt(c.params['lr'])}, {_arch(c)}" if all(k in c.params for k in _OURS) else _generic(c)


def _tried(c: Cycle) -> str:
    """What a cycle tried: its change against its parent, or its configuration when it changed nothing."""
    if c.key_change and c.key_change not in ("baseline configuration", "first trial", "no change"):
        return c.key_change
    lead = f"{c.key_change}: " if c.key_change else ""
    return f"{lead}{_config(c)}"


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
    if a.retried:
        parts.append(f"{len(a.retried)} interrupted and retried")
    if n["RUNNING"] or n["WAITING"]:
        parts.append(f"{n['RUNNING'] + n['WAITING']} running or waiting")
    epochs = sum(c.epochs_trained for c in a.cycles)  # a retry's resumed epochs were trained by its original
    timed = [c for c in a.cycles if c.metrics.get("train_seconds")]  # pruned and failed cycles record none
    secs = sum(c.metrics["train_seconds"] for c in timed)
    lines = ["## Overview", "", f"Study **{a.name}** ran {_n(len(a.cycles), 'improvement cycle')} ({', '.join(parts)})"
             + _search_text(a.search)
             + f": {epochs} epochs trained"
             + (f"; the {len(timed)} cycle{'s' if len(timed) != 1 else ''} that finished training took {secs:.1f} s"
                if timed else "") + "."]
    if a.storage:
        lines.append(f"Storage: `{a.storage}`.")
    if a.stats:
        s = a.stats
        task = a.cfg.data.source if a.cfg else "data"
        split = "/".join(str(s.get(k, "?")) for k in ("n_train", "n_val", "n_test"))
        lines.append(f"Task: {task} with {split} train/val/test sequences of {s['seq_len']} steps x "
                     f"{s['n_features']} features, {s['n_classes']} classes (chance loss {math.log(s['n_classes']):.4f})."
                     + (f" Cycles are scored by {s['folds']}-fold cross-validation over the {s['n_train'] + s['n_val']} "
                        "train and val sequences; each cycle's model averages its folds' models."
                        if s.get("folds", 1) > 1 else ""))
    first = a.cycles[0] if a.cycles else None
    if a.best is not None:
        line = f"Best validation loss **{a.best.value:.4f}** in cycle {a.best.cycle} (of {_n(len(a.complete), 'complete cycle')})"
        if first is not None and first.state == "COMPLETE" and first.value and first is not a.best:
            line += f", {100 * (first.value - a.best.value) / first.value:.2f}% below cycle 1 ({first.value:.4f})"
        elif first is a.best and len(a.cycles) > 1:
            line += ": no later cycle beat the baseline"
        lines.append(line + ".")
    elif a.cycles and len(an.finished(a.cycles)) == len(a.cycles):
        lines.append("No cycle completed: every one was pruned, diverged or failed.")
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
                     f"{a.test.n} sequences never used to select this model)"
                     + (f"; the best model averages the class probabilities of cycles "
                        f"{', '.join(map(str, a.test.cycles))} (`[study] ensemble`)" if len(a.test.cycles) > 1 else "")
                     + ("; refit: trained again on all training series, validation included (`cycle-optuna refit`)"
                        if a.test.refit else ""))
        if len(a.test.class_recall) > 1:
            name, recall, n = a.test.lowest_recall
            lowest = f"{_pct(recall)} of the {n} series of class {name!r}"
            if len({k for _, k in a.test.class_recall.values()}) > 1:  # equal classes: the same figure as accuracy
                lines.append(f"- **Held-out balanced accuracy:** {_pct(a.test.balanced_accuracy)} (the mean of the "
                             f"classes' recalls; lowest: {lowest})")
            else:
                lines.append(f"- **Lowest class recall (held out):** {lowest}")
    else:
        lines.append(f"- **Held-out test accuracy:** unavailable ({a.test_note})")
    lines += _context(a)
    lines.append(f"- **Model:** {_arch(b)}, {b.n_params or '?'} trainable parameters, {b.epochs_run} epochs"
                 + (f", diagnosis {b.diagnosis}" if b.diagnosis else ""))
    lines.append("- **Configuration:**")
    for k, v in b.params.items():
        lines.append(f"  - {LABELS.get(k, k)}: {_fmt(v)}" + ("" if k in space else " (fixed)"))
    return lines + [""]


def _context(a: Analysis) -> list[str]:
    """Where the best result stands: chance, the study's reference baselines, the oracle of the built-in task."""
    b = a.best
    if b is None or b.val_accuracy is None:
        return []
    out = []
    if a.stats and a.stats.get("n_classes"):
        out.append(f"chance {_pct(1 / a.stats['n_classes'], 1)}")
    for key, ref in a.baselines.items():
        test = f", test {_pct(ref['test_accuracy'], 1)}" if isinstance(ref.get("test_accuracy"), (int, float)) else ""
        balanced = ref.get("test_balanced_accuracy")
        if test and isinstance(balanced, (int, float)) and round(balanced, 3) != round(ref["test_accuracy"], 3):
            test += f" (balanced {_pct(balanced, 1)})"  # classes of different sizes: accuracy flatters the majority
        out.append(f"{ref.get('label', key)} {_pct(ref['val_accuracy'], 1)}{test}")
    if a.bayes:
        where = (f"the {a.stats['n_train'] + a.stats['n_val']} cross-validated series" if a.stats and a.stats.get("folds", 1) > 1
                 and isinstance(a.stats.get("n_train"), int) and isinstance(a.stats.get("n_val"), int) else "this val split")
        out.append(f"Bayes-optimal oracle {_pct(a.bayes['val'], 1)} on {where} "
                   f"({_pct(a.bayes['test'], 1)} on the test split)")
    if not out:
        return []
    line = f"- **In context** (validation accuracy {_pct(b.val_accuracy, 1)}): " + "; ".join(out)
    if a.bayes and a.bayes["val"] > 0:
        line += f". The tuned model reaches {100 * b.val_accuracy / a.bayes['val']:.0f}% of the oracle's accuracy"
    return [line]


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
    balanced = (" (class-balanced, as `class_weights = \"balanced\"` asks: each class's mean loss, averaged)"
                if a.cfg is not None and a.cfg.train.class_weights == "balanced" else "")
    lines += ["", f"Final val loss is the best validation loss{balanced} the cycle reached: a complete cycle's objective value "
              "(a pruned cycle's Optuna value, which `export` and the trial logs show, is its loss at the epoch it was "
              "stopped); accuracy is at the best epoch for a complete cycle, at the last epoch for a pruned one; "
              "improvement is first-to-best validation loss within the cycle's epochs.", ""]
    return lines


CAPACITY_WORDS = ("model size (hidden_dim^2 x n_layers)", "Smaller models performed better", "Larger models performed better",
                  "Capacity made little difference")
LR_WORDS = ("log learning rate", "higher learning rates gave higher loss", "higher learning rates gave lower loss",
            "no clear relation to loss")


def _log_lr(c: Cycle) -> float | None:
    return math.log(c.params["lr"]) if c.params.get("lr") else None


def _trend_line(t: an.Trend, quantity: str, up: str, down: str, flat: str) -> str:
    """A trend as one line that names its evidence: rho, the epoch compared at, complete and pruned cycles."""
    finding = up if t.direction > 0 else down if t.direction < 0 else flat
    evidence = f"Spearman rho of {quantity} vs val loss at epoch {t.epoch} = {t.rho:+.2f}, over {t.n} cycles"
    if t.contradicted:
        return (f"- **Finding:** unsettled: at epoch {t.epoch} {finding[0].lower() + finding[1:]} ({evidence}), "
                f"but the complete cycles alone point the other way (rho {t.rho_complete:+.2f} at their final loss)")
    return f"- **Finding:** {finding} ({evidence})"


def _too_few(t: an.Trend, what: str) -> str:
    return (f"- Too few cycles with different {what} to relate them to loss ({t.n}; a trend needs "
            f"{an.MIN_TREND} complete or pruned cycles, at least {an.MIN_TREND_MOVED} of them away from the most "
            "common value)")


def _capacity(a: Analysis) -> list[str]:
    lines = ["### 1. Model capacity vs performance", ""]
    t = an.trend(a.cycles, an.model_size)
    if t.rho is None:
        return lines + [_too_few(t, "capacities"), ""]
    lines.append(_trend_line(t, *CAPACITY_WORDS))
    sizes = sorted(c.n_params for c in a.complete if c.n_params)
    if a.best is not None and sizes:
        lines.append(f"- **Best** used {_arch(a.best)} ({a.best.n_params} parameters); complete cycles "
                     f"ranged {sizes[0]} - {sizes[-1]} parameters")
    bad = [c for c in a.cycles if c.diverged or c.diagnosis == "unstable"]
    if bad:
        shown = ", ".join(f"cycle {c.cycle} ({c.n_params or '?'} parameters)" for c in bad)
        lines.append(f"- Unstable or diverged: {shown}")
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
    elif seq:
        lines.append(f"- The learning rate stayed at {_fmt(seq[0])} in every cycle")
    else:
        lines.append("- No cycle yet: no learning rate to show")
    t = an.trend(a.cycles, _log_lr)
    if t.rho is not None:
        lines.append(_trend_line(t, *LR_WORDS))
    elif len(seq) > 1:
        lines.append(_too_few(t, "learning rates"))
    pruned = sorted(c.params["lr"] for c in a.pruned if c.params.get("lr"))
    if len(pruned) > 6:
        lines.append(f"- **Pruned:** {len(pruned)} cycles at learning rates {_fmt(pruned[0])} - {_fmt(pruned[-1])} "
                     f"(median {_fmt(float(np.median(pruned)))})")
    elif pruned:
        lines.append(f"- **Pruned** at learning rates {', '.join(_fmt(v) for v in pruned)}")
    div = sorted(c.params["lr"] for c in a.diverged if c.params.get("lr"))
    if div:
        lines.append(f"- **Diverged** at learning rates {', '.join(_fmt(v) for v in div)}")
    if a.best is not None and "lr" in a.best.params:
        lines.append(f"- The best cycle used {_fmt(a.best.params['lr'])}")
    return lines + [""]


def _dynamics(a: Analysis) -> list[str]:
    lines = ["### 3. Training dynamics", ""]
    acc = [c for c in a.cycles if c.val_accuracy is not None and c.state == "COMPLETE"]
    if acc:
        high = max(c.val_accuracy for c in acc)
        tops = [c for c in acc if c.val_accuracy == high]
        if len(tops) == 1:
            note = " (also the best loss)" if tops[0] is a.best else " despite not having the best loss"
            lines.append(f"- **Cycle {tops[0].cycle}** had the best accuracy of the {len(acc)} complete cycles "
                         f"({_pct(high)}){note}")
        else:  # a tie: no cycle had it "despite" anything
            names = ", ".join(str(c.cycle) for c in tops[:-1]) + f" and {tops[-1].cycle}"
            note = (f"; cycle {a.best.cycle}, one of them, also had the best loss" if a.best in tops
                    else "; none of them had the best loss")
            lines.append(f"- **Cycles {names}** shared the best accuracy of the {len(acc)} complete cycles "
                         f"({_pct(high)}){note}")
    imp = [c for c in a.cycles if c.improvement_pct is not None]
    if imp and max(c.improvement_pct for c in imp) > 0:
        top = max(imp, key=lambda c: c.improvement_pct)
        lines.append(f"- **Cycle {top.cycle}** had the highest within-cycle improvement ({top.improvement_pct:.2f}%, "
                     f"of {an.sample(imp)} cycles)")
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
    n = len(a.complete)
    lines += [f"Optuna's PED-ANOVA importance evaluator over the {n} complete cycles, for the parameters that "
              "varied among them:", "", "| Parameter | Importance |", "|-----------|-----------:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in a.importance.items()]
    fixed = [k for k in _space(a.cfg) if k not in a.importance]
    top = next(iter(a.importance))
    lines += [""]
    if fixed:
        lines.append(f"- Not rated (held one value in every complete cycle): {', '.join(fixed)}")
    if a.importance_warning:
        lines.append(f"- **Warning:** {a.importance_warning}")
    if n >= 50:
        return lines + [f"- **{top}** has the highest importance score over these {n} cycles.", ""]
    # the cycle sampler changes one parameter a move, so its table shows each change's effect; others change several
    samplers = {s["sampler"] for s in a.search}  # none known for a study made elsewhere
    if samplers == {"cycle"}:
        compare = " (compare the cycles that changed it in the table above)"
    elif samplers:
        compare = " (its cycles changed several parameters at once, so no one cycle isolates its effect)"
    else:
        compare = ""
    return lines + [f"- **{top}** has the highest importance score over these {n} cycles; with this few "
                    f"cycles the score is a hint, not a measurement{compare}.", ""]


def _pruning(a: Analysis) -> list[str]:
    lines = ["### 5. Epochs saved by pruning", ""]
    stopped = a.pruned + a.diverged
    if not a.epochs:
        return lines + [f"- {len(stopped)} cycles were stopped early (epoch budget unknown).", ""]
    # a cycle that early stopping would have ended by the same epoch owes pruning nothing; for the
    # others the rest of the budget is an upper bound (early stopping might have come later)
    train = a.cfg.train if a.cfg else None
    by_pruning = [c for c in stopped
                  if train is None or _early_stop_at(c.curve, train.early_stopping_patience, train.min_delta,
                                                     a.epochs) is None]
    saved = sum(max(0, a.epochs - c.epochs_run) for c in by_pruning)
    early = sum(max(0, a.epochs - c.epochs_run) for c in a.complete)
    counted = [c for c in a.cycles if c.retried_as is None]  # a retried cycle's epochs go on in its retry
    budget = a.epochs * max(1, len(counted))
    what = _n(len(a.pruned), "cycle") + (f" and stopped {len(a.diverged)} that diverged" if a.diverged else "")
    also = len(stopped) - len(by_pruning)
    same = (f"; early stopping would have ended {also} of them by the same epoch (counted as saving none)"
            if also else "")
    return lines + [f"- Pruning stopped {what}, saving up to **{_n(saved, 'epoch')}** "
                    f"({100 * saved / budget:.1f}% of the {budget}-epoch budget of {_n(len(counted), 'cycle')}){same}",
                    f"- Early stopping saved another {_n(early, 'epoch')} in complete cycles", ""]


def _early_stop_at(curve: list[float], patience: int, min_delta: float, epochs: int) -> int | None:
    """The epochs the trainer's early stopping would have run on `curve`, when it stops within it:
    the rule of train._track_best and train._early_stop, replayed here without importing torch."""
    ref, bad = math.inf, 0
    for e, v in enumerate(curve):
        if v < ref - min_delta:
            ref, bad = v, 0
        else:
            bad += 1
        if patience > 0 and bad >= patience and e < epochs - 1:
            return e + 1
    return None


def _worked(a: Analysis) -> list[str]:
    lines = ["## What worked and what failed", "", "### What worked", ""]
    best, wins, misses = math.inf, [], []
    for c in a.cycles:
        if c.state != "COMPLETE" or c.value is None:
            continue
        if c.value < best:
            if math.isfinite(best):
                small = "; within the noise threshold, so not counted as progress" if c.value >= best * (1 - an.NOISE) else ""
                wins.append(f"- Cycle {c.cycle}: {c.key_change} lowered the best loss {best:.4f} -> {c.value:.4f} "
                            f"({100 * (best - c.value) / best:.2f}%{small})")
            best = c.value
        else:
            misses.append(c)
    lines += wins or (["- No cycle improved on the first complete cycle."] if a.complete
                      else ["- No cycle completed, so none set a best."])
    lines += ["", "### What failed", ""]
    lines.append(f"- **Did not improve:** {_n(len(misses), 'complete cycle')}"
                 + (": " + "; ".join(f"cycle {c.cycle} ({c.key_change})" for c in misses[:8]) if misses else ""))
    groups = [("Diverged", a.diverged), ("Pruned", a.pruned), ("Failed", a.failed)]
    groups += [("Interrupted and retried", a.retried)] if a.retried else []
    for label, group in groups:
        lines.append(f"- **{label}:** {len(group)}")
        for c in group[:10]:
            lines.append(f"  - cycle {c.cycle} ({_tried(c)}): {c.reason or 'no reason recorded'}")
        if len(group) > 10:
            lines.append(f"  - and {len(group) - 10} more (cycles {', '.join(str(c.cycle) for c in group[10:])}; "
                         "the table above lists every cycle)")
    return lines + [""]


def _recommendations(a: Analysis) -> list[str]:
    gap = None
    if a.test is not None and a.best is not None and a.best.val_accuracy is not None:
        gap = a.best.val_accuracy - a.test.accuracy
    recs = an.recommendations(a.cycles, a.best, _space(a.cfg), importance=a.importance, test_gap=gap,
                              pruner=a.search[-1]["pruner"] if a.search else None)
    return ["## Recommendations for the next run", ""] + [f"{i}. {r}" for i, r in enumerate(recs, 1)] + [""]


def _loss_reduction(a: Analysis) -> list[str]:
    lines = ["## Loss reduction analysis", ""]
    imp = [c for c in a.cycles if c.improvement_pct is not None]
    if imp:
        top = max(imp, key=lambda c: c.improvement_pct)
        lines += [f"- **Largest drop within a cycle** (its first epoch's val loss to its best): "
                  f"{top.improvement_pct:.2f}% (cycle {top.cycle})",
                  f"- **Average drop within a cycle:** {np.mean([c.improvement_pct for c in imp]):.2f}% "
                  f"({an.sample(imp)} cycles)"]
    done = a.complete
    if len(done) >= 2:
        xs, ys = np.array([c.cycle for c in done], float), np.array([c.value for c in done])
        slope = float(np.polyfit(xs, ys, 1)[0])
        rel = slope / float(np.mean(ys))
        trend = ("loss fell with later cycles" if rel < -0.001 else
                 "loss rose with later cycles (diminishing returns)" if rel > 0.001 else "flat")
        lines.append(f"- **Overall trend:** {trend} ({slope:+.4f} per cycle, over {_n(len(done), 'complete cycle')})")
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
    test = (f" On the held-out test split {_model(a)} scored {_pct(a.test.accuracy)} accuracy." if a.test else "")
    what = (f"{_arch(b)}, lr {_fmt(b.params['lr'])}, batch {b.params['batch_size']}, dropout {_fmt(b.params['dropout'])}"
            if all(k in b.params for k in _OURS) else _config(b))
    return ["## Conclusion", "",
            f"**Key takeaway:** cycle {b.cycle} ({what}) reached validation loss "
            f"{b.value:.4f} and accuracy {_pct(b.val_accuracy)} after {_n(len(a.cycles), 'cycle')}.{test}", ""]


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


def summary(a: Analysis) -> str:
    """The report in a few lines (markdown): best cycle, results in context, key findings, the next step."""
    lines = [f"## cycle-optuna summary of {a.name}", ""]
    n = Counter(c.state for c in a.cycles)
    lines.append(f"{len(a.cycles)} cycles: {n['COMPLETE']} complete, {len(a.pruned)} pruned, {len(a.diverged)} "
                 f"diverged, {len(a.failed)} failed"
                 + (f", {len(a.retried)} interrupted and retried." if a.retried else "."))
    if a.best is None:
        return "\n".join(lines + ["", "No cycle has completed yet."]) + "\n"
    b = a.best
    lines += ["", f"**Best: cycle {b.cycle}**, val loss {b.value:.4f}, val accuracy {_pct(b.val_accuracy)}"
              + (f", held-out test accuracy of {_model(a)} {_pct(a.test.accuracy)}" if a.test else "") + f" ({_config(b)})", ""]
    lines += _context(a)
    for t, words in ((an.trend(a.cycles, an.model_size), CAPACITY_WORDS), (an.trend(a.cycles, _log_lr), LR_WORDS)):
        if t.rho is not None:
            lines.append(_trend_line(t, *words))
    recs = an.recommendations(a.cycles, a.best, _space(a.cfg), importance=a.importance,
                              pruner=a.search[-1]["pruner"] if a.search else None)
    lines += ["", "**Next:** " + recs[0]] + ([f"**Also:** {r}" for r in recs[1:3]])
    lines += ["", "The full report: `cycle-optuna report STUDY.toml`."]
    return "\n".join(lines).rstrip() + "\n"


def _search_text(search: list[dict]) -> str:
    """The overview's words on the sampler and pruner: one pair, or one per stretch of cycles when a run changed them."""
    if not search:
        return ""
    parts = [f"sampler `{s['sampler']}` and pruner `{s['pruner']}`" for s in search]
    if len(search) == 1:
        return f" with {parts[0]}"
    spans = [f"{p} from cycle {s['from_cycle']}" for p, s in zip(parts[1:], search[1:])]
    return f" with {parts[0]}, then {', then '.join(spans)}"
