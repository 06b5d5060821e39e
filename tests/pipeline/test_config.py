"""Config loading, overrides, validation and the resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobCfg
from pipeline.config_io import dump_toml, field_docs, flatten, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "jobs").rglob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(recipe)
    dumped = tmp_path / "config.toml"
    dumped.write_text(dump_toml(cfg))
    assert load_config(dumped) == cfg


def test_precedence_cli_over_recipe_over_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[optim]\nlr = 0.01\nweight_decay = 0.1\n[data]\ncrop_scale = [0.5, 1.0]\n')
    cfg = load_config(recipe, ["--optim.lr=3e-4", "--run.name=my run", "--model.kwargs={ depth = 3 }",
                               "--engine.mixed_precision=bf16", "--tracking.enabled=false"])
    assert cfg.optim.lr == 3e-4  # CLI wins
    assert cfg.optim.weight_decay == 0.1  # recipe wins over the default
    assert cfg.optim.eps == JobCfg().optim.eps  # default
    assert cfg.data.crop_scale == (0.5, 1.0) and isinstance(cfg.data.crop_scale, tuple)
    assert cfg.run.name == "my run" and cfg.model.kwargs == {"depth": 3}
    assert cfg.engine.mixed_precision == "bf16" and cfg.tracking.enabled is False


def test_int_accepted_for_float_and_number_for_string() -> None:
    cfg = load_config(None, ["--optim.lr=1", "--run.name=2024"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.name == "2024"


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ("--optimizer.lr=1", "unknown key 'optimizer' (did you mean 'optim'?)"),
    ("--optim.lr=fast", "optim.lr = 'fast': must be a number"),
    ("--data.batch_size=1.5", "data.batch_size = 1.5: must be an integer"),
    ("--data.batch_size=0", "data.batch_size = 0: must be >= 1"),
    ("--engine.mixed_precision=fp16", "engine.mixed_precision = 'fp16': must be one of 'no', 'bf16'"),
    ("--data.crop_scale=[0.5]", "data.crop_scale = [0.5]: must be a list of 2 numbers"),
    ("--data.crop_scale=[0.9,0.5]", "data.crop_scale = (0.9, 0.5): must be 0 < min <= max <= 1"),
    ("--tracking.enabled=yes", "tracking.enabled = 'yes': must be true or false"),
    ("--model.kwargs=3", "model.kwargs = 3: must be a table"),
    ("optim", "expected --section.key=value"),
])
def test_bad_values_name_key_value_and_allowed(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    wrong_section = tmp_path / "wrong.toml"
    wrong_section.write_text("optim = 3\n")
    with pytest.raises(ConfigError, match="optim = 3: must be a table"):
        load_config(wrong_section)


def test_every_field_is_documented() -> None:
    rows = field_docs()
    assert len(rows) == len(flatten(JobCfg()))
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented


def test_dump_quotes_strings_safely(tmp_path: Path) -> None:
    cfg = load_config(None, ['--run.name=a "quoted" \\ name'])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path).run.name == 'a "quoted" \\ name'


def test_run_name_is_one_directory_name() -> None:
    from pipeline.config import ConfigError, RunCfg

    with pytest.raises(ConfigError, match="run.name"):
        RunCfg(name="a/b")
    assert RunCfg(name="it's $(x) ok").name == "it's $(x) ok"  # quoting is the Slurm renderer's job
