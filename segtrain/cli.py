"""`segtrain <command> [overrides]`: each command is a Hydra application with its own primary config.

The command name picks conf/<command>.yaml; everything after it is handed to Hydra, so overrides,
`-m` sweeps, `--cfg job` and `hydra.run.dir=...` work as Hydra users expect. Before Hydra runs, the
overrides are composed once so that an unknown key or group option fails with one line naming it
(and the closest known key) rather than a multi-line report; a key added with `+` must be one that
segtrain reads (segtrain.keys). segtrain answers three things itself: `<command> --help` (only that
command's groups and keys, segtrain.help), and for eval/predict/export/info with `ckpt=`,
`--cfg job|all` (the checkpoint's config with the overrides applied: what will run) and a
`model=`/`backbone=` choice the checkpoint was not trained with.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from segtrain.config import check_options, register_configs
from segtrain.errors import Preempted, SegtrainError, user_message

COMMANDS = {
    "train": "train a model: segtrain train [experiment=NAME] [group=option ...] [key=value ...]",
    "eval": "evaluate a checkpoint: segtrain eval ckpt=PATH [key=value ...]",
    "info": "parameters and GFLOPs: segtrain info model=NAME backbone=NAME | ckpt=PATH [info.input_size=[H,W]]",
    "predict": "segment images: segtrain predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]",
    "export": "export for deployment: segtrain export ckpt=PATH format=onnx|torchscript",
    "bench": "speed and memory: segtrain bench model=NAME backbone=NAME [bench.batch_size=N bench.crop_size=[H,W]]",
    "data": "datasets: segtrain data prepare voc|cityscapes --root DIR ... ; segtrain data check dataset=NAME",
}

USAGE = "usage: segtrain <command> [Hydra overrides]   (segtrain <command> --help for its options)"


def config_dir() -> Path:
    """conf/ of a source checkout (editable install), else the copy shipped inside the wheel."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").is_file():
        return source
    return Path(__file__).resolve().parent / "conf"


def _one_line(exc: BaseException, known: Callable[[str], set[str]] | None = None) -> str:
    """A composition failure in one line; an unknown key comes with the closest known key (`known`
    gives the keys of the config composed without the offending override)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from segtrain.keys import unknown_key_message

    for err in (exc.__cause__, exc):
        key = getattr(err, "full_key", None) if isinstance(err, OmegaConfBaseException) else None
        if not key:
            continue
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
            try:
                keys = known(key) if known is not None else set()
            except Exception:  # noqa: BLE001 - the hint is a courtesy; the message stands without it
                keys = set()
            return unknown_key_message(key, keys)
        return f"invalid value for '{key}': {str(err).splitlines()[0]}"
    text = str(exc).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines).replace(" Available options in", "; available options in")


# Commands that rebuild the network from a checkpoint's stored config (`ckpt=`).
CHECKPOINT_COMMANDS = ("eval", "predict", "export", "info")


@dataclass
class Prechecked:
    """What precheck composed: the parsed arguments, the overrides (first value of any sweep), the config."""

    args: argparse.Namespace
    overrides: list[str]
    cfg: DictConfig | None


def _first_values(command: str, parsed: argparse.Namespace) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    parser = OverridesParser.create()
    try:
        for text in parsed.overrides:
            override = parser.parse_override(text)
            if override.is_sweep_override():
                if not parsed.multirun:
                    _fail(command, f"'{text}' is a sweep: add -m to run one job per value, or quote the "
                          "value (key='a,b') / use a list (key=[a,b])")
                value = _first_value(override)
                prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
                text = f"{prefix}{override.get_key_element().lstrip('+~')}={value}"
            overrides.append(text)
    except Exception as exc:  # noqa: BLE001 - malformed overrides
        _fail(command, _one_line(exc))
    return overrides


def _added_keys(overrides: list[str]) -> list[str]:
    """Overrides that add a key (`+key=`, `++key=`), not a config group option (`+group=option`)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create()
    added = []
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.split(".")[0] == "hydra":
            continue
        if loader.get_group_options(key.replace(".", "/")):
            continue
        added.append(text)
    return added


def _compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose; every key added with `+` must be one that segtrain reads."""
    from hydra import compose

    from segtrain.keys import check_added_key

    added = _added_keys(overrides)
    if added:
        base = compose(config_name=config_name, overrides=[t for t in overrides if t not in added])
        for text in added:
            check_added_key(text.split("=", 1)[0].lstrip("+"), base)
    cfg = compose(config_name=config_name, overrides=overrides)
    check_options(cfg)
    return cfg


def _known_without(config_name: str, overrides: list[str]) -> Callable[[str], set[str]]:
    def known(key: str) -> set[str]:
        from hydra import compose

        from segtrain.keys import known_keys

        kept = [t for t in overrides if t.split("=", 1)[0].lstrip("+~") != key]
        return known_keys(compose(config_name=config_name, overrides=kept))

    return known


def precheck(config_name: str, args: list[str]) -> Prechecked:
    """Compose the config with the given overrides (first value of any sweep) and report failures."""
    command = config_name.replace("_", " ")
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    parsed = get_args_parser().parse_args(args)
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return Prechecked(parsed, [], None)
    overrides = _first_values(command, parsed)
    if config_name in CHECKPOINT_COMMANDS:
        _refuse_training_keys(command, overrides)
    if config_name == "eval" or (config_name == "train" and int(os.environ.get("RANK", "0")) == 0):
        _refuse_used_run_dir(command, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=config_name):
            try:
                cfg = _compose_checked(config_name, overrides)
            except SegtrainError:
                raise
            except Exception as exc:  # noqa: BLE001 - any composition failure is a config error to the user
                _fail(command, _one_line(exc, _known_without(config_name, overrides)))
    except SegtrainError as exc:
        _fail(command, str(exc))
    finally:
        GlobalHydra.instance().clear()
    return Prechecked(parsed, overrides, cfg)


def _checkpoint_given(cfg: DictConfig | None) -> bool:
    from omegaconf import OmegaConf

    return cfg is not None and "ckpt" in cfg and not OmegaConf.is_missing(cfg, "ckpt") and cfg.ckpt is not None


def with_checkpoint(config_name: str, pre: Prechecked) -> None:
    """eval, predict, export and info with `ckpt=`: `--cfg job|all` prints the checkpoint's config with
    the command line applied (what will run, not the defaults), and a `model=`/`backbone=` choice
    is compared with the checkpoint before Hydra creates a run directory."""
    from omegaconf import OmegaConf

    if config_name not in CHECKPOINT_COMMANDS or not _checkpoint_given(pre.cfg):
        return
    show = pre.args.cfg in ("job", "all")
    task = [t for t in pre.overrides if not t.lstrip("+~").startswith("hydra.")]
    if not show and not any(t.split("=", 1)[0].lstrip("+") in ("model", "backbone") for t in task):
        return
    from segtrain.engine.restore import checkpoint_view

    try:
        view = checkpoint_view(pre.cfg, task)
    except SegtrainError as exc:
        _fail(config_name, user_message(exc))
    if not show:
        return
    if pre.args.cfg == "all":
        view = OmegaConf.merge({"hydra": _hydra_node(config_name, pre.overrides)}, view)
    if pre.args.package:
        view = OmegaConf.select(view, pre.args.package)
        print(f"# @package {pre.args.package}")
    print(OmegaConf.to_yaml(view, resolve=pre.args.resolve) if OmegaConf.is_config(view) else view, end="")
    raise SystemExit(0)


def _hydra_node(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=config_name):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True).hydra
    finally:
        GlobalHydra.instance().clear()


def _refuse_training_keys(command: str, overrides: list[str]) -> None:
    """eval, predict, export and info refuse keys only training reads, before anything is composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from segtrain.keys import check_effective

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        if override.is_delete() or override.key_or_group.split(".")[0] == "hydra":
            continue
        try:
            check_effective(override.key_or_group, command)
        except SegtrainError as exc:
            _fail(command, str(exc))


def _first_value(override: Any) -> str:
    """A sweep's first value, enough to check the config; an interval (Optuna) its lower end."""
    if override.is_interval_sweep():
        return str(override.value().start)
    return next(iter(override.sweep_string_iterator()))


def _refuse_used_run_dir(command: str, overrides: list[str]) -> None:
    """Before Hydra writes its files into an explicit hydra.run.dir: train refuses one a live run holds,
    eval one that holds another run's outputs."""
    from segtrain.engine.lock import refuse_if_held, refuse_used_eval_dir

    check = refuse_if_held if command == "train" else refuse_used_eval_dir
    for text in overrides:
        if text.startswith("hydra.run.dir="):
            try:
                check(Path(text.split("=", 1)[1]))
            except SegtrainError as exc:
                _fail(command, str(exc))


def _fail(command: str, message: str) -> None:
    print(f"segtrain {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def from_loader_worker(exc: BaseException) -> bool:
    """PyTorch re-raises a worker's exception in the main process with the worker's traceback as text."""
    return "in DataLoader worker process" in str(exc)


def _to_log_file(message: str) -> None:
    """The run's log file (train.log) gets the final error too; the console already shows it once."""
    import logging

    record = logging.LogRecord("segtrain", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _task(command: str, body: Callable[[DictConfig, Path], object]) -> Callable[[DictConfig], object]:
    """The Hydra task function; it returns the body's value (train: the best mIoU, which sweepers
    such as Optuna's optimise)."""

    def run(cfg: DictConfig) -> object:
        from hydra.core.hydra_config import HydraConfig

        from segtrain.engine.runtime import stop_worker_processes

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            return body(cfg, run_dir)
        except Preempted as exc:
            _to_log_file(f"segtrain {command}: {exc}")
            print(f"segtrain {command}: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except SegtrainError as exc:
            _to_log_file(f"segtrain {command}: error: {user_message(exc)}")
            _fail(command, user_message(exc))
        except Exception as exc:
            if not from_loader_worker(exc):
                raise
            # MemoryError, a bug in a dataset source, ...: re-raised here by the DataLoader.
            message = f"a data-loader worker failed: {user_message(exc)}"
            _to_log_file(f"segtrain {command}: error: {message}")
            _fail(command, message)
        finally:
            stop_worker_processes()

    return run


def _train(cfg: DictConfig, run_dir: Path) -> float:
    from segtrain.engine.trainer import train

    return float(train(cfg, run_dir)["best_miou"])


def _eval(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.eval import run_eval

    run_eval(cfg, list(HydraConfig.get().overrides.task), run_dir)


def _info(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.info import run_info

    run_info(cfg, list(HydraConfig.get().overrides.task))


def _data_check(cfg: DictConfig, run_dir: Path) -> None:
    from segtrain.commands.data import run_check

    status = run_check(cfg)
    if status:
        raise SystemExit(status)


def _predict(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.predict import run_predict

    run_predict(cfg, list(HydraConfig.get().overrides.task), run_dir)


def _export(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.export import run_export

    run_export(cfg, list(HydraConfig.get().overrides.task), run_dir)


def _bench(cfg: DictConfig, run_dir: Path) -> None:
    from segtrain.commands.bench import run_bench

    run_bench(cfg, run_dir)


TASKS = {"bench": _bench, "train": _train, "eval": _eval, "info": _info, "data_check": _data_check, "predict": _predict,
         "export": _export}


def _data(args: list[str]) -> None:
    """`segtrain data prepare ...` is a plain argparse tool; `segtrain data check` a Hydra app."""
    usage = "usage: segtrain data prepare {voc,cityscapes} [options] | segtrain data check dataset=NAME [data.split=S]"
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return
    if args[0] == "prepare":
        from segtrain.commands.data import prepare_main

        try:
            raise SystemExit(prepare_main(args[1:]))
        except SegtrainError as exc:
            _fail("data prepare", user_message(exc))
    if args[0] != "check":
        print(f"segtrain data: error: unknown subcommand '{args[0]}'; {usage}", file=sys.stderr)
        raise SystemExit(2)
    _hydra_app("data_check", args[1:])


def _hydra_app(command: str, rest: list[str]) -> None:
    import hydra

    from segtrain.engine.sweep import register_resolvers  # hydra.sweep.subdir's resolver

    register_configs()
    register_resolvers()
    if "-h" in rest or "--help" in rest:
        _command_help(command, rest)
        return
    with_checkpoint(command, precheck(command, rest))
    if int(os.environ.get("RANK", "0")) > 0 and command == "train":
        # Under torchrun only rank 0 writes; the others get a throw-away Hydra directory and learn
        # rank 0's run directory from it (segtrain.engine.trainer).
        scratch = tempfile.mkdtemp(prefix=f"segtrain-rank{os.environ['RANK']}-")
        rest = [*rest, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    sys.argv = [f"segtrain-{command}", *rest]
    app = hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(
        _task(command.replace("_", " "), TASKS[command])
    )
    app()


def version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("segtrain")
    except PackageNotFoundError:
        from segtrain import __version__

        return __version__


def _usage() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    lines += ["", "Examples:", "  segtrain train experiment=quickstart",
              "  segtrain train model=deeplabv3plus backbone=xception", "  segtrain train -m optimizer.lr=0.01,0.007",
              "  segtrain eval ckpt=outputs/<run>/checkpoints/best.pt", "", "segtrain --version prints the version."]
    return "\n".join(lines)


def _command_help(command: str, rest: list[str]) -> None:
    """`segtrain <command> --help`, composed with the overrides given next to it (as Hydra's help is)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from segtrain.help import render

    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=command):
            try:
                cfg = compose(config_name=command, overrides=overrides)
            except Exception:  # noqa: BLE001 - help with a bad override: show the defaults
                cfg = compose(config_name=command)
    finally:
        GlobalHydra.instance().clear()
    print(render(command, config_dir(), cfg))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if args[0] in ("-V", "--version"):
        print(f"segtrain {version()}")
        return
    command, rest = args[0], args[1:]
    if command == "data":
        _data(rest)
        return
    if command not in COMMANDS:
        print(f"segtrain: error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        raise SystemExit(2)
    _hydra_app(command, rest)
