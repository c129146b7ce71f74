"""The GPU benchmarks run end to end on the CPU at toy sizes (their figures only mean something on a GPU),
and `segtrain bench` reports start-up, compile time and CUDA memory keys."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from conftest import checkout_env, run_cli
from segtrain.engine.inference import InferenceSettings, infer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# One thread: the 2-core machine is often shared with other test processes, and oversubscribed OpenMP
# threads spin; one thread keeps these runs at a few seconds each.
ENV = {"OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A benchmark script, run on this checkout's segtrain (mark the test `cli`: it starts a process)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=checkout_env(ENV), capture_output=True, text=True,
                          timeout=300)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered under a private name: dataclasses look their module up in sys.modules while executing it.
    sys.modules[f"_benchmark_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.cli
def test_gpu_vs_smp_runs_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("segmentation_models_pytorch")
    result = run([str(BENCHMARKS / "gpu_vs_smp.py"), "--device", "cpu", "--encoders", "resnet18", "--batch", "2",
                  "--size", "32", "--steps", "1", "--warmup", "1", "--amp", "off", "--no-channels-last",
                  "--threads", "1"], tmp_path)
    assert result.returncode == 0, result.stderr
    ratio = re.search(r"segtrain / smp images/s = ([0-9.]+) .*median of per-round ratios ([0-9.]+)", result.stdout)
    assert ratio and float(ratio[1]) > 0 and float(ratio[2]) > 0, result.stdout
    assert re.search(r"segtrain: +[0-9.]+ images/s", result.stdout) and re.search(r"smp: +[0-9.]+ images/s",
                                                                                  result.stdout)


def test_gpu_vs_smp_maps_encoders_to_segtrain_backbones() -> None:
    script = load_script("gpu_vs_smp")
    assert script.segtrain_backbone("resnet101") == "resnet101"
    assert script.segtrain_backbone("tu-xception65") == "xception65"
    with pytest.raises(SystemExit, match="no segtrain backbone"):
        script.segtrain_backbone("tu-efficientnet_b0")


@pytest.mark.cli
def test_tta_cost_runs_on_cpu(tmp_path: Path) -> None:
    result = run([str(BENCHMARKS / "tta_cost.py"), "--device", "cpu", "--images", "2", "--max-side", "64",
                  "--scales", "0.5", "1.0", "--repeats", "1", "--threads", "1", "backbone=resnet18"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"TTA / sum of forward passes = [0-9.]+ .*median of per-image ratios [0-9.]+", result.stdout)
    assert "(4 forward passes per image)" in result.stdout and "cuDNN autotuning off" in result.stdout
    assert len(re.findall(r"^ +\d+x\d+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", result.stdout, re.M)) == 2


@pytest.mark.cli
def test_data_pipeline_runs_and_reports_both_worker_outputs(tmp_path: Path) -> None:
    result = run([str(BENCHMARKS / "data_pipeline.py"), "--rounds", "1", "--samples", "1", "--cases", "voc-513"],
                 tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ +voc-513( +[0-9.]+){6}$", result.stdout, re.M), result.stdout


class ShapeRecorder(nn.Module):
    """A stand-in model that records the input of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append(images.clone())
        return {"out": images[:, :2]}


def test_tta_cost_times_the_very_passes_infer_runs() -> None:
    """(b) must be made of the inputs `infer` feeds the model: same sizes, same mirrored pixels."""
    script = load_script("tta_cost")
    settings = InferenceSettings(scales=(0.5, 0.75, 1.0, 1.75), flip=True)
    image = torch.randn(1, 3, 37, 50)
    model = ShapeRecorder()
    infer(model, image, settings)
    built = script.pass_inputs(image, settings)
    assert len(built) == len(model.inputs) == 8
    for ours, theirs in zip(built, model.inputs):
        assert torch.equal(ours, theirs)


def test_tta_cost_sizes_are_voc_like_and_seeded() -> None:
    script = load_script("tta_cost")
    sizes = script.voc_like_sizes(12, 500, seed=0)
    assert sizes == script.voc_like_sizes(12, 500, seed=0) and sizes[0] == (375, 500)
    assert all(max(h, w) == 500 and 300 <= min(h, w) <= 500 for h, w in sizes)
    assert len(set(sizes)) > 6  # varying sizes: the point of the measurement


@pytest.mark.cli
def test_bench_reports_startup_compile_and_memory_keys(tmp_path: Path) -> None:
    result = run_cli("bench", "model=deeplabv3plus", "backbone=resnet18", "bench.batch_size=2",
                     "bench.crop_size=[64,64]", "bench.steps=2", "bench.warmup=1", "bench.data_samples=8",
                     "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    for key in ("train_images_per_s", "inference_images_per_s", "peak_memory_mb", "data_samples_per_s_per_worker",
                "gflops_per_image", "first_step_seconds"):
        assert report[key] > 0, key
    assert report["train_startup_seconds"] >= 0 and report["inference_startup_seconds"] >= 0
    # Without trainer.compile there is no compile time; off CUDA there are no CUDA memory figures.
    assert report["compile_seconds"] is None and report["compile"] == "off"
    assert report["compiled_regions"] is None and report["compiled_graphs"] is None
    assert report["max_memory_allocated_mb"] is None and report["max_memory_reserved_mb"] is None
    assert report["peak_memory_kind"] == "process peak RSS"
    for row in ("first training step", "start-up (warm-up - steady)", "compile time"):
        assert row in result.stdout, row
    # It says what it is doing while it runs: one line per phase, in order, on stderr.
    phases = [line for line in result.stderr.splitlines() if line.startswith("bench ")]
    assert [line.split(":")[0] for line in phases] == [f"bench {n}/4" for n in range(1, 5)], result.stderr
    assert "training steps: 1 warm-up + 2 timed" in phases[1] and "inference passes" in phases[2]
