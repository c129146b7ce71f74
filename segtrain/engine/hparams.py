"""The hyper-parameters a run is compared by (TensorBoard's HParams tab, result.json): the key
settings of every run plus whatever the command line overrode, each under its config key, except
the keys that do not change the result (NOT_RESULT_KEYS)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

GROUPS = ("model", "backbone", "dataset", "loss", "optimizer", "schedule")
KEY_SETTINGS = ("optimizer.lr", "optimizer.weight_decay", "trainer.batch_size", "dataset.augment.crop_size",
                "trainer.max_iters")
# HParams metrics: the scalars (TensorBoard tags) whose last value the tab shows for each run.
METRIC_TAGS = ("val/best_mIoU", "val/mIoU")
# Overrides that change how a run is logged, loaded or saved, not what it learns: left out of the HParams
# columns (a key and every key under it), so runs compare by what sets them apart.
NOT_RESULT_KEYS = ("logging", "hydra", "trainer.num_workers", "eval.num_workers", "trainer.ckpt_interval",
                   "trainer.keep_last", "eval.save_predictions", "data.split", "resume", "dataset.workers_per_gpu")


@dataclass
class RunInfo:
    """What Hydra knows about the running job, built by the CLI (segtrain.composition.hydra_run_info) and
    passed in; empty outside one (tests, the Python API)."""

    overrides: list[str] = field(default_factory=list)  # the task overrides, as given
    choices: dict[str, str] = field(default_factory=dict)  # group -> option (model: deeplabv3plus)
    job: int | None = None  # hydra.job.num of a sweep job


def _value(value: Any) -> float | str:
    """HParams values are numbers or strings: lists and mappings are written as JSON text."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return value
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.dumps(value)


def _group_name(cfg: DictConfig, group: str) -> str:
    """The option name without Hydra (a config composed by the API): `name` or the target's last part."""
    node = cfg.get(group)
    if not isinstance(node, DictConfig):
        return str(node)
    name = node.get("name") or node.get("_target_") or "?"
    return str(name).rsplit(".", 1)[-1]


def changes_result(key: str) -> bool:
    """False for NOT_RESULT_KEYS and the keys under them (`logging.interval`, `hydra.run.dir`)."""
    return not any(key == name or key.startswith(f"{name}.") for name in NOT_RESULT_KEYS)


def run_hparams(cfg: DictConfig, overrides: list[str], choices: dict[str, str]) -> dict[str, float | str]:
    """Key settings first, then every override (`key=value` under its key, `group=option` under the group)
    that changes the result."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: dict[str, float | str] = {group: choices.get(group) or _group_name(cfg, group) for group in GROUPS}
    for key in KEY_SETTINGS:
        values[key] = _value(OmegaConf.select(cfg, key, default=None))
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - already validated by Hydra; never fail a run over a label
            continue
        if override.is_delete():
            continue
        key = override.key_or_group.lstrip("+~")
        if not changes_result(key):
            continue
        if key in choices:
            values[key] = choices[key]
        else:
            values[key] = _value(OmegaConf.select(cfg, key, default=override.value()))
    return values
