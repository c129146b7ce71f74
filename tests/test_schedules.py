import pytest
import torch

from segtrain.config import ScheduleConfig
from segtrain.engine.schedules import build_scheduler, poly_lr


def _lrs(cfg: ScheduleConfig, base_lr: float, max_iters: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_scheduler(cfg, optimizer, max_iters, base_lr)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("iteration", [0, 1, 250, 500, 999, 1000])
def test_poly_formula(iteration):
    assert poly_lr(0.01, iteration, 1000, 0.9) == pytest.approx(0.01 * (1 - iteration / 1000) ** 0.9)


def test_scheduler_follows_poly_every_iteration():
    lrs = _lrs(ScheduleConfig(power=0.9), 0.007, 100, 101)
    for it in (0, 1, 10, 50, 99, 100):
        assert lrs[it] == pytest.approx(0.007 * (1 - it / 100) ** 0.9, rel=1e-12, abs=1e-15)
    assert lrs[100] == 0.0


def test_linear_warmup_then_poly():
    cfg = ScheduleConfig(power=0.9, warmup_iters=10, warmup_ratio=0.1)
    lrs = _lrs(cfg, 0.01, 100, 20)
    assert lrs[0] == pytest.approx(0.01 * 0.1)
    assert lrs[5] == pytest.approx(0.01 * (1 - 5 / 100) ** 0.9 * (0.1 + 0.9 * 5 / 10))
    assert lrs[10] == pytest.approx(0.01 * (1 - 10 / 100) ** 0.9)
    assert lrs[15] == pytest.approx(0.01 * (1 - 15 / 100) ** 0.9)
