"""Reading a study's stored reference baselines: which is best, and how a tuned result compares.

Pure Python, so `best` and `status` need no torch; computing them is cycle_optuna.baselines.
"""

from __future__ import annotations

from typing import Any

from cycle_optuna.attrs import BASELINES_ATTR  # noqa: F401 - re-exported

LABELS = {"majority": "majority class", "1nn": "1-NN Euclidean",
          "1nn_z": "1-NN Euclidean on z-normalised series", "mlp": "MLP on summary features"}


def best_reference(baselines: dict[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]] | None:
    """The baseline with the highest validation accuracy, as (key, entry); None without baselines."""
    if not baselines:
        return None
    scored = [(k, v) for k, v in baselines.items() if isinstance(v, dict) and v.get("val_accuracy") is not None]
    return max(scored, key=lambda kv: kv[1]["val_accuracy"]) if scored else None


def model_name(cycles: list[int] | tuple[int, ...] | None, refit: bool = False) -> str | None:
    """How `best` names a model: "cycle 4", or "mean of cycles 4, 7, 2" for an ensemble; " (refit)"
    after it when they are the cycles' configurations trained on all training series."""
    if not cycles:
        return None
    name = f"cycle {cycles[0]}" if len(cycles) == 1 else "mean of cycles " + ", ".join(map(str, cycles))
    return f"{name} (refit)" if refit else name


def compare(baselines: dict[str, dict[str, Any]] | None, *, val_accuracy: float | None,
            test_accuracy: float | None, val_model: str | None = None,
            test_model: str | None = None, test_balanced_accuracy: float | None = None) -> list[dict[str, Any]]:
    """One record per baseline: whether the tuned model beats it, by how many points, on val and test.
    `val_model` / `test_model` name the model each figure belongs to ("cycle 4", "mean of cycles
    4, 7, 2"): the val figure is the best cycle's, the test figure the model `best` loads.
    `test_balanced_accuracy` (given where the test classes differ in size): the test comparison
    also on balanced accuracy, for baselines that stored theirs."""
    out = []
    names = {"val": val_model, "test": test_model}
    for key, b in (baselines or {}).items():
        rec: dict[str, Any] = {"baseline": key, "label": b.get("label", key),
                               "test_balanced_accuracy": None, "test_balanced_margin": None}  # set where compared
        parts = []
        for split, mine in (("val", val_accuracy), ("test", test_accuracy)):
            theirs = b.get(f"{split}_accuracy")
            rec[f"{split}_accuracy"] = theirs
            if mine is None or theirs is None:
                rec[f"{split}_margin"] = None
                continue
            points = 100.0 * (mine - theirs)
            rec[f"{split}_margin"] = round(points, 2) + 0.0  # never -0.0
            shown = round(points, 1) + 0.0  # rounded once (2.745 is +2.7, not 2.75 then +2.8); the verdict goes with it
            who = f"{names[split]}: " if names[split] else ""
            balanced = ""
            theirs_b = b.get("test_balanced_accuracy") if split == "test" else None
            if split == "test" and test_balanced_accuracy is not None and theirs_b is not None:
                points_b = 100.0 * (test_balanced_accuracy - theirs_b)
                rec["test_balanced_accuracy"], rec["test_balanced_margin"] = theirs_b, round(points_b, 2) + 0.0
                shown_b = round(points_b, 1) + 0.0  # rounded once, as the accuracy margin
                balanced = (f"; balanced accuracy {test_balanced_accuracy:.1%} vs {theirs_b:.1%}, {shown_b:+.1f} "
                            f"points: {_verdict(shown_b)}")
            parts.append(f"{_verdict(shown)} on {split} ({who}{mine:.1%} vs {theirs:.1%}, {shown:+.1f} points{balanced})")
        rec["line"] = f"{rec['label']}: " + ("; ".join(parts) if parts else "no comparable accuracy")
        out.append(rec)
    return out


def _verdict(margin: float) -> str:
    return "beats it" if margin > 0 else "ties it" if margin == 0 else "below it"
