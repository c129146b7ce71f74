"""`segtrain export ckpt=PATH format=onnx|torchscript`: the model in inference mode, verified.

The exported graph takes a normalised (N, 3, H, W) float tensor and returns (N, C, H, W) logits;
auxiliary heads are not part of it. ONNX is exported with dynamic batch, height and width, as one
self-contained file below SINGLE_FILE_LIMIT (weights in a `.data` file beside it above); TorchScript
is traced at `export.input_size`. Both files carry the metadata a deployment needs (class names,
palette, normalisation, input layout, provenance: `export_metadata`). Either file is checked
against PyTorch on a random input and the largest absolute difference is printed. The libraries'
own messages go to the run's export.log, not the console.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

import segtrain
from segtrain.commands.quiet import library_output_to_log
from segtrain.data.normalization import normalization
from segtrain.engine.checkpoint import recorded_train_state
from segtrain.engine.restore import LoadedModel, load_for_inference
from segtrain.errors import ConfigError, SegtrainError, first_line
from segtrain.visualize import make_palette

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# Weights above this go to `<file>.data`: a protobuf message (one .onnx file) cannot exceed 2 GB,
# and the graph itself needs room too (the threshold torch.onnx uses as well).
SINGLE_FILE_LIMIT = 1536 * 1024 * 1024
TORCHSCRIPT_METADATA = "segtrain.json"  # the TorchScript file's extra file holding the metadata
INPUT_NORMALIZATION = "(pixel / 255 - mean) / std per channel"


class LogitsOnly(nn.Module):
    """The deployable graph: the main logits of a segmentor in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def _number(value: object) -> float | int | None:
    """A checkpoint's recorded number, or None when absent or not a finite number (checkpoints are untrusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _target_name(node: DictConfig | None) -> str:
    target = str((node or {}).get("_target_", ""))
    return target.rpartition(".")[2]


def export_metadata(loaded: LoadedModel) -> dict[str, str]:
    """Key -> text; lists are JSON (`json.loads` them), numbers decimal. Keys whose value the checkpoint
    does not record (an mIoU before any validation) are left out."""
    cfg, state = loaded.cfg, loaded.state
    names = loaded.class_names
    train_state = recorded_train_state(state)
    best = _number(train_state.get("best_miou"))
    mean, std = normalization(cfg)  # as the model was trained: dataset.mean/std, else the backbone's
    values = {
        "class_names": json.dumps(names),
        "palette": json.dumps(make_palette(cfg.dataset.palette, len(names))[: len(names)].tolist()),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "input_layout": "NCHW",
        "input_channels": "RGB",
        "input_dtype": "float32",
        "input_normalization": INPUT_NORMALIZATION,
        "output": f"logits (N, {len(names)}, H, W) float32 at the input size; argmax over dim 1 = class index",
        "ignore_index": str(int(cfg.dataset.ignore_index)),
        "segtrain_version": segtrain.__version__,
        "model": _target_name(cfg.model),
        "backbone": str(cfg.backbone.get("name") or _target_name(cfg.backbone)),
        "dataset": str(cfg.dataset.name),
        "iteration": _number(train_state.get("iteration")),
        "val_miou": _number(train_state.get("last_miou")),
        "best_val_miou": best if best is not None and best >= 0 else None,
        "best_iteration": _number(train_state.get("best_iteration")) if best is not None and best >= 0 else None,
    }
    return {key: value if isinstance(value, str) else f"{value:.6g}" if isinstance(value, float) else str(value)
            for key, value in values.items() if value is not None}


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                single_file_limit: int = SINGLE_FILE_LIMIT) -> list[Path]:
    """Write the ONNX file (and `<name>.data` when the weights exceed `single_file_limit`); the paths written."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SegtrainError("format=onnx needs the onnx extras: pip install 'segtrain[onnx]'") from None
    height, width = torch.export.Dim("height", min=32, max=8192), torch.export.Dim("width", min=32, max=8192)
    batch = torch.export.Dim("batch", min=1, max=1024)
    external = weight_bytes(module) > single_file_limit
    data_file = path.with_name(path.name + ".data")
    before = data_file.stat().st_mtime_ns if data_file.exists() else None
    try:
        program = torch.onnx.export(module.eval(), (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": {0: batch, 2: height, 3: width}}, dynamo=True,
                                    verbose=False)
        program.model.metadata_props.update(metadata)
        program.save(str(path), external_data=external)
    except SegtrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; one line for the user
        raise SegtrainError(f"ONNX export failed: {first_line(innermost_cause(exc))} (the exporter's "
                            "messages are in the run directory's export.log)") from None
    # The exporter also moves weights out on its own above its threshold: what it wrote decides.
    wrote_data = data_file.exists() and data_file.stat().st_mtime_ns != before
    return [path, data_file] if wrote_data else [path]


def innermost_cause(exc: BaseException) -> BaseException:
    """The error the exporter and tracer wrap in their own: the one the user can act on."""
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None and id(exc.__cause__ or exc.__context__) not in seen:
        exc = exc.__cause__ or exc.__context__
        seen.add(id(exc))
    return exc


def onnx_outputs(path: Path, image: torch.Tensor) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise SegtrainError("checking the ONNX file needs onnxruntime: pip install 'segtrain[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's concern
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> list[Path]:
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
        traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
    except Exception as exc:  # noqa: BLE001 - the tracer fails in many ways; one line for the user
        raise SegtrainError(f"TorchScript export failed: {first_line(innermost_cause(exc))}") from None
    return [path]


def verify(module: nn.Module, path: Path, export_format: str, size: list[int], generator: torch.Generator) -> float:
    """Largest |exported - PyTorch| on fresh inputs: for ONNX at another size too (its H and W are dynamic)."""
    checks = [torch.randn(1, 3, *size, generator=generator)]
    if export_format == "onnx":
        checks.append(torch.randn(2, 3, size[0] + 37, size[1] + 21, generator=generator))
    worst = 0.0
    for image in checks:
        with torch.no_grad():
            expected = module(image).numpy()
            if export_format == "onnx":
                actual = onnx_outputs(path, image)
            else:
                with library_output_to_log("segtrain.export"):
                    actual = torch.jit.load(str(path))(image).numpy()
        if actual.shape != expected.shape:
            raise SegtrainError(f"exported model gives shape {actual.shape} for input {tuple(image.shape)}, "
                                f"PyTorch {expected.shape}")
        difference = float(np.abs(actual - expected).max())
        worst = max(worst, difference)
        print(f"checked input {tuple(image.shape)}: max |exported - PyTorch| = {difference:.3g}")
    return worst


def output_files(path: Path, export_format: str) -> list[Path]:
    """The files an export may write: the model, and for ONNX its external weights beside it."""
    return [path, path.with_name(path.name + ".data")] if export_format == "onnx" else [path]


def refuse_existing_output(path: Path, export_format: str) -> None:
    """export never replaces a file (the checkpoint it reads included)."""
    for target in output_files(path, export_format):
        if target.exists() or target.is_symlink():
            raise ConfigError(f"export.output={path}: {target} already exists and export never replaces a file; "
                              "choose a new export.output, or move that file away first")


def publish(staged: Path, target: Path) -> Path:
    """Move a finished file to its name without ever replacing a file there (a hard link fails on an
    existing name; where links are not supported, a rename after a last check)."""
    try:
        os.link(staged, target)
    except FileExistsError:
        raise ConfigError(f"{target} appeared while exporting; export never replaces a file: choose a new "
                          "export.output") from None
    except OSError:
        refuse_existing_output(target, "torchscript")
        os.replace(staged, target)
    return target


def run_export(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    if composed.format not in FORMATS:
        raise ConfigError(f"format must be one of {sorted(FORMATS)}, got {composed.format!r}")
    size = [int(v) for v in composed.export.input_size]
    if len(size) != 2 or min(size) < 32:
        raise ConfigError(f"export.input_size must be [H, W] with both >= 32, got {size}")
    path = Path(composed.export.output) if composed.export.output else run_dir / f"model{FORMATS[composed.format]}"
    refuse_existing_output(path, composed.format)  # before the model loads: fail in a second
    loaded = load_for_inference(composed, overrides)
    module = LogitsOnly(loaded.model.cpu().float()).eval()  # exported graphs are device-neutral float32
    metadata = export_metadata(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, *size, generator=generator)
    # Written and verified in a folder of its own beside the output (the ONNX file names its `.data` file,
    # so the files keep their final names there), then moved into place: no partial file under the name.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = staging / path.name
        with library_output_to_log("segtrain.export"):
            if composed.format == "onnx":
                written = export_onnx(module, example, staged, metadata)
            else:
                written = export_torchscript(module, example, staged, metadata)
        worst = verify(module, staged, composed.format, size, generator)
        written = [publish(file, path.parent / file.name) for file in reversed(written)][::-1]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if len(written) > 1:
        print(f"wrote {path} and its weights {written[1]} (onnx, dynamic input size, max difference {worst:.3g}): "
              f"the weights are above {SINGLE_FILE_LIMIT / 2**30:.1f} GiB, so keep both files together")
    else:
        print(f"wrote {path} ({composed.format}, {'dynamic' if composed.format == 'onnx' else 'fixed'} input size, "
              f"one self-contained file, max difference {worst:.3g})")
    print(f"input: image float32 NCHW RGB, {INPUT_NORMALIZATION} with mean {metadata['mean']} std {metadata['std']}; "
          f"metadata keys: {', '.join(metadata)}")
    return {"path": str(path), "files": [str(p) for p in written], "max_abs_diff": worst, "metadata": metadata}
