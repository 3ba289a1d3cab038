"""Units of the loop against their formulas: loss warm-up weights and the running
average (icefall's model_avg: the uniform mean of the snapshots taken every average_period
batches)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zipasr.train.trainer import Trainer, loss_scales


@pytest.mark.parametrize("b", [0, 1, 500, 1000, 1999, 2000, 5000])
def test_loss_scales(b: int) -> None:
    s, p = loss_scales(b, 2000, 0.5)
    if b >= 2000:
        assert (s, p) == (0.5, 1.0)
    else:
        assert s == pytest.approx(1.0 - 0.5 * b / 2000)
        assert p == pytest.approx(0.1 + 0.9 * b / 2000)


def test_running_average_is_uniform_mean_of_snapshots() -> None:
    class Stub(Trainer):
        def __init__(self) -> None:  # only what _update_average reads
            self.cfg = type("C", (), {"average_period": 3})()
            model = torch.nn.Linear(2, 2)
            self.state = SimpleNamespace(model=model, batch_idx_train=0, model_avg={
                k: v.detach().double().clone() for k, v in model.state_dict().items()})

    t = Stub()
    snapshots = []
    torch.manual_seed(0)
    for b in range(1, 31):
        with torch.no_grad():
            t.state.model.weight.add_(torch.randn(2, 2))
        if b % 3 == 0:
            t.state.batch_idx_train = b
            t._update_average()
            snapshots.append(t.state.model.weight.detach().double().clone())
    expected = torch.stack(snapshots).mean(0)
    torch.testing.assert_close(t.state.model_avg["weight"], expected, rtol=1e-12, atol=1e-12)
    assert t.state.model_avg["weight"].dtype == torch.float64


def test_native_bf16_matches_cpu_flags() -> None:
    """The CPU check agrees with the kernel's view of the CPU (/proc/cpuinfo flags)."""
    from pathlib import Path

    from zipasr.train.trainer import native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_tile"})
