"""A checkpoint's stored config is inert data: parsed with limits, never resolved, its targets named one by one."""

from __future__ import annotations

import json
import resource
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.config import config_dir
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError
from segtrain.instantiate import check_stored_targets, shipped_targets
from segtrain.stored_config import MAX_DEPTH, parse_stored_config


def alias_bomb(levels: int = 6) -> str:
    """Each level names the previous one 10 times: 10**levels strings from a few hundred bytes."""
    lines = ['a0: &a0 ["xxxxxxxxxx"]']
    for n in range(1, levels + 1):
        lines.append(f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_aliases_interpolations_depth_and_size_are_refused_in_one_line():
    assert len(alias_bomb()) < 400
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"the config stored in x.pt uses a YAML alias \(\*a0\)"):
        parse_stored_config(alias_bomb(), "x.pt")
    assert time.perf_counter() - start < 1
    with pytest.raises(ConfigError, match=r"interpolation at dataset.class_names\[1\]"):
        parse_stored_config("dataset:\n  class_names: [a, '${oc.env:HOME}']\n", "x.pt")
    with pytest.raises(ConfigError, match="interpolation at trainer.lr"):
        parse_stored_config("trainer:\n  lr: ${nope}\n", "x.pt")
    deep = "v: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH}"):
        parse_stored_config(deep, "x.pt")
    with pytest.raises(ConfigError, match="larger than 1024 kB"):
        parse_stored_config("k: " + "x" * (1 << 20) + "\n", "x.pt")
    with pytest.raises(ConfigError, match="not a mapping"):
        parse_stored_config("[1, 2]", "x.pt")
    with pytest.raises(ConfigError, match="is a bytes, not YAML text"):
        parse_stored_config(b"k: 1", "x.pt")
    for text in (alias_bomb(), "trainer:\n  lr: ${nope}\n"):
        with pytest.raises(ConfigError) as refused:
            parse_stored_config(text, "x.pt")
        assert "\n" not in str(refused.value) and "use a checkpoint written by segtrain train" in str(refused.value)
    cfg = parse_stored_config("trainer:\n  lr: 0.01\n  names: [a, b]\n", "x.pt")
    assert cfg.trainer.lr == 0.01 and list(cfg.trainer.names) == ["a", "b"]


def test_the_allowlist_names_segtrains_own_classes_and_functions_not_a_package():
    shipped = shipped_targets(config_dir())
    assert "segtrain.models.deeplab.DeepLabV3Plus" in shipped and "segtrain.data.voc.voc_samples" in shipped
    assert "segtrain.data.download.download" not in shipped
    check_stored_targets({"model": {"_target_": "segtrain.models.pspnet.PSPNet"}}, "x.pt", set())
    with pytest.raises(ConfigError, match=r"refusing dataset.source._target_='segtrain.data.download.download'"):
        check_stored_targets({"dataset": {"source": {"_target_": "segtrain.data.download.download"}}}, "x.pt", set())
    # named on the command line: the user's own decision, as their own YAML files are
    check_stored_targets({"dataset": {"source": {"_target_": "segtrain.data.download.download"}}}, "x.pt",
                         {"dataset.source._target_"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_root):
    work = tmp_path_factory.mktemp("untrusted")
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 1, "trainer.val_interval": 1})
    train(compose_config("train", overrides), work / "run")
    return load_checkpoint(work / "run" / "checkpoints" / "last.pt")


def _saved(state: dict, path: Path, **config_changes) -> Path:
    state = dict(state)
    text = state["config"]
    for old, new in config_changes.items():
        text = text.replace(old, new)
    state["config"] = text
    torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.cli
def test_an_alias_bomb_checkpoint_is_refused_fast_and_small(tmp_path, trained):
    bomb = dict(trained)
    bomb["config"] = trained["config"] + alias_bomb()
    torch.save(bomb, tmp_path / "bomb.pt")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_cli("eval", f"ckpt={tmp_path / 'bomb.pt'}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path,
                     timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 2 and "uses a YAML alias" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # CPU seconds of the whole command, start-up included (wall time on a shared machine says nothing);
    # before the fix it ran past 300 s and 1.2 GB.
    cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu_seconds < 5, cpu_seconds
    # Memory: what reading the stored config allocates (the command's whole RSS is mostly `import torch`).
    tracemalloc.start()
    with pytest.raises(ConfigError, match="uses a YAML alias"):
        parse_stored_config(bomb["config"], "bomb.pt")
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert peak_mb < 500, peak_mb


@pytest.mark.slow
@pytest.mark.cli
def test_environment_interpolations_never_reach_an_export(tmp_path, trained, monkeypatch):
    pytest.importorskip("onnx")
    import onnx

    secret_env = {"SEGTRAIN_TEST_SECRET": "hunter2"}
    # in the stored config: refused in one line, nothing written
    leaky = _saved(trained, tmp_path / "leaky.pt", **{"- background": "- ${oc.env:SEGTRAIN_TEST_SECRET}"})
    assert "${oc.env:SEGTRAIN_TEST_SECRET}" in load_checkpoint(leaky)["config"]
    result = run_cli("export", f"ckpt={leaky}", f"hydra.run.dir={tmp_path / 'ex'}", cwd=tmp_path, env=secret_env,
                     timeout=300)
    assert result.returncode == 2 and "interpolation at dataset.class_names[0]" in result.stderr, result.stderr
    assert not list((tmp_path / "ex").glob("*.onnx")) if (tmp_path / "ex").exists() else True
    # in the checkpoint's class list (never parsed as config): exported as the literal text
    state = dict(trained)
    names = ["${oc.env:SEGTRAIN_TEST_SECRET}", *state["class_names"][1:]]
    state["class_names"] = names
    config = yaml.safe_load(state["config"])
    state["config"] = yaml.safe_dump(config)
    torch.save(state, tmp_path / "literal.pt")
    out = tmp_path / "model.onnx"
    result = run_cli("export", f"ckpt={tmp_path / 'literal.pt'}", f"export.output={out}",
                     f"hydra.run.dir={tmp_path / 'ex2'}", cwd=tmp_path, env=secret_env, timeout=300)
    if result.returncode == 0:
        metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert "hunter2" not in json.dumps(metadata)
    else:  # the names differ from the config's: refused, naming the class
        assert "names class 0" in result.stderr and "hunter2" not in result.stderr, result.stderr
