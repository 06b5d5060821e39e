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


# ---------------------------------------------------------------- the [data.video] table


def test_video_table_is_typed_and_listed_with_meanings() -> None:
    import dataclasses

    from pipeline.config import DataCfg, VideoCfg

    rows = {key: doc for key, _, doc in field_docs()}
    video_keys = {f"data.video.{f.name}" for f in dataclasses.fields(VideoCfg)}
    assert video_keys <= set(rows) and all(rows[k] for k in video_keys)  # every key, each with its meaning
    assert "data.video" not in rows  # the table itself is not a key
    # one key per concept: no video field repeats a data field (img_size, mean, std, scale, ratio, flip ...)
    data_fields = {f.name for f in dataclasses.fields(DataCfg)}
    assert not {f.name for f in dataclasses.fields(VideoCfg)} & (data_fields | {"scale", "ratio", "flip"})


def test_video_keys_are_validated_at_load_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^data\.video\.frames = 0: must be >= 1$"):
        load_config(None, ["--data.video.frames=0"])
    with pytest.raises(ConfigError, match="unknown key 'data.video.flip'"):
        load_config(None, ["--data.video.flip=true"])
    with pytest.raises(ConfigError, match="data.video.recipe = 'k700'"):
        load_config(None, ["--data.video.recipe=k700"])
    with pytest.raises(ConfigError, match="data.hflip = 0.5: must be 0 with data.video.recipe = 'ssv2'"):
        load_config(None, ["--data.video.recipe=ssv2"])  # direction-dependent labels: refused, not overridden
    with pytest.raises(ConfigError, match="data.video.short_side_range"):
        load_config(None, ["--data.img_size=288"])  # below the short-side range of the clip crop


def test_video_recipe_fills_only_the_keys_the_table_leaves_out(tmp_path: Path) -> None:
    cfg = load_config(None, ["--data.hflip=0", "--data.video.recipe=ssv2", "--data.video.frames=8"])
    v = cfg.data.video
    assert (v.recipe, v.sampling, v.frames, v.spatial_crops) == ("ssv2", "segment", 8, 3)
    dumped = tmp_path / "config.toml"
    dumped.write_text(dump_toml(cfg))
    assert "[data.video]" in dumped.read_text() and load_config(dumped) == cfg
    assert flatten(cfg)["data.video.frames"] == 8


def test_bad_video_key_fails_before_any_run_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe = ROOT / "jobs" / "demo" / "vitpico_digits_cls_cpu.toml"
    out = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "vitpipe", "train", str(recipe), "--data.video.frames=0",
                          f"--run.output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["vitpipe train: error: data.video.frames = 0: must be >= 1"]
    assert not out.exists()


def test_config_keys_command_lists_the_video_keys() -> None:
    import dataclasses
    import subprocess
    import sys

    from pipeline.config import VideoCfg

    out = subprocess.run([sys.executable, "-m", "vitpipe", "config", "--keys"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    for f in dataclasses.fields(VideoCfg):
        line = next(i for i, text in enumerate(out) if text.startswith(f"data.video.{f.name} = "))
        assert out[line + 1].strip(), f.name  # its meaning, on the next line
