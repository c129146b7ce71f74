"""Hydra multirun (`segtrain train -m ...`): job directories named by what the sweep varies, and the
sweep directory's `summary.csv` / `summary.md` from the jobs' `result.json` (written by the trainer,
segtrain.engine.sweep), printed when the sweep ends. This is CLI-level glue: a resolver and a callback
that Hydra calls, reading Hydra's state; the engine never imports it.

    outputs/multirun/<date>/<time>/
      0_optimizer.lr-0.01/          hydra.sweep.subdir: ${segtrain.job_subdir:}
      1_optimizer.lr-0.02/
      summary.csv  summary.md       SweepSummary (conf/common.yaml hydra.callbacks)

A job directory is `<job number>_<key>-<value>+<key>-<value>...` over the swept keys only (the
`kv_sep`/`item_sep` of hydra.job.config.override_dirname, its exclude_keys left out), with every
character a path or a Hydra override could not hold replaced by `-`, so `ckpt=<job dir>/...` works
unquoted. The swept keys are learnt at the start of the sweep (SweepSummary.on_multirun_start) from
the command line's sweep overrides and `hydra.sweeper.params` (Optuna's search space).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain.display import percent

SWEPT_KEYS_ENV = "SEGTRAIN_SWEPT_KEYS"  # set for the jobs (and launcher processes) of a running sweep
MAX_NAME = 120
UNSAFE = re.compile(r"[^A-Za-z0-9._+@%-]")
COLUMNS = ("job", "overrides", "best_miou", "best_iteration", "final_miou", "iterations", "run_dir")


def _parse(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def _key(override: Any) -> str:
    return override.key_or_group.lstrip("+~")


def swept_keys_of(config: DictConfig) -> list[str]:
    """Keys the sweep varies: command-line sweeps (`a=1,2`, `range()`, `choice()`, ...) and the
    sweeper's params (config-defined sweeps, Optuna's search space)."""
    keys = []
    for text in config.hydra.overrides.task:
        override = _parse(text)
        if override.is_sweep_override():
            keys.append(_key(override))
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if isinstance(params, DictConfig):
        for key, value in params.items():
            try:
                swept = _parse(f"{key}={value}").is_sweep_override()
            except Exception:  # noqa: BLE001 - a sweeper's own syntax: take it as swept
                swept = True
            if swept:
                keys.append(str(key).lstrip("+~"))
    return list(dict.fromkeys(keys))


def swept_keys() -> set[str] | None:
    """The running sweep's swept keys; None when unknown (then every override names the directory)."""
    text = os.environ.get(SWEPT_KEYS_ENV)
    return None if text is None else set(json.loads(text))


def safe_name(text: str) -> str:
    name = UNSAFE.sub("-", text)
    if len(name) > MAX_NAME:  # file systems stop at 255 bytes; keep it readable and unique
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def sweep_overrides(overrides: list[str], exclude: set[str] | None = None) -> list[str]:
    """The overrides (`key=value`) that name a sweep job: those of the swept keys, exclude_keys left out."""
    swept, chosen = swept_keys(), []
    for text in overrides:
        override = _parse(text)
        key = _key(override)
        if (swept is None or key in swept) and key not in (exclude or set()):
            chosen.append(f"{key}={override.get_value_element_as_str()}")
    return chosen


def subdir_name(num: int, overrides: list[str], kv_sep: str = "-", item_sep: str = "+",
                exclude: set[str] | None = None) -> str:
    """`<num>_<key><kv_sep><value><item_sep>...` over the swept overrides, made path- and override-safe."""
    items = [text.replace("=", kv_sep, 1) for text in sweep_overrides(overrides, exclude)]
    label = item_sep.join(sorted(items))
    return f"{num}_{safe_name(label)}" if label else str(num)


def job_subdir() -> str:
    """Resolver `segtrain.job_subdir` (hydra.sweep.subdir), with hydra.job.config.override_dirname's settings."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    naming = hydra_cfg.job.config.override_dirname
    return subdir_name(hydra_cfg.job.num, list(hydra_cfg.overrides.task), naming.kv_sep, naming.item_sep,
                       set(naming.exclude_keys))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("segtrain.job_subdir"):
        OmegaConf.register_new_resolver("segtrain.job_subdir", job_subdir)


register_resolvers()  # Hydra imports this module (hydra.callbacks) before any job directory is named


# --- the sweep's summary ------------------------------------------------------------------------

def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per finished job of the sweep, in job order."""
    from segtrain.engine.sweep import RESULT_FILE

    rows = []
    for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows.append({
            "job": result.get("job"),
            "overrides": " ".join(sweep_overrides(result.get("overrides", []))),
            "best_miou": result.get("best_miou"),
            "best_iteration": result.get("best_iteration"),
            "final_miou": result.get("final_miou"),
            "iterations": result.get("iteration"),
            "run_dir": str(path.parent.resolve()),
        })
    return sorted(rows, key=lambda row: (row["job"] is None, row["job"] or 0, row["run_dir"]))


def markdown(rows: list[dict[str, Any]]) -> str:
    best = max((r["best_miou"] for r in rows if r["best_miou"] is not None), default=None)
    lines = ["| job | overrides | best mIoU % | best iteration | final mIoU % | iterations | run dir |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        score = percent(r["best_miou"])
        if best is not None and r["best_miou"] == best:
            score = f"**{score}**"
        lines.append(f"| {r['job']} | {r['overrides'] or '-'} | {score} | {r['best_iteration']} | "
                     f"{percent(r['final_miou'])} | {r['iterations']} | {r['run_dir']} |")
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = collect(sweep_dir)
    if not rows:
        return rows
    with open(Path(sweep_dir) / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (Path(sweep_dir) / "summary.md").write_text(markdown(rows) + "\n")
    return rows


class SweepSummary(Callback):
    """Registered in conf/common.yaml (hydra.callbacks.sweep_summary)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEPT_KEYS_ENV] = json.dumps(swept_keys_of(config))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # After every job, so a sweep stopped by a failed job still has the rows of the finished ones. In a
        # multi-task job of the submitit launcher every task ends the job: rank 0 writes.
        from segtrain.engine.distributed import process_rank

        if process_rank() == 0 and str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN"):
            write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        os.environ.pop(SWEPT_KEYS_ENV, None)
        if not rows:
            return
        print(f"\nsweep summary ({len(rows)} jobs): {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}")
        print(markdown(rows))
