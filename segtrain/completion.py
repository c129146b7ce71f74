"""Shell completion (bash, zsh): the commands, each command's config groups and their options, its keys.

`eval "$(segtrain -sc install=bash)"` defines a completion function for the `segtrain` command (one
for every command: Hydra's own `-sc` script would register `segtrain-train`, a program that does not
exist). On TAB the shell runs `segtrain --complete` with the line in COMP_LINE and the cursor in
COMP_POINT; the candidates come from the same group folders and composed config as `<command> --help`,
so completion offers exactly the groups and keys the command reads.
"""

from __future__ import annotations

import os

from segtrain.errors import ConfigError

SHELLS = ("bash", "zsh")
HYDRA_OPTIONS = ("-m", "--multirun", "--cfg", "--help")
# The shell cuts words at these characters (COMP_WORDBREAKS); a candidate must start where its word does.
DEFAULT_WORDBREAKS = "\"'><=;|&(:"

_SCRIPT = """_segtrain_complete() {
    local IFS=$'\\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDBREAKS="$COMP_WORDBREAKS" \\
                 segtrain --complete 2>/dev/null))
}
complete -o nospace -o default -F _segtrain_complete segtrain
"""


def install_script(shell: str) -> str:
    """The script that `eval "$(segtrain -sc install=SHELL)"` runs."""
    if shell == "zsh":  # zsh runs bash completion functions through bashcompinit
        return "autoload -U +X bashcompinit && bashcompinit\n" + _SCRIPT
    return _SCRIPT


def shell_completion(value: str | None) -> str:
    """What `-sc install=bash|zsh` and `-sc uninstall=bash|zsh` print."""
    action, _, shell = (value or "").partition("=")
    if action not in ("install", "uninstall") or shell not in SHELLS:
        raise ConfigError(f"-sc {value or ''}: segtrain completes in bash and zsh; use "
                          "eval \"$(segtrain -sc install=bash)\" (or install=zsh; uninstall=bash removes it)")
    return install_script(shell) if action == "install" else "complete -r segtrain 2> /dev/null\n"


def _prefixed(options: list[str], word: str) -> list[str]:
    return sorted(o for o in set(options) if o.startswith(word))


def _children(node: object, base: str, word: str) -> list[str]:
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return []
    found = []
    for key in node.keys():
        child = node._get_node(key)
        full = f"{base}{key}"
        found.append(f"{full}." if isinstance(child, DictConfig) else f"{full}=")
    return _prefixed(found, word)


def _config_candidates(command: str, given: list[str], word: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    from segtrain.composition import compose_config, config_dir
    from segtrain.help import HELP, command_groups, selected_keys

    entry = HELP[command]
    groups = command_groups(command, config_dir())
    key, has_value, value = word.partition("=")
    if has_value and key in groups:
        return [f"{key}={option}" for option in _prefixed(groups[key], value)]
    try:
        cfg = selected_keys(compose_config(command, given), entry.keys)
    except Exception:  # noqa: BLE001 - a half-typed line that does not compose yet: the defaults
        cfg = selected_keys(compose_config(command), entry.keys)
    if has_value:  # a key's value: offer the booleans' two values
        current = OmegaConf.select(cfg, key, default=None)
        return [f"{key}={v}" for v in _prefixed(["true", "false"], value)] if isinstance(current, bool) else []
    base, dot, _ = word.rpartition(".")
    node = OmegaConf.select(cfg, base, default=None) if dot else cfg
    keys = _children(node, f"{base}." if dot else "", word) if isinstance(node, DictConfig) else []
    if dot:
        return keys
    return _prefixed([f"{g}=" for g in groups], word) + keys + _prefixed(list(HYDRA_OPTIONS), word)


def candidates(line: str, wordbreaks: str = DEFAULT_WORDBREAKS) -> list[str]:
    """The completions of the last word of `line` (the command line up to the cursor), cut where the
    shell's word starts (after the last of `wordbreaks` in it: `model=deep` completes as `deeplabv3`)."""
    from segtrain.cli import COMMANDS

    words = line.split()
    word = "" if not line or line[-1].isspace() else words.pop()
    if len(words) <= 1:
        found = _prefixed([*COMMANDS, "--help", "--version"], word)
    elif words[1] == "data":
        if len(words) == 2:
            found = _prefixed(["prepare", "check"], word)
        elif words[2] == "check":
            found = _config_candidates("data_check", [w for w in words[3:] if "=" in w], word)
        else:
            found = []  # data prepare takes --options and paths: the shell's own file completion
    elif words[1] in COMMANDS:
        found = _config_candidates(words[1], [w for w in words[2:] if "=" in w and not w.startswith("-")], word)
    else:
        found = []
    cut = max((word.rfind(c) for c in wordbreaks), default=-1) + 1
    return [candidate[cut:] for candidate in found]


def complete_from_environment() -> list[str]:
    """`segtrain --complete`: the candidates for the shell's COMP_LINE up to COMP_POINT."""
    line = os.environ.get("COMP_LINE", "")
    point = os.environ.get("COMP_POINT", "")
    if point.isdigit():
        line = line[: int(point)]
    return candidates(line, os.environ.get("COMP_WORDBREAKS", DEFAULT_WORDBREAKS))
