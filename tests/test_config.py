"""Study file parsing: every error names file, key and what is allowed; nothing else is touched."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cycle_optuna import config
from cycle_optuna.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICK = (ROOT / "studies" / "quick.toml").read_text()


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(text: str, section: str, line: str) -> str:
    """QUICK with `line` added at the top of [section] (replacing a key of the same name)."""
    key = line.split("=")[0].strip()
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
        ("baseline", "hidden_dim = 64", r"baseline\.hidden_dim: 64 is outside the space: choices are \[16, 32\]"),
        ("baseline", "n_heads = 3", r"baseline\.n_heads: 3 is outside the space"),
        ("space", "n_heads = { choices = [3, 5] }", r"no choice of n_heads \[3, 5\] divides any hidden_dim"),
        ("sampler", "type = 'tpee'", r"sampler\.type: 'tpee' is not one of .*tpe.* \(did you mean 'tpe'\?\)"),
        ("pruner", "type = 'medain'", r"pruner\.type: 'medain' is not one of .* \(did you mean 'median'\?\)"),
        ("train", "optimizer = 'adamx'", r"train\.optimizer: 'adamx' is not one of adamw, adam, sgd, lion, sophia"),
        ("train", "schedule = 'cosin'", r"train\.schedule: 'cosin' is not one of .* \(did you mean 'cosine'\?\)"),
        ("data", "source = 'missing.npz'", r"data\.source: file not found: .*missing\.npz"),
        ("data", "source = 'data.parquet'", r"data\.source: must be 'synthetic' or a \.npz/\.csv/\.ts/\.arff/\.tsv/\.txt file"),
        ("data", "test_source = 'test.npz'", r"data\.test_source: needs a data file in data\.source"),
        ("data", "source = 'd.csv'\nlayout = 'tall'", r"data\.layout: 'tall' is not one of long, wide"),
        ("study", "n_trials = 0", r"study\.n_trials: must be >= 1, got 0"),
        ("study", "ensemble = 0", r"study\.ensemble: must be >= 1, got 0"),
        ("pruner", "percentile = 150.0", r"pruner\.percentile: must be in \[0, 100\], got 150\.0"),
        ("pruner", "early_margin = -0.2", r"pruner\.early_margin: must be >= 0, got -0\.2"),
        ("baseline", "dropout = 1.0", r"baseline\.dropout"),
        ("study", "seed = -5", r"study\.seed: must be in 0\.\.4294967295, got -5"),
        ("study", "seed = 4294967296", r"study\.seed: must be in 0\.\.4294967295, got 4294967296"),
        ("train", "momentum = 2.0", r"train\.momentum: must be < 1, got 2\.0"),
        ("data", "n_classes = 200", r"data\.n_samples: must be >= 3 x n_classes = 600, got 480"),
        ("space", "dropout = { low = 0.0, high = 1.5 }", r"space\.dropout\.high: dropout must be in \[0, 1\), got 1\.5"),
        ("space", "batch_size = { choices = [-8, 32] }", r"space\.batch_size\.choices: batch_size must be in \[1, inf\), got -8"),
        ("space", "lr = { low = -1e-3, high = 1e-2 }", r"space\.lr\.low: lr must be in \(0, inf\), got -0\.001"),
        ("space", "n_layers = { low = 0, high = 3 }", r"space\.n_layers\.low: n_layers must be in \[1, inf\), got 0"),
        ("space", "hidden_dim = { choices = [0, 16] }", r"space\.hidden_dim\.choices: hidden_dim must be in \[1, inf\)"),
        ("space", "weight_decay = { low = -0.1, high = 0.1 }", r"space\.weight_decay\.low: weight_decay must be in \[0, inf\)"),
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
    with pytest.raises(ConfigError, match=r"baseline\.lr: lr must be in \(0, inf\), got 0"):
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


def test_baseline_heads_must_divide_hidden(tmp_path):
    text = edit(edit(QUICK, "baseline", "n_heads = 3"), "space", "n_heads = { choices = [2, 3, 4] }")
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
