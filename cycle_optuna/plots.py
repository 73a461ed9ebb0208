"""Report plots (matplotlib, headless Agg): history, learning curves, lr and capacity vs loss, importances."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by workers and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cycle_optuna.api import Cycle  # noqa: E402

COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:gray", "diverged": "tab:red"}
DPI = 110


def _color(c: Cycle) -> str:
    return COLORS["diverged"] if c.diverged else COLORS.get(c.state, "tab:gray")


def _loss(c: Cycle) -> float | None:
    """The cycle's val loss: the objective when complete, else the best epoch it reached."""
    if c.value is not None:
        return c.value
    finite = [v for v in c.curve if math.isfinite(v)]
    return min(finite) if finite else None


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _legend(ax: plt.Axes, cycles: Sequence[Cycle]) -> None:
    seen = {("diverged" if c.diverged else c.state.lower()): _color(c) for c in cycles}
    if not seen:
        return
    for label, color in seen.items():
        ax.scatter([], [], color=color, label=label)
    ax.legend(loc="best", fontsize=8)


def history(cycles: Sequence[Cycle], path: Path) -> Path:
    """Val loss of each cycle with the best-so-far line (Optuna's optimisation history)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = math.inf, [], []
    for c in cycles:
        loss = _loss(c)
        if loss is None:
            ax.axvline(c.cycle, color=COLORS["FAIL"], alpha=0.3, lw=1)
            continue
        ax.scatter(c.cycle, loss, color=_color(c), zorder=3, marker="o" if c.state == "COMPLETE" else "x")
        if c.state == "COMPLETE":
            best = min(best, loss)
        if math.isfinite(best):
            xs.append(c.cycle)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    _legend(ax, cycles)
    ax.set(xlabel="cycle", ylabel="validation loss", title="Optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves(cycles: Sequence[Cycle], path: Path) -> Path:
    """Val loss per epoch of every cycle; pruned ones dashed and ending in an x."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cycles:
        if not c.curve:
            continue
        epochs = list(range(1, len(c.curve) + 1))
        done = c.state == "COMPLETE"
        ax.plot(epochs, c.curve, color=_color(c) if not done else None, ls="-" if done else "--",
                lw=1.5 if done else 1.2, alpha=0.9, label=f"cycle {c.cycle}" + ("" if done else f" ({c.state.lower()})"))
        if not done:
            ax.scatter(epochs[-1], c.curve[-1], marker="x", color=_color(c), zorder=3)
    ax.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per epoch, every cycle")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 0 < len(ax.get_lines()) <= 20:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _scatter(cycles: Sequence[Cycle], x_of, path: Path, *, xlabel: str, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    shown = []
    for c in cycles:
        x, loss = x_of(c), _loss(c)
        if x is None or loss is None:
            continue
        shown.append(c)
        ax.scatter(x, loss, color=_color(c), marker="o" if c.state == "COMPLETE" else "x", zorder=3)
        ax.annotate(str(c.cycle), (x, loss), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    _legend(ax, shown)
    ax.set(xlabel=xlabel, ylabel="validation loss", title=title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def lr_vs_loss(cycles: Sequence[Cycle], path: Path) -> Path:
    """Learning rate (log) against val loss, cycle numbers annotated."""
    return _scatter(cycles, lambda c: c.params.get("lr"), path, xlabel="learning rate", title="Learning rate vs loss")


def capacity_vs_loss(cycles: Sequence[Cycle], path: Path) -> Path:
    """Trainable parameters (log) against val loss; cycles without a count use hidden^2 x layers."""
    def size(c: Cycle) -> float | None:
        if c.n_params:
            return c.n_params
        h, n = c.params.get("hidden_dim"), c.params.get("n_layers")
        return 12 * h * h * n if h and n else None  # rough transformer block size, for trials that never ran

    return _scatter(cycles, size, path, xlabel="trainable parameters", title="Model capacity vs loss")


def importances(values: dict[str, float], path: Path, *, note: str = "") -> Path:
    """Horizontal bars of parameter importances (or a note why there are none)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:purple")
        ax.set(xlabel="importance (normalised)", xlim=(0, max(1.0, max(values.values()))))
    else:
        ax.text(0.5, 0.5, note or "not enough completed trials", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title("Parameter importances (PED-ANOVA)")
    return _save(fig, path)


def write_all(cycles: Sequence[Cycle], importance: dict[str, float], out_dir: Path, *, note: str = "") -> dict[str, Path]:
    """Every report plot into `out_dir`; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "history": history(cycles, out_dir / "history.png"),
        "curves": curves(cycles, out_dir / "curves.png"),
        "lr": lr_vs_loss(cycles, out_dir / "lr_vs_loss.png"),
        "capacity": capacity_vs_loss(cycles, out_dir / "capacity_vs_loss.png"),
        "importances": importances(importance, out_dir / "importances.png", note=note),
    }
