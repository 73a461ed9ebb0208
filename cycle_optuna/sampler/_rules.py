"""The cycle rules: from a history snapshot to one proposal and the sentence that explains it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cycle_optuna.sampler._history import History, Rec, move_key, move_kind
from cycle_optuna.sampler._moves import (
    Roles,
    coerce,
    describe,
    divisors_nearest,
    is_numeric_choice,
    is_ordered,
    step_value,
)

SCALES = (1.0, 0.5, 0.25)  # the step shrinks through these once every move failed
MAX_SCALE = 3.0  # a float move that keeps improving grows its step up to this
CAPACITY = ("layers", "hidden")
MULTIPLICATIVE = ("lr", "hidden", "batch", "patch")  # roles whose numeric moves multiply
ROLE_ORDER = ("lr", "layers", "hidden", "dropout", "batch", "heads", "patch")
LOCAL_PER_GLOBAL = 2  # exploration trials around the incumbent before one from the fallback
TIE = 0.02  # a float move that finished within this (relative) of its parent was too small to tell
# Moves a diagnosis of the incumbent puts first; each is followed by its opposite.
DIAGNOSIS_FIRST: dict[str, tuple[tuple[str, int], ...]] = {
    "underfit": (("layers", +1), ("hidden", +1), ("lr", +1), ("dropout", -1)),
    "below_baseline": (("layers", +1), ("hidden", +1), ("lr", +1), ("dropout", -1)),
    "overfit": (("dropout", +1), ("layers", -1), ("hidden", -1)),
    "converging": (("lr", +1),),
    "unstable": (("lr", -1), ("batch", +1)),
    "diverged": (("lr", -1), ("batch", +1)),
}
_NO_VALUE = object()


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
    seed: int | None = None  # seeds the local explorations' choice of parameters


@dataclass(frozen=True)
class _Candidate:
    param: str
    direction: int  # +1 / -1 on ordered parameters; 0 for a choice of an unordered categorical
    scale: float
    why: str  # keep | reprobe | diverged | switch | diagnosis | pair | next | smaller | explore
    value: Any = _NO_VALUE  # the choice, for unordered categoricals


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
        if base is not None and not self.space and f.last_finished is not None:
            # every parameter is fixed by something else or changed its range: nothing for the rules to move
            return self._explore(None, "no parameter the rules can move (each is fixed by another sampler, "
                                 "or changed its range)")
        if base is None or not self.space:
            return self._startup()
        ref = max(base.number, f.last_explore)
        stall = n - 1 - ref
        if stall >= self.s.plateau_cycles:
            what = "the last exploration" if ref == f.last_explore and ref != base.number else "the incumbent"
            best = f"; the best is cycle {f.incumbent.cycle} ({_fmt(f.incumbent.value)})" if f.incumbent else ""
            return self._explore(base, f"no improvement in the {stall} cycles after cycle {ref + 1} ({what}){best}")
        config = self._base_config(base)
        for c in self._plan(base, config):
            moved = self._apply(config, c)
            if moved is None:
                continue
            cfg, label = moved
            if self.hist.known(self.hist.key(cfg)):
                continue
            if self.hist.known(move_key(base.number, c.param, c.direction, c.scale, cfg.get(c.param))):
                continue
            payload = {
                "kind": "move", "parent": base.number, "param": c.param, "dir": c.direction,
                "scale": c.scale, "move": label, "params": cfg,
            }
            return payload, f"cycle {n + 1}: {self._history_clause(base)}; {self._action_clause(base, config, c, label)}"
        return self._explore(base, f"every move from cycle {base.cycle} has been tried at the smallest step")

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

    def _plan(self, base: Rec, config: Mapping[str, Any]) -> list[_Candidate]:
        roles, hist = self.s.roles, self.hist
        front: list[_Candidate] = []
        last = hist.fold.last_finished
        lr = self._name("lr")
        if lr and last is not None and last is not base and last.diagnosis == "diverged":
            front.append(_Candidate(lr, -1, 1.0, "diverged"))
        if base.improved and base.kind in ("move", "lazy") and base.param in self.space and base.direction:
            front.append(_Candidate(base.param, base.direction, self._repeat_scale(base), "keep"))
            # One lr probe once capacity stops paying (a larger model often wants a smaller lr).
            if roles.role_of(base.param) in CAPACITY and lr:
                front.append(_Candidate(lr, -base.direction, 1.0, "reprobe"))
        tie = self._tied(base)
        if tie is not None:
            front.append(tie)
        pairs: list[_Candidate] = []
        role_names = {v for v in roles.as_dict().values() if v}
        # A switch (a true/false parameter) no cycle has flipped yet comes before the diagnosis and
        # the default order: on data files the model's switches (instance_norm, summary_features)
        # moved validation loss more than any step. Once flipped it takes its place among the others.
        untried = (x for x in self.space if x not in role_names and x not in hist.fold.moved)
        for name in sorted(x for x in untried if _is_switch(self.space[x])):
            pairs += [_Candidate(name, 0, 1.0, "switch", v) for v in _other_choices(self.space[name], config.get(name))]
        # Then the input's representation before the training's settings: a patch length no cycle has
        # moved yet is halved (finer tokens) next, unless the training itself is in trouble. A short motif
        # anywhere in the series needs a finer patch than the automatic one, and a search reached it
        # only after every lr, capacity, dropout and batch move (MotifPos, 10 cycles: 0.665 -> 0.985).
        patch = self._name("patch")
        if (patch and patch not in hist.fold.moved and is_ordered(self.space[patch])
                and base.diagnosis not in ("diverged", "unstable")):
            pairs.append(_Candidate(patch, -1, 1.0, "patch"))
        for role, d in DIAGNOSIS_FIRST.get(base.diagnosis or "", ()):
            name = self._name(role)
            if name:
                pairs += [_Candidate(name, d, 1.0, "diagnosis"), _Candidate(name, -d, 1.0, "pair")]
        names = [x for x in (self._name(r) for r in ROLE_ORDER) if x]
        names += sorted(x for x in self.space if x not in role_names)
        others: dict[str, list[Any]] = {}
        for name in names:
            if is_ordered(self.space[name]):
                pairs += [_Candidate(name, +1, 1.0, "next"), _Candidate(name, -1, 1.0, "pair")]
            else:
                others[name] = _other_choices(self.space[name], config.get(name))
                pairs += [_Candidate(name, 0, 1.0, "next", v) for v in others[name][:1]]
        # Unordered choices beyond the next one come in rounds, one per parameter: every
        # parameter gets a change before any gets its third choice.
        for k in range(1, max((len(v) for v in others.values()), default=0)):
            pairs += [_Candidate(name, 0, 1.0, "next", v[k]) for name, v in others.items() if k < len(v)]
        # Kinds of move that already failed elsewhere go behind those that did not, fewest first.
        fails = hist.fold.fails
        if fails:
            pairs.sort(key=lambda c: fails.get(move_kind(c.param, c.direction, c.value), 0))
        plan = list(front) + pairs
        for scale in SCALES[1:]:  # lists and ints cannot take a smaller step than one
            plan += [
                _Candidate(c.param, c.direction, scale, "smaller") for c in pairs
                if c.direction and isinstance(self.space[c.param], FloatDistribution)
            ]
        seen: set[tuple] = set()
        out = []
        for c in plan:
            key = (c.param, c.direction, c.scale, repr(c.value))
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out

    def _tied(self, base: Rec) -> _Candidate | None:
        """The last move from ``base`` changed a float and finished level with it (within TIE):
        the step was too small to tell, so the same move one step larger comes next (a tie at
        that step grows it again, up to MAX_SCALE). Lists and ints never: a larger step skips a choice."""
        last = self.hist.fold.last_finished
        if (
            last is None or last is base or last.kind != "move" or last.parent != base.number
            or last.param not in self.space or not last.direction or last.value is None or base.value is None
            or not isinstance(self.space[last.param], FloatDistribution) or last.scale >= MAX_SCALE
            or abs(last.value - base.value) > TIE * abs(base.value)
        ):
            return None
        return _Candidate(last.param, last.direction, last.scale + 1.0, "tie")

    def _repeat_scale(self, base: Rec) -> float:
        """Same step after one improvement; a float takes one step larger after two in a row.
        Lists and ints keep one step, so a repeat never skips a value that was not tried."""
        if not isinstance(self.space[base.param], FloatDistribution):  # type: ignore[index]
            return 1.0
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

    def _apply(self, config: Mapping[str, Any], c: _Candidate) -> tuple[dict[str, Any], str] | None:
        roles = self.s.roles
        dist = self.space[c.param]
        old = config.get(c.param)
        role = roles.role_of(c.param)
        cfg = dict(config)
        if c.value is not _NO_VALUE:
            if old is None or c.value == old:
                return None
            cfg[c.param] = c.value
            return cfg, describe(c.param, role, dist, old, c.value)
        if old is None or not is_numeric_choice(old):
            return None
        if role == "heads":
            hidden = config.get(roles.hidden) if roles.hidden else None
            hidden = hidden if hidden is not None else self.s.baseline.get(roles.hidden or "")
            new = _step_dividing(dist, old, c.direction, c.scale, hidden)
        else:
            factor = self.s.lr_factor if role == "lr" else 2.0
            multiplicative = role in MULTIPLICATIVE
            new = step_value(dist, old, c.direction, c.scale, factor=factor, multiplicative=multiplicative)
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

    # -- explorations ------------------------------------------------------------------------
    def _explore(self, base: Rec | None, why: str) -> tuple[dict[str, Any], str]:
        """One exploration trial: around the incumbent first, from the fallback after
        ``LOCAL_PER_GLOBAL`` local ones found nothing better."""
        f, n = self.hist.fold, self.n
        inc = f.incumbent
        k = f.explores_since if inc is not None else 0
        if inc is not None and base is inc and k % (LOCAL_PER_GLOBAL + 1) < LOCAL_PER_GLOBAL:
            radius = 2 + k // (LOCAL_PER_GLOBAL + 1)  # the neighbourhood grows each round that fails
            local = self._local(inc, radius)
            if local is not None:
                cfg, labels = local
                payload = {
                    "kind": "explore", "scope": "local", "parent": inc.number, "move": "explore (local)",
                    "params": cfg,
                }
                return payload, (
                    f"cycle {n + 1}: {why}; exploring around cycle {inc.cycle}, {len(labels)} changes at once: "
                    + ", ".join(labels)
                )
        fb = self.s.fallback_name
        parent = inc.number if inc is not None else None
        payload = {"kind": "explore", "scope": "global", "parent": parent, "move": f"explore ({fb})", "params": {}}
        after = f"; {k} explorations after cycle {inc.cycle} found nothing better" if inc is not None and k else ""
        return payload, f"cycle {n + 1}: {why}{after}; one exploration trial from {fb} over the whole space"

    def _local(self, inc: Rec, radius: int) -> tuple[dict[str, Any], list[str]] | None:
        """The incumbent with `radius` parameters moved one step each at random, untried."""
        config = self._base_config(inc)
        names = sorted(k for k in self.space if k in config)
        if len(names) < 2:
            return None
        rng = random.Random(f"{self.s.seed}:{self.n}")
        for _ in range(32):
            chosen = sorted(rng.sample(names, min(radius, len(names))))
            cfg, labels = dict(config), []
            for name in chosen:
                dist = self.space[name]
                if is_ordered(dist):
                    d = rng.choice((1, -1))
                    tries = [_Candidate(name, d, 1.0, "explore"), _Candidate(name, -d, 1.0, "explore")]
                else:
                    others = _other_choices(dist, cfg.get(name))
                    tries = [_Candidate(name, 0, 1.0, "explore", rng.choice(others))] if others else []
                # a step that trains as before (between two batch sizes above the ceiling) is no change
                now = self.hist.key(cfg)
                moved = next((m for c in tries if (m := self._apply(cfg, c)) is not None and self.hist.key(m[0]) != now),
                             None)
                if moved is not None:
                    cfg, label = moved
                    labels.append(label)
            if len(labels) >= 2 and not self.hist.known(self.hist.key(cfg)):
                return cfg, labels
        return None

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
        if self.s.generic_moves:  # without generic moves, parameters without a role are the fallback's
            names += sorted(x for x, v in self.s.baseline.items() if x not in role_names and is_numeric_choice(v))
        free = [(x, d) for x in names for d in (+1, -1) if not self.hist.known(move_key(base.number, x, d))]
        if not free:
            fb = self.s.fallback_name
            payload = {"kind": "explore", "scope": "global", "parent": None, "move": f"explore ({fb})", "params": {}}
            return payload, f"cycle {n + 1}: cycle {base.cycle} has no result yet and every first move is taken; one exploration trial from {fb}"
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
        if last is best:
            return f"{what} scored {_fmt(last.value)}, the best so far"
        if (last.value < best.value) if self.s.minimize else (last.value > best.value):
            return f"{what} scored {_fmt(last.value)}, within the noise margin of {_fmt(best.value)} (cycle {best.cycle})"
        if _fmt(last.value) == _fmt(best.value):  # equal as shown: "worse" would read false
            return f"{what} matched cycle {best.cycle} ({_fmt(best.value)}) without beating it"
        return f"{what} was worse: {_fmt(last.value)} vs {_fmt(best.value)} (cycle {best.cycle})"

    def _compared_step(self, base: Rec, config: Mapping[str, Any], param: str) -> str:
        """How the repeated step compares with the one that improved: again / larger / up to the bound."""
        parent = self.hist.rec(base.parent)
        before = parent.config.get(param) if parent is not None else None
        now = config.get(param)
        moved = self._apply(config, _Candidate(param, base.direction, self._repeat_scale(base), "keep"))
        after = moved[0].get(param) if moved else None
        dist = self.space[param]
        if isinstance(dist, CategoricalDistribution) or not all(is_numeric_choice(v) for v in (before, now, after)):
            return "again"  # a list moves one choice at a time, however far apart its values are
        role = self.s.roles.role_of(param)
        if dist.log or role in MULTIPLICATIVE:  # type: ignore[union-attr]
            if not all(v > 0 for v in (before, now, after)):  # type: ignore[operator]
                return "again"
            last_step, next_step = abs(math.log(now / before)), abs(math.log(after / now))
        else:  # linear floats and ints step by a fixed amount
            last_step, next_step = abs(now - before), abs(after - now)
        if next_step > last_step * 1.001 and not isinstance(dist, IntDistribution):
            return "(same way, larger step)"  # an int always takes one step: 11 -> 6 -> 3 is rounding, not larger
        if next_step < last_step * 0.999:
            return "(same way, up to the end of the range)"
        return "again"

    def _action_clause(self, base: Rec, config: Mapping[str, Any], c: _Candidate, label: str) -> str:
        last = self.hist.fold.last_finished
        where = f"from cycle {base.cycle}" if last is base or last is None else f"back to cycle {base.cycle}"
        # a repeat or a re-probe follows from the base's own move: when another cycle finished
        # since, say which cycle it starts from
        back = "" if last is base or last is None else f"back to cycle {base.cycle} ({base.move}), "
        if c.why == "keep":
            return f"{back}trying {label} {self._compared_step(base, config, c.param)}"
        if c.why == "tie":
            last = self.hist.fold.last_finished
            assert last is not None
            return (f"cycle {last.cycle} ended within {TIE:.0%} of cycle {base.cycle}, too close to tell; "
                    f"trying a larger step the same way: {label}")
        if c.why == "reprobe":
            return f"{back}re-probing lr after the capacity change: {label}"
        if c.why == "diverged":
            return f"{where}, lowering lr: {label}"
        if c.why == "diagnosis":
            return f"cycle {base.cycle} looks {base.diagnosis}: trying {label}"
        if c.why == "patch":
            return f"{where}, trying a finer patch before the training's settings: {label}"
        if c.why == "switch":
            return f"{where}, trying a switch no cycle has flipped yet: {label}"
        if c.why == "smaller":
            return f"{where}, every one-step move from cycle {base.cycle} is taken; trying a smaller step: {label}"
        if c.direction:
            opposite = self._apply(config, _Candidate(c.param, -c.direction, c.scale, "pair"))
            other = self.hist.holder(self.hist.key(opposite[0])) if opposite else None
            # only a move of this parameter the other way from this same cycle is "the opposite";
            # the trial holding that configuration may be the baseline, or another parent's move
            if (other is not None and other.state.is_finished() and other.kind == "move"
                    and other.parent == base.number and other.param == c.param and other.direction == -c.direction):
                return f"{where}, trying the opposite of cycle {other.cycle} ({other.move}): {label}"
        return f"{where}, trying {label}"


def _is_switch(dist: BaseDistribution) -> bool:
    """A true/false parameter: a categorical whose choices are exactly the two bools."""
    return isinstance(dist, CategoricalDistribution) and len(dist.choices) == 2 and \
        all(isinstance(c, bool) for c in dist.choices) and dist.choices[0] is not dist.choices[1]


def _other_choices(dist: BaseDistribution, current: Any) -> list[Any]:
    """An unordered categorical's other choices, nearest in the list first: the next one, the
    previous one, then outwards (wrapping), since neighbours in a list are often related."""
    choices = list(dist.choices)  # type: ignore[attr-defined]
    idx = next((i for i, ch in enumerate(choices) if coerce(dist, current) is ch), None)
    if idx is None:
        return []
    out: list[Any] = []
    for k in range(1, len(choices)):
        for j in ((idx + k) % len(choices), (idx - k) % len(choices)):
            if j != idx and choices[j] not in out:
                out.append(choices[j])
    return out


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
