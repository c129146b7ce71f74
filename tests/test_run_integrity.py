"""A run directory belongs to one run; nothing destroys a file it did not create; resume knows its data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import compose_config, tiny_overrides
from segtrain.engine.checkpoint import find_resume_checkpoint, load_checkpoint, prune, resume_candidates
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError


def _digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> sha256): byte-identical means the same dict."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_checkpoint(path: Path, run_id: str | None, iteration: int) -> None:
    state = {"model": {}, "config": "{}", "train_state": {"iteration": iteration}}
    if run_id is not None:
        state["run_id"] = run_id
    torch.save(state, path)


def _run(shapes_root, run_dir, *extra, **values):
    values = {"trainer.max_iters": 4, "trainer.val_interval": 2, "trainer.ckpt_interval": 2, **values}
    return train(compose_config("train", [*tiny_overrides(shapes_root, **values), *extra]), run_dir)


# -- 1 and 9: one run per directory; pruning by the iteration inside --------------------------------


def test_pruning_counts_only_this_runs_loadable_files_by_the_iteration_inside(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    _fake_checkpoint(ckpt / "iter_0000005.pt", "new", 5)
    _fake_checkpoint(ckpt / "iter_0000010.pt", "new", 10)
    _fake_checkpoint(ckpt / "iter_0000015.pt", "old", 15)  # another run's files: never ours to delete
    _fake_checkpoint(ckpt / "iter_0000020.pt", "old", 20)
    _fake_checkpoint(ckpt / "iter_0000099.pt", "new", 1)  # the name says newest, the content says oldest
    (ckpt / "iter_0000030.pt").write_bytes(b"")  # a killed or broken write: never displaces a loadable file
    _fake_checkpoint(ckpt / "iter_0000012.pt", "new", 12)
    before = _digest(ckpt)
    removed = prune(ckpt, 2, "new", ckpt / "iter_0000012.pt")
    assert sorted(p.name for p in removed) == ["iter_0000005.pt", "iter_0000099.pt"]
    after = _digest(ckpt)
    assert after == {name: digest for name, digest in before.items() if name in after}
    assert sorted(after) == ["iter_0000010.pt", "iter_0000012.pt", "iter_0000015.pt", "iter_0000020.pt",
                             "iter_0000030.pt"]


def test_resume_auto_continues_the_run_that_wrote_last_pt(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for run_id, iteration in (("old", 15), ("old", 20), ("mine", 5), ("mine", 10)):
        _fake_checkpoint(ckpt / f"iter_{iteration:07d}.pt", run_id, iteration)
    (ckpt / "last.pt").hardlink_to(ckpt / "iter_0000010.pt")
    assert [p.name for p in resume_candidates(tmp_path)] == ["iter_0000010.pt", "iter_0000005.pt", "last.pt"]
    path, state = find_resume_checkpoint(tmp_path)
    assert path.name == "iter_0000010.pt" and state["run_id"] == "mine"


@pytest.mark.slow
def test_a_new_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path, shapes_root):
    run_dir = tmp_path / "run"
    _run(shapes_root, run_dir)
    first = load_checkpoint(run_dir / "checkpoints" / "last.pt")["run_id"]
    assert isinstance(first, str) and len(first) >= 16
    (run_dir / "checkpoints" / ".iter_0000006.pt.x1y2.tmp").write_bytes(b"partial")  # a killed writer's
    before = _digest(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*run holds another run's checkpoints \(best.pt, "
                                          r"iter_0000002.pt, .*\) and resume=null starts a new run: continue that "
                                          r"run with resume=auto, or choose a new directory"):
        _run(shapes_root, run_dir)
    after = _digest(run_dir / "checkpoints")
    assert after == {k: v for k, v in before.items() if not k.endswith(".tmp")}  # only the leftover is gone
    # resume=auto continues it, keeps its id, and prunes only its own files (keep_last=2).
    (run_dir / "checkpoints" / "iter_0000030.pt").write_bytes(b"")
    result = _run(shapes_root, run_dir, "resume=auto", **{"trainer.max_iters": 8, "trainer.keep_last": 2})
    assert result.history[0]["iteration"] == 5
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*.pt"))
    assert names == ["iter_0000006.pt", "iter_0000008.pt", "iter_0000030.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["run_id"] == first
