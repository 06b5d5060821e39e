"""On one GPU: an NCCL process group, bf16 training steps of every model family, a GPU run's export on the CPU.

Marked ``gpu``: deselected on CPU machines, run by ``bash bench/gpu.sh`` (part ``pytest_gpu``) or
``pytest -m gpu tests/pipeline/test_gpu_training.py`` where a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import create_model
from tests.conftest import run_cli

pytestmark = pytest.mark.gpu

# (model, input shape of one sample): one tiny member of each family the pipeline trains.
FAMILIES = {
    "vit": ("vit_pico_patch4_32", (3, 32, 32)),
    "swin": ("swin_pico_patch2_window4_32_fused", (3, 32, 32)),
    "filtervit": ("filtervit_pico", (3, 32, 32)),
    "dropoutvit": ("dropoutvit_pico", (3, 32, 32)),
    "structvit": ("structvit_tiny_4_1", (3, 64, 64)),
    "structvit_video": ("structvit_tiny_4_1_video", (3, 4, 64, 64)),
}


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda", 0)


def test_nccl_process_group_on_one_gpu(cuda: torch.device, tmp_path: Path) -> None:
    assert dist.is_nccl_available()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=cuda)
    try:
        t = torch.arange(4, dtype=torch.float32, device=cuda)
        dist.all_reduce(t)
        assert torch.equal(t.cpu(), torch.arange(4, dtype=torch.float32))
        gathered = [torch.empty(2, device=cuda)]
        dist.all_gather(gathered, torch.full((2,), 7.0, device=cuda))
        assert gathered[0].tolist() == [7.0, 7.0]
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_training_steps(cuda: torch.device, family: str) -> None:
    name, shape = FAMILIES[family]
    torch.manual_seed(0)
    cpu_net = create_model(name, num_classes=10)
    net = create_model(name, num_classes=10).to(cuda)
    net.load_state_dict(cpu_net.state_dict())
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    # fp32 on the GPU (no TF32) computes what the CPU computes: the GPU kernels (SDPA, gathers, grouped convs).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net.eval(), cpu_net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x.to(cuda)).cpu(), cpu_net(x), atol=2e-3, rtol=2e-3)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    before = [p.detach().clone() for p in net.parameters()]
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x.to(cuda))
            loss = F.cross_entropy(logits.float(), y.to(cuda))
        assert logits.dtype == torch.bfloat16
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and min(losses[2:]) < losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


_TRAINER_MISSING = [m for m in ("webdataset", "av", "mlflow") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_TRAINER_MISSING), reason=f"not installed: {', '.join(_TRAINER_MISSING)}")
def test_gpu_run_export_loads_on_cpu(cuda: torch.device, digits_shards: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                   f"--run.output_dir={tmp_path}", "--run.name=gpu", "--schedule.max_steps=8",
                   "--engine.mixed_precision=bf16", "--tracking.enabled=false", "--eval.every_epochs=0",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "gpu" / "log.rank0.txt").read_text()
    assert "device cuda" in log and "precision bf16" in log  # the engine's line: bf16 on the GPU
    state = load_file(tmp_path / "gpu" / "final" / "model.safetensors", device="cpu")
    assert state and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    net = create_model("vit_nano_patch8_32", num_classes=10)
    net.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cpu_logits = net.eval()(x)
        gpu_logits = net.to(cuda)(x.to(cuda)).cpu()
    assert torch.isfinite(cpu_logits).all()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=2e-3)
