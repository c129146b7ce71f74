"""The compile modes in the benchmarks: benchmarks/compile_modes.py races off, model and regions, and
benchmarks/gpu_vs_smp.py --compile times both modes next to eager segtrain. Toy sizes on the CPU, with a
backend that runs dynamo's graphs as traced (no inductor: seconds, not minutes)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_compile_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def traced_backend():
    torch.compiler.reset()
    torch.compiler.set_default_backend(lambda graph, example_inputs: graph.forward)
    try:
        yield
    finally:
        torch.compiler.set_default_backend(None)
        torch.compiler.reset()


@pytest.mark.slow
def test_compile_modes_races_the_three_modes(traced_backend, capsys):
    script = load_script("compile_modes")
    args = argparse.Namespace(modes=["off", "model", "regions"], batch=2, size=32, steps=2, warmup=1,
                              device="cpu", overrides=["model=deeplabv3plus", "backbone=resnet18",
                                                       "backbone.out_indices=[1]"])
    steps = script.mode_steps(args)
    times, first = script.race(steps, args)
    assert {mode: len(t) for mode, t in times.items()} == {"off": 2, "model": 2, "regions": 2}
    ratios = script.report(times, first, args)
    assert ratios["off"] == 1.0 and all(r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    for mode in ("off", "model", "regions"):
        assert re.search(rf"{mode}: +[0-9.]+ ms/step .* vs off: [0-9.]+ \(ratio of medians\)", out), out


@pytest.mark.slow
def test_gpu_vs_smp_compile_times_both_modes_next_to_eager(traced_backend, monkeypatch, capsys):
    script = load_script("gpu_vs_smp")

    def plain_step(encoder, images, masks, args):  # smp is an optional extra: a stand-in of the same shape
        return script.Contender("smp", 0.0, lambda iteration: None)

    monkeypatch.setattr(script, "smp_contender", plain_step)
    monkeypatch.setattr(script, "sync", lambda device: time.sleep(0.001))
    args = argparse.Namespace(batch=2, size=32, steps=2, warmup=1, amp="off", channels_last=False,
                              compile=["model", "regions"], device="cpu",
                              overrides=["backbone.out_indices=[1]"])
    assert script.compare("resnet18", args) > 0
    out = capsys.readouterr().out
    for name in ("segtrain[off]", "segtrain[model]", "segtrain[regions]", "smp"):
        assert re.search(rf"{re.escape(name)}: +[0-9.]+ images/s", out), out
    assert "segtrain[model] / segtrain[off] images/s" in out and "segtrain[regions] / segtrain[off]" in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "regions"])
def test_segtrain_bench_times_each_compile_mode(traced_backend, tmp_path, mode):
    from conftest import compose_config
    from segtrain.commands.bench import run_bench

    overrides = ["model=deeplabv3plus", "backbone=resnet18", "backbone.out_indices=[1]", "bench.batch_size=2",
                 "bench.crop_size=[32,32]", "bench.steps=1", "bench.warmup=1", "bench.data_samples=8",
                 "trainer.device=cpu", f"trainer.compile={mode}"]
    report = run_bench(compose_config("bench", overrides), overrides, tmp_path)
    assert report["compile"] == mode and report["compile_seconds"] is not None and report["compiled_graphs"] > 0
    # The whole network is one graph for training and one for eval mode; regions are counted with regions only.
    assert (report["compiled_regions"] is None and report["compiled_graphs"] == 2) if mode == "model" else \
        report["compiled_regions"] > 0
    assert (tmp_path / "bench.json").is_file()
