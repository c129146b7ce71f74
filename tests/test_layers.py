"""The layers point one way: data, models and config never reach up into the engine or the commands;
the engine never reads Hydra's global state; one function reads weight files. Read from the source
with `ast`, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import segtrain

PACKAGE = Path(segtrain.__file__).resolve().parent
UPPER_LAYERS = ("segtrain.engine", "segtrain.commands", "segtrain.cli", "segtrain.composition", "segtrain.sweep",
                "segtrain.api")
LOWER_LAYERS = ("data", "models", "config.py")
# Hydra's global state: the running job's config (HydraConfig) and the initialised Hydra (GlobalHydra).
HYDRA_STATE = ("hydra.core.hydra_config", "hydra.core.global_hydra")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it; `from X import name` counts as X and X.name."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def sources(*relative: str) -> list[Path]:
    paths = []
    for part in relative:
        target = PACKAGE / part
        paths.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    return paths


def test_the_helpers_read_the_sources_they_are_meant_to():
    assert PACKAGE / "data" / "loading.py" in sources(*LOWER_LAYERS)
    assert PACKAGE / "config.py" in sources(*LOWER_LAYERS)
    loading = imported_modules(PACKAGE / "data" / "loading.py")
    assert "segtrain.data.dataset" in loading and "segtrain.data.dataset.SegmentationDataset" in loading
    assert within("segtrain.engine.trainer", UPPER_LAYERS) and not within("segtrain.engineering", UPPER_LAYERS)


def test_data_models_and_config_do_not_import_the_engine_or_the_commands():
    offending = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if within(name, UPPER_LAYERS))
        for path in sources(*LOWER_LAYERS)
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_python_api_sits_above_the_commands_and_the_engine():
    """segtrain.api runs the commands' code (cli -> api -> composition, commands -> engine); nothing below calls up."""
    offending = {
        str(path.relative_to(PACKAGE)): sorted(n for n in imported_modules(path) if within(n, ("segtrain.api",
                                                                                                "segtrain.cli")))
        for path in sources("engine", "commands", "composition.py", "keys.py", "flags.py")
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_models_do_not_import_data():
    offending = {
        str(path.relative_to(PACKAGE)): sorted(n for n in imported_modules(path) if within(n, ("segtrain.data",)))
        for path in sources("models")
    }
    assert {path: names for path, names in offending.items() if names} == {}


def _engine_reading_hydra_state() -> dict[str, list[str]]:
    offending = {
        str(path.relative_to(PACKAGE)): sorted(name for name in imported_modules(path) if within(name, HYDRA_STATE))
        for path in sources("engine")
    }
    return {path: names for path, names in offending.items() if names}


def test_the_engine_does_not_read_hydra_global_state():
    assert _engine_reading_hydra_state() == {}


def _is_torch_load(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
            and func.value.id == "torch")


def test_exactly_one_call_reads_a_weight_file():
    calls = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in sources(".")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and _is_torch_load(node)
    ]
    assert len(calls) == 1 and calls[0].startswith("weights_file.py:"), calls
