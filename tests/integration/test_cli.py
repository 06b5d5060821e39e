"""The command line: useful help everywhere, one-line user errors without tracebacks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from vitpipe.cli import build_parser

COMMANDS = ["demo", "prep", "prep imagenet", "train", "eval", "export", "config", "models", "order", "ui", "submit",
            "status", "cancel", "viz"]


def test_top_level_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "prep", "train", "eval", "ui", "config", "models", "order", "submit", "status", "cancel"):
        assert f"    {command}" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command: str) -> None:
    proc = run_cli(*command.split(), "--help")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) > 6, proc.stdout


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the parser tree: ``()``, ``("prep",)``, ``("prep", "imagenet")``, ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


HELP_PATHS = _command_paths(build_parser())
HEAVY = ("torch", "timm", "mlflow", "deepspeed", "accelerate")
_HELP_IN_FRESH_PROCESS = """
import sys
from vitpipe.cli import main
try:
    main({argv!r})
except SystemExit as exit_:
    assert exit_.code == 0, f"exit status {{exit_.code}}"
else:
    raise AssertionError("--help did not exit")
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_help_paths_cover_every_command() -> None:
    names = {path[0] for path in HELP_PATHS if path}
    assert set(COMMANDS) - {"prep imagenet"} <= names
    assert {("prep", source) for source in ("imagenet", "kinetics", "ssv2", "diving48", "videolist")} <= set(HELP_PATHS)


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda path: " ".join(path) or "vitpipe")
def test_help_imports_no_torch(path: tuple[str, ...]) -> None:
    """``vitpipe [COMMAND ...] --help`` builds the parser from light modules only (fresh process per case)."""
    code = _HELP_IN_FRESH_PROCESS.format(argv=[*path, "--help"], heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", f"--help imported {proc.stdout.splitlines()[-1]}"


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "unknown key 'optim.lrr'"),
    ("--data.batch_size=big", "data.batch_size = 'big': must be an integer"),
    ("--data.path=/no/such/dataset", "data.path = '/no/such/dataset': no dataset.json there"),
])
def test_bad_config_fails_at_start_with_one_line(override: str, message: str, tmp_path: Path) -> None:
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", override,
                   f"--run.output_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_missing_recipe_and_unknown_model(digits_shards: Path, tmp_path: Path) -> None:
    proc = run_cli("train", "jobs/nope.toml", timeout=120)
    assert proc.returncode == 2 and "recipe 'jobs/nope.toml' not found" in proc.stderr
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                   "--model.name=vit_nope", f"--run.output_dir={tmp_path}", "--tracking.enabled=false", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.name = 'vit_nope': not a registered model" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was created


def test_config_command_prints_resolved_toml_and_keys() -> None:
    proc = run_cli("config", "jobs/demo/vitpico_digits_cls_cpu.toml", "--optim.lr=0.01")
    assert proc.returncode == 0 and "lr = 0.01" in proc.stdout and 'name = "vit_pico_patch4_32"' in proc.stdout
    keys = run_cli("config", "--keys")
    assert "data.crop_scale = [0.08, 1.0]" in keys.stdout


def test_overrides_rejected_where_not_accepted() -> None:
    proc = run_cli("models", "--optim.lr=1")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_root_has_no_machine_paths() -> None:
    tracked = [p for p in ROOT.glob("jobs/**/*.toml")]
    assert tracked and not any("/work/" in p.read_text() or "/home/" in p.read_text() for p in tracked)


def test_finished_run_is_refused_on_every_rank_without_hanging(digits_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "summary.json").write_text('{"status": "FINISHED"}')
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", "--nproc-per-node", "2",
                   f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=taken",
                   "--tracking.enabled=false", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("holds a finished run; choose another run.name") == 1  # raised on both ranks, printed once
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_bf16_accumulation_and_checkpoint_rotation(digits_shards: Path, tmp_path: Path) -> None:
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                   f"--run.output_dir={tmp_path}", "--run.name=bf16", "--engine.mixed_precision=bf16",
                   "--engine.grad_accum_steps=2", "--schedule.max_steps=6", "--checkpoint.every_steps=2",
                   "--checkpoint.keep_last=2", "--tracking.enabled=false", "--eval.every_epochs=0",
                   "--engine.grad_checkpointing=true", "--engine.peak_tflops=1.0", "--tracking.log_every_steps=2",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("train/mfu=") == 3 and "GFLOPs per sample" in proc.stderr
    run_dir = tmp_path / "bf16"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000004", "step_00000006"]  # rotated; no temporary directory left
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["batches_in_epoch"] == 12  # 2 micro-batches per step
    scheduler = json.loads((run_dir / "checkpoints" / "step_00000006" / "scheduler.json").read_text())
    assert scheduler["last_epoch"] == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["steps"] == 6 and summary["val_samples"] == 359
    assert not list(run_dir.glob("**/.*tmp*"))  # no temporary files left behind
