"""`segtrain export ckpt=PATH format=onnx|torchscript`: the model in inference mode, verified.

The exported graph takes a normalised (N, 3, H, W) float tensor and returns (N, C, H, W) logits;
auxiliary heads are not part of it. ONNX is exported with dynamic batch, height and width;
TorchScript is traced at `export.input_size`. Either file is checked against PyTorch on a random
input and the largest absolute difference is printed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.commands.evaluate import load_for_inference
from segtrain.errors import ConfigError, SegtrainError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class LogitsOnly(nn.Module):
    """The deployable graph: the main logits of a segmentor in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SegtrainError("format=onnx needs the onnx extras: pip install 'segtrain[onnx]'") from None
    height, width = torch.export.Dim("height", min=32, max=8192), torch.export.Dim("width", min=32, max=8192)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"image": {0: batch, 2: height, 3: width}}, dynamo=True, verbose=False)


def onnx_outputs(path: Path, image: torch.Tensor) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise SegtrainError("checking the ONNX file needs onnxruntime: pip install 'segtrain[onnx]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]


def run_export(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    if composed.format not in FORMATS:
        raise ConfigError(f"format must be one of {sorted(FORMATS)}, got {composed.format!r}")
    size = [int(v) for v in composed.export.input_size]
    if len(size) != 2 or min(size) < 32:
        raise ConfigError(f"export.input_size must be [H, W] with both >= 32, got {size}")
    loaded = load_for_inference(composed, overrides)
    module = LogitsOnly(loaded.model.cpu().float())  # exported graphs are device-neutral float32
    path = Path(composed.export.output) if composed.export.output else run_dir / f"model{FORMATS[composed.format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, *size, generator=generator)
    if composed.format == "onnx":
        export_onnx(module, example, path)
    else:
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))
    # Verify on a fresh input: for ONNX at another size too, since its height and width are dynamic.
    checks = [torch.randn(1, 3, *size, generator=generator)]
    if composed.format == "onnx":
        checks.append(torch.randn(2, 3, size[0] + 37, size[1] + 21, generator=generator))
    worst = 0.0
    for image in checks:
        with torch.no_grad():
            expected = module(image).numpy()
            if composed.format == "onnx":
                actual = onnx_outputs(path, image)
            else:
                actual = torch.jit.load(str(path))(image).numpy()
        if actual.shape != expected.shape:
            raise SegtrainError(f"exported model gives shape {actual.shape} for input {tuple(image.shape)}, "
                                f"PyTorch {expected.shape}")
        difference = float(np.abs(actual - expected).max())
        worst = max(worst, difference)
        print(f"checked input {tuple(image.shape)}: max |exported - PyTorch| = {difference:.3g}")
    print(f"wrote {path} ({composed.format}, {'dynamic' if composed.format == 'onnx' else 'fixed'} input size, "
          f"max difference {worst:.3g})")
    return {"path": str(path), "max_abs_diff": worst}
