"""Study file (TOML) -> frozen dataclasses; the only module that parses the file."""

from __future__ import annotations

import dataclasses
import difflib
import filecmp
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cycle_optuna.errors import ConfigError
from cycle_optuna.redact import mask, mask_userinfo, remember

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "sophia")
SCHEDULES = ("constant", "cosine", "cyclical", "onecycle")
SAMPLERS = ("cycle", "reference", "tpe", "random", "cmaes")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "patient", "parent", "none")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_CUDAGRAPHS = "cudagraphs"  # train.compile: inductor plus CUDA graphs
FOLDS_AUTO = "auto"  # data.folds: cross-validate when the validation split is small
AUTO_FOLDS = 5  # folds "auto" takes
SMALL_VAL = 30  # validation series below which one series moves val accuracy by more than 3 points
# folds "auto" cross-validates a validation split of at most this many series (one series: >= 5 points).
# Chosen on the development sets: ACSF1 (20 validation series) gained 8 points with 5 folds,
# OSULeaf (29) lost on both seeds tried (docs/benchmarks.md, Accuracy)
AUTO_FOLDS_MAX_VAL = 20
# ... and one that would hold fewer than this many series per class: with a few series per class,
# the one each class gives up is a large share of what it trains on (a generated set of 40 classes
# of 4 series: 0.595 on the validation split, 0.790 cross-validated, 1-NN 0.647; docs/benchmarks.md)
AUTO_FOLDS_MIN_VAL_PER_CLASS = 2
MAX_FOLDS = 20
DIRECTIONS = ("minimize",)
DATA_SUFFIXES = (".npz", ".csv", ".ts", ".arff", ".tsv", ".txt")
SUFFIX_LIST = "/".join(DATA_SUFFIXES)
POS_ENCODINGS = ("sinusoidal", "rotary", "learned", "none")  # model.POS_ENCODINGS
POOLINGS = ("mean", "cls", "last", "max")  # model.POOLINGS
CHOICE_PARAMS = {"pos_encoding": POS_ENCODINGS, "pooling": POOLINGS}
MAX_CONV_STEM = 3  # len(model.CONV_KERNELS)
# study.name names files (<name>.db, its lock file, <name>-artifacts): longer names pass 255 bytes
MAX_NAME = 200

MAX_TRIALS = 1_000_000  # a study's total: more is a typo (a trial trains a model)


def sqlite_host_problem(url: str) -> str | None:
    """Why a SQLite URL with a host part (`sqlite://studies/x.db`) is wrong, None for any other URL:
    the driver drops the host and opens another file than the one meant."""
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if not sep or scheme.lower().split("+")[0] != "sqlite" or not authority:
        return None
    shown = mask_userinfo(authority)  # a password in it (SQLCipher's sqlite+pysqlcipher://:key@/x.db) is not shown
    return (f"a SQLite URL has no host ({shown!r} would be dropped); write sqlite:///{shown}{mask(rest[len(authority):])} "
            "for a path relative to the current directory, sqlite:////abs/path.db for an absolute one")


def check_n_trials(value: object, key: str) -> int:
    """`value` as a study's total of trials (a whole number from 1 to MAX_TRIALS), else ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise ConfigError(f"{key}: must be a whole number of trials from 1 to {MAX_TRIALS}, got {value!r}")
    n = value.__index__()
    if not 1 <= n <= MAX_TRIALS:
        raise ConfigError(f"{key}: must be a whole number of trials from 1 to {MAX_TRIALS}, got {n}")
    return n


@dataclass(frozen=True)
class StudySection:
    name: str = "study"
    storage: str | None = None  # None -> $CYCLE_OPTUNA_STORAGE or sqlite:///studies/<name>.db
    direction: str = "minimize"  # the objective is validation loss
    n_trials: int = 20  # total for the study across all workers
    seed: int = 0  # seeds data split, model init and sampler
    artifact_dir: str | None = None  # None -> studies/<name>-artifacts (checkpoints, best model)
    ensemble: int = 3  # the best model averages the top N cycles' models (by val loss); 1 = the best alone

    def __repr__(self) -> str:  # configs get printed and logged: the storage URL's password masked
        shown = (f"{f.name}={mask(v)!r}" if isinstance(v := getattr(self, f.name), str) and f.name == "storage"
                 else f"{f.name}={v!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic", or a path to a .npz (X [N,T,F], y [N]), .csv or .ts file
    test_source: str | None = None  # an official test file (same kinds); val is then carved from source only
    n_samples: int = 2400  # synthetic only
    seq_len: int = 16  # synthetic only
    n_features: int = 8  # synthetic only
    n_classes: int = 3  # synthetic only; files infer it from the labels
    noise: float = 1.0  # synthetic only: per-channel noise scale
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # how cycles are scored: 1 = on the validation split; k >= 2 = k-fold cross-validation over the
    # training and validation splits together; "auto" = AUTO_FOLDS folds when the validation split
    # would hold at most AUTO_FOLDS_MAX_VAL series or fewer than AUTO_FOLDS_MIN_VAL_PER_CLASS per
    # class, else 1
    folds: int | str = "auto"
    label_column: str = "label"  # csv only
    sample_column: str = "sample"  # csv only: rows sharing an id form one sequence
    layout: str = "long"  # csv only: "long" (a row per time step) | "wide" (a row per series, a column per step)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    optimizer: str = "adamw"  # adamw | adam | sgd | lion | sophia
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # constant | cosine | cyclical | onecycle
    warmup_epochs: float = 1.0  # linear warmup, may be fractional
    cyclical_low_ratio: float = 0.1  # cyclical: triangle between lr*ratio and lr
    cyclical_period_epochs: float = 2.0  # cyclical: epochs per full up-down cycle
    grad_clip: float = 1.0  # max grad norm; 0 disables
    max_bad_batches: int = 20  # consecutive non-finite losses before stopping as diverged
    early_stopping_patience: int = 5  # epochs without val improvement; 0 disables
    min_delta: float = 1e-4  # val loss improvement that resets patience
    augment_jitter: float = 0.0  # std of gaussian noise added to train inputs
    augment_scale: float = 0.0  # train inputs scaled by U(1-s, 1+s) per sample
    init_gain: float = 1.0  # scales the model's init (N(0, 0.02) transformer, unit-variance stem)
    device: str = "auto"  # auto picks cuda when present
    threads: int = 0  # torch intra-op threads per worker; 0 = cores // workers
    compile: bool | str = False  # torch.compile the model; "cudagraphs": also CUDA graphs (CUDA only)
    pack: int = 1  # trials one worker trains at once as a vmapped population, where they share a shape
    eval_batch_size: int = 512
    min_epoch_samples: int = 1024  # a smaller training set is repeated within an epoch up to this; 0 = off
    label_smoothing: float = 0.1  # training loss only; validation loss stays plain cross-entropy
    class_weights: str = "none"  # "balanced": each class weighs as much in the training loss, whatever its size


@dataclass(frozen=True)
class Hyperparams:
    """The trial's parameters; [baseline] sets every one, [space] varies any subset."""

    lr: float = 5e-4
    batch_size: int = 32
    hidden_dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    weight_decay: float = 0.01
    patch_len: int = 0  # steps per token; 0 = auto (the largest power of two leaving >= 16 tokens)
    conv_stem: int = 2  # conv layers (kernels 5, 3, 3) over the tokens; 0 = none
    pos_encoding: str = "sinusoidal"  # sinusoidal | rotary | learned | none
    pooling: str = "max"  # max | mean | cls | last
    instance_norm: bool = False  # standardise each series on its own (level/scale fed to the head)
    summary_features: bool = False  # per-series statistics (the MLP reference's inputs) into the head
    step_conv: bool = False  # a convolution over the raw steps before patching (nonlinear local shapes)


PARAM_NAMES = tuple(f.name for f in dataclasses.fields(Hyperparams))


@dataclass(frozen=True)
class ParamSpace:
    """One searchable parameter: a numeric range or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class SamplerConfig:
    type: str = "cycle"  # the cycle sampler (docs/sampler.md); tpe, random, cmaes, reference
    n_startup_trials: int = 5  # tpe/cmaes: random trials before modelling
    lr_factor: float = 2.0  # cycle: multiplicative lr step
    noise_margin: float = 0.002  # cycle: relative improvement that counts
    plateau_cycles: int = 6  # cycle: cycles without improvement before exploring
    fallback: str = "tpe"  # cycle: sampler for exploration and uncovered params


@dataclass(frozen=True)
class PrunerConfig:
    type: str = "median"
    n_startup_trials: int = 3
    # epochs before a trial can be pruned; "auto": an eighth of train.epochs, at least 2 (warmup_steps)
    n_warmup_steps: int | str = "auto"
    percentile: float = 50.0  # percentile only
    min_resource: int = 1  # successive_halving/hyperband
    reduction_factor: int = 3  # successive_halving/hyperband
    patience: int = 3  # patient; parent: epochs in a row behind the parent's curve
    min_delta: float = 0.0  # patient only
    warmup_fraction: float = 0.25  # parent: share of the epochs before anything is pruned
    margin: float = 0.0  # parent: relative distance behind the parent's curve that counts (at the last epoch)
    early_margin: float = 0.0  # parent: added to margin at the first epoch, shrinking linearly to 0 at the last


WARMUP_AUTO = "auto"


def warmup_steps(pr: PrunerConfig, epochs: int) -> int:
    """The epochs before the median, percentile or patient pruner may stop a trial: the written
    `n_warmup_steps`, else an eighth of the epochs, at least 2 (2 up to 23 epochs, 12 of 100): a
    fixed 2 judged a 100-epoch cycle on its first 3 epochs. The eighth is the share the pruning
    benchmark's settings were chosen at (2 of 16 epochs; docs/benchmarks.md)."""
    return max(2, epochs // 8) if pr.n_warmup_steps == WARMUP_AUTO else int(pr.n_warmup_steps)


@dataclass(frozen=True)
class StudyConfig:
    study: StudySection
    data: DataConfig
    train: TrainConfig
    baseline: Hyperparams
    space: tuple[ParamSpace, ...]
    sampler: SamplerConfig
    pruner: PrunerConfig
    path: str | None = field(default=None, compare=False)
    # False for a study file without a [space] table (it searches DEFAULT_SPACE, and, once the data's
    # length is known, the automatic patch_len's neighbours: with_data_defaults)
    space_written: bool = field(default=True, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored on the study."""
        out = dataclasses.asdict(self)
        out.pop("path")
        out.pop("space_written")
        # absolute paths, so the stored config works without the study file (best, report, dashboard)
        data_path = resolve_data_path(self)
        if data_path is not None:
            out["data"]["source"] = str(data_path.resolve())
        test_path = resolve_test_path(self)
        if test_path is not None:
            out["data"]["test_source"] = str(test_path.resolve())
        out["study"]["artifact_dir"] = str(resolve_artifact_dir(self).resolve())
        if out["study"]["storage"]:  # stored on the study, which the dashboard serves: no password
            remember(out["study"]["storage"])  # also when --storage overrode it: mask knows only the URL in use
            out["study"]["storage"] = mask(out["study"]["storage"])
        out["space"] = {p["name"]: {k: v for k, v in p.items() if k != "name" and v is not None and v is not False} for p in out["space"]}
        for p in out["space"].values():
            if "choices" in p:
                p["choices"] = list(p["choices"])
        return out

    def trial_definition(self) -> dict[str, Any]:
        """The parts that define what a trial means; workers of one study must agree on them.

        How a worker runs its trials (EXECUTION_KEYS: device, threads, compile, packing, eval batch)
        is its own: a GPU worker that packs and a CPU worker that does not can share one study.
        """
        d = self.to_dict()
        return {k: without_execution(k, d[k]) for k in DEFINITION_SECTIONS}


DEFINITION_SECTIONS = ("study", "data", "train", "baseline", "space")
# sections of which only these keys define a trial: the seed draws the split, the folds, the
# synthetic data and every model's initial weights; a study's name, total and storage do not
DEFINITION_ONLY = {"study": ("seed",)}
# [train] keys that change how fast a trial runs, not what it computes (packed and compiled trials
# match the trial alone within float tolerance): not part of the trial definition
EXECUTION_KEYS = {"train": ("device", "threads", "compile", "pack", "eval_batch_size")}
# keys added after studies existed, with the value that reproduces what those studies did
CSV_LAYOUTS = ("long", "wide")
DEFINITION_ADDED = {"data": {"folds": 1, "layout": "long"}, "train": {"class_weights": "none"},
                    "baseline": {"summary_features": False, "step_conv": False}}
CLASS_WEIGHTS = ("none", "balanced")


def without_execution(section: str, values: Any) -> Any:
    """A trial-definition section without its execution-only keys, nor the keys its own settings
    never read (momentum under adamw, a .csv column name for a .npz file): a study file may no longer
    write those (`parse`), and a study made when it could is still joined by a file without them."""
    if not isinstance(values, dict):
        return values
    if section in DEFINITION_ONLY:
        return {k: values[k] for k in DEFINITION_ONLY[section] if k in values}
    unread = set(EXECUTION_KEYS.get(section, ()))
    if section == "train":
        unread |= {k for k, (setting, readers) in TRAIN_KEYS_BY.items() if values.get(setting) not in readers}
    elif section == "data" and not any(isinstance(f, str) and f != "synthetic" and Path(f).suffix.lower() == ".csv"
                                       for f in (values.get("source"), values.get("test_source"))):
        unread |= {"label_column", "sample_column"}  # not layout: DEFINITION_ADDED supplies it to older studies
    return {k: v for k, v in values.items() if k not in unread}


_SECTIONS = {
    "study": StudySection,
    "data": DataConfig,
    "train": TrainConfig,
    "baseline": Hyperparams,
    "sampler": SamplerConfig,
    "pruner": PrunerConfig,
}
_SPACE_KEYS = ("low", "high", "log", "step", "choices")


def _suggest(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    """Carries the file name so every error names file and key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {msg}")

    def build(self, section: str, cls: type, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            raise self.fail(section, f"must be a table, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key not in fields:
                raise self.fail(f"{section}.{key}", f"unknown key{_suggest(key, list(fields))}; allowed: {', '.join(fields)}")
            kwargs[key] = self.coerce(f"{section}.{key}", value, fields[key].default)
        return cls(**kwargs)

    def coerce(self, key: str, value: Any, default: Any) -> Any:
        if key == "train.compile":
            if not isinstance(value, bool) and value != COMPILE_CUDAGRAPHS:
                raise self.fail(key, f"must be true or false, or {COMPILE_CUDAGRAPHS!r}, got {value!r}")
            return value
        if key == "pruner.n_warmup_steps":
            if value != WARMUP_AUTO and (isinstance(value, bool) or not isinstance(value, int)):
                raise self.fail(key, f"must be an integer, or {WARMUP_AUTO!r}, got {value!r}")
            return value
        if key == "data.folds":
            if value != FOLDS_AUTO and (isinstance(value, bool) or not isinstance(value, int)
                                        or not 1 <= value <= MAX_FOLDS):
                raise self.fail(key, f"must be an integer from 1 to {MAX_FOLDS}, or {FOLDS_AUTO!r}, got {value!r}")
            return value
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise self.fail(key, f"must be true or false, got {value!r}")
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"must be an integer, got {value!r}")
            return value
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(key, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise self.fail(key, f"must be finite, got {value!r}")
            return float(value)
        if isinstance(default, str) or default is None:
            if not isinstance(value, str):
                raise self.fail(key, f"must be a string, got {value!r}")
            return value
        raise self.fail(key, f"unsupported value {value!r}")  # pragma: no cover

    def one_of(self, key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise self.fail(key, f"'{value}' is not one of {', '.join(allowed)}{_suggest(value, list(allowed))}")

    def at_least(self, key: str, value: float, low: float, *, strict: bool = False) -> None:
        if value < low or (strict and value == low):
            raise self.fail(key, f"must be {'>' if strict else '>='} {low}, got {value}")

    def at_most(self, key: str, value: float, high: float, why: str) -> None:
        if value > high:
            raise self.fail(key, f"must be <= {high} ({why}), got {value}")

    def space_param(self, name: str, raw: Any) -> ParamSpace:
        key = f"space.{name}"
        if name not in PARAM_NAMES:
            raise self.fail(key, f"unknown parameter{_suggest(name, list(PARAM_NAMES))}; allowed: {', '.join(PARAM_NAMES)}")
        if not isinstance(raw, Mapping):
            raise self.fail(key, "must be a table like {low = 1, high = 6} or {choices = [32, 64]}")
        for k in raw:
            if k not in _SPACE_KEYS:
                raise self.fail(f"{key}.{k}", f"unknown key{_suggest(k, list(_SPACE_KEYS))}; allowed: {', '.join(_SPACE_KEYS)}")
        default = getattr(Hyperparams(), name)
        is_int = isinstance(default, int)
        if isinstance(default, (bool, str)) and "choices" not in raw:
            raise self.fail(key, f"must be a table of choices like {{choices = {_example_choices(default)}}}")
        if "choices" in raw:
            extra = set(raw) - {"choices"}
            if extra:
                raise self.fail(key, f"choices cannot be combined with {', '.join(sorted(extra))}")
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices:
                raise self.fail(f"{key}.choices", "must be a non-empty list")
            kind = default if isinstance(default, (bool, str)) else 0 if is_int else 0.0
            checked = tuple(self.coerce(f"{key}.choices", c, kind) for c in choices)
            if len(set(checked)) != len(checked):
                raise self.fail(f"{key}.choices", f"has duplicates: {list(checked)}")
            return ParamSpace(name, choices=checked)
        if "low" not in raw or "high" not in raw:
            raise self.fail(key, "needs both low and high (or choices)")
        kind = 0 if is_int else 0.0
        low = self.coerce(f"{key}.low", raw["low"], kind)
        high = self.coerce(f"{key}.high", raw["high"], kind)
        log = self.coerce(f"{key}.log", raw.get("log", False), False)
        step = raw.get("step")
        if step is not None:
            step = self.coerce(f"{key}.step", step, kind)
            if step <= 0:
                raise self.fail(f"{key}.step", f"must be > 0, got {step}")
            if log:
                raise self.fail(key, "step and log cannot be combined")
        if low > high:
            raise self.fail(key, f"low must be <= high, got low={low}, high={high}")
        if log and low <= 0:
            raise self.fail(f"{key}.low", f"must be > 0 on a log scale, got {low}")
        if step is not None and not _grid_size_ok(low, high, step):
            raise self.fail(f"{key}.step", f"{step:g} is too small for low = {low:g}, high = {high:g}: "
                            f"the grid would hold more than {MAX_GRID_POINTS:.0e} values")
        return ParamSpace(name, low=low, high=high, log=log, step=step)


def _example_choices(default: bool | str) -> str:
    if isinstance(default, bool):
        return "[false, true]"
    allowed = CHOICE_PARAMS.get(next(k for k, v in CHOICE_PARAMS.items() if default in v), ())
    return "[" + ", ".join(f'"{v}"' for v in allowed[:2]) + "]"


# A study file without a [space] table searches this (an empty [space] table searches nothing):
# optimisation, capacity, the stem, per-series normalisation and the summary branch, as
# benchmarks/accuracy.py measures.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "conv_stem": {"low": 0, "high": MAX_CONV_STEM},
    "instance_norm": {"choices": [False, True]},
    "hidden_dim": {"choices": [32, 64, 128]},
    "n_layers": {"low": 1, "high": 3},
    "dropout": {"low": 0.0, "high": 0.3},
    "batch_size": {"choices": [16, 32, 64]},
    "pooling": {"choices": ["max", "mean"]},
    "summary_features": {"choices": [False, True]},
}


def auto_patch_len(seq_len: int, *, tokens: int = 16) -> int:
    """patch_len 0 ("auto"): the largest power of two that still leaves at least `tokens` tokens."""
    p = 1
    while math.ceil(seq_len / (2 * p)) >= tokens:
        p *= 2
    return p


def with_data_defaults(cfg: StudyConfig, seq_len: int, stored: Mapping[str, Any] | None) -> StudyConfig:
    """The config a study runs with once its data's length is known.

    A study file without [space] whose patch_len is automatic also searches patch_len: cycle 1 runs
    the automatic patch for this length, and the space holds it and its neighbours (half, double).
    No single patch suits every data set (a short motif at a random position wants tokens of a few
    steps; aligned outlines scored better with longer ones), and the length is known only once the
    data is read. `stored`: the config stored on the study when it exists; a study made before this
    (its stored space without patch_len) keeps the definition it was made with.
    """
    if cfg.space_written or cfg.baseline.patch_len != 0 or any(p.name == "patch_len" for p in cfg.space):
        return cfg
    if stored is not None and "patch_len" not in (stored.get("space") or {}):
        return cfg
    p = auto_patch_len(seq_len)
    choices = tuple(sorted(v for v in {max(1, p // 2), p, 2 * p} if v <= seq_len))
    if len(choices) < 2:
        return cfg
    return dataclasses.replace(cfg, baseline=dataclasses.replace(cfg.baseline, patch_len=p),
                               space=(ParamSpace(name="patch_len", choices=choices), *cfg.space))


def default_space(baseline: Hyperparams) -> dict[str, dict[str, Any]]:
    """DEFAULT_SPACE widened to hold `baseline` (a default never contradicts the file's own values)."""
    out = {}
    for name, spec in DEFAULT_SPACE.items():
        value = getattr(baseline, name)
        if "choices" in spec:
            choices = list(dict.fromkeys([*spec["choices"], value]))
            if name == "hidden_dim":  # every width must split into the baseline's heads
                choices = [h for h in choices if baseline.n_heads > 0 and h % baseline.n_heads == 0]
                if baseline.hidden_dim not in choices:
                    continue  # an impossible baseline is reported under its own key
            out[name] = {"choices": sorted(choices)}
        else:
            out[name] = {**spec, "low": min(spec["low"], value), "high": max(spec["high"], value)}
    return out


def parse(raw: Mapping[str, Any], where: str = "<study>", *, check_files: bool = True,
          as_written: bool = True) -> StudyConfig:
    """Validate a parsed TOML document into a StudyConfig.

    ``as_written``: `raw` is what a person wrote, so a key that the file's own settings never read
    (a hyperband key under the median pruner, a column name for a .npz file) or that can never take
    effect is refused. A stored config (:func:`from_dict`) holds every key and was accepted when
    its study was created: it is checked as before, so an older study stays readable.
    """
    c = _Checker(where)
    allowed = [*_SECTIONS, "space"]
    for section in raw:
        if section not in allowed:
            raise c.fail(section, f"unknown section{_suggest(section, allowed)}; allowed: {', '.join(allowed)}")
    parts = {name: c.build(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    if "space" not in raw:  # the default space is widened to the baseline: a bad baseline is named first
        _validate_params(c, "baseline", parts["baseline"])
    raw_space = raw["space"] if "space" in raw else default_space(parts["baseline"])
    if not isinstance(raw_space, Mapping):
        raise c.fail("space", "must be a table of parameters")
    space = tuple(c.space_param(name, spec) for name, spec in raw_space.items())
    if as_written and not space:  # nothing to search: every trial would train the baseline to the same result
        if "n_trials" not in raw.get("study", {}):
            parts["study"] = dataclasses.replace(parts["study"], n_trials=1)
        elif parts["study"].n_trials > 1:
            raise c.fail("study.n_trials", _empty_space_repeats(parts["study"].n_trials))
    cfg = StudyConfig(space=space, path=None if where.startswith("<") else where, space_written="space" in raw, **parts)
    _validate(c, cfg, check_files, as_written)
    if as_written:
        _check_written(c, cfg, {name: set(raw.get(name, {})) for name in _SECTIONS})
    return cfg


def _validate(c: _Checker, cfg: StudyConfig, check_files: bool, as_written: bool = True) -> None:
    s, d, t, b = cfg.study, cfg.data, cfg.train, cfg.baseline
    if not s.name or not all(ch.isalnum() or ch in "-_." for ch in s.name):
        raise c.fail("study.name", f"must be letters, digits, '-', '_' or '.', got {s.name!r}")
    if s.name.startswith("."):  # '.', '..' or '.x' would name hidden files: '..db', '.-artifacts'
        raise c.fail("study.name", f"must not start with '.', got {s.name!r}")
    c.one_of("study.direction", s.direction, DIRECTIONS)
    c.at_least("study.n_trials", s.n_trials, 1)
    c.at_most("study.n_trials", s.n_trials, MAX_TRIALS, "trials in a study")
    c.at_least("study.ensemble", s.ensemble, 1)
    if not 0 <= s.seed < 2**32:  # numpy's and torch's generators take 32-bit unsigned seeds
        raise c.fail("study.seed", f"must be in 0..{2**32 - 1}, got {s.seed}")
    c.at_least("data.val_fraction", d.val_fraction, 0, strict=True)
    c.at_least("data.test_fraction", d.test_fraction, 0, strict=True)
    if d.val_fraction + d.test_fraction >= 0.9:
        raise c.fail("data", f"val_fraction + test_fraction must be < 0.9, got {d.val_fraction + d.test_fraction}")
    if d.source == "synthetic":
        c.at_least("data.n_samples", d.n_samples, 30)
        c.at_least("data.seq_len", d.seq_len, 4)
        c.at_least("data.n_features", d.n_features, 2)
        c.at_least("data.n_classes", d.n_classes, 2)
        if d.n_samples < 3 * d.n_classes:  # a class needs a series in each of train, validation and test
            raise c.fail("data.n_samples", f"must be >= 3 x n_classes = {3 * d.n_classes}, got {d.n_samples}")
        if as_written and (values := d.n_samples * d.seq_len * d.n_features) > MAX_SYNTHETIC_VALUES:
            raise c.fail("data", f"n_samples x seq_len x n_features must be <= {MAX_SYNTHETIC_VALUES:,} (the synthetic "
                         f"task is generated in memory), got {d.n_samples} x {d.seq_len} x {d.n_features} = {values:,}")
        c.at_least("data.noise", d.noise, 0)
    else:
        c.one_of("data.layout", d.layout, CSV_LAYOUTS)
        if d.label_column == d.sample_column:
            raise c.fail("data.label_column", f"must differ from data.sample_column, both are {d.label_column!r}")
        src = resolve_data_path(cfg)
        if src.suffix.lower() not in DATA_SUFFIXES:
            raise c.fail("data.source", f"must be 'synthetic' or a {SUFFIX_LIST} file, got {d.source!r}")
        if check_files and not src.is_file():
            raise c.fail("data.source", f"{_missing(src)}: {src}")
    if d.test_source is not None:
        if d.source == "synthetic":
            raise c.fail("data.test_source", "needs a data file in data.source (the synthetic task carves its own "
                         "test split)")
        test = resolve_test_path(cfg)
        if test.suffix.lower() not in DATA_SUFFIXES:
            raise c.fail("data.test_source", f"must be a {SUFFIX_LIST} file, got {d.test_source!r}")
        if check_files and not test.is_file():
            raise c.fail("data.test_source", f"{_missing(test)}: {test}")
    c.at_least("train.epochs", t.epochs, 1)
    # far past any training this tool runs: a typo that would otherwise run for good, silently
    if as_written:  # a study stored with more stays readable
        c.at_most("train.epochs", t.epochs, 100_000, "epochs per trial")
    c.one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    c.one_of("train.schedule", t.schedule, SCHEDULES)
    c.one_of("train.device", t.device, DEVICES)
    c.at_least("train.warmup_epochs", t.warmup_epochs, 0)
    if not 0 < t.cyclical_low_ratio <= 1:
        raise c.fail("train.cyclical_low_ratio", f"must be in (0, 1], got {t.cyclical_low_ratio}")
    c.at_least("train.cyclical_period_epochs", t.cyclical_period_epochs, 0, strict=True)
    for key in ("grad_clip", "augment_jitter", "augment_scale", "min_delta", "momentum"):
        c.at_least(f"train.{key}", getattr(t, key), 0)
    if t.momentum >= 1:
        raise c.fail("train.momentum", f"must be < 1, got {t.momentum}")
    if t.augment_scale >= 1:
        raise c.fail("train.augment_scale", f"must be < 1, got {t.augment_scale}")
    if not 0 <= t.label_smoothing < 1:
        raise c.fail("train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    c.one_of("train.class_weights", t.class_weights, CLASS_WEIGHTS)
    c.at_least("train.init_gain", t.init_gain, 0, strict=True)
    c.at_least("train.max_bad_batches", t.max_bad_batches, 1)
    c.at_least("train.early_stopping_patience", t.early_stopping_patience, 0)
    c.at_least("train.threads", t.threads, 0)
    c.at_least("train.pack", t.pack, 1)
    c.at_least("train.eval_batch_size", t.eval_batch_size, 1)
    c.at_least("train.min_epoch_samples", t.min_epoch_samples, 0)
    if as_written:
        c.at_most("train.eval_batch_size", t.eval_batch_size, 1_048_576, "series per evaluation batch")
        c.at_most("train.min_epoch_samples", t.min_epoch_samples, 10_000_000, "series drawn per epoch")
    _validate_params(c, "baseline", b)
    for p in cfg.space:
        _check_space_domain(c, p)
    for p in cfg.space:  # every choice must build a model, not only the baseline's
        for v in p.choices or (p.low, p.high):
            _validate_params(c, "space", dataclasses.replace(b, **{p.name: v}))
    if d.source == "synthetic":
        check_patch_len(cfg, d.seq_len)
    # with neither searched, the space check would name a key not in the file: the baseline one does
    if {p.name for p in cfg.space} & {"hidden_dim", "n_heads"}:
        _check_space_feasible(c, cfg)
    for p in cfg.space:
        _check_baseline_in_space(c, p, getattr(b, p.name))
    if b.hidden_dim % b.n_heads:
        raise c.fail("baseline.n_heads", f"{b.n_heads} does not divide hidden_dim {b.hidden_dim}")
    sp = cfg.sampler
    c.one_of("sampler.type", sp.type, SAMPLERS)
    c.one_of("sampler.fallback", sp.fallback, ("tpe", "random", "cmaes"))
    c.at_least("sampler.n_startup_trials", sp.n_startup_trials, 0)
    c.at_least("sampler.lr_factor", sp.lr_factor, 1, strict=True)
    c.at_least("sampler.noise_margin", sp.noise_margin, 0)
    c.at_least("sampler.plateau_cycles", sp.plateau_cycles, 1)
    pr = cfg.pruner
    c.one_of("pruner.type", pr.type, PRUNERS)
    c.at_least("pruner.n_startup_trials", pr.n_startup_trials, 0)
    if pr.n_warmup_steps != WARMUP_AUTO:
        c.at_least("pruner.n_warmup_steps", pr.n_warmup_steps, 0)
    if not 0 <= pr.percentile <= 100:
        raise c.fail("pruner.percentile", f"must be in [0, 100], got {pr.percentile}")
    c.at_least("pruner.min_resource", pr.min_resource, 1)
    c.at_least("pruner.reduction_factor", pr.reduction_factor, 2)
    c.at_least("pruner.patience", pr.patience, 0)
    c.at_least("pruner.min_delta", pr.min_delta, 0)
    if not 0 <= pr.warmup_fraction <= 1:
        raise c.fail("pruner.warmup_fraction", f"must be in [0, 1], got {pr.warmup_fraction}")
    c.at_least("pruner.margin", pr.margin, 0)
    c.at_least("pruner.early_margin", pr.early_margin, 0)
    if pr.type == "parent":
        c.at_least("pruner.patience", pr.patience, 1)


# Keys that only some settings read. Written for another setting they would do nothing, so they
# are refused like an unknown key, naming the setting that reads them.
# [pruner] keys by type, as objective.make_pruner builds the pruner. "none" reads none of them, and a
# file that switches pruning off may keep the settings of the pruner it switched off.
PRUNER_KEYS: dict[str, tuple[str, ...]] = {
    "median": ("n_startup_trials", "n_warmup_steps"),
    "percentile": ("percentile", "n_startup_trials", "n_warmup_steps"),
    "successive_halving": ("min_resource", "reduction_factor"),
    "hyperband": ("min_resource", "reduction_factor"),
    "patient": ("n_startup_trials", "n_warmup_steps", "patience", "min_delta"),
    "parent": ("warmup_fraction", "margin", "early_margin", "patience", "n_startup_trials"),
}
# [sampler] keys by type, as sampler.make_sampler builds the sampler (the cycle sampler's fallback
# reads n_startup_trials when it is tpe or cmaes)
SAMPLER_KEYS: dict[str, tuple[str, ...]] = {
    "cycle": ("lr_factor", "noise_margin", "plateau_cycles", "fallback", "n_startup_trials"),
    "reference": ("lr_factor",),
    "tpe": ("n_startup_trials",),
    "random": (),
    "cmaes": ("n_startup_trials",),
}
# [train] keys read under one optimizer or schedule only (train.make_optimizer, train.lr_factor)
TRAIN_KEYS_BY: dict[str, tuple[str, tuple[str, ...]]] = {  # key: (the setting, its values that read the key)
    "momentum": ("optimizer", ("sgd",)),
    "warmup_epochs": ("schedule", tuple(s for s in SCHEDULES if s != "onecycle")),  # onecycle warms up on its own
    "cyclical_low_ratio": ("schedule", ("cyclical",)),
    "cyclical_period_epochs": ("schedule", ("cyclical",)),
}
# [data] keys only a .csv file reads (data.load_csv), and what they set there
CSV_ONLY_KEYS = {"label_column": "columns to name", "sample_column": "columns to name", "layout": "a layout to choose"}
SYNTHETIC_ONLY_KEYS = ("n_samples", "seq_len", "n_features", "n_classes", "noise")  # a data file has its own


def _check_written(c: _Checker, cfg: StudyConfig, written: dict[str, set[str]]) -> None:
    """What the file writes takes effect: no key its own settings never read, no setting that can
    never act (see `parse`'s ``as_written``)."""
    st, d, t, sp, pr = cfg.study, cfg.data, cfg.train, cfg.sampler, cfg.pruner
    if len(st.name.encode()) > MAX_NAME:
        raise c.fail("study.name", f"at most {MAX_NAME} characters (UTF-8 bytes: it names the study's database and "
                     f"artifact folder), got {len(st.name.encode())}")
    for key in ("storage", "artifact_dir"):
        if key in written["study"] and not getattr(st, key).strip():
            raise c.fail(f"study.{key}", "is empty; leave the key out for the default (beside the study file)")
    if "storage" in written["study"]:
        remember(st.storage)  # its password is masked wherever it turns up, even when --storage overrides it
    if "storage" in written["study"] and (problem := sqlite_host_problem(st.storage)):
        raise c.fail("study.storage", f"{mask(st.storage)!r}: {problem}")
    for key in CSV_ONLY_KEYS:
        if key in written["data"]:
            _check_csv_key(c, cfg, key)
    for key in SYNTHETIC_ONLY_KEYS:
        if key in written["data"] and d.source != "synthetic":
            raise c.fail(f"data.{key}", f"only the synthetic task reads it, and data.source is the file {d.source!r} "
                         "(its size, length, features and classes are the file's own); remove the key")
    if d.test_source is not None and _same_path(train := resolve_data_path(cfg), test := resolve_test_path(cfg)):
        raise c.fail("data.test_source", f"is the training file itself ({d.source}): a test split must be held out; "
                     "leave test_source out to carve one from data.source")
    if d.test_source is not None and _same_content(train, test):
        raise c.fail("data.test_source", f"has the same content as the training file ({d.source}): a test split must "
                     "be held out; leave test_source out to carve one from data.source")
    for key, (setting, readers) in TRAIN_KEYS_BY.items():
        value = getattr(t, setting)
        if key in written["train"] and value not in readers:
            why = " (which has its own warm-up: the first 30% of the steps)" if value == "onecycle" else ""
            raise c.fail(f"train.{key}", f"not used by {setting} = {value!r}{why}; it is a setting of "
                         f"{setting} {', '.join(readers)}")
    # equal is a warm-up over the whole run, reaching lr at its last step; longer never reaches lr
    if t.schedule != "onecycle" and t.warmup_epochs > t.epochs:
        raise c.fail("train.warmup_epochs", f"{t.warmup_epochs:g} is longer than the training (train.epochs = "
                     f"{t.epochs}): the learning rate would never reach lr; at most {t.epochs}")
    for p in cfg.space:
        _check_grid(c, p, getattr(cfg.baseline, p.name))
    for key in [f.name for f in dataclasses.fields(SamplerConfig) if f.name in written["sampler"] - {"type"}]:
        if key == "n_startup_trials" and sp.type == "cycle" and sp.fallback == "random":
            raise c.fail("sampler.n_startup_trials", "not used by type = 'cycle' with fallback = 'random'; it is a "
                         "setting of type tpe, cmaes (and of type cycle with fallback tpe or cmaes)")
        if key not in SAMPLER_KEYS[sp.type]:
            users = [k for k, keys in SAMPLER_KEYS.items() if key in keys]
            reads = ", ".join(SAMPLER_KEYS[sp.type]) or "no other key"
            raise c.fail(f"sampler.{key}", f"not used by type = {sp.type!r} (which reads {reads}); it is a "
                         f"setting of type {', '.join(users)}")
    if pr.type == "none":
        return
    keys = PRUNER_KEYS[pr.type]
    for key in [f.name for f in dataclasses.fields(PrunerConfig) if f.name in written["pruner"] - {"type"}]:
        if key not in keys:
            users = [k for k, ks in PRUNER_KEYS.items() if key in ks]
            raise c.fail(f"pruner.{key}", f"not used by type = {pr.type!r} (which reads {', '.join(keys)}); it is a "
                         f"setting of type {', '.join(users)}")
    _check_pruner_reach(c, pr, t.epochs, written["pruner"])


def _same_content(a: Path | None, b: Path | None) -> bool:
    """Two readable files with the same bytes (a copy of the training file given as the test file); an
    empty file is left to the data checks."""
    try:
        return (a is not None and b is not None and a.is_file() and b.is_file()
                and 0 < a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))
    except OSError:  # unreadable: reading the data says so
        return False


def _same_path(a: Path | None, b: Path | None) -> bool:
    """Two data paths name one file (the same path, or both existing and the same file)."""
    if a is None or b is None:
        return False
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


MAX_SYNTHETIC_VALUES = 2**30  # the synthetic task's N x T x F: 4 GiB as float32, ~27 GiB while it is made
SYNTHETIC_BYTES_PER_VALUE = 32  # make_synthetic's peak (measured: ~27 bytes a value), for run's memory check
MAX_GRID_POINTS = 1e12  # a stepped range's values; beyond it (high - low) / step loses integer precision


def _grid_size_ok(low: float, high: float, step: float) -> bool:
    """(high - low) / step is a finite count of at most MAX_GRID_POINTS (5e-324 would overflow it)."""
    try:
        n = (high - low) / step
    except OverflowError:  # ints too large for a float
        return False
    return math.isfinite(n) and n <= MAX_GRID_POINTS


def _check_grid(c: _Checker, p: ParamSpace, baseline: Any) -> None:
    """A stepped range reaches its high bound and holds the baseline (Optuna would silently move both)."""
    if p.step is None or p.low is None or p.high is None:
        return

    def on_grid(value: float) -> bool:
        k = (value - p.low) / p.step
        return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))

    if not on_grid(p.high):
        last = p.low + math.floor((p.high - p.low) / p.step + 1e-9) * p.step
        raise c.fail(f"space.{p.name}.step", f"{p.step:g} does not divide high - low: the grid from {p.low:g} stops at "
                     f"{last:g}, short of high = {p.high:g}")
    if not on_grid(baseline):
        below = p.low + math.floor((baseline - p.low) / p.step) * p.step
        raise c.fail(f"baseline.{p.name}", f"{baseline:g} is not on the space's grid (from {p.low:g} in steps of "
                     f"{p.step:g}): the nearest values are {below:g} and {below + p.step:g}")


def _check_csv_key(c: _Checker, cfg: StudyConfig, key: str) -> None:
    """`data.<key>` is read from .csv files only: the data (or test) file must be one."""
    d, what = cfg.data, CSV_ONLY_KEYS[key]
    if d.source == "synthetic":
        raise c.fail(f"data.{key}", f"only a .csv data file has {what}, and data.source is the synthetic task")
    files = [("data.source", d.source), *([("data.test_source", d.test_source)] if d.test_source else [])]
    if any(Path(f).suffix.lower() == ".csv" for _, f in files):
        return
    kinds = " and ".join(f"{k} {f!r} is a {Path(f).suffix.lower()} file" for k, f in files)
    raise c.fail(f"data.{key}", f"only a .csv data file has {what}, and {kinds}")


def _check_pruner_reach(c: _Checker, pr: PrunerConfig, epochs: int, written: set[str]) -> None:
    """A written warm-up (or patience) that leaves the pruner no epoch to stop a trial at is refused.

    A trial is never stopped after its last epoch (objective), so a pruner can act after epochs
    1 .. epochs - 1; a one-epoch study has nothing to prune whatever the keys, and is left alone.
    """
    if epochs < 2:
        return
    first = {  # the 0-based epoch after which the pruner may first stop a trial, by key
        "n_warmup_steps": pr.n_warmup_steps,  # optuna: no pruning while step < n_warmup_steps
        "min_resource": pr.min_resource,  # successive halving's first rung, hyperband's first bracket
        "warmup_fraction": math.ceil(pr.warmup_fraction * epochs),  # as ParentCurvePruner computes it
        # parent: `patience` reported epochs behind; optuna's PatientPruner: more than patience + 1 steps
        "patience": pr.patience - 1 if pr.type == "parent" else pr.patience + 1,
    }
    for key, step in first.items():
        if key in written and step != WARMUP_AUTO and step > epochs - 2:  # "auto" adapts to any epochs
            raise c.fail(f"pruner.{key}", f"{getattr(pr, key)} leaves no epoch to prune: the {pr.type} pruner would "
                         f"first stop a trial at epoch {step + 1}, and with train.epochs = {epochs} the last epoch "
                         f"a trial can be stopped at is {epochs - 1} (never its last)")


# what each hyperparameter may be: (low, low excluded, high, high excluded); None = unbounded
# (low, low open, high, high open). The highs are far beyond a small transformer, yet stop a typo
# (hidden_dim = 1000000000000) before it is a study whose trials exhaust memory or never build.
_DOMAINS: dict[str, tuple[float, bool, float | None, bool]] = {
    "lr": (0, True, 10, False),
    "batch_size": (1, False, 2**20, False),
    "hidden_dim": (1, False, 16384, False),
    "n_layers": (1, False, 128, False),
    "n_heads": (1, False, 1024, False),
    "dropout": (0, False, 1, True),
    "weight_decay": (0, False, None, False),
    "patch_len": (0, False, None, False),  # 0: chosen from the sequence length
}


def _check_domain(c: _Checker, key: str, name: str, value: Any) -> None:
    """`value` of hyperparameter `name` is one the model can take (unknown names: not checked)."""
    if name not in _DOMAINS or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return
    low, low_open, high, high_open = _DOMAINS[name]
    if value < low or (low_open and value == low) or (high is not None and (value > high or (high_open and value == high))):
        lo, hi = "(" if low_open else "[", ")" if high_open or high is None else "]"
        raise c.fail(key, f"{name} must be in {lo}{low}, {'inf' if high is None else high}{hi}, got {value}")


def _validate_params(c: _Checker, section: str, hp: Hyperparams) -> None:
    for name in _DOMAINS:
        if hasattr(hp, name):
            _check_domain(c, f"{section}.{name}", name, getattr(hp, name))
    if not 0 <= hp.conv_stem <= MAX_CONV_STEM:
        raise c.fail(f"{section}.conv_stem", f"must be in 0..{MAX_CONV_STEM}, got {hp.conv_stem}")
    for name, allowed in CHOICE_PARAMS.items():
        c.one_of(f"{section}.{name}", getattr(hp, name), allowed)


def _check_space_domain(c: _Checker, p: ParamSpace) -> None:
    if p.choices is not None:
        for value in p.choices:
            _check_domain(c, f"space.{p.name}.choices", p.name, value)
    else:
        _check_domain(c, f"space.{p.name}.low", p.name, p.low)
        _check_domain(c, f"space.{p.name}.high", p.name, p.high)


def check_patch_len(cfg: StudyConfig, seq_len: int) -> None:
    """A patch longer than the task's sequences is a ConfigError naming the key (files: checked on load)."""
    c = _Checker(cfg.path or "<study>")
    if cfg.baseline.patch_len > seq_len:
        raise c.fail("baseline.patch_len", f"{cfg.baseline.patch_len} is longer than the sequences ({seq_len} steps)")
    for p in cfg.space:
        if p.name == "patch_len" and max(p.choices or (p.high,)) > seq_len:
            raise c.fail("space.patch_len", f"{max(p.choices or (p.high,))} is longer than the sequences ({seq_len} steps)")


def _missing(path: Path) -> str:
    """Why `path`, which is not a regular file, cannot be read as one."""
    if path.exists():
        return "not a file"
    return "a symbolic link to nothing (broken or looping)" if path.is_symlink() else "file not found"


def _check_baseline_in_space(c: _Checker, p: ParamSpace, value: Any) -> None:
    if p.choices is not None:
        if value not in p.choices:
            raise c.fail(f"baseline.{p.name}", f"{value} is outside the space: choices are {list(p.choices)}")
    elif not p.low <= value <= p.high:
        raise c.fail(f"baseline.{p.name}", f"{value} is outside the space [{p.low}, {p.high}]")


def param_values(cfg: StudyConfig, name: str) -> tuple[Any, ...]:
    """The values parameter `name` takes: its space's choices or integer range (() when that range is
    too wide to list), else the baseline's."""
    for p in cfg.space:
        if p.name == name:
            if p.choices is not None:
                return p.choices
            return tuple(range(int(p.low), int(p.high) + 1)) if p.high - p.low <= 4096 else ()
    return (getattr(cfg.baseline, name),)


def _check_space_feasible(c: _Checker, cfg: StudyConfig) -> None:
    hidden, heads = param_values(cfg, "hidden_dim"), param_values(cfg, "n_heads")
    if hidden and heads and not any(h % n == 0 for h in hidden for n in heads):
        searched = {p.name for p in cfg.space}
        raise c.fail("space.n_heads" if "n_heads" in searched else "space.hidden_dim", f"no choice of n_heads {list(heads)} divides any hidden_dim {list(hidden)}")
    listed = {p.name for p in cfg.space if p.choices is not None}  # a range may hold values no partner fits
    if hidden and heads and "n_heads" in listed:
        for n in heads:
            if not any(h % n == 0 for h in hidden):
                raise c.fail("space.n_heads.choices", f"{n} divides no hidden_dim {list(hidden)}: it could never be tried")
    if hidden and heads and "hidden_dim" in listed:
        for h in hidden:
            if not any(h % n == 0 for n in heads):
                raise c.fail("space.hidden_dim.choices", f"{h} is divided by no n_heads {list(heads)}: it could never be tried")


def _data_not_study(path: Path) -> str:
    """A data file given where a study file goes (it read as neither UTF-8 nor TOML)."""
    return (f"{path}: a data file, not a study file: give the study file (.toml) whose [data] source names it, e.g. "
            f"[study] name = \"mine\" and [data] source = \"{path.name}\" (see studies/quick.toml and docs/data.md)")


def load(path: str | Path, *, check_files: bool = True) -> StudyConfig:
    """Read and validate a study file. ``check_files=False`` (commands that only read a study:
    its definition is stored on it) accepts data files that are no longer where it says."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or device would block the read
        raise ConfigError(f"{path}: not a regular file (a pipe or a device); give the study file itself")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors may start the file with a byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except UnicodeDecodeError as e:
        if path.suffix.lower() in DATA_SUFFIXES:
            raise ConfigError(_data_not_study(path)) from None
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read study file: {e.strerror}") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        if path.suffix.lower() in DATA_SUFFIXES:
            raise ConfigError(_data_not_study(path)) from e
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    if not raw:  # an empty file is a mistake, not a request for an all-default study
        raise ConfigError(f"{path}: the study file is empty; give at least [study] name "
                          "(see studies/quick.toml)")
    return parse(raw, str(path), check_files=check_files)


def from_dict(d: Mapping[str, Any]) -> StudyConfig:
    """Rebuild a config stored on a study by :meth:`StudyConfig.to_dict`."""
    raw = {k: v for k, v in d.items() if k in (*_SECTIONS, "space")}
    raw["study"] = {k: v for k, v in raw.get("study", {}).items() if v is not None}
    raw = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if k != "space" else v) for k, v in raw.items()}
    return parse(raw, "<stored study config>", check_files=False, as_written=False)


def resolve_data_path(cfg: StudyConfig) -> Path | None:
    """The data file, relative to the study file; None for the synthetic task."""
    if cfg.data.source == "synthetic":
        return None
    src = Path(cfg.data.source)
    if cfg.path and not src.is_absolute():
        src = Path(cfg.path).parent / src
    return src


def resolve_test_path(cfg: StudyConfig) -> Path | None:
    """The official test file, relative to the study file; None when the test split is carved from the data."""
    if cfg.data.test_source is None:
        return None
    src = Path(cfg.data.test_source)
    if cfg.path and not src.is_absolute():
        src = Path(cfg.path).parent / src
    return src


def study_dir(cfg: StudyConfig) -> Path:
    """Where a study's local files go: beside its study file, else ./studies."""
    return Path(cfg.path).parent if cfg.path else Path("studies")


def resolve_artifact_dir(cfg: StudyConfig) -> Path:
    """Directory of the study's artifacts (checkpoints, saved models)."""
    if cfg.study.artifact_dir:
        path = Path(cfg.study.artifact_dir)
        return path if path.is_absolute() or not cfg.path else Path(cfg.path).parent / path
    return study_dir(cfg) / f"{cfg.study.name}-artifacts"


def _empty_space_repeats(n: int) -> str:
    return (f"{n} trials of an empty [space] would train the baseline again with the same result each time; "
            "use 1, or name parameters to search in [space]")


def override(cfg: StudyConfig, **study_fields: Any) -> StudyConfig:
    """A copy with [study] fields replaced (n_trials, storage from the command line)."""
    changes = {k: v for k, v in study_fields.items() if v is not None}
    if "n_trials" in changes:
        changes["n_trials"] = check_n_trials(changes["n_trials"], "n_trials")
    if not cfg.space and changes.get("n_trials", 1) > 1:
        raise ConfigError(f"--n-trials: {_empty_space_repeats(changes['n_trials'])}")
    return dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, **changes)) if changes else cfg
