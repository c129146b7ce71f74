"""CUDA: the defaults, mixed precision with exact resume, channels_last, compile, CPU/CUDA parity,
export from a CUDA-trained checkpoint and SyncBatchNorm in training mode. Skipped without a GPU
(conftest); CPU-only behaviour of the same settings is tested elsewhere."""

import json

import pytest
import torch
from torch import nn

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.runtime import resolve_amp, resolve_channels_last
from segtrain.engine.trainer import Trainer, train

pytestmark = pytest.mark.cuda


def _cuda(shapes_root, **values) -> list[str]:
    return tiny_overrides(shapes_root, **{"trainer.device": "cuda", **values})


def _weights(result: dict) -> dict:
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}


def test_defaults_resolve_to_fast_settings_on_cuda(tmp_path, shapes_root):
    device = torch.device("cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_amp("auto", device) == expected and resolve_channels_last("auto", device)
    trainer = Trainer(compose_config("train", _cuda(shapes_root, **{"trainer.amp": "auto",
                                                                     "trainer.channels_last": "auto"})), tmp_path)
    trainer.setup()
    assert trainer.run.step.amp == expected
    assert trainer.run.step.scaler.is_enabled() == (expected == "fp16")
    assert trainer.run.step.memory_format == torch.channels_last
    conv = next(m for m in trainer.run.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_resumes_exactly(tmp_path, shapes_root, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    values = {"trainer.amp": amp, "trainer.max_iters": 4, "trainer.val_interval": 2, "trainer.ckpt_interval": 2}
    full = train(compose_config("train", _cuda(shapes_root, **values)), tmp_path / "full")
    part = tmp_path / "part"
    train(compose_config("train", _cuda(shapes_root, **{**values, "trainer.max_iters": 2})), part)
    resumed = train(compose_config("train", [*_cuda(shapes_root, **values), "resume=auto"]), part)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full.history)
    for (name, a), b in zip(_weights(full).items(), _weights(resumed).values()):
        assert torch.equal(a, b), name
    if amp == "fp16":
        assert load_checkpoint(part / "checkpoints" / "last.pt")["scaler"]["scale"] > 0


@pytest.mark.parametrize("mode", ["model", "regions"])
def test_channels_last_and_compile_train_on_cuda(tmp_path, shapes_root, mode):
    result = train(compose_config("train", _cuda(shapes_root, **{
        "trainer.channels_last": "true", "trainer.compile": mode, "trainer.max_iters": 3,
        "trainer.val_interval": 3})), tmp_path)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.final_miou >= 0


@pytest.mark.cli
def test_cpu_and_cuda_evaluation_agree(tmp_path, shapes_root):
    run = tmp_path / "run"
    train(compose_config("train", tiny_overrides(shapes_root, **{"trainer.max_iters": 6})), run)
    ckpt = run / "checkpoints" / "last.pt"
    scores = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"ev_{device}"
        result = run_cli("eval", f"ckpt={ckpt}", f"trainer.device={device}", "trainer.amp=off",
                         f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        scores[device] = json.loads((out / "metrics.json").read_text())["miou"]
    # fp32 on both; convolution algorithms differ, so a few pixels near ties may flip.
    assert abs(scores["cpu"] - scores["cuda"]) < 2e-3


@pytest.mark.cli
def test_export_from_a_cuda_trained_checkpoint(tmp_path, shapes_root):
    run = tmp_path / "run"
    train(compose_config("train", _cuda(shapes_root, **{"trainer.max_iters": 2, "trainer.val_interval": 2})), run)
    result = run_cli("export", f"ckpt={run / 'checkpoints' / 'last.pt'}", "format=torchscript",
                     "export.input_size=[64,64]", f"hydra.run.dir={tmp_path / 'ex'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ex" / "model.pt").is_file()


def test_sync_batchnorm_in_training_mode_matches_batchnorm(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).cuda().train()
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).cuda().train()
        synced.load_state_dict(plain.state_dict())
        x = torch.randn(4, 3, 16, 16, device="cuda")
        a, b = plain(x), synced(x)
        a.sum().backward()
        b.sum().backward()
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(plain[1].running_var, synced[1].running_var, atol=1e-5)
        assert torch.allclose(plain[0].weight.grad, synced[0].weight.grad, atol=1e-4)
    finally:
        dist.destroy_process_group()
