"""The CUDA-free host-sync counter: what it counts, what it counts apart, and that it leaves torch as it was."""

from __future__ import annotations

import torch

from pipeline.host_sync import HostSyncCounter


def test_counts_every_read_of_a_value_and_nothing_else() -> None:
    t = torch.arange(6, dtype=torch.float32)
    with HostSyncCounter() as counter:
        _ = t.shape, t.numel(), t.dtype, t + 1, t.sum() * 2  # metadata and device work: no read
        assert counter.count == 0
        t.sum().item()
        t.tolist()
        bool(t[0] > 0)
        float(t[1])
        int(t[2])
        t.cpu()
        t.numpy()
        t.nonzero()
        assert counter.count == 8
        assert counter.take() == 8 and counter.take() == 0
        if t.sum() > 0:  # a Python condition on a tensor is a read too
            pass
        assert counter.take() == 1
    sites = " ".join(counter.sites)
    assert "item " in sites and "__bool__ " in sites and __file__ in sites


def test_methods_are_restored_and_nested_reads_count_once() -> None:
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}
    with HostSyncCounter() as counter:
        torch.tensor([1.0, 2.0]).tolist()  # tolist may read element by element internally: one call
        assert counter.count == 1
    assert all(getattr(torch.Tensor, name) is fn for name, fn in originals.items())
    torch.tensor(1.0).item()
    assert counter.count == 1  # not counting any more


def test_host_tensor_reads_of_the_optimizer_step_are_counted_apart() -> None:
    """AdamW reads its CPU step counter with item() (a host tensor on every machine): not a sync."""
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)
    net(torch.ones(3, 4)).sum().backward()
    with HostSyncCounter() as counter:
        opt.step()
    assert counter.count == 0
    assert counter.host_reads == 2  # one step counter per parameter (weight, bias)
    assert all("optimizer.py" in site for site in counter.host_sites)
