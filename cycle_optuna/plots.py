"""Report plots (matplotlib, headless Agg): history, learning curves, lr and capacity vs loss, importances."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by workers and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from cycle_optuna import files  # noqa: E402
from cycle_optuna.analysis import shown_loss as _loss  # noqa: E402
from cycle_optuna.api import Cycle  # noqa: E402

# One colour per outcome, used by every plot; the best-so-far line and the best cycle get black and
# a gold star, which no outcome uses.
STATES = {"complete": "tab:blue", "pruned": "tab:orange", "diverged": "tab:red", "failed": "tab:gray"}
MARKERS = {"complete": "o", "pruned": "x", "diverged": "X", "failed": "|"}
BEST_COLOR, BEST_STAR = "black", "gold"
DPI = 110
LABEL_GAP_PX = (26, 12)  # point labels closer than this (x, y) to a placed one are left out


def outcome(c: Cycle) -> str:
    """The cycle's outcome as the plots name and colour it."""
    if c.diverged:
        return "diverged"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(c.state, "running")


def _color(c: Cycle) -> str:
    return STATES.get(outcome(c), "tab:purple")


def _best(cycles: Sequence[Cycle]) -> Cycle | None:
    done = [c for c in cycles if c.state == "COMPLETE" and c.value is not None]
    return min(done, key=lambda c: c.value) if done else None


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with files.replacing(path) as tmp:  # Ctrl-C mid-save leaves no truncated PNG
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    return path


def _legend(ax: plt.Axes, cycles: Sequence[Cycle], *, best: bool = False, extra: Sequence = ()) -> None:
    """One entry per outcome present (with its count), then the best markers; placed outside the data."""
    counts: dict[str, int] = {}
    for c in cycles:
        counts[outcome(c)] = counts.get(outcome(c), 0) + 1
    handles = [Line2D([], [], color=STATES.get(k, "tab:purple"), marker=MARKERS.get(k, "o"), ls="none",
                      label=f"{k} ({n})") for k, n in counts.items()]
    if best:
        handles.append(Line2D([], [], color=BEST_STAR, marker="*", markersize=12, markeredgecolor="black",
                              ls="none", label="best cycle"))
    handles += list(extra)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def history(cycles: Sequence[Cycle], path: Path) -> Path:
    """Val loss of each cycle coloured by outcome, with the best-so-far line (Optuna's optimisation history)."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    best, xs, ys = math.inf, [], []
    for c in cycles:
        loss = _loss(c)
        if loss is None:
            ax.axvline(c.cycle, color=STATES["failed"], alpha=0.4, lw=1)
            continue
        ax.scatter(c.cycle, loss, color=_color(c), zorder=3, marker=MARKERS.get(outcome(c), "o"))
        if c.state == "COMPLETE":
            best = min(best, loss)
        if math.isfinite(best):
            xs.append(c.cycle)
            ys.append(best)
    extra = []
    if xs:
        ax.step(xs, ys, where="post", color=BEST_COLOR, lw=1.8, zorder=2)
        extra.append(Line2D([], [], color=BEST_COLOR, lw=1.8, label="best so far"))
    top = _best(cycles)
    if top is not None:
        ax.scatter(top.cycle, top.value, marker="*", s=220, color=BEST_STAR, edgecolor="black", zorder=4)
    _legend(ax, cycles, best=top is not None, extra=extra)
    ax.set(xlabel="cycle", ylabel="validation loss (best epoch)", title="Optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves(cycles: Sequence[Cycle], path: Path) -> Path:
    """Val loss per epoch of every cycle coloured by outcome; pruned ones dashed, ending in an x; the best on top."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = _best(cycles)
    style = {"complete": "-", "pruned": "--", "diverged": ":"}
    for c in cycles:
        if not c.curve or c is top:
            continue
        epochs = list(range(1, len(c.curve) + 1))
        kind = outcome(c)
        (line,) = ax.plot(epochs, c.curve, color=_color(c), ls=style.get(kind, "-"), lw=1.1,
                          alpha=0.75 if len(cycles) <= 30 else 0.45)
        line.set_gid(f"cycle {c.cycle}")
        if kind != "complete":
            ax.scatter(epochs[-1], c.curve[-1], marker="x", color=_color(c), zorder=3)
    extra = []
    if top is not None and top.curve:
        (line,) = ax.plot(range(1, len(top.curve) + 1), top.curve, color=BEST_COLOR, lw=2.4, zorder=4)
        line.set_gid(f"cycle {top.cycle}")
        extra.append(Line2D([], [], color=BEST_COLOR, lw=2.4, label=f"best: cycle {top.cycle}"))
    handles = [Line2D([], [], color=STATES[k], ls=style[k], label=f"{k} ({n})")
               for k in style if (n := sum(outcome(c) == k for c in cycles))]  # the best counted too, as the text counts it
    ax.legend(handles=handles + extra, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per epoch, every cycle")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _label_points(ax: plt.Axes, points: list[tuple[float, float, str]]) -> None:
    """Label points by cycle number, leaving out any label that would overlap one already placed."""
    ax.figure.canvas.draw()  # settles the axis limits, so data -> pixel positions are final
    placed: list[tuple[float, float]] = []
    gx, gy = LABEL_GAP_PX
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        if all(abs(px - qx) > gx or abs(py - qy) > gy for qx, qy in placed):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            placed.append((px, py))


def _log_ticks(ax: plt.Axes, xs: Sequence[float]) -> None:
    """Readable log-axis labels: 1-2-5 steps over a narrow range, decades over a wide one, no minor labels."""
    xs = [x for x in xs if x and x > 0]
    decades = math.log10(max(xs) / min(xs)) if xs else 0
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis collide with the major ones


def _scatter(cycles: Sequence[Cycle], x_of, path: Path, *, xlabel: str, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    shown, points = [], []
    top = _best(cycles)
    for c in cycles:
        x, loss = x_of(c), _loss(c)
        if x is None or loss is None:
            continue
        shown.append(c)
        ax.scatter(x, loss, color=_color(c), marker=MARKERS.get(outcome(c), "o"), zorder=3)
        points.append((x, loss, str(c.cycle)))
    if top is not None and x_of(top) is not None:
        ax.scatter(x_of(top), top.value, marker="*", s=220, color=BEST_STAR, edgecolor="black", zorder=4)
    ax.set_xscale("log")
    _log_ticks(ax, [p[0] for p in points])
    _legend(ax, shown, best=top is not None)
    ax.set(xlabel=xlabel, ylabel="validation loss (best epoch)", title=title)
    ax.grid(alpha=0.3, which="both")
    best_first = sorted(points, key=lambda p: p[1])  # the best cycles keep their labels
    _label_points(ax, best_first)
    return _save(fig, path)


def lr_vs_loss(cycles: Sequence[Cycle], path: Path) -> Path:
    """Learning rate (log) against val loss, cycle numbers annotated where they fit."""
    return _scatter(cycles, lambda c: c.params.get("lr"), path, xlabel="learning rate", title="Learning rate vs loss")


def capacity_vs_loss(cycles: Sequence[Cycle], path: Path) -> Path:
    """Model size (hidden_dim^2 x n_layers, log) against val loss: every cycle, pruned ones too, the
    measure the report's text reads (a pruned cycle stops before it counts its parameters: plotted
    by parameter count, the cycles that changed the size were the ones left out)."""
    from cycle_optuna.analysis import model_size

    return _scatter(cycles, model_size, path, xlabel="model size (hidden_dim² × n_layers)", title="Model capacity vs loss")


def importances(values: dict[str, float], path: Path, *, note: str = "", warning: str = "") -> Path:
    """Horizontal bars of parameter importances (or a note why there are none), with the report's caveat."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:purple")
        ax.set(xlabel="importance (normalised)", xlim=(0, max(1.0, max(values.values()))))
        if warning:  # under the axis label, where tight_layout keeps room for it
            ax.set_xlabel("importance (normalised)\n" + "\n".join(textwrap.wrap(f"warning: {warning}", 70)),
                          fontsize=8)
    else:
        ax.text(0.5, 0.5, note or "not enough completed trials", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title("Parameter importances (PED-ANOVA)")
    return _save(fig, path)


FILES = {"history": "history.png", "curves": "curves.png", "lr": "lr_vs_loss.png",
         "capacity": "capacity_vs_loss.png", "importances": "importances.png"}  # the report's plots


def write_all(cycles: Sequence[Cycle], importance: dict[str, float], out_dir: Path, *, note: str = "",
              warning: str = "") -> dict[str, Path]:
    """Every report plot into `out_dir`; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "history": history(cycles, out_dir / FILES["history"]),
        "curves": curves(cycles, out_dir / FILES["curves"]),
        "lr": lr_vs_loss(cycles, out_dir / FILES["lr"]),
        "capacity": capacity_vs_loss(cycles, out_dir / FILES["capacity"]),
        "importances": importances(importance, out_dir / FILES["importances"], note=note, warning=warning),
    }
