"""The cycle rules: from a history snapshot to one proposal and the sentence that explains it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from optuna.distributions import BaseDistribution, IntDistribution
from optuna.trial import TrialState

from cycle_optuna.sampler._history import History, Rec, lazy_key
from cycle_optuna.sampler._moves import (
    Roles,
    coerce,
    config_key,
    describe,
    divisors_nearest,
    is_numeric_choice,
    step_value,
)

SCALES = (1.0, 0.5, 0.25)  # the step shrinks through these once every move failed
MAX_SCALE = 3.0  # a move that keeps improving grows its step up to this
CAPACITY = ("layers", "hidden")
ROLE_ORDER = ("lr", "layers", "hidden", "dropout", "batch", "heads")
# Moves a diagnosis of the incumbent puts first; each is followed by its opposite.
DIAGNOSIS_FIRST: dict[str, tuple[tuple[str, int], ...]] = {
    "underfit": (("layers", +1), ("hidden", +1), ("lr", +1), ("dropout", -1)),
    "overfit": (("dropout", +1), ("layers", -1), ("hidden", -1)),
    "converging": (("lr", +1),),
    "unstable": (("lr", -1), ("batch", +1)),
    "diverged": (("lr", -1), ("batch", +1)),
}


@dataclass(frozen=True)
class Settings:
    roles: Roles
    baseline: Mapping[str, Any]
    lr_factor: float
    plateau_cycles: int
    fallback_name: str
    minimize: bool
    movable: Callable[[str, BaseDistribution], bool]  # which params the rules move
    generic_moves: bool


@dataclass(frozen=True)
class _Candidate:
    param: str
    direction: int
    scale: float
    why: str  # keep | reprobe | diverged | diagnosis | pair | smaller


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


class Planner:
    """Decides one trial. Pure: the same history and settings give the same proposal."""

    def __init__(self, s: Settings, hist: History, number: int) -> None:
        self.s, self.hist, self.n = s, hist, number
        f = hist.fold
        self.space = {
            k: d for k, d in f.space.items() if k not in f.conflicts and not d.single() and s.movable(k, d)
        }

    # -- entry point -------------------------------------------------------------------------
    def decide(self) -> tuple[dict[str, Any], str]:
        """(payload for the system attr, reason sentence)."""
        f, n = self.hist.fold, self.n
        base = f.incumbent or f.base
        if base is None or not self.space:
            return self._startup()
        ref = max(base.number, f.last_explore)
        stall = n - 1 - ref
        if stall >= self.s.plateau_cycles:
            best = f" (best {_fmt(f.incumbent.value)})" if f.incumbent else ""
            since = f"cycle {ref + 1}"
            return self._explore(f"no improvement for {stall} cycles since {since}{best}")
        config = self._base_config(base)
        plan = self._plan(base)
        for i, c in enumerate(plan):
            moved = self._apply(config, c)
            if moved is None:
                continue
            cfg, label = moved
            if self.hist.known(config_key(cfg)):
                continue
            if c.scale == 1.0 and self.hist.known(lazy_key(base.number, c.param, c.direction)):
                continue
            prev = plan[i - 1] if i else None
            payload = {
                "kind": "move", "parent": base.number, "param": c.param, "dir": c.direction,
                "scale": c.scale, "move": label, "params": cfg,
            }
            return payload, f"cycle {n + 1}: {self._history_clause(base)}; {self._action_clause(base, c, prev, label)}"
        return self._explore(f"every move from cycle {base.cycle} has been tried at the smallest step")

    def enqueued(self, fixed: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """A trial enqueued with fixed params: the rest stays at the incumbent's values."""
        base = self.hist.fold.incumbent or self.hist.fold.base
        params = {k: v for k, v in self._base_config(base).items() if k not in fixed} if base else {}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(fixed.items()))
        rest = f"; other parameters from cycle {base.cycle}" if base and params else ""
        payload = {"kind": "enqueued", "parent": base.number if base else None, "move": "enqueued", "params": params}
        return payload, f"cycle {self.n + 1}: enqueued with {shown}{rest}"

    # -- plan --------------------------------------------------------------------------------
    def _name(self, role: str) -> str | None:
        name = self.s.roles.as_dict()[role]
        return name if name in self.space else None

    def _plan(self, base: Rec) -> list[_Candidate]:
        roles, hist = self.s.roles, self.hist
        front: list[_Candidate] = []
        last = hist.fold.last_finished
        lr = self._name("lr")
        if lr and last is not None and last is not base and last.diagnosis == "diverged":
            front.append(_Candidate(lr, -1, 1.0, "diverged"))
        if base.improved and base.kind == "move" and base.param in self.space and base.direction:
            if roles.role_of(base.param) in CAPACITY and lr:
                front.append(_Candidate(lr, -base.direction, 1.0, "reprobe"))
                front.append(_Candidate(lr, base.direction, 1.0, "reprobe"))
            front.append(_Candidate(base.param, base.direction, self._repeat_scale(base), "keep"))
        pairs: list[tuple[str, int, str]] = []
        for role, d in DIAGNOSIS_FIRST.get(base.diagnosis or "", ()):
            name = self._name(role)
            if name:
                pairs += [(name, d, "diagnosis"), (name, -d, "pair")]
        for role in ROLE_ORDER:
            name = self._name(role)
            if name:
                pairs += [(name, +1, "next"), (name, -1, "pair")]
        role_names = {v for v in roles.as_dict().values() if v}
        for name in sorted(self.space):
            if name not in role_names:
                pairs += [(name, +1, "next"), (name, -1, "pair")]
        plan = list(front)
        for scale in SCALES:
            plan += [_Candidate(p, d, scale, why if scale == 1.0 else "smaller") for p, d, why in pairs]
        seen: set[tuple[str, int, float]] = set()
        out = []
        for c in plan:
            if (c.param, c.direction, c.scale) not in seen:
                seen.add((c.param, c.direction, c.scale))
                out.append(c)
        return out

    def _repeat_scale(self, base: Rec) -> float:
        """Same step after one improvement; one step larger after two in a row."""
        parent = self.hist.rec(base.parent)
        streak = (
            parent is not None and parent.improved and parent.kind == "move"
            and parent.param == base.param and parent.direction == base.direction
        )
        return min(base.scale + (1.0 if streak else 0.0), MAX_SCALE)

    # -- moves -------------------------------------------------------------------------------
    def _base_config(self, base: Rec) -> dict[str, Any]:
        """The incumbent's covered params; a base without a result (the baseline trial still
        running, or pruned) is completed from the baseline, so that proposals made before and
        after its params became known compare equal."""
        config = dict(base.config)
        if base is self.hist.fold.incumbent:
            return config
        f, roles = self.hist.fold, self.s.roles
        for name, value in self.s.baseline.items():
            if name in config or name in f.conflicts:
                continue
            dist = f.space.get(name)
            if dist is not None:
                v = coerce(dist, value) if self.s.movable(name, dist) else None
            elif is_numeric_choice(value) and (self.s.generic_moves or roles.role_of(name)):
                v = value
            else:
                v = None
            if v is not None:
                config[name] = v
        return config

    def _apply(self, config: dict[str, Any], c: _Candidate) -> tuple[dict[str, Any], str] | None:
        roles = self.s.roles
        dist = self.space[c.param]
        old = config.get(c.param)
        if old is None or not is_numeric_choice(old):
            return None
        role = roles.role_of(c.param)
        cfg = dict(config)
        if role == "heads":
            hidden = config.get(roles.hidden) if roles.hidden else None
            hidden = hidden if hidden is not None else self.s.baseline.get(roles.hidden or "")
            new = _step_dividing(dist, old, c.direction, c.scale, hidden)
        else:
            factor = self.s.lr_factor if role == "lr" else 2.0
            new = step_value(dist, old, c.direction, c.scale, factor=factor, multiplicative=role in ("lr", "hidden", "batch"))
        if new is None:
            return None
        cfg[c.param] = new
        label = describe(c.param, role, dist, old, new)
        if role == "hidden" and roles.heads:
            heads = config.get(roles.heads)
            hdist = self.space.get(roles.heads)
            if heads is not None and hdist is not None:
                if new % heads:
                    fixed = divisors_nearest(hdist, heads, lambda h: new % h == 0)
                    if fixed is None:
                        return None
                    cfg[roles.heads] = fixed
                    label += f", heads {heads}->{fixed}"
            else:
                fixed_heads = self.s.baseline.get(roles.heads)
                if is_numeric_choice(fixed_heads) and fixed_heads > 0 and new % fixed_heads:
                    return None
        return cfg, label

    # -- outcomes without a local move -------------------------------------------------------
    def _explore(self, why: str) -> tuple[dict[str, Any], str]:
        fb = self.s.fallback_name
        payload = {"kind": "explore", "parent": None, "move": f"explore ({fb})", "params": {}}
        return payload, f"cycle {self.n + 1}: {why}; one exploration trial from {fb}"

    def _startup(self) -> tuple[dict[str, Any], str]:
        """No parameter seen yet (first trial, or workers starting together): baseline, then
        moves from the baseline resolved lazily as each parameter is suggested."""
        n, base = self.n, self.hist.fold.base
        if base is None:
            if self.s.baseline:
                return {"kind": "baseline", "parent": None, "move": "baseline", "params": {}}, f"cycle {n + 1}: baseline configuration"
            fb = self.s.fallback_name
            return (
                {"kind": "baseline", "parent": None, "move": f"first trial ({fb})", "params": {}},
                f"cycle {n + 1}: no baseline given; first configuration from {fb}",
            )
        roles = self.s.roles
        names = [roles.as_dict()[r] for r in ROLE_ORDER]
        names = [x for x in names if x and is_numeric_choice(self.s.baseline.get(x))]
        role_names = set(roles.as_dict().values())
        names += sorted(x for x, v in self.s.baseline.items() if x not in role_names and is_numeric_choice(v))
        free = [(x, d) for x in names for d in (+1, -1) if not self.hist.known(lazy_key(base.number, x, d))]
        if not free:
            return self._explore(f"cycle {base.cycle} has no result yet and every first move is taken")
        name, d = free[0]
        label = f"{roles.role_of(name) or name} {'up' if d > 0 else 'down'}"
        payload = {"kind": "lazy", "parent": base.number, "param": name, "dir": d, "scale": 1.0, "move": label, "params": {}}
        return payload, f"cycle {n + 1}: cycle {base.cycle} is still running; trying a neighbour of it meanwhile: {label}"

    # -- sentences ---------------------------------------------------------------------------
    def _history_clause(self, base: Rec) -> str:
        last = self.hist.fold.last_finished
        if last is None:
            return f"no cycle has finished yet (cycle {base.cycle} is running)"
        what = f"cycle {last.cycle}"
        if last.kind == "explore":
            what = f"exploration cycle {last.cycle}"
        elif last.move and last.kind in ("move", "lazy"):
            what = f"cycle {last.cycle} ({last.move})"
        if last is base and last.improved:
            if last.beaten is None:
                return f"cycle {last.cycle} scored {_fmt(last.value)}"
            if last.kind == "explore":
                return f"exploration cycle {last.cycle} improved {_fmt(last.beaten)} -> {_fmt(last.value)}; the local search moves there"
            if last.kind == "move":
                return f"cycle {last.cycle} improved {_fmt(last.beaten)} -> {_fmt(last.value)} with {last.move}"
            return f"cycle {last.cycle} improved {_fmt(last.beaten)} -> {_fmt(last.value)}"
        if last.diagnosis == "diverged":
            return f"{what} diverged"
        if last.state == TrialState.PRUNED:
            return f"{what} was pruned"
        if last.state == TrialState.FAIL:
            return f"{what} failed"
        if last.value is None:
            return f"{what} gave no finite value"
        best = self.hist.fold.incumbent
        if best is None or best.value is None:
            return f"{what} scored {_fmt(last.value)}"
        if (last.value < best.value) if self.s.minimize else (last.value > best.value):
            return f"{what} scored {_fmt(last.value)}, within the noise margin of {_fmt(best.value)} (cycle {best.cycle})"
        return f"{what} was worse: {_fmt(last.value)} vs {_fmt(best.value)} (cycle {best.cycle})"

    def _action_clause(self, base: Rec, c: _Candidate, prev: _Candidate | None, label: str) -> str:
        last = self.hist.fold.last_finished
        where = f"from cycle {base.cycle}" if last is base or last is None else f"back to cycle {base.cycle}"
        if c.why == "keep":
            return f"trying {label} again" if label == base.move else f"trying {label} (same way, larger step)"
        if c.why == "reprobe":
            return f"re-probing lr after the capacity change: {label}"
        if c.why == "diverged":
            return f"{where}, lowering lr: {label}"
        if c.why == "diagnosis":
            return f"cycle {base.cycle} looks {base.diagnosis}: trying {label}"
        if c.why == "smaller":
            return f"every move from cycle {base.cycle} failed at the larger step; trying {label}"
        if c.why == "pair" and prev is not None and prev.param == c.param and prev.direction == -c.direction:
            return f"{where}, trying the opposite: {label}"
        return f"{where}, trying {label}"


def _step_dividing(dist: BaseDistribution, old: Any, direction: int, scale: float, hidden: Any) -> Any:
    """Heads: the next allowed value in `direction` that divides hidden."""
    value, steps = old, max(1, round(scale))
    for _ in range(64):
        nxt = step_value(dist, value, direction, 1.0, factor=2.0, multiplicative=not isinstance(dist, IntDistribution) or dist.log)
        if nxt is None:
            return None
        value = nxt
        if not is_numeric_choice(hidden) or hidden % value == 0:
            steps -= 1
            if steps == 0:
                return value
    return None
