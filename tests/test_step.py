"""The one training step: shared by the trainer and `segtrain bench`, the loss group end to end."""

import json
import math

import pytest
import torch
from dist_helpers import train_two_ranks
from torch import nn

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.commands.bench import bench_train_step
from segtrain.engine.distributed import DistContext
from segtrain.engine.runtime import Runtime, autocast
from segtrain.engine.step import FirstCallFallback, TrainStep
from segtrain.engine.trainer import Trainer, train
from segtrain.errors import ConfigError
from segtrain.losses import CrossEntropy


@pytest.mark.slow
def test_bench_and_trainer_run_the_same_step(tmp_path, shapes_root):
    overrides = tiny_overrides(shapes_root, **{"model.dropout": 0.0, "optimizer.lr": 0.05})
    trainer = Trainer(compose_config("train", overrides), tmp_path)
    trainer.setup()
    bench = bench_train_step(compose_config("bench", [*overrides, "bench.batch_size=4", "bench.crop_size=[32,32]"]),
                             torch.device("cpu"))
    bench.model.load_state_dict(trainer.run.model.state_dict())
    trainer.run.model.train()
    bench.model.train()
    batches = [(bench.images.clone(), bench.masks.clone())]
    for iteration in (1, 2):
        ours = trainer.run.step(iteration, batches)
        theirs = bench.step(iteration, batches)
        assert torch.equal(ours.loss, theirs.loss)
    before = dict(bench_train_step(compose_config("bench", overrides), torch.device("cpu")).model.state_dict())
    changed = 0
    for (name, a), b in zip(trainer.run.model.state_dict().items(), bench.model.state_dict().values()):
        assert torch.equal(a, b), name
        changed += not torch.equal(a, before[name]) if a.shape == before[name].shape else 1
    assert changed > 0  # the two steps did update the weights
    assert trainer.run.step.optimizer.param_groups[0]["lr"] == bench.step.optimizer.param_groups[0]["lr"]


def test_compile_fallback_guards_only_the_first_call(caplog):
    eager = nn.Linear(2, 2)
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        raise RuntimeError("compiler missing" if calls["n"] == 1 else "CUDA error: an illegal memory access")

    forward = FirstCallFallback(flaky, eager)
    with caplog.at_level("WARNING"):
        assert forward(torch.zeros(1, 2)).shape == (1, 2)  # first call: falls back to eager
    assert "compilation failed (RuntimeError: compiler missing)" in caplog.text
    assert forward.module is eager
    compiled_ok = FirstCallFallback(lambda x: eager(x), eager)
    compiled_ok(torch.zeros(1, 2))
    compiled_ok.module = flaky  # a later failure of the compiled module is raised as what it is
    with pytest.raises(RuntimeError, match="illegal memory access"):
        compiled_ok(torch.zeros(1, 2))


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("extra", [["loss=ohem", "loss.min_kept=64"], ["loss.class_weights=[0.5,2,2,2,2]"]])
def test_train_with_ohem_or_class_weights_from_the_command_line(tmp_path, extra):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 2, "trainer.val_interval": 2})
    result = run_cli("train", *overrides, *extra, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("loss OhemCrossEntropy" if "loss=ohem" in extra else "loss CrossEntropy") in log
    assert "iter 2/2: loss " in log


@pytest.mark.cli
def test_aux_weight_for_a_model_without_auxiliary_heads_is_refused(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 1})
    result = run_cli("train", *overrides, "loss.aux_weight=0.3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("segtrain train: error: loss.aux_weight") and "model.aux" in last, result.stderr


def _pspnet(shapes_root, **extra) -> list[str]:
    values = {"trainer.max_iters": 2, "trainer.val_interval": 2, "trainer.ckpt_interval": 2, "model.dropout": 0.0,
              "trainer.freeze_bn": "true", "trainer.batch_size": 4, "backbone.output_stride": 8,
              "model.channels": 16, "model.aux_channels": 8, **extra}
    return ["model=pspnet", "backbone=resnet18", *tiny_overrides(shapes_root, **values)[1:]]


@pytest.mark.slow
def test_pspnet_aux_weight_comes_from_the_loss(tmp_path, shapes_root):
    with_aux = train(compose_config("train", _pspnet(shapes_root)), tmp_path / "a")
    without = train(compose_config("train", _pspnet(shapes_root, **{"loss.aux_weight": 0.0})), tmp_path / "b")
    assert with_aux.model.auxiliary_outputs() == ("aux",)
    assert with_aux.history[0]["loss"] > without.history[0]["loss"]  # the aux term adds 0.4 x its CE


@pytest.mark.slow
def test_ddp_with_an_unweighted_auxiliary_head(tmp_path, shapes_root):
    """aux_weight 0: the declared aux head gets no gradient, and DDP is told so by the declaration."""
    overrides = _pspnet(shapes_root, **{"loss.aux_weight": 0.0})
    single, result = train_two_ranks(tmp_path, overrides)
    assert result["agreed"] == [True, True]
    for (name, a), b in zip(single.model.state_dict().items(), result["state"].values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


class TinySegmentor(nn.Module):
    """A 1x1 convolution: the smallest network with the segmentor contract ({"out": logits})."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(images)}


def _clip_step(amp: str, clip: float | None) -> tuple[TrainStep, list, dict[str, torch.Tensor], torch.Tensor]:
    """A TrainStep of TinySegmentor with plain SGD at lr 1 (the update is minus the applied gradient),
    a batch, and the gradients and their total norm computed by hand (fp32 backward, no clipping)."""
    torch.manual_seed(0)
    model = TinySegmentor()
    cpu = torch.device("cpu")
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), CrossEntropy(4), lambda iteration: 1.0,
                     DistContext(0, 1, 0, cpu), Runtime(cpu, amp, channels_last=False), clip_grad_norm=clip)
    images, masks = torch.randn(2, 3, 8, 8) * 5, torch.randint(0, 4, (2, 8, 8))
    reference = TinySegmentor()
    reference.load_state_dict(model.state_dict())
    with autocast(cpu, amp):
        outputs = reference(images)
    loss = CrossEntropy(4)(outputs, masks, step.loss.normalizer(masks).float())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    return step, [(images, masks)], grads, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))


def _applied_gradients(step: TrainStep, batches: list) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    before = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    result = step(1, batches)
    assert not result.skipped
    return {name: before[name] - p.detach() for name, p in step.model.named_parameters()}, result.grad_norm


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_clip_grad_norm_scales_the_gradients_to_the_limit(amp):
    step, batches, grads, total = _clip_step(amp, clip=0.1)
    assert step.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":  # the loss is scaled by 2**10 before backward (2**16 overflows here: see the next test)
        step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    applied, grad_norm = _applied_gradients(step, batches)
    assert total > 0.1  # the hand-computed norm is above the limit: clipping must act
    # The reported norm is that of the true (unscaled) gradients, before clipping.
    torch.testing.assert_close(grad_norm, total, rtol=1e-3, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(applied[name], grad * 0.1 / total, rtol=1e-3, atol=1e-7)
    applied_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in applied.values()]))
    torch.testing.assert_close(applied_norm, torch.tensor(0.1), rtol=1e-3, atol=0)


def test_an_fp16_overflow_is_still_skipped_by_the_scaler_with_clipping():
    step, batches, _, _ = _clip_step("fp16", clip=0.1)
    scale = step.scaler.get_scale()  # 2**16: this batch's scaled gradients overflow float16
    applied, grad_norm = _applied_gradients(step, batches)
    assert not torch.isfinite(grad_norm)
    assert all(torch.equal(change, torch.zeros_like(change)) for change in applied.values())  # no update
    assert step.scaler.get_scale() == scale / 2


def test_gradients_below_the_limit_and_clipping_off_are_left_alone():
    for clip in (1e6, None):
        step, batches, grads, total = _clip_step("off", clip)
        applied, grad_norm = _applied_gradients(step, batches)
        assert grad_norm is None if clip is None else torch.allclose(grad_norm, total)
        for name, grad in grads.items():
            torch.testing.assert_close(applied[name], grad)


@pytest.mark.parametrize("value", [0, -1.0, "inf", "nan"])
def test_clip_grad_norm_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match=r"^trainer.clip_grad_norm must be a positive number \(null: off"):
        compose_config("train", [f"trainer.clip_grad_norm={value}"])


@pytest.mark.slow
def test_the_gradient_norm_is_logged_at_log_intervals(tmp_path, shapes_root):
    overrides = tiny_overrides(shapes_root, **{"trainer.clip_grad_norm": 0.5, "trainer.max_iters": 4,
                                               "trainer.val_interval": 4, "logging.interval": 2})
    train(compose_config("train", overrides), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = {line["iteration"]: line["train/grad_norm"] for line in lines if "train/grad_norm" in line}
    assert sorted(norms) == [2, 4] and all(math.isfinite(n) and n > 0 for n in norms.values())
