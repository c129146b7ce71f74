"""The command line's `--options`: Hydra's own, and the flags of other trainers answered with segtrain's form.

segtrain takes settings as `key=value` overrides; its only `--options` are Hydra's (`--cfg`, `-m`,
`--help`, ...). Users coming from other tools type `--resume`, `--lr 0.01` or `--epochs 50`, which
argparse would answer with Hydra's usage and `unrecognized arguments`. `parse_command_line` answers
each with one line giving the override that does it (`--resume is not an option; use resume=auto`),
and any other unknown option with where the keys are listed.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from segtrain.errors import ConfigError

VALUE = "{value}"  # stands for the flag's value where one was given (`--lr 0.01`, `--lr=0.01`)

# flag -> (the override for every command, for the checkpoint commands where it differs)
TRAIN_FLAGS: dict[str, str] = {
    "--resume": "resume=auto (this run directory's newest checkpoint, with hydra.run.dir=<run directory>) "
                "or resume=<checkpoint.pt>",
    "--lr": f"optimizer.lr={VALUE}",
    "--learning-rate": f"optimizer.lr={VALUE}",
    "--epochs": "trainer.max_iters=N (training is counted in optimizer steps, not epochs: an epoch is the "
                "number of training images / trainer.batch_size steps)",
    "--max-iters": f"trainer.max_iters={VALUE}",
    "--iters": f"trainer.max_iters={VALUE}",
    "--batch-size": f"trainer.batch_size={VALUE}",
    "--bs": f"trainer.batch_size={VALUE}",
    "--workers": f"trainer.num_workers={VALUE}",
    "--num-workers": f"trainer.num_workers={VALUE}",
    "--seed": f"trainer.seed={VALUE}",
    "--fp16": "trainer.amp=fp16",
    "--amp": "trainer.amp=auto (the default; or bf16, fp16, off)",
    "--load-from": f"init_from={VALUE}",
    "--pretrained": "backbone.pretrained=true",
}
COMMON_FLAGS: dict[str, str] = {
    "--config": "experiment=NAME for a recipe of conf/experiment/, group=option and key=value overrides for the "
                "rest (--cfg job prints the composed config)",
    "--config-file": "experiment=NAME for a recipe of conf/experiment/, group=option and key=value overrides for "
                     "the rest (--cfg job prints the composed config)",
    "--device": f"trainer.device={VALUE}",
    "--gpu": "trainer.device=cuda:N",
    "--cpu": "trainer.device=cpu",
    "--dataset": f"dataset={VALUE}",
    "--data-root": f"dataset.root={VALUE}",
    "--model": f"model={VALUE}",
    "--backbone": f"backbone={VALUE}",
    "--output": f"hydra.run.dir={VALUE}",
    "--output-dir": f"hydra.run.dir={VALUE}",
    "--work-dir": f"hydra.run.dir={VALUE}",
}
# What a checkpoint flag means: the weights to start from (train), or the model to use (the others).
CHECKPOINT_FLAGS = ("--ckpt", "--checkpoint", "--weights")


def _canonical(flag: str) -> str:
    return flag.replace("_", "-").lower()


def _value(args: list[str], index: int) -> str | None:
    """The flag's value: after `=`, or the next argument when it is neither an option nor an override."""
    flag = args[index]
    if flag.startswith("--") and "=" in flag:
        return flag.split("=", 1)[1]
    following = args[index + 1] if index + 1 < len(args) else None
    if following is None or following.startswith("-") or "=" in following:
        return None
    return following


def segtrain_form(command: str, flag: str, value: str | None) -> str | None:
    """The override that does what `flag` does elsewhere, or None when the flag is not a known one."""
    name = _canonical(flag.split("=", 1)[0])
    if name == "--resume" and command == "train" and value is not None:
        return f"resume={value}"
    if name in CHECKPOINT_FLAGS:
        form = (f"init_from={VALUE} (a whole model's weights) or backbone.weights={VALUE} (the backbone's)"
                if command == "train" else f"ckpt={VALUE}")
    else:
        form = COMMON_FLAGS.get(name) or (TRAIN_FLAGS.get(name) if command == "train" else None)
    if form is None:
        return None
    shown = value if value is not None else "..."
    return form.replace(VALUE, shown)


def _refuse(command: str, args: list[str]) -> None:
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        form = segtrain_form(command, flag, _value(args, index))
        if form is not None:
            raise ConfigError(f"{flag} is not an option; use {form}")


def _raise_config_error(command: str) -> object:
    def error(message: str) -> NoReturn:
        raise ConfigError(f"{message}; settings are key=value overrides (segtrain {command} --help lists them)")

    return error


def parse_command_line(command: str, args: list[str]) -> argparse.Namespace:
    """Hydra's parse of `args`; a flag of another trainer, or any option Hydra does not know, is a
    ConfigError naming it (with the override that does it, where there is one)."""
    from hydra._internal.utils import get_args_parser

    name = command.replace("_", " ")
    _refuse(command, args)
    parser = get_args_parser()
    parser.error = _raise_config_error(name)  # type: ignore[method-assign]  # one line, not Hydra's usage
    parsed, unknown = parser.parse_known_args(args)
    options = [arg for arg in unknown if arg.startswith("-")]
    if options:
        raise ConfigError(f"{options[0]} is not an option of segtrain {name}; settings are key=value overrides "
                          f"(segtrain {name} --help lists the groups and keys)")
    if unknown:  # Hydra reads one run of overrides: an option in the middle cuts it
        raise ConfigError(f"{unknown[0]} follows an option that comes after other overrides; put the options "
                          "(-m, --cfg ...) before or after all the key=value overrides")
    return parsed
