"""Shared helpers: composing configs the way the CLI does, one config-group file as a node (`node`), the
checkout's command line in a subprocess (`run_cli`, `start_cli`) or in this process (`run_main`), a tiny
shapes dataset, the CPU pin for tests, and the markers: `cuda` (run where CUDA is available, skipped
elsewhere) and `cli` (starts `python -m segtrain`, required by run_cli; left out of `make test-fast`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from segtrain.composition import config_dir
from segtrain.config import register_configs

register_configs()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `make test` runs workers side by side: share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CHECKOUT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 600
_running: dict[str, pytest.Item] = {}  # the test being set up or run: run_cli checks its `cli` mark


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    from segtrain import composition
    from segtrain.config_checks import check_config

    cfg = composition.compose_config(command, overrides)
    check_config(cfg)  # as the CLI does: a bad value fails here, canonical option strings
    return cfg


def node(group: str, option: str, **extra: object) -> DictConfig:
    """conf/<group>/<option>.yaml as a config node, with `extra` keys merged over it."""
    return OmegaConf.merge(OmegaConf.load(config_dir() / group / f"{option}.yaml"), extra)


def checkout_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus `env`, with the checkout first on PYTHONPATH: a child runs this tree's segtrain,
    not whichever one is installed. A PYTHONPATH in `env` comes after the checkout."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the child gets this worker's share of the cores too: two
        merged.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # 2-thread runs on 2 cores take 2.4x
    rest = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    merged["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *rest])
    return merged


def _command_line(args: tuple[str, ...]) -> list[str]:
    item = _running.get("item")
    if item is not None and "cli" not in item.keywords:
        raise RuntimeError(f"{item.nodeid} starts the command line: mark it @pytest.mark.cli")
    return [sys.executable, "-m", "segtrain", *args]


def run_cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_S,
            check: bool = False) -> subprocess.CompletedProcess:
    """`python -m segtrain ARGS` from this checkout, in `cwd`; text stdout and stderr captured."""
    result = subprocess.run(_command_line(args), cwd=cwd, env=checkout_env(env), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, f"segtrain {' '.join(args[:1])} exited {result.returncode}: {result.stderr}"
    return result


def start_cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """run_cli that returns at once: the running process, text stdout and stderr on pipes."""
    return subprocess.Popen(_command_line(args), cwd=cwd, env=checkout_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """segtrain.cli.main(ARGS) in this process: (exit status, stdout, stderr). For `--help` and for commands
    refused before any run starts; anything that runs a Hydra app belongs in a `cli` test (run_cli)."""
    from segtrain.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        status = 0
    except SystemExit as exited:
        status = exited.code if isinstance(exited.code, int) else int(exited.code is not None)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """run_main with run_cli's result: for a command that is no Hydra app (`data prepare`), whose start-up in a
    subprocess would cost more than its work."""
    status, out, err = run_main(capsys, *args)
    return subprocess.CompletedProcess(["segtrain", *args], status, out, err)


FULL_RESNET18 = {"backbone.out_indices": "[1,2,3,4]"}  # tiny_overrides with all four stages (output stride 16)
SMALL_RESNET18 = {"backbone.out_indices": "[1,2]"}  # up to the second stage: what tests' tiny runs train


def tiny_overrides(shapes_root: Path, **extra: object) -> list[str]:
    """A seconds-long run: quickstart model on 16 tiny shapes images, no workers, no progress bar. Its ResNet-18
    stops at the second stage (8 MB checkpoints, not 94 MB: on a slow disk each 94 MB write costs a second);
    `FULL_RESNET18` in `extra` keeps all four stages, and another `backbone` choice is left as it is."""
    values = {
        "dataset.root": str(shapes_root),
        "dataset.source.num_train": 16,
        "dataset.source.num_val": 4,
        "dataset.source.image_size": "[40,56]",
        "dataset.augment.crop_size": "[32,32]",
        "trainer.batch_size": 4,
        "trainer.max_iters": 6,
        "trainer.val_interval": 3,
        "trainer.ckpt_interval": 3,
        "trainer.num_workers": 0,
        "trainer.deterministic": "true",
        "trainer.device": "cpu",  # CPU tests stay on the CPU on a GPU machine too (bit-exact comparisons)
        "eval.num_workers": 0,
        "logging.progress": "false",
        "logging.interval": 1,
        "logging.image_interval": 3,
    }
    if "backbone" not in extra:
        values.update(SMALL_RESNET18)
    values.update(extra)
    return ["experiment=quickstart", *(f"{k}={v}" for k, v in values.items())]


def folder_run_overrides(root: Path, **extra: object) -> list[str]:
    """tiny_overrides for a two-class folder dataset with split files (datasets_builders.folder_dataset_with_a_bad_
    mask): one iteration, validated."""
    values = {"dataset.root": str(root), "dataset.class_names": "[a,b]", "dataset.source.split_dir": "splits",
              **SMALL_RESNET18, "dataset.augment.crop_size": "[32,32]", "trainer.batch_size": 4,
              "trainer.num_workers": 0, "eval.num_workers": 0, "trainer.max_iters": 1, "trainer.val_interval": 1,
              "logging.progress": "false", "trainer.device": "cpu", **extra}
    return ["dataset=folder", "backbone=resnet18", *(f"{k}={v}" for k, v in values.items())]


def write_random_checkpoint(cfg: DictConfig, path: Path) -> Path:
    """A checkpoint of cfg's model with random weights, in the trainer's layout (iteration 6, best mIoU 0.25)."""
    from segtrain.models import build_model

    model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True),
                "train_state": {"iteration": 6, "best_miou": 0.25}, "class_names": list(cfg.dataset.class_names)},
               path)
    return path


def fit_recording_start(cfg: DictConfig, run_dir: Path) -> tuple[object, dict[str, torch.Tensor], dict]:
    """Set up (and resume or init) a Trainer, record the weights it starts from, train; close it always."""
    from segtrain.engine.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        trainer.setup()
        trainer.resume()
        weights = {k: v.clone() for k, v in trainer.run.model.state_dict().items()}
        result = trainer.fit()
    finally:
        trainer.close()
    return trainer, weights, result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running["item"] = item  # before any fixture: a module fixture that runs the CLI counts for this test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """Process-wide torch settings a test (or a training run inside it) may change."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    hub_dir, threads = torch.hub.get_dir(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    torch.hub.set_dir(hub_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "shapes"
