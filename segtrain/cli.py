"""`segtrain <command> [overrides]`: each command is a Hydra application with its own primary config.

The command name picks conf/<command>.yaml; everything after it is handed to Hydra untouched, so
overrides, `-m` sweeps, `--cfg job`, `+new.key=...` and `hydra.run.dir=...` work as Hydra users expect.
Before Hydra runs, the overrides are composed once so that an unknown key or group option fails
with one line naming it rather than a multi-line report.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from segtrain.config import check_options, register_configs
from segtrain.errors import Preempted, SegtrainError, user_message

COMMANDS = {
    "train": "train a model: segtrain train [experiment=NAME] [group=option ...] [key=value ...]",
    "eval": "evaluate a checkpoint: segtrain eval ckpt=PATH [key=value ...]",
    "info": "parameters and GFLOPs of a model: segtrain info model=NAME backbone=NAME [info.input_size=[H,W]]",
    "predict": "segment images: segtrain predict ckpt=PATH input=FILE|DIR|GLOB output=DIR",
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


def _one_line(exc: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for err in (exc.__cause__, exc):
        key = getattr(err, "full_key", None) if isinstance(err, OmegaConfBaseException) else None
        if not key:
            continue
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
            return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=VALUE)"
        return f"invalid value for '{key}': {str(err).splitlines()[0]}"
    text = str(exc).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines).replace(" Available options in", "; available options in")


def precheck(config_name: str, args: list[str]) -> None:
    """Compose the config with the given overrides (first value of any sweep) and report failures."""
    command = config_name.replace("_", " ")
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit:
        raise
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return
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
    if config_name == "eval" or (config_name == "train" and int(os.environ.get("RANK", "0")) == 0):
        _refuse_used_run_dir(command, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=config_name):
            check_options(compose(config_name=config_name, overrides=overrides))
    except SegtrainError as exc:
        _fail(command, str(exc))
    except Exception as exc:  # noqa: BLE001 - any composition failure is a config error to the user
        _fail(command, _one_line(exc))
    finally:
        GlobalHydra.instance().clear()


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

    from segtrain.commands.evaluate import run_eval

    run_eval(cfg, list(HydraConfig.get().overrides.task), run_dir)


def _info(cfg: DictConfig, run_dir: Path) -> None:
    from segtrain.commands.info import run_info

    run_info(cfg)


def _data_check(cfg: DictConfig, run_dir: Path) -> None:
    from segtrain.commands.data import run_check

    status = run_check(cfg)
    if status:
        raise SystemExit(status)


def _predict(cfg: DictConfig, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.predict import run_predict

    run_predict(cfg, list(HydraConfig.get().overrides.task))


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

    register_configs()
    precheck(command, rest)
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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<8}{text}")
        print("\nExamples:\n  segtrain train experiment=quickstart\n  segtrain train -m optimizer.lr=0.01,0.007"
              "\n  segtrain eval ckpt=outputs/<run>/checkpoints/best.pt")
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
