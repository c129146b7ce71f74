"""Regional torch.compile: which modules are regions, the first-call fallback, and a training run on
inductor's CPU backend that compiles once and never recompiles (validation included)."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import compose_config, tiny_overrides
from segtrain.engine.callbacks import Callback
from segtrain.engine.compile import RegionalCompile, model_regions
from segtrain.engine.step import FirstCallFallback
from segtrain.engine.trainer import train
from segtrain.models import build_backbone, build_model


def _quickstart(*overrides: str) -> nn.Module:
    cfg = compose_config("train", ["experiment=quickstart", *overrides])
    return build_model(cfg.model, cfg.backbone, 5)


def test_regions_are_the_backbone_blocks_and_the_head():
    model = _quickstart()
    regions = model_regions(model)
    kinds = [type(r).__name__ for r in regions]
    assert kinds.count("BasicBlock") == 8  # resnet18: 2 blocks in each of 4 stages
    assert {id(model.aspp), id(model.low_level), id(model.fuse)} <= {id(r) for r in regions}
    # Single layers stay eager: the stem conv and BatchNorm, the 1x1 classifier.
    assert all(id(m) not in {id(r) for r in regions} for m in (model.backbone.net.conv1, model.classifier))
    xception = build_backbone(compose_config("train", ["backbone=xception65"]).backbone)
    kinds = [type(r).__name__ for r in model_regions(xception)]
    # All 21 blocks, and (for the feature taps, which call a block's layers one by one) their separable convs.
    assert kinds.count("XceptionModule") == 21 and kinds.count("SeparableConv2d") >= 5 * 3


def test_a_failed_first_compiled_call_restores_the_eager_model(caplog):
    model = _quickstart("backbone.out_indices=[1,2]")
    regions = RegionalCompile(model)
    assert regions.regions and all("forward" in r.__dict__ for r in regions.regions)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(_: torch.Tensor) -> dict:
        raise RuntimeError("inductor: no C++ compiler")

    forward = FirstCallFallback(failing, model, on_failure=regions.remove)
    with caplog.at_level("WARNING"):
        out = forward(torch.randn(2, 3, 32, 32))["out"]
    assert out.shape == (2, 5, 32, 32) and "no C++ compiler" in caplog.text
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(state)  # in-place compilation never changed the keys


def test_compiled_training_and_validation_never_recompile(tmp_path, shapes_root):
    """inductor on the CPU: every region compiles in the first step, later steps and the validations
    (eager) compile nothing, and no region has a graph break."""
    torch._dynamo.reset()
    counters.clear()
    frames: dict[int, int] = {}
    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.compile": "true", "trainer.max_iters": 3, "trainer.val_interval": 2, "trainer.ckpt_interval": 3,
        # resnet18's first stage only (its two blocks are identical: one graph for inductor) and the head.
        "backbone.out_indices": "[1]", "logging.image_interval": 3}))
    start = time.perf_counter()
    class FrameCount(Callback):
        def on_step_end(self, run, result):
            frames[run.state.iteration] = counters["frames"]["total"]

    result = train(cfg, tmp_path, callbacks=[FrameCount()])
    elapsed = time.perf_counter() - start
    regions = [m for m in result.model.modules() if "forward" in m.__dict__]
    assert regions, "trainer.compile=true compiled no region"
    assert frames[1] > 0 and counters["frames"]["ok"] == counters["frames"]["total"]
    # Step 1 compiles; steps 2-3, the validations after steps 2 and 3 and the checkpoints compile nothing.
    assert frames[1] == frames[2] == frames[3] == counters["frames"]["total"], (frames, counters)
    # A compiled region per code object: one graph per compiled frame, and no graph breaks.
    assert counters["stats"]["unique_graphs"] == counters["frames"]["ok"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # The eager path takes any image size without compiling.
    model = result.model.eval()
    with torch.no_grad(), RegionalCompile.eager():
        assert model(torch.randn(1, 3, 37, 51))["out"].shape == (1, 5, 37, 51)
    assert counters["frames"]["total"] == frames[3]
    print(f"compiled training run: {elapsed:.1f} s, {frames[1]} regions compiled, "
          f"{counters['inductor']['fxgraph_cache_hit']} graphs from inductor's cache")
