import torch
from omegaconf import OmegaConf

from segtrain.engine.optim import build_optimizer, fused_update
from segtrain.models import build_model

SGD = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "head_lr_mult": 10.0}
ADAMW = {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "head_lr_mult": 1.0}


def _model():
    backbone = {"_target_": "segtrain.models.backbones.resnet.ResNetBackbone", "name": "resnet18",
                "output_stride": 16, "pretrained": False}
    head = {"_target_": "segtrain.models.deeplab.DeepLabV3", "aspp_channels": 8}
    return build_model(OmegaConf.create(head), OmegaConf.create(backbone), 3)


def test_cpu_optimizers_use_the_fused_update_with_both_groups():
    model = _model()
    for cfg in (SGD, ADAMW):
        optimizer = build_optimizer(OmegaConf.create(cfg), model)
        assert [g["fused"] for g in optimizer.param_groups] == [True, True]
        assert [g["lr"] for g in optimizer.param_groups] == [cfg["lr"], cfg["lr"] * cfg["head_lr_mult"]]


def test_fused_sgd_step_equals_the_reference_update():
    torch.manual_seed(0)
    weights = torch.randn(50)
    grads = [torch.randn(50) for _ in range(3)]
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(weights.clone())
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_parameters_off_cpu_and_cuda_use_the_loop_update():
    assert not fused_update([{"params": [torch.nn.Parameter(torch.empty(3, device="meta"))]}])
    assert not fused_update([{"params": []}])
