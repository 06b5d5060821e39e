"""Checkpoints are checked and never executed (issue 14, findings 5 and 6).

* A pickle payload (a ``torch.save``d object whose ``__reduce__`` would create a marker file) planted in
  every file of the latest checkpoint is never executed: the damaged checkpoint fails its hashes and the
  run resumes from the previous one; and with the hashes recomputed to match (what someone who can write
  the run directory could do), every loader refuses the file instead of running it (DDP and DeepSpeed).
* A same-size corruption of any checkpoint file makes the resume fall back to the previous checkpoint.
* A resume that cannot succeed exits with one line and marks the MLflow run FAILED.

One short training run (killed after its second checkpoint) is copied per variant; the per-file checks run
in one worker process per engine (``python -m tests.integration.test_checkpoint_safety ENGINE ...``),
which builds the real trainer, writes its own two checkpoints and calls the trainer's resume path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
NAME = "ck"
ACCELERATE_PICKLES = ("custom_checkpoint_0.pkl", "random_states_0.pkl")  # what accelerate would look for


class Payload:
    """Unpickling this runs ``touch MARKER``, as in finding 5."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return os.system, (f"touch {self.marker}",)


def payload_bytes(marker: Path, tmp: Path) -> bytes:
    torch.save({"state": Payload(marker)}, tmp)
    return tmp.read_bytes()


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, f"--data.path={shards}", f"--run.output_dir={out}", f"--run.name={NAME}",
            "--checkpoint.every_steps=2", "--checkpoint.keep_last=3", "--optim.ema_decay=0.9",
            "--eval.every_epochs=0", "--tracking.log_every_steps=1", "--data.num_workers=1", *extra]


@pytest.fixture(scope="module")
def killed_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run SIGKILLed after its second checkpoint (MLflow run left RUNNING); the output directory."""
    out = tmp_path_factory.mktemp("killed")
    proc = subprocess.Popen([sys.executable, "-m", "vitpipe", *_args(digits_shards, out, "--schedule.max_steps=40")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        if "saved checkpoint" in line and "step_00000004" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "training ended before its second checkpoint"
    return out


def _copy(out: Path, dest: Path) -> tuple[Path, list[Path]]:
    """A copy of the run's output directory; its checkpoints, newest first."""
    shutil.copytree(out, dest)
    return dest, sorted((dest / NAME / "checkpoints").glob("step_*"), reverse=True)


def _mlflow_run(out: Path):  # noqa: ANN202 - an MLflow Run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vitpipe-demo").experiment_id
    (run,) = client.search_runs([experiment])
    return run


def test_planted_pickles_are_not_executed_and_the_run_resumes_from_the_previous(
        killed_run: Path, digits_shards: Path, tmp_path: Path) -> None:
    out, (latest, previous, *_) = _copy(killed_run, tmp_path / "out")
    marker = tmp_path / "EXECUTED"
    payload = payload_bytes(marker, tmp_path / "payload.pt")
    files = [p for p in latest.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.bin", "scheduler.json", "ema.safetensors",
                                       "rng_state_0.safetensors", "trainer_state.json"}
    assert not list(latest.glob("*.pkl"))  # nothing of accelerate's pickles is left to load
    for path in [*files, *(latest / name for name in ACCELERATE_PICKLES)]:
        path.write_bytes(payload)
    step = json.loads((previous / "trainer_state.json").read_text())["step"]
    proc = run_cli(*_args(digits_shards, out, f"--schedule.max_steps={step + 1}"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {latest} is corrupt" in proc.stderr
    assert f"resumed from {previous}: step {step}" in proc.stderr
    assert not marker.exists()


def test_failed_resume_exits_with_one_line_and_marks_the_mlflow_run_failed(
        killed_run: Path, digits_shards: Path, tmp_path: Path) -> None:
    out, checkpoints = _copy(killed_run, tmp_path / "out")
    assert _mlflow_run(out).info.status == "RUNNING"  # killed: nobody ended it
    for ckpt in checkpoints:  # the corruption: bytes 8-200 zeroed, same size
        weights = ckpt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[8:200] = bytes(192)
        weights.write_bytes(bytes(data))
    proc = run_cli(*_args(digits_shards, out), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitpipe train: error: no checkpoint in ") and "can be resumed" in last, last
    assert "model.safetensors: content differs from its recorded sha256 (same size)" in last
    assert "Traceback" not in proc.stderr
    run = _mlflow_run(out)
    assert run.info.status == "FAILED" and "can be resumed" in run.data.tags["vitpipe.error"]


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_every_file_is_checked_and_no_loader_unpickles(digits_shards: Path, tmp_path: Path, engine: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_checkpoint_safety", engine,
                           str(digits_shards), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if engine == "ddp":
        loaded = {"model.safetensors", "optimizer.bin", "scheduler.json", "ema.safetensors",
                  "rng_state_0.safetensors"}
    else:
        loaded = {"pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                  "scheduler.json", "rng_state_0.safetensors"}
    assert loaded <= set(report["refused"]), report  # a payload with a matching hash: the loader refuses it
    for name in loaded:
        if name.endswith((".pt", ".bin")):  # torch.load: refused by the weights-only unpickler, not run
            assert "UnpicklingError: Weights only load failed" in report["errors"][name], report["errors"][name]
    assert set(report["refused"]) | set(report["ignored"]) == set(report["files"]) | set(ACCELERATE_PICKLES)
    assert report["fell_back"] == [*report["files"], "trainer_state.json"]  # same-size corruption of each file
    assert not (tmp_path / "EXECUTED").exists()


def test_init_from_refuses_a_pickle_payload_in_one_line(tmp_path: Path) -> None:
    """``model.init_from`` (and timm's ``checkpoint_path``) read torch files with the weights-only unpickler."""
    from model.factory import create_model
    from pipeline.build import build_model
    from pipeline.config import ConfigError
    from pipeline.config_io import load_config

    marker, weights = tmp_path / "EXECUTED", tmp_path / "weights.pt"
    payload_bytes(marker, weights)
    cfg = load_config(RECIPE, [f"--model.init_from={weights}", "--model.num_classes=10"])
    with pytest.raises(ConfigError, match="not a weights file that loads without unpickling code"):
        build_model(cfg)
    with pytest.raises(Exception, match="weights_only=True blocked loading"):  # timm's own message
        create_model("vit_nano_patch8_32", num_classes=10, img_size=32, checkpoint_path=str(weights))
    assert not marker.exists()


# --------------------------------------------------------------- the worker
def _worker(engine: str, shards: str, out: str) -> dict:
    """Builds the real trainer, writes two checkpoints and probes every file of the second one."""
    from pipeline import checkpoint as ckpt
    from pipeline.config_io import load_config
    from pipeline.log import setup_logging
    from pipeline.trainer import Trainer

    extra = ["--optim.ema_decay=0.9"] if engine == "ddp" else [
        "--engine.backend=deepspeed", "--engine.zero_stage=2", "--optim.ema_decay=0"]
    cfg = load_config(RECIPE, [f"--data.path={shards}", f"--run.output_dir={out}", "--run.name=w",
                               "--tracking.enabled=false", "--data.num_workers=0", "--checkpoint.keep_last=2",
                               *extra])
    setup_logging(0, None, "WARNING")
    trainer = Trainer(cfg)
    first, second = trainer.save_checkpoint(), None
    trainer.step = 1
    second = trainer.save_checkpoint()
    ckpts, state_file = second.parent, second / ckpt.STATE_FILE
    marker, payload = Path(out) / "EXECUTED", payload_bytes(Path(out) / "EXECUTED", Path(out) / "payload.pt")
    state = json.loads(state_file.read_text())
    report = {"files": sorted(state["files"]), "refused": [], "ignored": [], "fell_back": [], "errors": {}}
    for name in [*report["files"], "trainer_state.json"]:  # a same-size corruption of each file
        path, original = second / name, (second / name).read_bytes()
        data = bytearray(original)
        if name == "trainer_state.json":  # one hex digit of a recorded hash: still valid JSON
            at = original.index(b'"sha256": "') + 11
            data[at] = ord("0") if data[at] != ord("0") else ord("1")
        else:
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        if ckpt.choose_checkpoint(ckpts)[0] == first:
            report["fell_back"].append(name)
        path.write_bytes(original)
    for name in [*report["files"], *ACCELERATE_PICKLES]:  # a payload whose hash is recorded as if written so
        path = second / name
        original = path.read_bytes() if path.is_file() else None
        path.write_bytes(payload)
        planted = {**state, "files": {**state["files"], name: {"size": len(payload), "sha256": ckpt.file_digest(path)}}}
        state_file.write_text(json.dumps(ckpt.seal(planted)))
        chosen, chosen_state = ckpt.choose_checkpoint(ckpts)
        assert chosen == second, f"{name}: verification did not accept the recomputed hash"
        try:
            trainer.resume(chosen, chosen_state)
            report["ignored"].append(name)
        except ckpt.CheckpointError as err:
            report["refused"].append(name)
            report["errors"][name] = str(err)
        assert not marker.exists(), f"{name}: the payload ran"
        path.unlink()
        if original is not None:
            path.write_bytes(original)
        state_file.write_text(json.dumps(state))
    trainer.acc.end_training()
    return report


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_worker(*sys.argv[1:4])) + "\n")
