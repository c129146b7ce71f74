import pytest
import torch
from omegaconf import OmegaConf

from segtrain.engine.optim import build_optimizer, fused_update, load_optimizer_state, parameter_groups
from segtrain.errors import ConfigError
from segtrain.models import build_model

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9, "nesterov": False,
       "weight_decay": 1e-4, "head_lr_mult": 10.0}
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
         "weight_decay": 0.01, "head_lr_mult": 1.0}


def _model():
    backbone = {"_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": "resnet18",
                "output_stride": 16, "pretrained": False}
    head = {"_target_": "segtrain.models.deeplab.DeepLabV3", "aspp_channels": 8}
    return build_model(OmegaConf.create(head), OmegaConf.create(backbone), 3)


def test_cpu_optimizers_use_the_fused_update_with_both_groups():
    model = _model()
    for cfg, kind in ((SGD, torch.optim.SGD), (ADAMW, torch.optim.AdamW)):
        optimizer = build_optimizer(OmegaConf.create(cfg), model)
        assert isinstance(optimizer, kind)
        assert [g["fused"] for g in optimizer.param_groups] == [True, True]
        assert [g["lr"] for g in optimizer.param_groups] == [cfg["lr"], cfg["lr"] * cfg["head_lr_mult"]]
        assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, cfg["head_lr_mult"]]


def test_optimizer_keys_are_checked_against_the_class():
    with pytest.raises(ConfigError, match="unknown key optimizer.momentun for SGD"):
        build_optimizer(OmegaConf.create({**SGD, "momentun": 0.8}), _model())


def test_resuming_takes_the_state_but_keeps_this_runs_settings_and_fused_update():
    model = _model()
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    old = torch.optim.SGD(parameter_groups(model, 0.02, 1.0), lr=0.02, momentum=0.5, weight_decay=0.1)  # loop update
    torch.nn.functional.cross_entropy(model(images)["out"], masks).backward()
    old.step()
    model.zero_grad()
    optimizer = build_optimizer(OmegaConf.create({**SGD, "head_lr_mult": 1.0}), model)
    load_optimizer_state(optimizer, old.state_dict())
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]
    # A changed learning rate, momentum or weight decay is this run's, not the checkpoint's.
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [(0.01, 0.9, 1e-4)] * 2
    momentum = next(iter(optimizer.state.values()))["momentum_buffer"].clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.nn.functional.cross_entropy(model(images)["out"], masks)).backward()
    scaler.step(optimizer)  # the fused update with the scaler's scale: fails if the loop update came back
    scaler.update()
    assert not torch.equal(next(iter(optimizer.state.values()))["momentum_buffer"], momentum)


def test_parameters_off_cpu_and_cuda_use_the_loop_update():
    assert not fused_update([{"params": [torch.nn.Parameter(torch.empty(3, device="meta"))]}])
    assert not fused_update([{"params": []}])


@pytest.mark.parametrize("change,message", [
    ({"_partial_": False}, "optimizer._partial_ must be true"),
    ({"params": [1]}, "optimizer.params is set by segtrain itself"),
    ({"momentum": -1.0}, "optimizer: SGD refused the configured values: Invalid momentum value: -1.0"),
    ({"nesterov": True, "momentum": 0.0}, "optimizer: SGD refused the configured values: Nesterov momentum"),
])
def test_bad_optimizer_nodes_are_one_line_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(OmegaConf.create({**SGD, **change}), _model())


@pytest.mark.slow
def test_bad_schedule_and_loss_values_are_one_line_config_errors():
    from conftest import compose_config
    from segtrain.engine.step import build_loss, build_lr_schedule

    for overrides, message in ((["schedule.min_lr=-0.001"], "schedule.min_lr must be in"),
                               (["schedule.power=-1"], "schedule.power must be >= 0"),
                               (["+schedule.base_lr=1"], "schedule.base_lr is set by segtrain itself"),
                               (["schedule._partial_=false"], "schedule._partial_ must be true")):
        with pytest.raises(ConfigError, match=message):
            build_lr_schedule(compose_config("train", overrides))
    for overrides, message in ((["loss=ohem", "loss.threshold=abc"], "loss: OhemCrossEntropy refused"),
                               (["loss=ohem", "loss.min_kept=2.7"], "loss.min_kept must be a whole number"),
                               (["loss.class_weights=abc"], "loss: CrossEntropy refused"),
                               (["+loss.num_classes=3"], "loss.num_classes is set by segtrain itself"),
                               (["+loss._partial_=true"], "loss._partial_ must be false")):
        with pytest.raises(ConfigError, match=message):
            build_loss(compose_config("train", overrides), 5, 255)
