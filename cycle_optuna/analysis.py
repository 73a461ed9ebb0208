"""The report's reasoning as pure functions over cycles: samples, comparisons at a common epoch,
trends, which parameters varied, recommendations inside the space, and the stop rule.

Nothing here reads storage or renders text for a file; `report` does both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cycle_optuna.api import Cycle, HeldOutScore
from cycle_optuna.config import ParamSpace, StudyConfig

CORRELATION = 0.3  # |Spearman rho| from which a relation is called a trend
MIN_TREND = 6  # informative cycles (complete or pruned) needed before any trend is stated
MIN_TREND_MOVED = 3  # ... of which at least this many away from the quantity's most common value
MIN_IMPORTANCE = 10  # complete cycles below which importances carry a warning
EDGE = 0.1  # best value within this fraction of a range's ends is "at the edge"
NOISE = 0.005  # a new best must beat the old by this fraction to count as progress
PLATEAU = 8  # stop rule: this many finished cycles in a row without progress ...
MIN_CYCLES_TO_STOP = 12  # ... in a study of at least this many finished cycles

# What the model and the trainer accept: a recommendation never leaves these bounds.
VALID = {"lr": (1e-7, 1.0), "batch_size": (1, 1 << 16), "hidden_dim": (1, 1 << 14), "n_layers": (1, 64),
         "n_heads": (1, 256), "dropout": (0.0, 0.9), "weight_decay": (0.0, 1.0), "patch_len": (1, 1 << 12)}


@dataclass(frozen=True)
class Sample:
    """How many cycles of each kind an insight rests on."""

    complete: int
    pruned: int

    def __str__(self) -> str:
        return f"{self.complete} complete, {self.pruned} pruned"


def finished(cycles: Sequence[Cycle]) -> list[Cycle]:
    """Cycles that ended (complete, pruned, diverged, failed), in order."""
    return [c for c in cycles if c.state in ("COMPLETE", "PRUNED", "FAIL")]


def informative(cycles: Sequence[Cycle]) -> list[Cycle]:
    """Cycles whose curve says something about a configuration: complete, or pruned without diverging."""
    return [c for c in cycles if c.state in ("COMPLETE", "PRUNED") and not c.diverged
            and any(math.isfinite(v) for v in c.curve)]


def sample(cycles: Sequence[Cycle]) -> Sample:
    return Sample(sum(c.state == "COMPLETE" for c in cycles), sum(c.state == "PRUNED" for c in cycles))


def common_epoch(cycles: Sequence[Cycle]) -> int | None:
    """The latest epoch every informative cycle reached (pruned ones stop early); None without any."""
    lengths = [len(c.curve) for c in informative(cycles)]
    return min(lengths) if lengths else None


def shown_loss(c: Cycle) -> float | None:
    """The cycle's val loss as the report and its plots show it: the objective when complete, else
    the best epoch it reached (a pruned trial's Optuna value is its last reported epoch, not its best)."""
    if c.state == "COMPLETE" and c.value is not None:
        return c.value
    finite = [v for v in c.curve if math.isfinite(v)]
    return min(finite) if finite else c.value


def loss_at(c: Cycle, epoch: int) -> float | None:
    """The cycle's best validation loss over its first `epoch` epochs; None when it ran fewer."""
    if len(c.curve) < epoch:
        return None
    finite = [v for v in c.curve[:epoch] if math.isfinite(v)]
    return min(finite) if finite else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation with ties sharing their mean rank; None when undefined."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in set(v):
            idx = [i for i, w in enumerate(v) if w == val]
            r[idx] = r[idx].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


@dataclass(frozen=True)
class Trend:
    """A relation between a quantity and validation loss, compared at one epoch for every cycle."""

    rho: float | None  # Spearman rho of the quantity vs val loss at `epoch`; None when too few points
    epoch: int | None
    n: Sample
    rho_complete: float | None = None  # the same over complete cycles at their final loss

    @property
    def direction(self) -> int:
        """+1 larger values gave higher loss, -1 lower loss, 0 no clear relation (or too little data)."""
        if self.rho is None or abs(self.rho) < CORRELATION:
            return 0
        return 1 if self.rho > 0 else -1

    @property
    def contradicted(self) -> bool:
        """The complete cycles alone point the other way."""
        return (self.direction != 0 and self.rho_complete is not None and abs(self.rho_complete) >= CORRELATION
                and (self.rho_complete > 0) != (self.rho > 0))


def model_size(c: Cycle) -> float | None:
    """hidden_dim^2 x n_layers: the block size every cycle has, pruned ones too (they stop before
    counting their parameters); what the report's capacity trend and plot read."""
    h, n = c.params.get("hidden_dim"), c.params.get("n_layers")
    return float(h * h * n) if h and n else None


def trend(cycles: Sequence[Cycle], x_of: Callable[[Cycle], float | None]) -> Trend:
    """Quantity vs val loss at the common epoch over complete and pruned cycles."""
    pool = [c for c in informative(cycles) if x_of(c) is not None]
    epoch = common_epoch(pool)
    n = sample(pool)
    xs = [x_of(c) for c in pool]
    off_mode = len(xs) - max((xs.count(x) for x in set(xs)), default=0)
    # a rank correlation carried by one or two cycles that moved the quantity says what those cycles did
    if epoch is None or len(pool) < MIN_TREND or off_mode < MIN_TREND_MOVED:
        return Trend(None, epoch, n)
    pts = [(x_of(c), loss_at(c, epoch)) for c in pool]
    pts = [(x, y) for x, y in pts if y is not None]
    done = [c for c in pool if c.state == "COMPLETE" and c.value is not None]
    rho_c = spearman([x_of(c) for c in done], [c.value for c in done])
    return Trend(spearman([x for x, _ in pts], [y for _, y in pts]), epoch, n, rho_c)


def varied(cycles: Sequence[Cycle], names: Sequence[str]) -> list[str]:
    """Parameters that took more than one value among the complete cycles."""
    done = [c for c in cycles if c.state == "COMPLETE"]
    return [n for n in names if len({repr(c.params.get(n)) for c in done}) > 1]


def importance_warning(n_complete: int) -> str:
    """The caveat importances carry below MIN_IMPORTANCE complete cycles ('' from there on)."""
    if n_complete >= MIN_IMPORTANCE:
        return ""
    return (f"only {n_complete} complete cycles (fewer than {MIN_IMPORTANCE}): these importances are "
            "indicative, not reliable")


def progress_cycles(cycles: Sequence[Cycle]) -> list[Cycle]:
    """The complete cycles that beat the best before them by more than NOISE (the first counts)."""
    out, best = [], math.inf
    for c in cycles:
        if c.state == "COMPLETE" and c.value is not None and c.value < best * (1 - NOISE):
            out.append(c)
            best = c.value
    return out


@dataclass(frozen=True)
class Plateau:
    """The stop rule's verdict: finished cycles since the last real progress, and whether to stop."""

    since: int  # finished cycles after the last cycle that made progress
    finished: int
    stop: bool

    @property
    def rule(self) -> str:
        return (f"stop when {PLATEAU} finished cycles in a row bring no new best by more than {100 * NOISE:g}%, "
                f"in a study of at least {MIN_CYCLES_TO_STOP} finished cycles")


def plateau(cycles: Sequence[Cycle]) -> Plateau | None:
    """The stop rule applied to the cycles; None before any cycle completed."""
    progress = progress_cycles(cycles)
    if not progress:
        return None
    done = finished(cycles)
    since = sum(c.number > progress[-1].number for c in done)
    return Plateau(since, len(done), since >= PLATEAU and len(done) >= MIN_CYCLES_TO_STOP)


# -- recommendations ------------------------------------------------------------------------------

def _valid(name: str, value: float) -> bool:
    lo, hi = VALID.get(name, (-math.inf, math.inf))
    return lo <= value <= hi


def _widen(p: ParamSpace, end: float, sign: int) -> float:
    """A new range end: x2 or /2 (log), else half the span further, kept an int for int ranges."""
    new = end * 2.0 ** sign if p.log else end + sign * (p.high - p.low) / 2
    if isinstance(p.low, int) and not isinstance(p.low, bool):
        return math.ceil(new) if sign > 0 else math.floor(new)
    return new


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _toml(v: Any) -> str:
    """`v` as a study file writes it (true, "mean", 0.00061234): a line to paste, not a display."""
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isfinite(v):
        return repr(v)
    return json.dumps(v) if isinstance(v, str) else str(v)


def _edge(name: str, p: ParamSpace, v: Any) -> str | None:
    """The range advice for a best value at an edge of its range or choices; None when inside or impossible."""
    if p.choices is not None:
        nums = sorted(c for c in p.choices if isinstance(c, (int, float)) and not isinstance(c, bool))
        if len(nums) < 2 or v not in (nums[0], nums[-1]):
            return None
        up = v == nums[-1]
        new = v * 2 if up else (v // 2 if isinstance(v, int) else v / 2)
        if new == v or not _valid(name, new):
            return None
        return (f"Best {name} {_fmt(v)} is the {'largest' if up else 'smallest'} choice of {list(p.choices)}: "
                f"add a {'larger' if up else 'smaller'} choice (e.g. {_fmt(new)})")
    if p.low is None or not p.high > p.low or not isinstance(v, (int, float)):
        return None
    pos = ((math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low)) if p.log
           else (v - p.low) / (p.high - p.low))
    if pos >= 1 - EDGE:
        new, side, word = _widen(p, p.high, +1), "upper", "upwards (e.g. high"
    elif pos <= EDGE:
        new, side, word = _widen(p, p.low, -1), "lower", "downwards (e.g. low"
    else:
        return None
    lo, hi = VALID.get(name, (-math.inf, math.inf))
    new = min(max(new, lo), hi)  # never past what the model accepts
    if new == (p.high if side == "upper" else p.low):
        return None  # the range already ends where the model does
    return (f"Best {name} {_fmt(v)} sits at the {side} edge of [{_fmt(p.low)}, {_fmt(p.high)}]: "
            f"widen the range {word} = {_fmt(new)})")


DIAGNOSIS_ADVICE = {
    "converging": "The best cycle was still improving at its last epoch: raise train.epochs",
    # the diagnosis' two cases: near chance, or below a reference baseline with training loss no better than validation
    "underfit": "The best cycle underfits (its training loss is not well below its validation loss, or both are near "
                "chance): raise capacity or epochs",
    "below_baseline": "The best cycle is below a reference baseline: raise capacity or epochs, or check the data",
    "overfit": "The best cycle overfits: raise dropout or weight_decay, or add data",
    "unstable": "The best cycle's loss was unstable: lower the learning rate or add warmup",
}


# the setting that lets a pruner's trials run longer before they can be stopped, by [pruner] type
PRUNER_WARMUP_KEY = {
    "parent": "pruner.warmup_fraction", "median": "pruner.n_warmup_steps", "percentile": "pruner.n_warmup_steps",
    "patient": "pruner.patience", "successive_halving": "pruner.min_resource", "hyperband": "pruner.min_resource",
}


def recommendations(
    cycles: Sequence[Cycle],
    best: Cycle | None,
    space: Mapping[str, ParamSpace],
    *,
    importance: Mapping[str, float] | None = None,
    test_gap: float | None = None,
    pruner: str | None = None,
) -> list[str]:
    """Advice for the next run, each inside what the model and space accept, one per topic, consistent."""
    if best is None:
        ended = finished(cycles)
        if ended and len(ended) == len(cycles):  # nothing left running: waiting would not help
            which = "its only cycle was" if len(ended) == 1 else f"all {len(ended)} were"
            return [f"No cycle completed: {which} pruned, diverged or failed; read their reasons "
                    "(`status`, the table above), then change the study (a smaller lr, a gentler pruner) and run more"]
        return ["Run the study: no cycle has completed yet."]
    recs: list[str] = []
    widened: set[str] = set()
    moved = set(varied(cycles, list(space)))
    for name, p in space.items():
        # a best value at an edge says something only if the complete cycles tried other values too
        text = _edge(name, p, best.params.get(name)) if name in moved else None
        if text:
            recs.append(text)
            widened.add(name)
    div = [c.params["lr"] for c in cycles if c.diverged and c.params.get("lr")]
    if div:
        recs.append(f"Keep the learning rate below {_fmt(min(div))}: {len(div)} cycle{'s' if len(div) > 1 else ''} "
                    "diverged at or above it")
    if best.diagnosis in DIAGNOSIS_ADVICE:
        recs.append(DIAGNOSIS_ADVICE[best.diagnosis])
    stopped = sum(c.state == "PRUNED" for c in cycles)
    done = finished(cycles)
    if done and stopped / len(done) > 0.5:
        key = PRUNER_WARMUP_KEY.get(pruner or "", "the pruner's warm-up")
        recs.append(f"The pruner stopped {stopped} of {len(done)} cycles: raise {key} if it prunes slow starters")
    if test_gap is not None and test_gap > 0.05:
        recs.append(f"Test accuracy trails validation accuracy by {100 * test_gap:.1f} points: selection overfits "
                    "the validation split; enlarge data.val_fraction")
    verdict = plateau(cycles)
    if verdict is not None:
        if verdict.stop:
            recs.append(f"Stop, or change the space: no new best in the last {verdict.since} finished cycles "
                        f"(rule: {verdict.rule})")
        elif verdict.since == 0 and len(done) > 1:
            recs.append("The last finished cycle set the best loss: run more cycles (raise study.n_trials)")
        else:
            recs.append(f"Keep going: {verdict.since} finished cycle{'' if verdict.since == 1 else 's'} since the last "
                        f"new best by more than {100 * NOISE:g}%, short of the stop rule ({verdict.rule})")
    n_complete = sum(c.state == "COMPLETE" for c in cycles)
    if importance and n_complete >= MIN_IMPORTANCE:
        top, *rest = importance.items()
        weak = [k for k, v in rest if v < 0.05 and k not in widened]
        if top[1] >= 0.5:
            recs.append(f"Focus on {top[0]} (importance {top[1]:.2f})"
                        + (f"; fix {', '.join(weak)} at the best values to shrink the space" if weak else ""))
    toml = ", ".join(f"`{k} = {_toml(v)}`" for k, v in best.params.items())
    recs.append(f"Use cycle {best.cycle} as the next baseline, in [baseline]: {toml}")
    seen: set[str] = set()
    return [r for r in recs if not (r in seen or seen.add(r))]


# -- the report's inputs, as data -----------------------------------------------------------------

@dataclass
class Analysis:
    """Everything the report is written from: the study's cycles and what was measured about them."""

    name: str
    cfg: StudyConfig | None
    stats: dict[str, Any] | None
    cycles: list[Cycle]
    best: Cycle | None
    test: HeldOutScore | None = None
    test_note: str = ""
    importance: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""
    importance_warning: str = ""
    storage: str | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    bayes: dict[str, float] | None = None  # oracle accuracy on the val/test split (built-in task only)
    search: list[dict[str, Any]] = field(default_factory=list)  # api.search_settings: sampler/pruner per stretch

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
        """Failed cycles that got no retry (an interrupted or lost cycle that was retried is `retried`)."""
        return [c for c in self.cycles if c.state == "FAIL" and c.retried_as is None]

    @property
    def retried(self) -> list[Cycle]:
        return [c for c in self.cycles if c.state == "FAIL" and c.retried_as is not None]

    @property
    def epochs(self) -> int | None:
        return self.cfg.train.epochs if self.cfg else None
