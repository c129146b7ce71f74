"""trainer.num_workers=auto: the dataset's workers per GPU (dataset.workers_per_gpu), capped by this process's
share of the CPUs; explicit numbers as before (capped by the CPUs)."""

from __future__ import annotations

import os

import pytest

from conftest import compose_config, tiny_overrides
from segtrain.data import loading
from segtrain.data.loading import train_worker_count
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError


@pytest.fixture()
def cpus(monkeypatch):
    """Set the CPUs this process may use, and the node's training processes (torchrun's LOCAL_WORLD_SIZE)."""
    def set_cpus(count: int, local_processes: int | None = None) -> None:
        monkeypatch.setattr(loading, "available_cpus", lambda: count)
        if local_processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    return set_cpus


def _resolved(dataset: str, *overrides: str) -> int:
    cfg = compose_config("train", [f"dataset={dataset}", *overrides])
    return train_worker_count(cfg.trainer.num_workers, cfg.dataset.workers_per_gpu)


def test_auto_is_the_datasets_workers_per_gpu_on_a_large_machine(cpus):
    assert compose_config("train", []).trainer.num_workers == "auto"
    cpus(64)
    # Cityscapes' PNGs at 769-1024 crops need more workers per GPU than VOC's JPEGs (benchmarks/README.md).
    assert {name: _resolved(name) for name in ("voc", "cityscapes", "shapes")} == {"voc": 2, "cityscapes": 4,
                                                                                     "shapes": 1}
    assert _resolved("cityscapes", "dataset.workers_per_gpu=6") == 6


def test_auto_is_capped_by_this_processes_share_of_the_cpus(cpus):
    cpus(4)  # one process: 4 CPUs, one kept for the training process
    assert (_resolved("voc"), _resolved("cityscapes"), _resolved("shapes")) == (2, 3, 1)
    cpus(2)
    assert (_resolved("voc"), _resolved("cityscapes")) == (1, 1)
    cpus(1)
    assert _resolved("cityscapes") == 0  # load in the training process itself
    cpus(32, local_processes=8)  # torchrun, 8 GPUs on the node: 4 CPUs each
    assert (_resolved("voc"), _resolved("cityscapes")) == (2, 3)
    cpus(96, local_processes=8)
    assert (_resolved("voc"), _resolved("cityscapes")) == (2, 4)


def test_explicit_numbers_keep_working_capped_by_the_cpus(cpus):
    cpus(8, local_processes=4)
    assert _resolved("cityscapes", "trainer.num_workers=0") == 0
    assert _resolved("voc", "trainer.num_workers=6") == 6  # a number is taken as given up to the CPUs
    assert _resolved("voc", "trainer.num_workers=12") == 8
    assert compose_config("train", ["trainer.num_workers=AUTO"]).trainer.num_workers == "auto"
    assert compose_config("train", ["trainer.num_workers='3'"]).trainer.num_workers == 3


@pytest.mark.parametrize("override,message", [
    ("trainer.num_workers=many", "trainer.num_workers must be auto .* or a whole number >= 0, got 'many'"),
    ("trainer.num_workers=true", "trainer.num_workers must be auto .* or a whole number >= 0, got True"),
    ("trainer.num_workers=-1", "trainer.num_workers must be >= 0, got -1"),
    ("dataset.workers_per_gpu=-2", "dataset.workers_per_gpu must be >= 0, got -2"),
])
def test_bad_worker_counts_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config("train", [override])


@pytest.mark.slow
def test_a_training_run_uses_the_resolved_count(tmp_path, shapes_root, cpus, caplog):
    cpus(os.cpu_count() or 2)
    with caplog.at_level("INFO"):
        result = train(compose_config("train", tiny_overrides(shapes_root, **{
            "trainer.num_workers": "auto", "trainer.max_iters": 1, "trainer.val_interval": 1})), tmp_path)
    expected = min(1, max(0, (os.cpu_count() or 2) - 1))  # dataset=shapes: 1 worker per GPU
    assert f"trainer.num_workers=auto: {expected} loader workers (dataset.workers_per_gpu=1" in caplog.text
    assert result.history
