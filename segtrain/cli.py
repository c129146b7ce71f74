"""`segtrain <command> [overrides]`: each command is a Hydra application with its own primary config.

The command name picks conf/<command>.yaml; everything after it is handed to Hydra, so overrides,
`-m` sweeps, `--cfg job` and `hydra.run.dir=...` work as Hydra users expect. Before Hydra runs, the
overrides are composed and checked once (segtrain.composition), so that a mistake fails with one
line naming it rather than a multi-line report, before any run directory exists. segtrain answers
three things itself: `<command> --help` (only that command's groups and keys, segtrain.help), and
for eval/predict/export/info with `ckpt=`, `--cfg job|all` (the checkpoint's config with the
overrides applied: what will run) and a `model=`/`backbone=` choice the checkpoint was not trained
with. Each Hydra job's config is checked again (segtrain.config_checks) before its command runs:
sweep values after the first are seen only there.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from segtrain.composition import checkpoint_cfg_text, config_dir, precheck, register
from segtrain.errors import Preempted, SegtrainError, user_message

__all__ = ["COMMANDS", "config_dir", "main", "version"]  # config_dir: where scripts and tests find conf/

COMMANDS = {
    "train": "train a model: segtrain train [experiment=NAME] [group=option ...] [key=value ...]",
    "eval": "evaluate a checkpoint: segtrain eval ckpt=PATH [key=value ...]",
    "info": "parameters and GFLOPs: segtrain info model=NAME backbone=NAME | ckpt=PATH [info.input_size=[H,W]]",
    "predict": "segment images: segtrain predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]",
    "export": "export for deployment: segtrain export ckpt=PATH format=onnx|torchscript",
    "bench": "speed and memory: segtrain bench model=NAME backbone=NAME [bench.batch_size=N bench.crop_size=[H,W]]",
    "data": "datasets: segtrain data prepare DATASET --root DIR ... ; segtrain data check dataset=NAME",
}

USAGE = "usage: segtrain <command> [Hydra overrides]   (segtrain <command> --help for its options)"
DISTRIBUTION = "segtrain-dilated"  # pyproject's [project] name: the installed version is found under it


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


def _exit_at_once_on_ctrl_c() -> None:
    """From here the process only shuts down: another Ctrl-C ends it at once, instead of landing in an atexit
    callback (DataLoader workers, tracker threads) as a KeyboardInterrupt traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def _task(command: str, body: Callable[[DictConfig, Path], object]) -> Callable[[DictConfig], object]:
    """The Hydra task function: the job the Python API runs (segtrain.api.job), with its errors as one line
    and an exit status; it returns the body's value (train: the best mIoU, which sweepers such as Optuna's
    optimise)."""

    def run(cfg: DictConfig) -> object:
        from segtrain.api import job

        try:
            return job(body)(cfg)
        except Preempted as exc:
            _to_log_file(f"segtrain {command}: {exc}")
            print(f"segtrain {command}: {exc}", file=sys.stderr)
            from segtrain.engine.preemption import hand_over_to_launcher

            hand_over_to_launcher(exc.signum)  # a submitit job: submitit requeues it (rank 0) and exits
            _exit_at_once_on_ctrl_c()
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C before the handler is in place, or the second one: stop now
            message = ("interrupted (Ctrl-C): stopped at once; checkpoints already written are kept "
                       "(resume=auto continues from the newest)" if command == "train" else "interrupted (Ctrl-C)")
            _to_log_file(f"segtrain {command}: {message}")
            print(f"segtrain {command}: {message}", file=sys.stderr)
            _exit_at_once_on_ctrl_c()
            raise SystemExit(130) from None
        except SegtrainError as exc:
            _to_log_file(f"segtrain {command}: error: {user_message(exc)}")
            _fail(command, user_message(exc))
        except MemoryError as exc:
            message = ("out of memory (MemoryError): use smaller batches, crops or images, or fewer data-loader "
                       "workers")
            if from_loader_worker(exc):  # the worker's own message says what it could not allocate
                message = f"a data-loader worker failed: {user_message(exc)}"
            _to_log_file(f"segtrain {command}: error: {message}")
            _fail(command, message)
        except Exception as exc:
            from segtrain.engine.distributed import peer_failure_message

            peer_gone = peer_failure_message(exc)
            if peer_gone is not None:
                _to_log_file(f"segtrain {command}: error: {peer_gone}")
                _fail(command, peer_gone)
            if not from_loader_worker(exc):
                raise
            # MemoryError, a bug in a dataset source, ...: re-raised here by the DataLoader.
            message = f"a data-loader worker failed: {user_message(exc)}"
            _to_log_file(f"segtrain {command}: error: {message}")
            _fail(command, message)

    return run


def _train(cfg: DictConfig, run_dir: Path) -> float:
    from segtrain.api import run_training  # segtrain.train's job

    return float(run_training(cfg, run_dir).best_miou)


def _eval(cfg: DictConfig, run_dir: Path) -> None:
    from segtrain.api import run_evaluation  # segtrain.evaluate's job

    run_evaluation(cfg, run_dir)


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
    from hydra.core.hydra_config import HydraConfig

    from segtrain.commands.bench import run_bench

    run_bench(cfg, list(HydraConfig.get().overrides.task), run_dir)


TASKS = {"bench": _bench, "train": _train, "eval": _eval, "info": _info, "data_check": _data_check, "predict": _predict,
         "export": _export}


def _data(args: list[str]) -> None:
    """`segtrain data prepare ...` is a plain argparse tool; `segtrain data check` a Hydra app."""
    usage = ("usage: segtrain data prepare {voc,cityscapes,ade20k,pascal_context,coco_stuff164k,camvid,lip} "
             "[options] | segtrain data check dataset=NAME [data.split=S]")
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


def _checked(command: str, rest: list[str]) -> None:
    """Compose and check the command line before Hydra runs it; answer `--cfg` of checkpoint commands."""
    name = command.replace("_", " ")
    try:
        pre = precheck(command, rest)
    except SegtrainError as exc:
        _fail(name, str(exc))
    try:
        text = checkpoint_cfg_text(command, pre)
    except SegtrainError as exc:
        _fail(command, user_message(exc))
    if text is not None:
        print(text, end="")
        raise SystemExit(0)


def _hydra_app(command: str, rest: list[str]) -> None:
    import hydra

    register()
    if "-h" in rest or "--help" in rest:
        _command_help(command, rest)
        return
    _checked(command, rest)
    if command in ("train", "eval"):
        from segtrain.engine.distributed import rank_scratch_overrides

        rest = [*rest, *rank_scratch_overrides()]  # under torchrun only rank 0 writes
    sys.argv = [f"segtrain-{command}", *rest]
    app = hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(
        _task(command.replace("_", " "), TASKS[command])
    )
    app()


def version() -> str:
    """The installed distribution's version (the package's own when run from a source tree). Asked by the
    distribution's name, never `segtrain`: that name belongs to an unrelated project on the package index."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:
        from segtrain import __version__

        return __version__


def _usage() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    lines += ["", "Examples:", "  segtrain train experiment=quickstart",
              "  segtrain train model=deeplabv3plus backbone=xception", "  segtrain train -m optimizer.lr=0.01,0.007",
              "  segtrain eval ckpt=outputs/<run>/checkpoints/best.pt", "",
              "segtrain --version prints the version; eval \"$(segtrain -sc install=bash)\" completes commands, "
              "groups and keys (bash, zsh)."]
    return "\n".join(lines)


def _command_help(command: str, rest: list[str]) -> None:
    """`segtrain <command> --help`, composed with the overrides given next to it (as Hydra's help is)."""
    from segtrain.composition import compose_config
    from segtrain.help import render

    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    try:
        cfg = compose_config(command, overrides)
    except Exception:  # noqa: BLE001 - help with a bad override: show the defaults
        cfg = compose_config(command)
    print(render(command, config_dir(), cfg))


def _completion(args: list[str]) -> None:
    """`segtrain --complete` (asked by the shell on TAB) and `segtrain [command] -sc install=bash|zsh`."""
    from segtrain.completion import complete_from_environment, shell_completion

    if args[0] == "--complete":
        print("\n".join(complete_from_environment()))
        return
    flag = "-sc" if "-sc" in args else "--shell-completion"
    index = args.index(flag)
    try:
        print(shell_completion(args[index + 1] if index + 1 < len(args) else None), end="")
    except SegtrainError as exc:
        print(f"segtrain: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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
    if args[0] == "--complete" or "-sc" in args or "--shell-completion" in args:
        _completion(args)
        return
    command, rest = args[0], args[1:]
    if command == "data":
        _data(rest)
        return
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? Commands" if close else "choose one of"
        print(f"segtrain: error: unknown command '{command}'; {hint}: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    _hydra_app(command, rest)
