"""torch.compile of the training step (trainer.compile=off|model|regions): the modes and their YAML booleans,
which modules are regions, the first-call fallback, and compiled training runs in both modes that compile
once and never recompile (validation included), watched through public torch.compiler APIs."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from conftest import compose_config, tiny_overrides
from segtrain.config_checks import COMPILE_DEFAULT, compile_mode
from segtrain.engine import step as step_module
from segtrain.engine.callbacks import Callback
from segtrain.engine.compile import RegionalCompile, model_regions
from segtrain.engine.runtime import resolve_runtime
from segtrain.engine.step import FirstCallFallback
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.models import build_backbone, build_model


@pytest.mark.parametrize("value,expected", [
    ("off", "off"), ("model", "model"), ("REGIONS", "regions"),
    # The key was a boolean before the modes: true is the default mode, false (YAML's bare off too) is off.
    (True, COMPILE_DEFAULT), ("true", COMPILE_DEFAULT), ("True", COMPILE_DEFAULT), (False, "off"), ("False", "off")])
def test_compile_modes_and_yaml_booleans(value, expected):
    assert compile_mode(value) == expected


def test_compile_mode_is_canonical_after_composition_and_reaches_the_runtime():
    assert compose_config("train", []).trainer.compile == "off"
    for given, expected in (("true", COMPILE_DEFAULT), ("false", "off"), ("regions", "regions"), ("model", "model")):
        trainer = compose_config("train", [f"trainer.compile={given}", "trainer.device=cpu"]).trainer
        assert trainer.compile == expected and resolve_runtime(trainer).compile == expected
    with pytest.raises(ConfigError, match="trainer.compile must be one of off, model, regions, got 'graph'"):
        compose_config("train", ["trainer.compile=graph"])


def test_whole_model_compile_falls_back_with_a_message(monkeypatch, caplog):
    def broken(model, **_):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Linear(2, 2)
    with caplog.at_level("WARNING"):
        assert step_module.compile_network(model) is model
    assert "trainer.compile=model: torch.compile is unavailable" in caplog.text and "no compiler" in caplog.text


def _quickstart(*overrides: str) -> nn.Module:
    cfg = compose_config("train", ["experiment=quickstart", *overrides])
    return build_model(cfg.model, cfg.backbone, 5)


def test_regions_are_the_backbone_blocks_and_the_head():
    model = _quickstart()
    regions = model_regions(model)
    kinds = [type(r).__name__ for r in regions]
    blocks = [m for m in model.backbone.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and kinds.count("BasicBlock") == len(blocks)  # every residual block of resnet18
    assert {id(model.aspp), id(model.low_level), id(model.fuse)} <= {id(r) for r in regions}
    # Single layers stay eager: the stem conv and BatchNorm, the 1x1 classifier.
    assert all(id(m) not in {id(r) for r in regions} for m in (model.backbone.net.conv1, model.classifier))
    xception = build_backbone(compose_config("train", ["backbone=xception65"]).backbone)
    kinds = [type(r).__name__ for r in model_regions(xception)]
    modules = [m for m in xception.modules() if type(m).__name__ == "XceptionModule"]
    # All blocks, and (for the feature taps, which call a block's layers one by one) their separable convs.
    assert modules and kinds.count("XceptionModule") == len(modules) and kinds.count("SeparableConv2d") >= 5 * 3


@pytest.mark.slow
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


@pytest.fixture()
def counting_backend():
    """The default torch.compile backend for one test: records each graph dynamo hands it, runs it as traced."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch.compiler.reset()
    torch.compiler.set_default_backend(backend)
    try:
        yield graphs
    finally:
        torch.compiler.set_stance("default")
        torch.compiler.set_default_backend(None)
        torch.compiler.reset()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regions", "model"])
def test_compiled_training_and_validation_never_recompile(tmp_path, shapes_root, counting_backend, mode):
    """Step 1 compiles (each region into one graph, or the whole network into one graph: no graph break);
    later steps and the validations (eager) compile nothing: after step 1 the stance is fail_on_recompile."""
    graphs_after: dict[int, int] = {}
    steps = []

    class GraphCount(Callback):
        def on_step_end(self, run, result):
            graphs_after[run.state.iteration] = len(counting_backend)
            steps.append(run.step)
            if run.state.iteration == 1:
                torch.compiler.set_stance("fail_on_recompile")  # any later compilation raises

    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.compile": mode, "trainer.max_iters": 3, "trainer.val_interval": 2, "trainer.ckpt_interval": 3,
        # resnet18's first stage only (its two blocks are identical: one graph) and the head.
        "backbone.out_indices": "[1]", "logging.image_interval": 3}))
    start = time.perf_counter()
    result = train(cfg, tmp_path, callbacks=[GraphCount()])
    elapsed = time.perf_counter() - start
    regions = [m for m in result.model.modules() if "forward" in m.__dict__]
    assert steps[0].compiled, f"trainer.compile={mode} compiled nothing"
    # Step 1 compiles; steps 2-3, the validations after steps 2 and 3 and the checkpoints compile nothing.
    assert 0 < graphs_after[1] == graphs_after[2] == graphs_after[3] == len(counting_backend), graphs_after
    if mode == "regions":
        # One graph per outermost region (a region inside another is traced into the outer one's graph): a graph
        # break would split a region's graph in two.
        inner = {id(m) for region in regions for m in region.modules() if m is not region}
        assert len(counting_backend) == len([r for r in regions if id(r) not in inner]), len(counting_backend)
    else:
        # The model itself is untouched (validation, checkpoints and EMA use it eagerly); one graph, no break.
        assert not regions and steps[0].regions is None and len(counting_backend) == 1, len(counting_backend)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # The eager path takes any image size without compiling.
    model = result.model.eval()
    with torch.no_grad(), RegionalCompile.eager():
        assert model(torch.randn(1, 3, 37, 51))["out"].shape == (1, 5, 37, 51)
    assert len(counting_backend) == graphs_after[3]
    print(f"compiled training run ({mode}): {elapsed:.1f} s, {len(counting_backend)} graphs, {len(regions)} regions")
