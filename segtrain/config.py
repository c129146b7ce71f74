"""The configuration schema.

Typed sections (trainer, eval, logging, data, dataset) are dataclasses registered in Hydra's
ConfigStore, so a misspelt key or an option outside its fixed set of values fails at composition
time. `model`, `backbone`, `loss`, `optimizer`, `schedule` and `dataset.source` are `_target_` nodes
whose keys are the arguments of the function or class they name; `segtrain.instantiate` checks them
against its signature. The values themselves (ranges, the option fields whose values YAML would
otherwise read as booleans, `cuda:N`) are checked by segtrain.config_checks right after composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


def config_dir() -> Path:
    """conf/ of a source checkout (editable install), else the copy shipped inside the wheel."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").is_file():
        return source
    return Path(__file__).resolve().parent / "conf"


class Choice(str, Enum):
    """An option with a fixed set of values: compares equal to, and prints as, its plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choice(name: str, values: list[str]) -> type[Choice]:
    # The functional form allows members named after keywords (`raise`).
    return Choice(name, [(value, value) for value in values])  # type: ignore[return-value]


NanPolicy = _choice("NanPolicy", ["stop", "skip"])
EvalMode = _choice("EvalMode", ["whole", "slide"])
OnError = _choice("OnError", ["raise", "skip"])
PadWith = _choice("PadWith", ["mean", "zero"])

# Keys of a backbone node that describe its weights' input statistics for the data pipeline
# (segtrain.data.normalization), not arguments of the backbone's class.
NORMALIZATION_KEYS = ("mean", "std")


@dataclass
class TrainerConfig:
    max_iters: int = 30000
    # The global batch per optimizer step: split over processes and accumulation steps.
    batch_size: int = 16
    grad_accum_steps: int = 1
    val_interval: int = 2000
    # Validate on the first N images of the validation split (null: all of them): smoke runs (debug=fast).
    val_max_images: int | None = None
    ckpt_interval: int = 1000
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by segtrain.config_checks)
    # auto: bf16 on CUDA devices that support it, fp16 (+ GradScaler) on older ones, off on CPU.
    amp: str = "auto"  # auto | off | bf16 | fp16 (segtrain.config_checks: YAML reads a bare `off` as false)
    # Training loader workers per process: auto = the dataset's dataset.workers_per_gpu, capped by this process's
    # share of the CPUs (one left for the process itself); or a number (capped by the CPUs).
    num_workers: Any = "auto"
    seed: int = 0
    deterministic: bool = False
    # Periodic checkpoints (iter_XXXXXXX.pt) kept on disk; last.pt always names the newest.
    keep_last: int = 2
    # BatchNorm -> SyncBatchNorm across processes: auto = exactly when world size > 1 on CUDA.
    sync_bn: str = "auto"  # auto | true | false (checked by segtrain.config_checks)
    # Keep BatchNorm layers in eval mode (running statistics frozen), e.g. for tiny batches.
    freeze_bn: bool = False
    channels_last: str = "auto"  # auto (on for CUDA) | true | false
    # torch.compile of the training step: off | model (whole network, one graph) | regions (per block); true means
    # the default mode (segtrain.config_checks.COMPILE_DEFAULT), false off.
    compile: str = "off"
    # Non-finite loss: stop (name the iteration and the last good checkpoint) or skip the step.
    nan_policy: NanPolicy = NanPolicy.stop  # type: ignore[attr-defined]
    max_skipped_steps: int = 10
    # Exponential moving average of the weights (null or 0: off; e.g. 0.999), updated after every
    # optimizer step; validation, best.pt and eval/predict/export use the averaged weights.
    ema_decay: float | None = None
    # Gradient clipping: scale the gradients down to this total (L2) norm when it is larger (null: off;
    # e.g. 1.0). Under fp16 it applies to the unscaled gradients; the norm is logged as train/grad_norm.
    clip_grad_norm: float | None = None


@dataclass
class EvalConfig:
    split: str = "val"
    batch_size: int = 1
    num_workers: int = 2
    # Test-time protocol (segtrain.engine.inference), shared by validation, eval and predict.
    mode: EvalMode = EvalMode.whole  # type: ignore[attr-defined]
    crop_size: Any = None  # slide: [H, W] window (null: the training crop)
    stride: Any = None  # slide: [H, W] step (null: 2/3 of the window)
    scales: list[float] = field(default_factory=lambda: [1.0])
    # false, true (= whole: the image and its mirror) or per_window (slide: each window with its mirror).
    flip: Any = False
    # slide: windows combined as logits or softmax probabilities (probs: hszhao/semseg's scale_process).
    average: str = "logits"
    # slide: an image smaller than the window padded at the bottom/right (end) or on both sides (centred).
    pad: str = "end"
    # Resize the image to a long side of round(scale * this) before each scale (semseg's base_size); null: no.
    resize_long_side: Any = None
    # Evaluate a model trained at output stride 16 at 8 (eval and predict; the DeepLab protocol).
    output_stride: Any = None
    save_predictions: bool = False


@dataclass
class LoggingConfig:
    interval: int = 20
    image_interval: int = 2000
    num_images: int = 4
    progress: bool = True
    tensorboard: bool = True


@dataclass
class DataConfig:
    # raise: stop at the first unusable training sample, naming it; skip: warn once per file,
    # replace it by the next usable sample, count it (TensorBoard data/skipped_samples, summary).
    on_error: OnError = OnError["raise"]
    # Split read by `segtrain data check` (null: the dataset's train and val splits).
    split: Any = None
    # Images and masks above this many pixels are refused before decoding (decompression bombs);
    # Cityscapes frames are 2 MP.
    max_image_pixels: int = 100_000_000
    # `segtrain train` reads a sample of the training and validation files before the first step (the checks
    # of `segtrain data check`): stops on masks it cannot learn from, warns about a weak validation split.
    check_on_start: bool = True


@dataclass
class AugmentConfig:
    crop_size: list[int] = field(default_factory=lambda: [513, 513])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    pad_image_with: PadWith = PadWith.mean  # type: ignore[attr-defined]
    # Random scale in discrete steps (DeepLab: 0.25 gives 0.5, 0.75, ..., 2.0); null: any value in scale_range.
    scale_step: Any = None
    # Random rotation by an angle uniform in [-rotate, rotate] degrees, with probability rotate_prob: image
    # bilinear, mask nearest; uncovered pixels get the image pad value and ignore_index in the mask.
    rotate: float = 0.0
    rotate_prob: float = 1.0
    # Probability of a 5x5 Gaussian blur (cv2.GaussianBlur(image, (5, 5), 0)), semseg's: 0.5.
    gaussian_blur: float = 0.0
    # torchvision-style colour jitter (brightness, contrast, saturation = j, hue = j/4) with probability 0.8.
    color_jitter: float = 0.0
    # DLA's RandomJitter: PIL brightness, contrast and sharpness factors uniform in [1-j, 1+j], in random order.
    enhance_jitter: float = 0.0
    # Rotation angles drawn as whole degrees, randint(-rotate, rotate) (fyu/drn, ucbdrive/dla RandomRotate).
    rotate_integer: bool = False
    # Where rotation and padding to the crop uncover pixels, the image gets the pad value (constant) or its
    # reflection without the edge repeated (reflect: DRN/DLA's pad_reflection, OpenCV's BORDER_REFLECT_101);
    # the mask gets ignore_index either way.
    image_border: str = "constant"
    # Rotate before the random scale (DRN/DLA segment.py) instead of after it (semseg).
    rotate_before_scale: bool = False
    # Random-scale resampling of the image: bilinear, or antialias_bicubic (DRN/DLA RandomScale: PIL's
    # antialiasing filter when shrinking, bicubic when enlarging, sizes int(ratio * side)).
    scale_resample: str = "bilinear"


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    class_names: list[str] = MISSING
    train_split: str = "train"
    val_split: str = "val"
    ignore_index: int = 255
    # RGB triplets, one per class; null means the PASCAL VOC colour map.
    palette: Any = None
    # Input normalisation, RGB in [0, 1] units; null: the backbone's (backbone.mean/std, the statistics its
    # pretrained weights expect; segtrain.data.normalization).
    mean: Any = None
    std: Any = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Class pairs whose labels swap under a horizontal flip ([[left_arm, right_arm], ...], LIP): the training flip
    # swaps them in the mask and flip test-time augmentation swaps their score channels; [] for most datasets.
    flip_pairs: Any = field(default_factory=list)
    # Loader workers one training process needs to keep its GPU fed with this dataset's recipe (trainer.num_workers=
    # auto): decoding and augmentation cost per sample over the training rate, see benchmarks/README.md.
    workers_per_gpu: int = 4
    # `_target_` of a function (root, split, **kwargs) -> list of (image_path, mask_path) pairs.
    source: Any = MISSING


@dataclass
class CommonConfig:
    model: Any = MISSING
    backbone: Any = MISSING
    dataset: DatasetConfig = MISSING
    # `_target_` nodes: segtrain.losses, torch.optim (+ head_lr_mult), segtrain.engine.schedules.
    loss: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainAppConfig(CommonConfig):
    # null: fresh start; auto: newest checkpoint of this run directory; or a checkpoint path.
    resume: Any = None
    # A checkpoint (segtrain's or a plain state dict) whose model weights start a new run: fresh
    # optimizer, schedule and iteration; classifiers re-initialised for another class count.
    init_from: Any = None
    # The user's own training-loop callbacks: name -> `_target_` node of a segtrain.engine.callbacks.Callback
    # (run after segtrain's own, in this order; null switches one off).
    callbacks: dict[str, Any] = field(default_factory=dict)
    # Experiment trackers (conf/logger/): name -> `_target_` node of a segtrain.engine.callbacks.Tracker.
    logger: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalAppConfig(CommonConfig):
    ckpt: str = MISSING
    # Experiment trackers recording the scores (conf/logger/; segtrain.engine.eval_tracking), as in TrainAppConfig.
    logger: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictConfig:
    alpha: float = 0.5  # weight of the colour mask in the overlay


@dataclass
class PredictAppConfig(CommonConfig):
    ckpt: str = MISSING
    input: Any = None
    output: Any = None
    predict: PredictConfig = field(default_factory=PredictConfig)


@dataclass
class ExportConfig:
    input_size: list[int] = field(default_factory=lambda: [512, 512])
    output: Any = None  # default: <run dir>/model.onnx or model.pt


@dataclass
class ExportAppConfig(CommonConfig):
    ckpt: str = MISSING
    format: str = "onnx"
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class BenchConfig:
    batch_size: int = 2
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    steps: int = 10
    warmup: int = 3
    data_samples: int = 64


@dataclass
class BenchAppConfig(CommonConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


@dataclass
class InfoConfig:
    input_size: list[int] = field(default_factory=lambda: [512, 512])
    # Also estimate the training memory per process at this batch size (0: skip).
    batch_size: int = 0


@dataclass
class InfoAppConfig(CommonConfig):
    # A checkpoint: report its model (the network it was trained with) instead of model=/backbone=.
    ckpt: Any = None
    info: InfoConfig = field(default_factory=InfoConfig)


def _value_or(value: Any, default: Any) -> Any:
    return default if value is None else value


def register_configs() -> None:
    # `${segtrain.or:${output},DEFAULT}`: a null key's stand-in (oc.select only replaces absent keys).
    if not OmegaConf.has_resolver("segtrain.or"):
        OmegaConf.register_new_resolver("segtrain.or", _value_or)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainAppConfig)
    store.store(name="eval_schema", node=EvalAppConfig)
    store.store(name="info_schema", node=InfoAppConfig)
    store.store(name="bench_schema", node=BenchAppConfig)
    store.store(name="predict_schema", node=PredictAppConfig)
    store.store(name="export_schema", node=ExportAppConfig)
