"""segtrain from Python: `load` a checkpoint and segment images, `train`, `evaluate`.

    import segtrain
    segmenter = segtrain.load("outputs/<run>")            # any checkpoint `segtrain eval` accepts
    mask = segmenter.predict("street.jpg", protocol="flip")  # H x W class indices
    result = segtrain.train(["experiment=quickstart"])
    metrics = segtrain.evaluate(result.best_checkpoint)

The commands run this module's code: `segtrain predict` segments with `Segmenter`'s inference
(segtrain.engine.predictor), `segtrain train` and `segtrain eval` run `run_training` / `run_evaluation` as
the Hydra job (`job`) that `train` and `evaluate` run here. The overrides go through the command line's
checks (segtrain.composition) and Hydra's composition, so a mistake is the same one-line `ConfigError`,
raised instead of printed; a training or evaluation gets the run directory, log file and `.hydra/` files
the command would write. `import segtrain` stays quick: this module is imported on first use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from segtrain.engine.predictor import Predictor

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from segtrain.composition import Prechecked
    from segtrain.engine.inference import InferenceSettings
    from segtrain.engine.restore import LoadedModel
    from segtrain.engine.trainer import TrainResult

__all__ = ["Segmenter", "evaluate", "load", "run_evaluation", "run_training", "train"]

# What `predict` accepts: a file, a PIL image, an RGB HxWx3 uint8 array or a CHW tensor (uint8, or float in [0, 1]).
ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
# A protocol: a name from conf/protocol (`"flip"`), or eval keys ({"scales": [0.75, 1, 1.25], "flip": True}).
ProtocolChoice = str | Mapping[str, Any] | None

_PLAIN_VALUE = re.compile(r"[\w./:~+@-]+")


def override_value(value: object) -> str:
    """`value` written as a Hydra override value: lists as [a,b], booleans true/false, None null, and a
    string quoted where Hydra would read it otherwise (a path with spaces, commas, '=', quotes)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text) and text.lower() not in ("true", "false", "null"):
        return text
    # Hydra's quoted strings: a quote is escaped, and so are the backslashes before a quote or at the end.
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{escaped}'"


def _checked(command: str, overrides: Sequence[str]) -> Prechecked:
    """The command line's checks before Hydra runs (as `segtrain <command>` does): ConfigError in one line."""
    from segtrain.composition import checkpoint_cfg_text, precheck
    from segtrain.errors import ConfigError

    overrides = [str(text) for text in overrides]
    options = [text for text in overrides if text.startswith("-")]
    if options:
        raise ConfigError(f"{options[0]}: the Python API takes key=value overrides only (no options such as -m or "
                          f"--cfg; a sweep is a loop over segtrain.{'train' if command == 'train' else 'evaluate'})")
    pre = precheck(command, overrides)
    checkpoint_cfg_text(command, pre)  # a model=/backbone= choice against the checkpoint, before any directory
    return pre


def job(body: Callable[[DictConfig, Path], Any]) -> Callable[[DictConfig], Any]:
    """The Hydra task function of a command: this job's config checked (a sweep's later values are seen only
    here), then `body(cfg, run_dir)`; data-loader workers stopped however it ends. Errors propagate:
    segtrain.cli turns them into one line and an exit status, the API raises them."""

    def run(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from segtrain.config_checks import check_config
        from segtrain.engine.runtime import stop_worker_processes

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            check_config(cfg)  # canonical option strings
            return body(cfg, run_dir)
        finally:
            stop_worker_processes()

    return run


def run_training(cfg: DictConfig, run_dir: Path) -> TrainResult:
    """`segtrain train`'s job and `segtrain.train`'s: a training in `run_dir`."""
    from segtrain.composition import hydra_run_info
    from segtrain.engine.trainer import train as fit

    return fit(cfg, run_dir, run_info=hydra_run_info())


def run_evaluation(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`segtrain eval`'s job and `segtrain.evaluate`'s: what metrics.json holds, plus `run_dir`."""
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.eval import run_eval

    written = run_eval(cfg, list(HydraConfig.get().overrides.task), run_dir)
    return {**written, "run_dir": str(run_dir)}


def _run_job(command: str, overrides: list[str], body: Callable[[DictConfig, Path], Any]) -> Any:
    """`body` as the Hydra job `segtrain <command> OVERRIDES` runs, in this process; its value returned and its
    exception raised. Hydra points the root logger at the run's log file; that is undone afterwards, and
    Hydra's state cleared."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from segtrain.composition import config_dir, register

    register()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=command):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None  # initialize_config_dir created it
            return hydra.run(config_name=command, task_function=job(body), overrides=overrides).return_value
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # the job is over: nothing later reads its Hydra state as running
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def train(overrides: Sequence[str] = ()) -> TrainResult:
    """`segtrain train OVERRIDES` in this process: the run's directory, best checkpoint and mIoU
    (`TrainResult`); a mistake in the overrides raises the command line's one-line ConfigError."""
    from segtrain.engine.distributed import rank_scratch_overrides

    pre = _checked("train", overrides)
    return _run_job("train", [*pre.overrides, *rank_scratch_overrides()], run_training)


def evaluate(ckpt: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`segtrain eval ckpt=CKPT OVERRIDES` in this process (`ckpt`: a checkpoint or a training run's
    directory): the metrics it writes to metrics.json (miou, pixel_acc, mean_acc, per_class, protocol, ...)
    and `run_dir`, the evaluation's directory."""
    from segtrain.engine.distributed import rank_scratch_overrides

    pre = _checked("eval", [f"ckpt={override_value(str(ckpt))}", *overrides])
    return _run_job("eval", [*pre.overrides, *rank_scratch_overrides()], run_evaluation)  # torchrun: rank 0 writes


def load(ckpt: str | Path, device: str | torch.device | None = None, overrides: Sequence[str] = ()) -> Segmenter:
    """A checkpoint (or a training run's directory) as a `Segmenter`, loaded as `segtrain predict` loads it:
    the same checks of the stored config, the EMA weights when the run kept them. `device`: "cpu", "cuda",
    "cuda:1" (default: the checkpoint's trainer.device, normally auto). `overrides`: what `segtrain predict`
    takes besides ckpt/input/output, e.g. ["protocol=ms_flip", "eval.output_stride=8", "trainer.amp=bf16"]."""
    from segtrain.engine.restore import load_for_inference

    args = [f"ckpt={override_value(str(ckpt))}", *overrides]
    if device is not None:
        args.append(f"trainer.device={override_value(str(device))}")
    pre = _checked("predict", args)
    return Segmenter(load_for_inference(pre.cfg, pre.overrides))


def as_rgb(image: ImageInput, max_pixels: int) -> np.ndarray:
    """Any accepted input as RGB uint8 HxWx3; a file is read as `segtrain predict` reads it."""
    from segtrain.data.dataset import decode_image
    from segtrain.errors import DataError

    if isinstance(image, (str, Path)):
        return decode_image(Path(image), max_pixels)[0]
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise DataError(f"a tensor image must be CHW with 3 channels (RGB), got shape {tuple(image.shape)}")
        tensor = image.detach().cpu()
        if tensor.is_floating_point():  # torchvision's to_tensor convention: [0, 1]
            tensor = (tensor.clamp(0, 1) * 255).round()
        elif tensor.dtype != torch.uint8:
            raise DataError(f"a tensor image must be uint8 (0-255) or float in [0, 1], got {tensor.dtype}")
        return np.ascontiguousarray(tensor.to(torch.uint8).permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 3 and image.shape[2] == 3 or image.ndim == 2):
            raise DataError(f"an array image must be RGB uint8 HxWx3 (or HxW grey), got shape {image.shape} "
                            f"{image.dtype}")
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    raise DataError(f"cannot segment a {type(image).__name__}: give a path, a PIL image, an RGB uint8 HxWx3 array "
                    "or a CHW tensor")


class Segmenter(Predictor):
    """A trained network ready to segment images of any size, with the checkpoint's normalisation, test-time
    protocol and palette (segtrain.engine.predictor, `segtrain predict`'s inference): `predict`,
    `predict_batch`, `colorize`, `overlay`; `class_names`, `palette`, `mean`/`std`, `model`, `device`."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self._protocols: dict[str, InferenceSettings] = {}

    def __repr__(self) -> str:
        return (f"Segmenter({self.checkpoint}, {self.num_classes} classes of {self.cfg.dataset.name}, "
                f"device={self.device}, mode={self.settings.mode}, scales={list(self.settings.scales)}, "
                f"flip={self.settings.flip})")

    def protocol_settings(self, protocol: ProtocolChoice) -> InferenceSettings:
        """The test-time protocol `protocol` names, applied to the checkpoint's eval section as `segtrain eval
        protocol=NAME` (or `eval.KEY=VALUE` for a mapping) applies it; None: the loaded one."""
        if protocol is None:
            return self.settings
        key = repr(protocol if isinstance(protocol, str) else sorted(protocol.items()))
        if key not in self._protocols:
            self._protocols[key] = self._composed_protocol(protocol)
        return self._protocols[key]

    def _composed_protocol(self, protocol: str | Mapping[str, Any]) -> InferenceSettings:
        from omegaconf import OmegaConf

        from segtrain.engine.inference import InferenceSettings
        from segtrain.engine.restore import PROTOCOL_KEYS, apply_overrides
        from segtrain.errors import ConfigError

        if isinstance(protocol, str):
            overrides = [f"protocol={protocol}"]
        elif isinstance(protocol, Mapping):
            unknown = [str(k) for k in protocol if k not in PROTOCOL_KEYS]
            if unknown:
                raise ConfigError(f"protocol key '{unknown[0]}': a protocol sets {', '.join(PROTOCOL_KEYS)}")
            overrides = [f"eval.{k}={override_value(v)}" for k, v in protocol.items()]
        else:
            raise ConfigError(f"protocol must be a name from conf/protocol or a mapping of eval keys, got {protocol!r}")
        pre = _checked("predict", overrides)
        cfg = apply_overrides(OmegaConf.create(OmegaConf.to_container(self.cfg)), pre.cfg, pre.overrides)
        if cfg.eval.output_stride != self.cfg.eval.output_stride:
            stride = cfg.eval.output_stride
            given = f"protocol={protocol}" if isinstance(protocol, str) else f"eval.output_stride={stride}"
            raise ConfigError(f"protocol {protocol!r} sets eval.output_stride={stride}, which rebuilds "
                              f"the network: give it when loading, segtrain.load(ckpt, overrides=['{given}'])")
        return InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size, cfg.dataset.get("flip_pairs"))

    def predict(self, image: ImageInput, protocol: ProtocolChoice = None) -> np.ndarray:
        """H x W class indices (uint8; int64 beyond 256 classes) at the image's own resolution."""
        return self.segment([as_rgb(image, self.max_pixels)], self.protocol_settings(protocol))[0]

    def predict_batch(self, images: Sequence[ImageInput], protocol: ProtocolChoice = None, batch_size: int = 8
                      ) -> list[np.ndarray]:
        """`predict` of each image; consecutive images of one size run together, up to `batch_size`."""
        settings = self.protocol_settings(protocol)
        arrays = [as_rgb(image, self.max_pixels) for image in images]
        masks: list[np.ndarray] = []
        group: list[np.ndarray] = []
        for array in arrays:
            if group and (array.shape != group[0].shape or len(group) == batch_size):
                masks += self.segment(group, settings)
                group = []
            group.append(array)
        if group:
            masks += self.segment(group, settings)
        return masks

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class indices -> RGB uint8 HxWx3 in the checkpoint's palette (the colours of predict's _color.png)."""
        from segtrain.visualize import colorize

        return colorize(mask, self.palette)

    def overlay(self, image: ImageInput, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The colour mask blended over the image (predict's _overlay.png; `alpha`: the mask's weight)."""
        from segtrain.visualize import overlay

        return overlay(as_rgb(image, self.max_pixels), mask, self.palette, alpha)
