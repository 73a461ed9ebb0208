"""Study file parsing: every error names file, key and what is allowed; nothing else is touched."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from cycle_optuna import config
from cycle_optuna.errors import ConfigError
from workers_helpers import drop_synthetic_keys

ROOT = Path(__file__).resolve().parents[1]
QUICK = (ROOT / "studies" / "quick.toml").read_text()


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(text: str, section: str, line: str) -> str:
    """QUICK with `line` added at the top of [section] (replacing a key of the same name); a data
    file as `data.source` drops the keys only the synthetic task reads."""
    key = line.split("=")[0].strip()
    if section == "data" and key == "source" and "synthetic" not in line:
        text = drop_synthetic_keys(text)
    lines, out, current = text.splitlines(), [], None
    for ln in lines:
        header = re.match(r"^\[(\w+)\]", ln)
        if header:
            current = header.group(1)
            out.append(ln)
            if current == section:
                out.append(line)
            continue
        if current == section and ln.split("=")[0].strip() == key:
            continue
        out.append(ln)
    if section not in {re.match(r"^\[(\w+)\]", ln).group(1) for ln in lines if re.match(r"^\[(\w+)\]", ln)}:
        out += [f"[{section}]", line]
    return "\n".join(out) + "\n"


def test_shipped_study_files_load():
    seed = config.load(ROOT / "studies" / "seed.toml")
    assert (seed.baseline.hidden_dim, seed.baseline.n_layers, seed.baseline.n_heads) == (64, 2, 4)
    assert (seed.baseline.lr, seed.baseline.batch_size, seed.baseline.dropout) == (5e-4, 32, 0.1)
    space = {p.name: p for p in seed.space}
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-4, 1e-2, True)
    assert (space["n_layers"].low, space["n_layers"].high) == (1, 6)
    assert space["hidden_dim"].choices == (32, 64, 128, 256)
    assert space["n_heads"].choices == (2, 4, 8)
    assert space["batch_size"].choices == (16, 32, 64, 128)
    assert (space["dropout"].low, space["dropout"].high) == (0.0, 0.5)
    quick = config.load(ROOT / "studies" / "quick.toml")
    assert [p.name for p in quick.space] == [p.name for p in seed.space]


def test_config_is_frozen():
    cfg = config.parse({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.study.name = "x"  # type: ignore[misc]


def test_to_dict_round_trips():
    cfg = config.load(ROOT / "studies" / "seed.toml")
    again = config.from_dict(cfg.to_dict())
    assert again.trial_definition() == cfg.trial_definition()
    assert again.space == cfg.space


@pytest.mark.parametrize(
    ("section", "line", "pattern"),
    [
        ("train", "epoch = 3", r"train\.epoch: unknown key \(did you mean 'epochs'\?\)"),
        ("study", "n_trails = 3", r"study\.n_trails: unknown key \(did you mean 'n_trials'\?\)"),
        ("train", "epochs = 'ten'", r"train\.epochs: must be an integer, got 'ten'"),
        ("train", "grad_clip = true", r"train\.grad_clip: must be a number"),
        ("train", "compile = 1", r"train\.compile: must be true or false"),
        ("train", "compile = 'graphs'", r"train\.compile: must be true or false, or 'cudagraphs', got 'graphs'"),
        ("train", "pack = 0", r"train\.pack: must be >= 1, got 0"),
        ("space", "lr = { low = 1e-2, high = 1e-4, log = true }", r"space\.lr: low must be <= high"),
        ("space", "lr = { low = 0.0, high = 1e-2, log = true }", r"space\.lr\.low: must be > 0 on a log scale"),
        ("space", "hidden_dim = { choices = [] }", r"space\.hidden_dim\.choices: must be a non-empty list"),
        ("space", "n_layer = { low = 1, high = 2 }", r"space\.n_layer: unknown parameter \(did you mean 'n_layers'\?\)"),
        ("space", "n_layers = { low = 1.5, high = 2 }", r"space\.n_layers\.low: must be an integer"),
        ("space", "n_layers = { low = 1, hi = 2 }", r"space\.n_layers\.hi: unknown key \(did you mean 'high'\?\)"),
        ("baseline", "lr = 0.5", r"baseline\.lr: 0\.5 is outside the space"),
        ("study", "name = '..'", r"study\.name: must not start with '\.', got '\.\.'"),
        # sizes far past a small transformer are typos: refused before a trial exhausts memory
        ("baseline", "hidden_dim = 1000000000000", r"baseline\.hidden_dim: hidden_dim must be in \[1, 16384\]"),
        ("space", "n_layers = { low = 1, high = 100000 }", r"space\.n_layers\.high: n_layers must be in \[1, 128\]"),
        ("space", "lr = { low = 1e-4, high = 1e308, log = true }", r"space\.lr\.high: lr must be in \(0, 10\]"),
        ("baseline", "hidden_dim = 64", r"baseline\.hidden_dim: 64 is outside the space: choices are \[16, 32\]"),
        ("baseline", "n_heads = 3", r"baseline\.n_heads: 3 is outside the space"),
        ("train", "epochs = 99999999999999999999", r"train\.epochs: must be <= 100000 \(epochs per trial\)"),
        ("train", "min_epoch_samples = 1000000000000", r"train\.min_epoch_samples: must be <= 10000000"),
        ("train", "eval_batch_size = 1000000000000", r"train\.eval_batch_size: must be <= 1048576"),
        ("space", "n_heads = { choices = [3, 5] }", r"no choice of n_heads \[3, 5\] divides any hidden_dim"),
        # each listed choice must fit some partner: one that fits none would fail every trial that draws it
        ("space", "n_heads = { choices = [2, 5] }", r"space\.n_heads\.choices: 5 divides no hidden_dim \[16, 32\]: "
                                                  r"it could never be tried"),
        ("space", "hidden_dim = { choices = [16, 15] }", r"space\.hidden_dim\.choices: 15 is divided by no n_heads "
                                                       r"\[2, 4\]: it could never be tried"),
        ("sampler", "type = 'tpee'", r"sampler\.type: 'tpee' is not one of .*tpe.* \(did you mean 'tpe'\?\)"),
        ("pruner", "type = 'medain'", r"pruner\.type: 'medain' is not one of .* \(did you mean 'median'\?\)"),
        ("train", "optimizer = 'adamx'", r"train\.optimizer: 'adamx' is not one of adamw, adam, sgd, lion, sophia"),
        ("train", "schedule = 'cosin'", r"train\.schedule: 'cosin' is not one of .* \(did you mean 'cosine'\?\)"),
        ("train", "class_weights = 'balance'", r"train\.class_weights: 'balance' is not one of none, balanced \(did you mean 'balanced'\?\)"),
        ("data", "source = 'missing.npz'", r"data\.source: file not found: .*missing\.npz"),
        ("data", "source = 'data.parquet'", r"data\.source: must be 'synthetic' or a \.npz/\.csv/\.ts/\.arff/\.tsv/\.txt file"),
        ("data", "test_source = 'test.npz'", r"data\.test_source: needs a data file in data\.source"),
        ("data", "source = 'd.csv'\nlayout = 'tall'", r"data\.layout: 'tall' is not one of long, wide"),
        ("study", "n_trials = 0", r"study\.n_trials: must be >= 1, got 0"),
        ("study", "n_trials = 99999999999999999999", r"study\.n_trials: must be <= 1000000 \(trials in a study\)"),
        ("study", "ensemble = 0", r"study\.ensemble: must be >= 1, got 0"),
        ("pruner", "percentile = 150.0", r"pruner\.percentile: must be in \[0, 100\], got 150\.0"),
        ("pruner", "early_margin = -0.2", r"pruner\.early_margin: must be >= 0, got -0\.2"),
        ("baseline", "dropout = 1.0", r"baseline\.dropout"),
        ("study", "seed = -5", r"study\.seed: must be in 0\.\.4294967295, got -5"),
        ("study", "seed = 4294967296", r"study\.seed: must be in 0\.\.4294967295, got 4294967296"),
        ("train", "momentum = 2.0", r"train\.momentum: must be < 1, got 2\.0"),
        ("data", "n_classes = 200", r"data\.n_samples: must be >= 3 x n_classes = 600, got 480"),
        ("space", "dropout = { low = 0.0, high = 1.5 }", r"space\.dropout\.high: dropout must be in \[0, 1\), got 1\.5"),
        ("space", "batch_size = { choices = [-8, 32] }", r"space\.batch_size\.choices: batch_size must be in \[1, 1048576\], got -8"),
        ("space", "lr = { low = -1e-3, high = 1e-2 }", r"space\.lr\.low: lr must be in \(0, 10\], got -0\.001"),
        ("space", "n_layers = { low = 0, high = 3 }", r"space\.n_layers\.low: n_layers must be in \[1, 128\], got 0"),
        ("space", "hidden_dim = { choices = [0, 16] }", r"space\.hidden_dim\.choices: hidden_dim must be in \[1, 16384\]"),
        ("space", "weight_decay = { low = -0.1, high = 0.1 }", r"space\.weight_decay\.low: weight_decay must be in \[0, inf\)"),
        # written keys that never take effect (QUICK: 5 epochs, sampler tpe, pruner parent)
        ("train", "warmup_epochs = 6.0", r"train\.warmup_epochs: 6 is longer than the training \(train\.epochs = 5\): "
                                         r"the learning rate would never reach lr; at most 5"),
        ("train", "momentum = 0.5", r"train\.momentum: not used by optimizer = 'adamw'; it is a setting of optimizer sgd$"),
        ("train", "cyclical_low_ratio = 0.5", r"train\.cyclical_low_ratio: not used by schedule = 'cosine'; it is a setting "
                                              r"of schedule cyclical$"),
        ("sampler", "lr_factor = 3.0", r"sampler\.lr_factor: not used by type = 'tpe' \(which reads n_startup_trials\); "
                                       r"it is a setting of type cycle, reference$"),
        ("pruner", "reduction_factor = 3", r"pruner\.reduction_factor: not used by type = 'parent' \(which reads "
                                           r"warmup_fraction, .*\); it is a setting of type successive_halving, hyperband$"),
        ("pruner", "warmup_fraction = 0.7", r"pruner\.warmup_fraction: 0\.7 leaves no epoch to prune: the parent pruner "
                                            r"would first stop a trial at epoch 5, and with train\.epochs = 5 the last "
                                            r"epoch a trial can be stopped at is 4 \(never its last\)"),
        ("pruner", "patience = 5", r"pruner\.patience: 5 leaves no epoch to prune: the parent pruner would first stop"),
        ("data", "label_column = 'y'", r"data\.label_column: only a \.csv data file has columns to name, and data\.source "
                                       r"is the synthetic task"),
        ("study", "storage = ''", r"study\.storage: is empty; leave the key out for the default"),
        ("study", "artifact_dir = ' '", r"study\.artifact_dir: is empty"),
        ("study", f"name = '{'n' * 201}'", r"study\.name: at most 200 characters \(UTF-8 bytes: .*\), got 201"),
        ("space", "hidden_dim = { low = 16, high = 40, step = 16 }",
         r"space\.hidden_dim\.step: 16 does not divide high - low: the grid from 16 stops at 32, short of high = 40"),
        ("space", "dropout = { low = 0.0, high = 0.3, step = 0.2 }", r"space\.dropout\.step: 0\.2 does not divide"),
        # a grid too fine to count: (high - low) / step overflowed into a traceback
        ("space", "dropout = { low = 0.0, high = 0.3, step = 5e-324 }",
         r"space\.dropout\.step: 4\.94066e-324 is too small for low = 0, high = 0\.3: the grid would hold more than 1e\+12 values"),
        ("space", "weight_decay = { low = 0.0, high = 1e300, step = 1e-300 }", r"space\.weight_decay\.step: 1e-300 is too small"),
        # the synthetic task is made in memory: a size past it was a MemoryError, exit 1
        ("data", "n_samples = 9223372036854775807",
         r"data: n_samples x seq_len x n_features must be <= 1,073,741,824 \(the synthetic task is generated in memory\), "
         r"got 9223372036854775807 x \d+ x \d+ = [\d,]+$"),
        ("data", "seq_len = 100000000", r"data: n_samples x seq_len x n_features must be <= 1,073,741,824"),
    ],
)
def test_bad_study_file_names_file_key_and_allowed(tmp_path, section, line, pattern):
    path = write(tmp_path, edit(QUICK, section, line))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_bad_baseline_is_named_before_the_default_space_widens_to_it(tmp_path):
    # without [space] the default space is widened to hold the baseline: lr = 0 is the baseline's mistake
    path = write(tmp_path, "[study]\nname = 'x'\n[baseline]\nlr = 0\n")
    with pytest.raises(ConfigError, match=r"baseline\.lr: lr must be in \(0, 10\], got 0"):
        config.load(path)


def test_label_and_sample_columns_differ(tmp_path):
    (tmp_path / "d.csv").write_text("sample,label,f0\ns0,a,1\n")
    text = QUICK.replace('source = "synthetic"', 'source = "d.csv"\nlabel_column = "sample"')
    with pytest.raises(ConfigError, match=r"data\.label_column: must differ from data\.sample_column, both are 'sample'"):
        config.load(write(tmp_path, text))


def test_study_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + QUICK.encode())  # as Windows editors save "UTF-8 with BOM"
    assert config.load(path).study.name == config.load(write(tmp_path, QUICK)).study.name


def test_compile_takes_cudagraphs_and_pack_a_size(tmp_path):
    cfg = config.load(write(tmp_path, edit(edit(QUICK, "train", "compile = 'cudagraphs'"), "train", "pack = 8")))
    assert cfg.train.compile == "cudagraphs" and cfg.train.pack == 8
    assert config.from_dict(cfg.to_dict()).train == cfg.train


def test_a_data_source_that_is_a_broken_or_looping_link_says_so(tmp_path):
    (tmp_path / "loop.npz").symlink_to("loop.npz")
    (tmp_path / "gone.npz").symlink_to("nowhere.npz")
    for name in ("loop.npz", "gone.npz"):
        with pytest.raises(ConfigError, match=rf"data\.source: a symbolic link to nothing \(broken or looping\): .*{name}"):
            config.load(write(tmp_path, edit(QUICK, "data", f"source = '{name}'")))


def test_baseline_heads_must_divide_hidden(tmp_path):
    text = edit(edit(edit(QUICK, "baseline", "n_heads = 3"), "space", "n_heads = { choices = [2, 3, 4] }"),
                "space", "hidden_dim = { choices = [16, 32, 48] }")  # 3 heads fit 48, not the baseline's 32
    with pytest.raises(ConfigError, match=r"baseline\.n_heads: 3 does not divide hidden_dim 32"):
        config.load(write(tmp_path, text))


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"sampeler: unknown section \(did you mean 'sampler'\?\)"):
        config.load(write(tmp_path, QUICK + "\n[sampeler]\ntype = 'tpe'\n"))


def test_broken_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"s\.toml: not valid TOML"):
        config.load(write(tmp_path, "[study\nname = 1"))
    with pytest.raises(ConfigError, match=r"nope\.toml: study file not found"):
        config.load(tmp_path / "nope.toml")


def test_a_data_file_given_for_the_study_file_is_named_as_one(tmp_path):
    """`best data.npz` said "not a UTF-8 text file ...; save it as UTF-8" (re-save the data?), and
    `run data.csv` "not valid TOML"."""
    import numpy as np

    np.savez(tmp_path / "d.npz", X=np.zeros((2, 3, 1)), y=np.array([0, 1]))
    (tmp_path / "d.csv").write_text("sample,label,f0\ns0,a,1\n")
    for name in ("d.npz", "d.csv"):
        with pytest.raises(ConfigError, match=rf"{name}: a data file, not a study file: give the study file \(\.toml\) "
                                              rf"whose \[data\] source names it, e\.g\. \[study\] name = \"mine\" and "
                                              rf"\[data\] source = \"{name}\""):
            config.load(tmp_path / name)
    assert config.load(write(tmp_path, QUICK, "study.txt")).study.name == "quick"  # a study file is one, whatever its suffix


def test_data_path_is_relative_to_the_study_file(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    cfg = config.load(write(tmp_path, edit(QUICK, "data", "source = 'd.npz'")))
    assert config.resolve_data_path(cfg) == tmp_path / "d.npz"
    assert cfg.to_dict()["data"]["source"] == str((tmp_path / "d.npz").resolve())


def test_override_changes_only_study_fields():
    cfg = config.parse({})
    changed = config.override(cfg, n_trials=7, storage=None)
    assert changed.study.n_trials == 7
    assert changed.trial_definition() == cfg.trial_definition()


def test_an_empty_space_trains_the_baseline_once(tmp_path):
    """Nothing to search: training is seeded, so a second trial would repeat the first exactly."""
    cfg = config.load(write(tmp_path, "[study]\nname = 'x'\n[space]\n"))
    assert (cfg.space, cfg.study.n_trials) == ((), 1)
    with pytest.raises(ConfigError, match=r"s\.toml: study\.n_trials: 3 trials of an empty \[space\]"):
        config.load(write(tmp_path, "[study]\nname = 'x'\nn_trials = 3\n[space]\n"))
    with pytest.raises(ConfigError, match=r"--n-trials: 2 trials of an empty \[space\]"):
        config.override(cfg, n_trials=2)
    assert config.override(cfg, n_trials=1).study.n_trials == 1
    assert config.parse({}).study.n_trials == 20  # no [space] table: the default space, the default total


def test_reference_study_matches_seed_but_for_its_sampler():
    seed = config.load(ROOT / "studies" / "seed.toml")
    ref = config.load(ROOT / "studies" / "reference.toml")
    assert (seed.sampler.type, ref.sampler.type) == ("cycle", "reference")
    assert ref.trial_definition() == seed.trial_definition()


def test_an_impossible_baseline_names_the_baseline_key_when_nothing_is_searched(tmp_path):
    text = "[study]\nname = 'x'\n[baseline]\nhidden_dim = 64\nn_heads = 1000\n"
    with pytest.raises(ConfigError, match=r"baseline\.n_heads: 1000 does not divide hidden_dim 64"):
        config.load(write(tmp_path, text))


def test_the_stored_config_holds_no_password(tmp_path):
    text = "[study]\nname = 'x'\nstorage = 'postgresql+psycopg://alice:s3c@ret@db/optuna'\n"
    stored = config.load(write(tmp_path, text)).to_dict()
    assert stored["study"]["storage"] == "postgresql+psycopg://alice:***@db/optuna"


def test_the_stored_config_holds_no_password_the_url_pattern_alone_would_miss(tmp_path):
    # a quote in the password: the URL pattern stops before it; --storage overriding the file's URL
    # meant nothing remembered this one
    text = "[study]\nname = 'x'\nstorage = \"postgresql+psycopg://alice:'St0redPW@db/optuna\"\n"
    stored = config.load(write(tmp_path, text)).to_dict()
    assert "St0redPW" not in str(stored) and stored["study"]["storage"].startswith("postgresql+psycopg://alice:***")


def test_a_printed_config_shows_no_password(tmp_path):
    """print(load_config(...)) is what a notebook or a log line shows of a study file."""
    from cycle_optuna import load_config

    cfg = load_config(write(tmp_path, "[study]\nname = 'x'\nstorage = 'postgresql+psycopg://me:TopSecret1@db/optuna'\n"))
    for shown in (repr(cfg), str(cfg), repr(cfg.study), f"{cfg.study}"):
        assert "TopSecret1" not in shown and "postgresql+psycopg://me:***@db/optuna" in shown
    assert cfg.study.storage == "postgresql+psycopg://me:TopSecret1@db/optuna"  # the value itself is kept


@pytest.mark.parametrize("url", ["sqlite://studies/x.db", "sqlite+pysqlite://here/x.db"])
def test_a_sqlite_url_with_a_host_is_refused_naming_the_key(tmp_path, url):
    """The driver drops the "host" and opens another file (x.db in the current directory)."""
    with pytest.raises(ConfigError, match=r"study\.storage: .*a SQLite URL has no host"):
        config.load(write(tmp_path, f"[study]\nname = 'x'\nstorage = '{url}'\n"))


# ---------------------------------------------------------------------------------------------
# What a file writes must take effect: a key its own settings never read, or a setting that can
# never act, is refused like an unknown key; a stored config (every key) is read as before.
# ---------------------------------------------------------------------------------------------

def with_pruner(text: str, body: str) -> str:
    """`text` (QUICK: its [pruner] section is the last) with that section replaced by `body`."""
    return text.split("[pruner]")[0] + "[pruner]\n" + body + "\n"


def refused(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message.removeprefix(f"{path}: ")


def test_warmup_epochs_may_span_the_whole_run_but_not_more(tmp_path):
    # equal: a linear warm-up over all of training that reaches lr at its last step
    assert config.load(write(tmp_path, edit(QUICK, "train", "warmup_epochs = 5.0"))).train.warmup_epochs == 5.0
    assert refused(tmp_path, edit(QUICK, "train", "warmup_epochs = 5.5")).startswith(
        "train.warmup_epochs: 5.5 is longer than the training (train.epochs = 5)")
    onecycle = edit(edit(QUICK, "train", "warmup_epochs = 0.5"), "train", "schedule = 'onecycle'")
    assert refused(tmp_path, onecycle) == ("train.warmup_epochs: not used by schedule = 'onecycle' (which has its own "
                                           "warm-up: the first 30% of the steps); it is a setting of schedule constant, "
                                           "cosine, cyclical")


@pytest.mark.parametrize("kind, key, users", [
    ("median", "reduction_factor = 3", "successive_halving, hyperband"),
    ("median", "percentile = 25.0", "percentile"),
    ("hyperband", "n_warmup_steps = 1", "median, percentile, patient"),
    ("successive_halving", "n_startup_trials = 2", "median, percentile, patient, parent"),
    ("percentile", "patience = 2", "patient, parent"),
    ("patient", "margin = 0.1", "parent"),
    ("parent", "n_warmup_steps = 1", "median, percentile, patient"),
])
def test_a_pruner_key_its_type_does_not_read_names_the_type_that_does(tmp_path, kind, key, users):
    message = refused(tmp_path, with_pruner(QUICK, f"type = '{kind}'\n{key}"))
    name = key.split()[0]
    assert message.startswith(f"pruner.{name}: not used by type = '{kind}' (which reads "), message
    assert message.endswith(f"); it is a setting of type {users}"), message


def test_pruner_none_keeps_the_settings_of_the_pruner_it_switched_off(tmp_path):
    text = QUICK.replace('[pruner]\ntype = "parent"', '[pruner]\ntype = "none"')
    assert "warmup_fraction = 0.5" in text and config.load(write(tmp_path, text)).pruner.type == "none"


@pytest.mark.parametrize("body, key, start", [
    ("type = 'median'\nn_warmup_steps = 4", "n_warmup_steps", 5),
    ("type = 'percentile'\nn_warmup_steps = 9", "n_warmup_steps", 10),
    ("type = 'patient'\npatience = 3", "patience", 5),  # optuna's PatientPruner: more than patience + 1 epochs
    ("type = 'successive_halving'\nmin_resource = 4", "min_resource", 5),
    ("type = 'hyperband'\nmin_resource = 6", "min_resource", 7),
    ("type = 'parent'\nwarmup_fraction = 1.0", "warmup_fraction", 6),
    ("type = 'parent'\npatience = 5", "patience", 5),
])
def test_a_pruner_warmup_that_leaves_no_epoch_to_prune(tmp_path, body, key, start):
    # 5 epochs: a trial can be stopped after epochs 1-4, never after its last
    message = refused(tmp_path, with_pruner(QUICK, body))
    assert message.startswith(f"pruner.{key}: "), message
    assert message.endswith(f"leaves no epoch to prune: the {body.split(chr(39))[1]} pruner would first stop a trial "
                            f"at epoch {start}, and with train.epochs = 5 the last epoch a trial can be stopped at "
                            "is 4 (never its last)"), message


@pytest.mark.parametrize("body", [
    "type = 'median'\nn_warmup_steps = 3",
    "type = 'patient'\npatience = 2",
    "type = 'hyperband'\nmin_resource = 3",
    "type = 'parent'\nwarmup_fraction = 0.6\npatience = 4",
])
def test_a_pruner_warmup_that_leaves_the_last_prunable_epoch_is_accepted(tmp_path, body):
    assert config.load(write(tmp_path, with_pruner(QUICK, body))).pruner.type == body.split("'")[1]


@pytest.mark.parametrize("value, says", [("'soon'", "must be an integer, or 'auto', got 'soon'"),
                                         ("true", "must be an integer, or 'auto', got True"),
                                         ("2.5", "must be an integer, or 'auto', got 2.5"),
                                         ("-1", "must be >= 0, got -1")])
def test_n_warmup_steps_is_a_count_or_auto(tmp_path, value, says):
    assert refused(tmp_path, with_pruner(QUICK, f"type = 'median'\nn_warmup_steps = {value}")) == f"pruner.n_warmup_steps: {says}"


def test_n_warmup_steps_auto_may_be_written_and_is_the_default(tmp_path):
    assert config.load(write(tmp_path, with_pruner(QUICK, "type = 'median'\nn_warmup_steps = 'auto'"))).pruner.n_warmup_steps == "auto"
    assert config.PrunerConfig().n_warmup_steps == "auto"


def test_a_one_epoch_study_has_nothing_to_prune_and_its_pruner_keys_are_not_blamed(tmp_path):
    text = edit(edit(QUICK, "train", "epochs = 1"), "train", "warmup_epochs = 0.5")
    assert config.load(write(tmp_path, text)).pruner.warmup_fraction == 0.5  # QUICK's parent pruner, as written


def test_the_cycle_samplers_fallback_reads_n_startup_trials_unless_it_is_random(tmp_path):
    text = QUICK.replace('[sampler]\ntype = "tpe"', '[sampler]\ntype = "cycle"\nn_startup_trials = 2')
    assert config.load(write(tmp_path, text)).sampler.n_startup_trials == 2  # fallback tpe
    assert refused(tmp_path, edit(text, "sampler", "fallback = 'random'")).startswith(
        "sampler.n_startup_trials: not used by type = 'cycle' with fallback = 'random'")


@pytest.mark.parametrize("line, what", [
    ("label_column = 'y'", "columns to name"),
    ("sample_column = 'id'", "columns to name"),
    ("layout = 'wide'", "a layout to choose"),
])
def test_csv_only_keys_with_a_file_that_has_no_columns_name_key_and_file(tmp_path, line, what):
    for name in ("d.npz", "t.ts", "t.csv"):
        (tmp_path / name).write_bytes(b"")  # the study file is checked before any data file is read
    text = edit(QUICK, "data", "source = 'd.npz'")
    key = line.split()[0]
    assert refused(tmp_path, edit(text, "data", line)) == (
        f"data.{key}: only a .csv data file has {what}, and data.source 'd.npz' is a .npz file")
    with_test = edit(edit(text, "data", line), "data", "test_source = 't.ts'")
    assert refused(tmp_path, with_test) == (f"data.{key}: only a .csv data file has {what}, and data.source 'd.npz' is "
                                            "a .npz file and data.test_source 't.ts' is a .ts file")
    # a .csv test file reads it
    assert config.load(write(tmp_path, edit(edit(text, "data", line), "data", "test_source = 't.csv'")))


@pytest.mark.parametrize("line", ["n_samples = 500", "seq_len = 32", "n_features = 3", "n_classes = 4", "noise = 0.5"])
def test_keys_of_the_synthetic_task_beside_a_data_file_are_refused(tmp_path, line):
    """A size, length or class count written for a data file would be silently ignored: refused."""
    (tmp_path / "d.npz").write_bytes(b"")  # the study file is checked before any data file is read
    text = edit(edit(QUICK, "data", "source = 'd.npz'"), "data", line)
    assert refused(tmp_path, text) == (
        f"data.{line.split()[0]}: only the synthetic task reads it, and data.source is the file 'd.npz' (its size, "
        "length, features and classes are the file's own); remove the key")
    assert config.load(write(tmp_path, edit(QUICK, "data", line)))  # the synthetic task reads it

def test_the_test_file_cannot_be_the_training_file(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    text = edit(edit(QUICK, "data", "source = 'd.npz'"), "data", "test_source = 'sub/../d.npz'")
    assert refused(tmp_path, text).startswith("data.test_source: is the training file itself (d.npz)")
    (tmp_path / "d.npz").write_bytes(b"series")
    (tmp_path / "copy.npz").write_bytes(b"series")  # a copy is no held-out split either
    text = edit(edit(QUICK, "data", "source = 'd.npz'"), "data", "test_source = 'copy.npz'")
    assert refused(tmp_path, text) == ("data.test_source: has the same content as the training file (d.npz): a test "
                                       "split must be held out; leave test_source out to carve one from data.source")
    (tmp_path / "copy.npz").write_bytes(b"serieS")
    assert config.load(write(tmp_path, text))


def test_test_source_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    (tmp_path / "t.npz").mkdir()
    text = edit(edit(QUICK, "data", "source = 'd.npz'"), "data", "test_source = 't.npz'")
    assert refused(tmp_path, text) == f"data.test_source: not a file: {tmp_path / 't.npz'}"


def test_a_baseline_off_a_stepped_space_is_refused(tmp_path):
    text = edit(QUICK, "space", "dropout = { low = 0.0, high = 0.3, step = 0.1 }")
    assert config.load(write(tmp_path, text)).baseline.dropout == 0.1  # 0.3 is 3 steps of 0.1, within rounding
    assert refused(tmp_path, edit(text, "baseline", "dropout = 0.15")) == (
        "baseline.dropout: 0.15 is not on the space's grid (from 0 in steps of 0.1): the nearest values are 0.1 and 0.2")


def test_a_stored_config_is_read_as_before(tmp_path):
    """Stored configs hold every key (and older studies were accepted by older rules): not refused."""
    cfg = config.load(write(tmp_path, with_pruner(QUICK, "type = 'median'")))
    stored = cfg.to_dict()
    assert "reduction_factor" in stored["pruner"] and "label_column" in stored["data"]
    assert config.from_dict(stored).pruner == cfg.pruner
    stored["train"]["warmup_epochs"] = 50.0  # a study made before warm-ups longer than the run were refused
    assert config.from_dict(stored).train.warmup_epochs == 50.0


def test_keys_a_trial_never_reads_are_not_part_of_its_definition(tmp_path):
    """A study made when a file could write them is still joined by the file without them."""
    (tmp_path / "d.npz").write_bytes(b"")
    cfg = config.load(write(tmp_path, edit(QUICK, "data", "source = 'd.npz'")))
    stored = cfg.to_dict()
    stored["train"].update(momentum=0.5, cyclical_low_ratio=0.3)  # adamw, cosine: never read
    stored["data"].update(label_column="y", sample_column="id")  # a .npz file: never read
    # what a worker compares (worker._check_same_definition): the file's definition and the stored one
    mine = cfg.trial_definition()
    assert {k: config.without_execution(k, stored[k]) for k in mine} == mine
    stored["train"]["warmup_epochs"] = 0.25  # read by the cosine schedule: part of the definition
    assert config.without_execution("train", stored["train"]) != mine["train"]
    (tmp_path / "d.csv").write_bytes(b"")  # a .csv file reads its columns: they stay in the definition
    with_csv = config.load(write(tmp_path, edit(QUICK, "data", "source = 'd.csv'"))).trial_definition()
    assert with_csv["data"]["label_column"] == "label"


def test_a_pipe_as_the_study_file_is_refused_not_read(tmp_path):
    fifo = tmp_path / "s.toml"
    os.mkfifo(fifo)  # reading it would block until a writer came
    with pytest.raises(ConfigError, match=r"s\.toml: not a regular file"):
        config.load(fifo)


def test_a_stored_config_past_the_new_upper_bounds_stays_readable(tmp_path):
    """Bounds added to catch typos in files apply to what a person writes, not to studies stored before."""
    stored = config.load(write(tmp_path, QUICK)).to_dict()
    stored["train"].update(epochs=200_000, eval_batch_size=2_000_000, min_epoch_samples=20_000_000)
    cfg = config.from_dict(stored)
    assert (cfg.train.epochs, cfg.train.eval_batch_size, cfg.train.min_epoch_samples) == (200_000, 2_000_000, 20_000_000)


# defaults README's table states in words rather than as a value
_DEFAULTS_IN_WORDS = {("study", "storage"), ("study", "artifact_dir"), ("data", "test_source")}


@pytest.mark.parametrize("section", ["study", "data", "train", "baseline", "sampler", "pruner"])
def test_readme_table_of_keys_states_every_default_as_the_code_has_it(section: str):
    """README.md's "Sections and their defaults" row of each section: every key of its dataclass is
    listed, with the code's default first in its parentheses (a user's first contact: a default
    changed in the code and not there would mislead everyone who reads it)."""
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| `[{section}]`"))
    stated = dict(re.findall(r"`(\w+)` \(([^()]*(?:\([^()]*\))?[^()]*)\)", row))
    for f in dataclasses.fields(config._SECTIONS[section]):
        assert f.name in stated or (section, f.name) in _DEFAULTS_IN_WORDS, f"[{section}] {f.name} not in README's table"
        if (section, f.name) in _DEFAULTS_IN_WORDS:
            continue
        first = re.split(r"[,;:/ ]", stated[f.name].strip())[0].strip('"')
        if isinstance(f.default, bool):
            assert first.lower() == str(f.default).lower(), (section, f.name, stated[f.name])
        elif isinstance(f.default, (int, float)):
            assert float(first) == float(f.default), (section, f.name, stated[f.name])
        else:
            assert first == str(f.default), (section, f.name, stated[f.name])
    assert set(stated) <= {f.name for f in dataclasses.fields(config._SECTIONS[section])}
