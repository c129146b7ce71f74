"""Distributed training (gloo on CPU), SyncBatchNorm policy and the global-batch split."""

import pytest
import torch
from dist_helpers import train_two_ranks
from torch import nn

from conftest import compose_config, tiny_overrides
from segtrain.engine.distributed import apply_sync_bn, micro_batch_size, should_sync_bn
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError


@pytest.mark.parametrize("setting,world,device,expected", [
    ("auto", 2, "cuda", True),
    ("auto", 8, "cuda", True),
    ("auto", 1, "cuda", False),
    ("auto", 2, "cpu", False),
    ("false", 2, "cuda", False),
    ("true", 2, "cuda", True),
    ("true", 1, "cuda", False),
])
def test_sync_bn_conversion_policy(setting, world, device, expected):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    converted = apply_sync_bn(model, setting, world, device)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == expected
    assert should_sync_bn(setting, world, device) == expected


def test_sync_bn_true_on_cpu_is_an_error():
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA"):
        should_sync_bn("true", 2, "cpu")


def test_global_batch_must_split_over_ranks_and_accumulation():
    assert micro_batch_size(16, 8, 1) == 2 and micro_batch_size(16, 2, 2) == 4
    with pytest.raises(ConfigError, match=r"trainer.batch_size=16 .* world size 3 x trainer.grad_accum_steps=2"):
        micro_batch_size(16, 3, 2)


@pytest.mark.slow
def test_accumulation_gives_the_gradient_of_one_big_batch(tmp_path, shapes_root):
    common = {"trainer.max_iters": 3, "trainer.val_interval": 3, "model.dropout": 0.0, "trainer.freeze_bn": "true"}
    big = train(compose_config("train", tiny_overrides(shapes_root, **common)), tmp_path / "big")
    split = train(compose_config("train", tiny_overrides(shapes_root, **common, **{"trainer.grad_accum_steps": 2})),
                  tmp_path / "split")
    for a, b in zip(big.model.state_dict().values(), split.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert [h["loss"] for h in big.history] == pytest.approx([h["loss"] for h in split.history], abs=1e-6)


@pytest.mark.slow
def test_two_process_training_matches_one_process(tmp_path, shapes_root):
    overrides = tiny_overrides(shapes_root, **{
        "trainer.max_iters": 4, "trainer.val_interval": 2, "trainer.ckpt_interval": 2,
        "model.dropout": 0.0, "trainer.freeze_bn": "true", "trainer.batch_size": 4})
    single, result = train_two_ranks(tmp_path, overrides)
    run_dir = tmp_path / "ddp" / "run"
    assert result["agreed"] == [True] * 4  # identical weights on both ranks after every step
    for (name, a), b in zip(single.model.state_dict().items(), result["state"].values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert result["losses"] == pytest.approx([h["loss"] for h in single.history], abs=1e-5)
    # only rank 0 wrote: checkpoints and events in its run directory, nothing in rank 1's
    assert (run_dir / "checkpoints" / "last.pt").is_file() and list(run_dir.glob("events.out.tfevents.*"))
    assert not (tmp_path / "ddp" / "scratch-1").exists() or not any((tmp_path / "ddp" / "scratch-1").rglob("*"))


@pytest.mark.slow
def test_channels_last_training_runs(tmp_path, shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root, **{"trainer.channels_last": "true",
                                                                 "trainer.max_iters": 2}))
    result = train(cfg, tmp_path)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_compile_falls_back_with_a_message(monkeypatch, caplog):
    from segtrain.engine import step as step_module

    def broken(model, **_):
        raise RuntimeError("no compiler")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Sequential(Block(), Block())
    with caplog.at_level("WARNING"):
        assert step_module.compile_regions(model, model) == (model, None)
    assert "torch.compile is unavailable" in caplog.text and "no compiler" in caplog.text
    assert all("forward" not in block.__dict__ for block in model)
