"""Composing a command's config before Hydra runs it, so that every mistake fails in one line.

`compose_config` is segtrain's one Hydra composition outside a running Hydra app (the CLI's checks,
`--help`, `--cfg all` of checkpoint commands, the tests). `precheck` composes the command line once
(the first value of any sweep) and refuses what would fail later or silently do nothing: an unknown
key or group option (with the closest known key), a key added with `+` that nothing reads
(segtrain.keys), a training key given to an inference command, a value out of range
(segtrain.config_checks), an explicit run directory that is in use. Failures are `ConfigError`s in
one line; segtrain.cli prints them. `hydra_run_info` turns the running app's Hydra state into the
`RunInfo` the engine is given.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.config import config_dir
from segtrain.config_checks import check_config
from segtrain.engine.hparams import RunInfo
from segtrain.errors import ConfigError, SegtrainError

# Commands that rebuild the network from a checkpoint's stored config (`ckpt=`).
CHECKPOINT_COMMANDS = ("eval", "predict", "export", "info")


def register() -> None:
    """What the primary configs name: the typed schemas (ConfigStore) and the sweep's resolver."""
    from segtrain.config import register_configs
    from segtrain.sweep import register_resolvers

    register_configs()
    register_resolvers()


def compose_config(config_name: str, overrides: Sequence[str] = (), *, with_hydra: bool = False) -> DictConfig:
    """`config_name` (conf/<config_name>.yaml) composed with `overrides`; `with_hydra`: keep the `hydra`
    node. Hydra's global state is cleared before and after, so calls never see each other's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=config_name):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()


def hydra_run_info() -> RunInfo:
    """The running Hydra job's overrides, group choices and job number (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return RunInfo()
    hydra_cfg = HydraConfig.get()
    choices = {k: v for k, v in OmegaConf.to_container(hydra_cfg.runtime.choices).items()
               if isinstance(v, str) and not k.startswith("hydra")}
    job = OmegaConf.select(hydra_cfg, "job.num", default=None)
    return RunInfo(list(hydra_cfg.overrides.task), choices, None if job is None else int(job))


def closest_option(option: str, options: list[str]) -> str | None:
    """The group option most like `option`: the shortest that extends it (`deeplab` -> `deeplabv3`), else
    the closest spelling (`quickstrat` -> `quickstart`); None when none is close."""
    extended = sorted((o for o in options if o.startswith(option)), key=lambda o: (len(o), o))
    if extended:
        return extended[0]
    match = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
    return match[0] if match else None


def missing_option_message(exc: BaseException) -> str | None:
    """Hydra's `Could not find 'model/deeplab'` as `model=deeplab` with the closest option and the list;
    None for anything but a missing option of a config group."""
    from hydra.errors import MissingConfigException

    if not isinstance(exc, MissingConfigException) or not exc.options or "/" not in (exc.missing_cfg_file or ""):
        return None
    group, option = exc.missing_cfg_file.rsplit("/", 1)
    options = sorted(exc.options)
    where = re.match(r"In '([^']+)'", str(exc))
    # A defaults list of a group file (an experiment's `override /model: x`) is named; the primary configs are not.
    named = where is not None and not where.group(1).startswith("hydra/")
    inside = f" (in {where.group(1)})" if named and not (config_dir() / f"{where.group(1)}.yaml").is_file() else ""
    close = closest_option(option, options)
    hint = f"; did you mean {group}={close}? Options" if close else "; options"
    message = f"{group}={option}: no option '{option}' in group '{group}'{inside}{hint}: {', '.join(options)}"
    if group == "hydra/launcher" and option.startswith("submitit") and option not in options:
        message += " (submitit_slurm and submitit_local come with pip install 'segtrain-dilated[slurm]')"
    return message


def one_line(exc: BaseException, known: Callable[[str], set[str]] | None = None) -> str:
    """A composition failure in one line; an unknown key comes with the closest known key (`known`
    gives the keys of the config composed without the offending override), an unknown group option
    with the closest option."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from segtrain.keys import unknown_key_message

    missing = missing_option_message(exc)
    if missing is not None:
        return missing
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
    added_group = re.match(r"Multiple values for (\S+)\. To override a value use 'override \S+: (\S+)'", text)
    if added_group:  # `+group=option` for a group the defaults already choose from
        group, option = added_group.groups()
        return f"{group} is a config group with a default choice: write {group}={option} (without +)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines).replace(" Available options in", "; available options in")


@dataclass
class Prechecked:
    """What precheck composed: the parsed arguments, the overrides (first value of any sweep), the config."""

    args: argparse.Namespace
    overrides: list[str]
    cfg: DictConfig | None


def _first_value(override: Any) -> str:
    """A sweep's first value, enough to check the config; an interval (Optuna) its lower end."""
    if override.is_interval_sweep():
        return str(override.value().start)
    return next(iter(override.sweep_string_iterator()))


def refuse_launcher_without_multirun(command: str, parsed: argparse.Namespace) -> None:
    """Hydra hands jobs to hydra/launcher in a multirun only: without -m the choice would be ignored (`--cfg`,
    which runs nothing, shows it)."""
    if parsed.multirun or parsed.cfg:
        return
    for text in parsed.overrides:
        key, _, value = text.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and value not in ("", "basic", "null"):
            raise ConfigError(f"{text} takes effect with -m only (Hydra launches the jobs of a multirun): "
                              f"segtrain {command} -m {text} ...; one job per sweep point, one job without a sweep")


PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.\-/:+]*")


def _quoted(item: str) -> str:
    item = item.strip()
    if PLAIN_VALUE.fullmatch(item) or item[:1] in ("'", '"'):
        return item
    return f"'{item}'" if "'" not in item else f'"{item}"'


def unparsable_override_message(text: str, exc: BaseException) -> str:
    """Hydra's grammar error ("token recognition error at: 'ü'", "mismatched input '='") with the override
    it is about and the fix: a value holding characters outside letters, digits and `_-./:` needs quotes."""
    key, _, value = text.partition("=")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not value:
        return f"cannot read the override '{text}' ({reason}): write key=value"
    if value.startswith("[") and value.endswith("]"):  # quote the items, not the list (that would be a string)
        example = f"{key}=[{','.join(_quoted(item) for item in value[1:-1].split(','))}]"
    else:
        example = f"{key}={_quoted(value)}"
    return (f"cannot read the override '{text}' ({reason}): quote a value that holds spaces, '=', non-ASCII or "
            f"other special characters, e.g. {example} (in a shell, quote the whole override once more: "
            f"\"{example}\")")


def parse_override(parser: Any, text: str) -> Any:
    """One command-line override parsed by Hydra; a grammar error is a ConfigError naming it."""
    from hydra.errors import HydraException

    try:
        return parser.parse_override(text)
    except HydraException as exc:
        raise ConfigError(unparsable_override_message(text, exc)) from None


def first_values(parsed: argparse.Namespace) -> list[str]:
    """The command line's overrides with every sweep replaced by its first value (a sweep needs -m)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    parser = OverridesParser.create()
    try:
        for text in parsed.overrides:
            override = parse_override(parser, text)
            if override.is_sweep_override():
                if not parsed.multirun:
                    raise ConfigError(f"'{text}' is a sweep: add -m to run one job per value, or quote the "
                                      "value (key='a,b') / use a list (key=[a,b])")
                value = _first_value(override)
                prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
                text = f"{prefix}{override.get_key_element().lstrip('+~')}={value}"
            overrides.append(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed overrides
        raise ConfigError(one_line(exc)) from None
    return overrides


def added_keys(overrides: list[str]) -> list[str]:
    """Overrides that add a key (`+key=`, `++key=`), not a config group option (`+group=option`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    added = []
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.split(".")[0] == "hydra":
            continue
        if (config_dir() / key.replace(".", "/")).is_dir():  # a config group of conf/
            continue
        added.append(text)
    return added


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose; every key added with `+` must be one that segtrain reads, every value valid."""
    from segtrain.keys import check_added_key

    added = added_keys(overrides)
    if added:
        base = compose_config(config_name, [t for t in overrides if t not in added])
        for text in added:
            check_added_key(text.split("=", 1)[0].lstrip("+"), base)
    cfg = compose_config(config_name, overrides)
    check_config(cfg)
    return cfg


def known_without(config_name: str, overrides: list[str]) -> Callable[[str], set[str]]:
    """The keys known to the config composed without the override of a given key (for hints)."""
    def known(key: str) -> set[str]:
        from segtrain.keys import known_keys

        kept = [t for t in overrides if t.split("=", 1)[0].lstrip("+~") != key]
        return known_keys(compose_config(config_name, kept))

    return known


def refuse_training_keys(command: str, overrides: list[str]) -> None:
    """eval, predict, export and info refuse keys only training reads, before anything is composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from segtrain.keys import check_effective

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        if override.is_delete() or override.key_or_group.split(".")[0] == "hydra":
            continue
        check_effective(override.key_or_group, command)


def explicit_run_dir(overrides: list[str], key: str = "hydra.run.dir") -> Path | None:
    """The run directory given as hydra.run.dir=..., if any (the last one wins, as in Hydra); an empty
    value is refused (Hydra would write into the current directory)."""
    given = [text.split("=", 1)[1] for text in overrides if text.lstrip("+").startswith(f"{key}=")]
    if given and not given[-1].strip().strip("'\""):
        raise ConfigError(f"{key} is empty: give a directory, or leave {key} out for a new one under outputs/")
    return Path(given[-1]) if given else None


def check_writable_folder(key: str, folder: Path) -> None:
    """`folder` can be created and written: its nearest existing parent is a folder we may write into (a
    read-only file system or a file in the way fails here in one line, not in a traceback later)."""
    import os
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is a file, not a folder; give a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".segtrain-write-check-", dir=existing)
    except OSError as exc:
        raise ConfigError(f"{key}={folder}: cannot write into {existing} ({exc.strerror or exc}); give a "
                          "writable folder") from None
    os.close(handle)
    os.unlink(probe)


def precheck(config_name: str, args: list[str]) -> Prechecked:
    """Compose the config with the given overrides (first value of any sweep); ConfigError in one line."""
    from segtrain.engine.distributed import process_rank
    from segtrain.engine.lock import refuse_if_held, refuse_used_run_dir
    from segtrain.flags import parse_command_line

    command = config_name.replace("_", " ")
    parsed = parse_command_line(config_name, args)
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return Prechecked(parsed, [], None)
    refuse_launcher_without_multirun(command, parsed)
    overrides = first_values(parsed)
    if config_name in CHECKPOINT_COMMANDS:
        refuse_training_keys(command, overrides)
    run_dir = explicit_run_dir(overrides)
    sweep_dir = explicit_run_dir(overrides, "hydra.sweep.dir")
    if run_dir is not None and (config_name != "train" or process_rank() == 0):
        refuse_used_run_dir(command, run_dir)
    predict_output = [text.split("=", 1)[1] for text in overrides if text.startswith("output=")]
    if config_name == "predict" and predict_output and predict_output[-1] not in ("", "null"):
        refuse_if_held(Path(predict_output[-1]), "output")  # its run directory: Hydra's predict.log goes there
    try:
        cfg = compose_checked(config_name, overrides)
    except SegtrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - any composition failure is a config error to the user
        raise ConfigError(one_line(exc, known_without(config_name, overrides))) from None
    if parsed.multirun:
        check_writable_folder("hydra.sweep.dir", sweep_dir or Path("outputs"))
    elif config_name == "predict" and cfg.get("output") is not None:  # predict's output is its run directory
        check_writable_folder("output", Path(str(cfg.output)))
    elif config_name != "info":  # info writes nothing
        check_writable_folder("hydra.run.dir", run_dir or Path("outputs"))
    return Prechecked(parsed, overrides, cfg)


def _checkpoint_given(cfg: DictConfig | None) -> bool:
    return cfg is not None and "ckpt" in cfg and not OmegaConf.is_missing(cfg, "ckpt") and cfg.ckpt is not None


def checkpoint_cfg_text(config_name: str, pre: Prechecked) -> str | None:
    """eval, predict, export and info with `ckpt=`: what `--cfg job|all` prints, the checkpoint's config
    with the command line applied (what will run, not the defaults); None where Hydra should answer.
    A `model=`/`backbone=` choice is compared with the checkpoint here, before Hydra creates a run
    directory (ConfigError/WeightsError)."""
    if config_name not in CHECKPOINT_COMMANDS or not _checkpoint_given(pre.cfg):
        return None
    show = pre.args.cfg in ("job", "all")
    task = [t for t in pre.overrides if not t.lstrip("+~").startswith("hydra.")]
    if not show and not any(t.split("=", 1)[0].lstrip("+") in ("model", "backbone") for t in task):
        return None
    from segtrain.engine.restore import checkpoint_view

    view = checkpoint_view(pre.cfg, task)
    if not show:
        return None
    if pre.args.cfg == "all":
        view = OmegaConf.merge({"hydra": compose_config(config_name, pre.overrides, with_hydra=True).hydra}, view)
    header = ""
    if pre.args.package:
        view = OmegaConf.select(view, pre.args.package)
        header = f"# @package {pre.args.package}\n"
    return header + (OmegaConf.to_yaml(view, resolve=pre.args.resolve) if OmegaConf.is_config(view) else str(view))
