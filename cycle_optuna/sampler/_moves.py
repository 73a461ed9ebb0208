"""Parameter roles and one-step moves on Optuna distributions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_LINEAR_FLOAT_STEPS = 5  # a linear float moves by (high - low) / 5 at scale 1
_LINEAR_INT_STEPS = 8  # a wide int range moves by (high - low) / 8 at scale 1 (at least one step)
_MAX_ENUMERATED = 4096  # int ranges up to this size are enumerated for the heads constraint


@dataclass(frozen=True)
class Roles:
    """Which parameter plays which part in the rules; ``None`` switches a role off.

    Parameters with no role are moved by the generic numeric rule (step up/down) when the
    sampler's ``generic_moves`` is on, and otherwise left to the fallback sampler.
    """

    lr: str | None = "lr"  # multiplied/divided by lr_factor
    layers: str | None = "n_layers"  # capacity: +-1
    hidden: str | None = "hidden_dim"  # capacity: next/previous choice (or x2 / /2)
    heads: str | None = "n_heads"  # kept dividing hidden
    dropout: str | None = "dropout"  # +- a fifth of its range
    batch: str | None = "batch_size"  # next/previous choice (or x2 / /2)
    patch: str | None = "patch_len"  # resolution: next/previous choice (or x2 / /2)

    def __post_init__(self) -> None:
        names = [n for n in self.as_dict().values() if n is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"Each parameter can play one role only, but got {self!r}.")
        for role, name in self.as_dict().items():
            if name is not None and not isinstance(name, str):
                raise ValueError(f"Role {role} must name a parameter (str) or be None, but got {name!r}.")

    def as_dict(self) -> dict[str, str | None]:
        return {r: getattr(self, r) for r in ("lr", "layers", "hidden", "heads", "dropout", "batch", "patch")}

    def role_of(self, name: str) -> str | None:
        for role, pname in self.as_dict().items():
            if pname == name:
                return role
        return None


def is_numeric_choice(c: Any) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)


def is_ordered(dist: BaseDistribution) -> bool:
    """Whether a neighbour is defined: ints, floats and all-numeric categorical choices."""
    if isinstance(dist, CategoricalDistribution):
        return all(is_numeric_choice(c) for c in dist.choices)
    return isinstance(dist, (IntDistribution, FloatDistribution))


def compatible(old: BaseDistribution, new: BaseDistribution) -> bool:
    """Optuna's own rule for reusing a parameter name (same kind, same log, same choices)."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if isinstance(old, CategoricalDistribution):
        return old.choices == new.choices  # optuna's __eq__ is ~50x slower
    return old.log == new.log  # type: ignore[attr-defined]


def contains(dist: BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def coerce(dist: BaseDistribution, value: Any) -> Any:
    """A value in the form the distribution returns (int for ints, the choice object), or None."""
    if value is None:
        return None
    if isinstance(dist, CategoricalDistribution):
        for c in dist.choices:
            if isinstance(c, bool) == isinstance(value, bool) and c == value:
                return c
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(dist, IntDistribution):
        if float(value) != int(value):
            return None
        value = int(value)
    else:
        value = float(value)
    return value if contains(dist, value) else None


def norm(value: Any) -> Any:
    """Round floats so a value reached by two routes compares equal."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.10g}")
    return value


def config_key(config: Mapping[str, Any], ceilings: Mapping[str, float] | None = None) -> tuple:
    """A configuration as a history key. ``ceilings``: parameter -> the value at and above which
    every value trains the same (a batch size at or above the largest training split trains as the
    whole split); such values share one key, so a move between two of them is a known configuration."""
    if ceilings:
        config = {k: ceilings[k] if k in ceilings and _at_or_above(v, ceilings[k]) else v for k, v in config.items()}
    return tuple(sorted((k, _key_value(v)) for k, v in config.items()))


def _key_value(value: Any) -> Any:
    """A float as a key holds 6 significant digits, and one within 1e-12 of zero is zero: a value
    reached by two routes of steps (8 x 1.41 / 1.41 = 8.000000001, 8 / 1.41 = 5.656854249 against
    8 x 1.41 / 2 = 5.65685425, 0.15 - 0.05 - 0.1 = 1.4e-17) is the configuration tried already. The
    routes differ in the 10th digit; no rule steps by less than 9%, so coarser keys merge nothing
    the rules propose, and the digits two routes differ in rarely straddle a rounding boundary."""
    if isinstance(value, float) and math.isfinite(value):
        return 0.0 if abs(value) < 1e-12 else float(f"{value:.6g}")
    return value


def _at_or_above(value: Any, ceiling: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= ceiling


def _grid_values(dist: BaseDistribution) -> list[Any] | None:
    """Every allowed value of a categorical or small int distribution, ascending."""
    if isinstance(dist, CategoricalDistribution):
        return sorted(c for c in dist.choices if is_numeric_choice(c))
    if isinstance(dist, IntDistribution) and not dist.log:
        if (dist.high - dist.low) // dist.step <= _MAX_ENUMERATED:
            return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, IntDistribution) and dist.high - dist.low <= _MAX_ENUMERATED:
        return list(range(dist.low, dist.high + 1))
    return None


def _nearest_index(values: list[Any], value: Any) -> int:
    return min(range(len(values)), key=lambda i: (abs(values[i] - value), i))


def _clip(dist: FloatDistribution | IntDistribution, v: float) -> float:
    return min(max(v, dist.low), dist.high)


def _snap(dist: FloatDistribution | IntDistribution, v: float, direction: int, old: float) -> float:
    """Round to the distribution's step grid, at least one step away from `old`."""
    step = dist.step
    if step is None:
        return v
    k = round((v - dist.low) / step)
    k_old = round((old - dist.low) / step)
    if k == k_old:
        k += direction
    return dist.low + k * step


def step_value(
    dist: BaseDistribution, value: Any, direction: int, scale: float, *, factor: float, multiplicative: bool
) -> Any:
    """The value one move away in `direction` (+1/-1), or None at a bound or when undefined.

    Categorical choices step to the neighbouring choice whatever the scale: a step on a list
    never skips a choice. Log scales, and parameters marked multiplicative, multiply by
    ``factor ** scale``; other floats add ``scale * (high - low) / 5``, other ints
    ``scale * (high - low) / 8`` steps.
    """
    if isinstance(dist, CategoricalDistribution):
        values = _grid_values(dist)
        if not values or not is_numeric_choice(value):
            return None
        i = _nearest_index(values, value)
        j = min(max(i + direction, 0), len(values) - 1)
        return None if values[j] == value else coerce(dist, values[j])
    if not isinstance(dist, (IntDistribution, FloatDistribution)) or not is_numeric_choice(value):
        return None
    old = _clip(dist, value)
    if (dist.log or multiplicative) and old > 0:
        new = old * factor ** (direction * scale)
    elif isinstance(dist, IntDistribution):
        span = max(1, round((dist.high - dist.low) / dist.step / _LINEAR_INT_STEPS))
        new = old + direction * max(1, round(scale * span)) * dist.step
    else:
        new = old + direction * scale * (dist.high - dist.low) / _LINEAR_FLOAT_STEPS
    if isinstance(dist, IntDistribution):
        new = round(new)
        if new == old:
            new = old + direction * dist.step
    new = _clip(dist, _snap(dist, new, direction, old))
    if isinstance(dist, IntDistribution):
        new = int(round(new))
    else:
        new = min(max(norm(float(new)), dist.low), dist.high)
    if norm(new) == norm(value) or not contains(dist, new):
        return None
    if (new - value) * direction <= 0:  # from a value outside the range, clipping would move it the other way
        return None
    return new


def divisors_nearest(dist: BaseDistribution, current: Any, ok: Any) -> Any:
    """The allowed value nearest to `current` (on a log scale) for which ``ok(value)`` holds."""
    values = _grid_values(dist)
    if not values:
        return None
    good = [v for v in values if v > 0 and ok(v)]
    if not good:
        return None
    ref = current if is_numeric_choice(current) and current > 0 else good[0]
    best = min(good, key=lambda v: (abs(math.log(v / ref)), v))
    return coerce(dist, best)


def describe(name: str, role: str | None, dist: BaseDistribution, old: Any, new: Any) -> str:
    """Short move label: ``lr x2``, ``layers +1``, ``hidden 64->128``, ``dropout +0.1``, ``pooling mean->cls``."""
    label = role if role in ("layers", "hidden", "heads", "batch") else name
    if not (is_numeric_choice(old) and is_numeric_choice(new)):
        return f"{label} {old}->{new}"
    if role == "layers" or (isinstance(dist, IntDistribution) and not dist.log and role is None):
        return f"{label} {new - old:+d}" if role == "layers" else f"{label} {old}->{new}"
    if isinstance(dist, CategoricalDistribution) or isinstance(dist, IntDistribution):
        return f"{label} {old}->{new}"
    if (dist.log or role == "lr") and old > 0 and new > 0:
        ratio = new / old
        return f"{label} x{ratio:.3g}" if ratio >= 1 else f"{label} /{1 / ratio:.3g}"
    return f"{label} {new - old:+.3g}"


def repair(roles: Roles, name: str, dist: BaseDistribution, value: Any, params: Mapping[str, Any]) -> Any:
    """Keep heads dividing hidden for a value sampled by another sampler.

    Heads sampled after hidden move to the nearest choice that divides hidden; hidden sampled
    after heads moves to the nearest choice that heads divides. Other values pass through.
    """
    if not roles.heads or not roles.hidden or not is_numeric_choice(value) or value <= 0:
        return value
    if name == roles.heads:
        hidden = params.get(roles.hidden)
        if is_numeric_choice(hidden) and hidden % value:
            fixed = divisors_nearest(dist, value, lambda h: hidden % h == 0)
            return value if fixed is None else fixed
    elif name == roles.hidden:
        heads = params.get(roles.heads)
        if is_numeric_choice(heads) and heads > 0 and value % heads:
            fixed = divisors_nearest(dist, value, lambda v: v % heads == 0)
            return value if fixed is None else fixed
    return value
