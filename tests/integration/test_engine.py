"""The engine seam on 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-0/1/2/3 train the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import model  # noqa: F401  (registers vitpipe's models with timm)
from pipeline.config import EngineCfg
from pipeline.engine import deepspeed_config
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
ENGINES = {"ddp": [], **{f"zero{s}": ["--engine.backend=deepspeed", f"--engine.zero_stage={s}"] for s in range(4)},
           # bf16 weights, fp32 master copies: the export must hold the fp32 masters
           "zero2_bf16": ["--engine.backend=deepspeed", "--engine.zero_stage=2", "--engine.mixed_precision=bf16"]}


@pytest.fixture(scope="module")
def runs(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines")
    for name, extra in ENGINES.items():
        proc = run_cli("train", RECIPE, "--nproc-per-node", "2", f"--data.path={digits_shards}",
                       f"--run.output_dir={out}", f"--run.name={name}", "--schedule.max_steps=8",
                       "--tracking.log_every_steps=1", "--data.num_workers=1", *extra, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _losses(out: Path, name: str) -> list[float]:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vitpipe-demo").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    return [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_ddp(runs: Path, stage: int) -> None:
    ddp, zero = _losses(runs, "ddp"), _losses(runs, f"zero{stage}")
    assert len(ddp) == len(zero) == 8
    assert zero == pytest.approx(ddp, rel=1e-4, abs=1e-5)  # fp32; only the reduction order differs


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "zero2_bf16"])
def test_export_loads_strictly_and_gives_the_run_accuracy(runs: Path, name: str) -> None:
    """The final export (gathered from the live engine by every rank) equals ``vitpipe export`` of the last
    checkpoint (merged from the shards on disk), tensor for tensor, in fp32."""
    run_dir = runs / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    net = timm.create_model("vit_nano_patch8_32", num_classes=10,
                            checkpoint_path=str(run_dir / "final" / "model.safetensors"))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    proc = run_cli("eval", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not name.endswith("bf16"):  # bf16 runs evaluate their bf16 weights; the export holds the fp32 masters
        assert json.loads(proc.stdout.splitlines()[-1])["top1"] == pytest.approx(summary["val_top1"])
    export = run_cli("export", str(run_dir), "--out", str(run_dir / "again.safetensors"))
    assert export.returncode == 0, export.stderr[-2000:]
    a, b = load_file(run_dir / "again.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
    if name.endswith("bf16"):  # the fp32 master weights, not the bf16 weights the model computes with
        assert any(not torch.equal(v, v.bfloat16().float()) for v in b.values())


def test_deepspeed_config_follows_the_run_config() -> None:
    cfg = EngineCfg(backend="deepspeed", zero_stage=3, mixed_precision="bf16", grad_accum_steps=4,
                    offload_optimizer=True)
    ds = deepspeed_config(cfg, micro_batch=32, clip_grad=1.0)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_runs_under_the_deepspeed_launcher(digits_shards: Path, tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2 pipeline/train.py …` (on CPU it starts 2 local processes, adds --local_rank)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "pipeline/train.py", RECIPE,
                           f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=ds",
                           "--engine.backend=deepspeed", "--engine.zero_stage=2", "--schedule.max_steps=4",
                           "--data.num_workers=1", "--tracking.enabled=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["world_size"] == 2 and summary["steps"] == 4


def test_torch_compile_trains_like_eager_and_exports_plain_weights(digits_shards: Path, tmp_path: Path) -> None:
    """``engine.compile``: inductor-compiled training follows the eager loss curve; the export loads in timm."""
    import re

    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--engine.compile=true"])):
        proc = run_cli("train", RECIPE, f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}",
                       f"--run.name={name}", "--schedule.max_steps=6", "--tracking.log_every_steps=1",
                       "--data.num_workers=1", "--tracking.enabled=false", *extra, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = (tmp_path / name / "log.rank0.txt").read_text()
        losses[name] = [float(v) for v in re.findall(r"train/loss=(\S+)", log)]
    assert "torch.compile (inductor): on" in (tmp_path / "compiled" / "log.rank0.txt").read_text()
    assert len(losses["compiled"]) == 6
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=2e-3)  # fused kernels reorder float sums
    weights = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    assert not any(k.startswith("_orig_mod.") for k in weights)
    net = timm.create_model("vit_nano_patch8_32", num_classes=10, img_size=32)
    net.load_state_dict(weights, strict=True)
