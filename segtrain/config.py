"""The configuration schema.

Typed sections (trainer, eval, logging, dataset, optimizer, schedule) are dataclasses registered in
Hydra's ConfigStore, so a misspelt key in a YAML file or on the command line fails at composition
time. `model` and `backbone` are `_target_` nodes whose keys are the constructor's arguments; they are
checked against the constructor's signature when the model is built (see segtrain.models.build).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainerConfig:
    max_iters: int = 30000
    # The global batch per optimizer step: split over processes and accumulation steps.
    batch_size: int = 16
    grad_accum_steps: int = 1
    val_interval: int = 2000
    ckpt_interval: int = 1000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16
    num_workers: int = 4
    seed: int = 0
    deterministic: bool = False
    # Periodic checkpoints (iter_XXXXXXX.pt) kept on disk; last.pt always names the newest.
    keep_last: int = 2
    # BatchNorm -> SyncBatchNorm across processes: auto = exactly when world size > 1 on CUDA.
    sync_bn: str = "auto"
    # Keep BatchNorm layers in eval mode (running statistics frozen), e.g. for tiny batches.
    freeze_bn: bool = False
    channels_last: bool = False
    compile: bool = False
    # Non-finite loss: stop (name the iteration and the last good checkpoint) or skip the step.
    nan_policy: str = "stop"
    max_skipped_steps: int = 10


@dataclass
class EvalConfig:
    split: str = "val"
    batch_size: int = 1
    num_workers: int = 2
    # Test-time protocol (segtrain.engine.inference), shared by validation, eval and predict.
    mode: str = "whole"  # whole | slide
    crop_size: Any = None  # slide: [H, W] window (null: the training crop)
    stride: Any = None  # slide: [H, W] step (null: 2/3 of the window)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
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
    on_error: str = "raise"
    # Split read by `segtrain data check` (null: the dataset's train and val splits).
    split: Any = None


@dataclass
class AugmentConfig:
    crop_size: list[int] = field(default_factory=lambda: [513, 513])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    pad_image_with: str = "mean"  # mean | zero
    color_jitter: float = 0.0


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
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # `_target_` of a function (root, split, **kwargs) -> list of (image_path, mask_path) pairs.
    source: Any = MISSING


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.007
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 4e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # LR multiplier for every parameter outside the (pretrained) backbone.
    head_lr_mult: float = 1.0


@dataclass
class ScheduleConfig:
    name: str = "poly"
    power: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    min_lr: float = 0.0


@dataclass
class CommonConfig:
    model: Any = MISSING
    backbone: Any = MISSING
    dataset: DatasetConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainAppConfig(CommonConfig):
    # null: fresh start; auto: newest checkpoint of this run directory; or a checkpoint path.
    resume: Any = None


@dataclass
class EvalAppConfig(CommonConfig):
    ckpt: str = MISSING


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
    info: InfoConfig = field(default_factory=InfoConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainAppConfig)
    store.store(name="eval_schema", node=EvalAppConfig)
    store.store(name="info_schema", node=InfoAppConfig)
    store.store(name="bench_schema", node=BenchAppConfig)
    store.store(name="predict_schema", node=PredictAppConfig)
    store.store(name="export_schema", node=ExportAppConfig)
