"""`segtrain <command> --help`: each command's usage, examples, and only the groups and keys it reads.

The option lists come from conf/ and the key listing from the command's composed config, so the help
never lists a group option or key that is not there. Groups a command does not read (eval rebuilds
the network from its checkpoint, so it offers no `model=`) are left out.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Groups only `train` composes (conf/train.yaml's defaults).
TRAIN_ONLY_GROUPS = ("callbacks", "debug", "logger")
# Groups a checkpoint fixes (eval, predict, export): the network and everything only training reads.
FROM_CHECKPOINT = ("model", "backbone", "loss", "optimizer", "schedule", "experiment", *TRAIN_ONLY_GROUPS)
INFERENCE_KEYS = ("ckpt", "dataset", "eval", "data", "logging.progress", "logging.tensorboard", "trainer.device",
                  "trainer.amp")
# eval records its scores to the trackers of the `logger` group, as training does.
EVAL_SKIPS = tuple(group for group in FROM_CHECKPOINT if group != "logger")


@dataclass(frozen=True)
class CommandHelp:
    summary: str
    usage: str
    examples: tuple[str, ...]
    # Config groups left out of this command's help (None: all of them are read).
    skip_groups: tuple[str, ...] | None = None
    # Top-level keys or `section.key`s this command reads (None: the whole config).
    keys: tuple[str, ...] | None = None
    note: str = ""


CHECKPOINT_NOTE = ("The model, backbone and dataset come from the config stored in the checkpoint; the keys "
                   "given on the command line apply on top (--cfg job prints the result).")

HELP = {
    "train": CommandHelp(
        "train a model; checkpoints, train.log and TensorBoard logs go to the run directory",
        "segtrain train [experiment=NAME] [group=option ...] [key=value ...]",
        ("segtrain train experiment=quickstart",
         "segtrain train experiment=quickstart debug=fast",
         "segtrain train model=deeplabv3plus backbone=xception dataset=voc",
         "segtrain train -m optimizer.lr=0.01,0.007",
         "segtrain train resume=auto hydra.run.dir=outputs/my_run")),
    "eval": CommandHelp(
        "evaluate a checkpoint on a dataset split (mIoU, per-class IoU, confusion matrix)",
        "segtrain eval ckpt=PATH [dataset=NAME] [key=value ...]",
        ("segtrain eval ckpt=outputs/<run>/checkpoints/best.pt",
         "segtrain eval ckpt=outputs/<run>   (a run directory: its best.pt, else its newest checkpoint)",
         "segtrain eval ckpt=outputs/<run>/checkpoints/best.pt eval.mode=slide eval.scales=[0.75,1.0,1.25] "
         "eval.flip=true",
         "segtrain eval ckpt=outputs/<run>/checkpoints/best.pt logger=[tensorboard,mlflow] "
         "logger.mlflow.tracking_uri=sqlite:///mlflow.db   (into the training's MLflow run)",
         "segtrain eval ckpt=outputs/<run>/checkpoints/best.pt --cfg job"),
        EVAL_SKIPS, (*INFERENCE_KEYS, "logger"), CHECKPOINT_NOTE),
    "predict": CommandHelp(
        "segment images of any size; writes <name>.png, <name>_color.png and <name>_overlay.png per image",
        "segtrain predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR] [key=value ...]",
        ("segtrain predict ckpt=outputs/<run>/checkpoints/best.pt input=photos/",
         "segtrain predict ckpt=outputs/<run>/checkpoints/best.pt input='photos/*.jpg' output=masks/ "
         "predict.alpha=0.6"),
        FROM_CHECKPOINT, ("input", "output", "predict", *INFERENCE_KEYS),
        CHECKPOINT_NOTE + " Without output=, the images go to the run directory (outputs/<date>/<time>-predict)."),
    "export": CommandHelp(
        "export a checkpoint for deployment (ONNX or TorchScript), checked against PyTorch",
        "segtrain export ckpt=PATH [format=onnx|torchscript] [export.input_size=[H,W]] [export.output=FILE]",
        ("segtrain export ckpt=outputs/<run>/checkpoints/best.pt format=onnx",
         "segtrain export ckpt=outputs/<run>/checkpoints/best.pt format=torchscript export.input_size=[512,1024]"),
        (*FROM_CHECKPOINT, "protocol"), ("ckpt", "format", "export", "trainer.device"), CHECKPOINT_NOTE),
    "info": CommandHelp(
        "parameters, GFLOPs and (info.batch_size) training memory of a model, without data",
        "segtrain info [model=NAME backbone=NAME | ckpt=PATH] [info.input_size=[H,W]] [info.batch_size=N]",
        ("segtrain info model=deeplabv3plus backbone=xception info.input_size=[513,513]",
         "segtrain info experiment=hrnetv2_w48_cityscapes info.input_size=[1024,2048] info.batch_size=2",
         "segtrain info ckpt=outputs/<run>/checkpoints/best.pt"),
        ("loss", "optimizer", "schedule", "protocol", *TRAIN_ONLY_GROUPS), ("ckpt", "info", "model", "backbone")),
    "bench": CommandHelp(
        "training and inference speed, memory and FLOP use on trainer.device",
        "segtrain bench [model=NAME backbone=NAME] [bench.batch_size=N bench.crop_size=[H,W]] [key=value ...]",
        ("segtrain bench model=deeplabv3plus backbone=resnet50 bench.batch_size=2 bench.crop_size=[512,512]",
         "segtrain bench experiment=quickstart trainer.amp=off"),
        TRAIN_ONLY_GROUPS, ("bench", "trainer", "model", "backbone", "loss", "optimizer")),
    "data_check": CommandHelp(
        "read every image and mask of a dataset and report the problems (sizes, labels, unreadable files)",
        "segtrain data check dataset=NAME [dataset.root=DIR] [data.split=SPLIT]",
        ("segtrain data check dataset=voc dataset.root=data/VOCdevkit/VOC2012",
         "segtrain data check dataset=folder dataset.root=my_data data.split=train"),
        ("model", "backbone", "loss", "optimizer", "schedule", *TRAIN_ONLY_GROUPS),
        ("dataset", "data", "logging.progress")),
}


def group_options(conf: Path) -> dict[str, list[str]]:
    """Every config group of conf/ (Hydra's own excluded) and its options."""
    return {folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
            for folder in sorted(conf.iterdir()) if folder.is_dir() and folder.name != "hydra"}


def selected_keys(cfg: DictConfig, keys: tuple[str, ...] | None) -> DictConfig:
    plain = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if keys is None:
        return OmegaConf.create(plain)
    chosen: dict = {}
    for key in keys:
        source, target, parts = plain, chosen, key.split(".")
        for part in parts[:-1]:
            source, target = source.get(part, {}), target.setdefault(part, {})
        if parts[-1] in source:
            target[parts[-1]] = source[parts[-1]]
    return OmegaConf.create(chosen)


def command_groups(command: str, conf: Path) -> dict[str, list[str]]:
    """The config groups `command` reads (its help and its shell completion show these) and their options."""
    skipped = HELP[command].skip_groups
    return {g: options for g, options in group_options(conf).items() if skipped is None or g not in skipped}


def render(command: str, conf: Path, cfg: DictConfig) -> str:
    """The help text of one command, `cfg` being its composed config (with the user's overrides)."""
    entry = HELP[command]
    name = command.replace("_", " ")
    groups = command_groups(command, conf)
    lines = [f"segtrain {name}: {entry.summary}", "", f"usage: {entry.usage}", ""]
    if entry.note:
        lines += [*textwrap.wrap(entry.note, 100), ""]
    if groups:
        lines += ["== Config groups ==", "Choose one option per group (group=option):", ""]
        lines += [f"{group}: {', '.join(options)}" for group, options in groups.items()]
        lines.append("")
    lines += ["== Config ==", "Override any of these keys (key=value); --cfg job prints the config that will run:", ""]
    lines += [OmegaConf.to_yaml(selected_keys(cfg, entry.keys)).rstrip(), ""]
    lines += ["Examples:", *(f"  {example}" for example in entry.examples), "",
              "Hydra options: -m (one job per value of key=a,b), --cfg job, --hydra-help"]
    return "\n".join(lines)
