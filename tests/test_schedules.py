import pytest

from conftest import compose_config
from segtrain.engine.schedules import cosine_lr, poly_lr
from segtrain.engine.step import build_lr_schedule
from segtrain.errors import ConfigError


@pytest.mark.parametrize("iteration", [0, 1, 250, 500, 999, 1000])
def test_poly_formula(iteration):
    assert poly_lr(0.01, iteration, 1000, 0.9) == pytest.approx(0.01 * (1 - iteration / 1000) ** 0.9)


def test_schedule_from_config_follows_poly_every_iteration():
    cfg = compose_config("train", ["optimizer.lr=0.007", "trainer.max_iters=100"])
    lr_at = build_lr_schedule(cfg)
    for it in (0, 1, 10, 50, 99, 100):
        assert lr_at(it) == pytest.approx(0.007 * (1 - it / 100) ** 0.9, rel=1e-12, abs=1e-15)
    assert lr_at(100) == 0.0


def test_linear_warmup_then_poly():
    cfg = compose_config("train", ["schedule=poly_warmup", "schedule.warmup_iters=10", "optimizer.lr=0.01",
                                   "trainer.max_iters=100"])
    lr_at = build_lr_schedule(cfg)
    assert lr_at(0) == pytest.approx(0.01 * 0.1)
    assert lr_at(5) == pytest.approx(0.01 * (1 - 5 / 100) ** 0.9 * (0.1 + 0.9 * 5 / 10))
    assert lr_at(10) == pytest.approx(0.01 * (1 - 10 / 100) ** 0.9)
    assert lr_at(15) == pytest.approx(0.01 * (1 - 15 / 100) ** 0.9)


def test_cosine_schedule_is_one_function_and_one_yaml():
    cfg = compose_config("train", ["schedule=cosine", "schedule.min_lr=0.001", "optimizer.lr=0.01",
                                   "trainer.max_iters=100"])
    lr_at = build_lr_schedule(cfg)
    assert lr_at(0) == pytest.approx(0.01)
    assert lr_at(50) == pytest.approx(0.001 + 0.009 * 0.5)
    assert lr_at(100) == pytest.approx(0.001)
    assert lr_at(25) == pytest.approx(cosine_lr(0.01, 25, 100, min_lr=0.001))


def test_bad_schedule_values_and_keys_name_the_key():
    with pytest.raises(ConfigError, match="schedule.warmup_ratio"):
        build_lr_schedule(compose_config("train", ["schedule.warmup_ratio=1.5"]))
    with pytest.raises(ConfigError, match="unknown key schedule.powr"):
        build_lr_schedule(compose_config("train", ["+schedule.powr=1.0"]))
