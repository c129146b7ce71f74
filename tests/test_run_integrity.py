"""A run directory belongs to one run; nothing destroys a file it did not create; resume knows its data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_cli, tiny_overrides
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_root) -> Path:
    """A finished 4-iteration run (checkpoints at 2 and 4); tests copy what they change."""
    run_dir = tmp_path_factory.mktemp("trained")
    _run(shapes_root, run_dir)
    return run_dir


def _copy_checkpoints(trained: Path, run_dir: Path) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    for path in (trained / "checkpoints").glob("*.pt"):
        (run_dir / "checkpoints" / path.name).write_bytes(path.read_bytes())
    return run_dir


# -- 2: export never replaces a file, and writes atomically ------------------------------------------


@pytest.mark.cli
def test_export_refuses_an_existing_output_its_own_checkpoint_included(tmp_path, trained):
    ckpt = tmp_path / "D" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((trained / "checkpoints" / "best.pt").read_bytes())
    before = _digest(ckpt.parent)
    result = run_cli("export", f"ckpt={ckpt}", "format=torchscript", f"export.output={ckpt}",
                     f"hydra.run.dir={tmp_path / 'ex'}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"export.output={ckpt}: {ckpt} already exists and export never replaces a file" in last, last
    assert _digest(ckpt.parent) == before


@pytest.mark.slow
def test_a_failed_export_leaves_no_file_under_the_output_name(tmp_path, trained, monkeypatch):
    from segtrain.commands import export
    from segtrain.errors import SegtrainError

    output = tmp_path / "out" / "model.pt"
    overrides = [f"ckpt={trained / 'checkpoints' / 'best.pt'}", "format=torchscript", "export.input_size=[64,64]",
                 f"export.output={output}"]

    def broken_check(*args):
        raise SegtrainError("exported model gives shape (1,) for input (1, 3, 64, 64)")

    monkeypatch.setattr(export, "verify", broken_check)
    with pytest.raises(SegtrainError, match="exported model gives shape"):
        export.run_export(compose_config("export", overrides), overrides, tmp_path / "run")
    assert list(output.parent.iterdir()) == []  # neither the file nor its staging folder
    monkeypatch.undo()
    export.run_export(compose_config("export", overrides), overrides, tmp_path / "run")
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.pt"]
    torch.jit.load(str(output))


# -- 3: data commands never delete a dataset -----------------------------------------------------------


def test_shapes_generation_never_replaces_a_dataset(tmp_path):
    from segtrain.data.shapes import ensure_shapes
    from segtrain.errors import DataError

    root = tmp_path / "D"
    root.mkdir()  # an empty folder is generated into
    ensure_shapes(root, 3, 2, [40, 48], 0)
    before = _digest(root)
    with pytest.raises(DataError, match=rf"dataset.root={root} holds a shapes dataset generated with "
                                        r"dataset.source.num_train=3 .* segtrain never deletes a dataset: use those "
                                        r"values, or a new dataset.root for dataset.source.num_train=4"):
        ensure_shapes(root, 4, 2, [40, 48], 0)
    assert _digest(root) == before
    assert not [p for p in tmp_path.iterdir() if p.name not in ("D", ".D.lock")]  # no temporary tree left


@pytest.mark.cli
def test_data_check_with_other_settings_leaves_the_dataset_byte_identical(tmp_path):
    from segtrain.data.shapes import ensure_shapes

    root = ensure_shapes(tmp_path / "D", 6, 2, [40, 48], 0)
    before = _digest(root)
    result = run_cli("data", "check", "dataset=shapes", f"dataset.root={root}", "dataset.source.num_train=4",
                     "dataset.source.num_val=2", "dataset.source.image_size=[40,48]", "logging.progress=false",
                     f"hydra.run.dir={tmp_path / 'check'}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"dataset.root={root} holds a shapes dataset generated with dataset.source.num_train=6" in last, last
    assert _digest(root) == before


@pytest.mark.slow
def test_a_refused_resume_leaves_the_dataset_untouched(tmp_path, trained, shapes_root):
    from segtrain.errors import DataError

    run_dir = _copy_checkpoints(trained, tmp_path / "run")
    before = _digest(shapes_root)
    with pytest.raises(DataError, match=r"dataset.source.num_train=16 .* never deletes a dataset"):
        _run(shapes_root, run_dir, "resume=auto", **{"dataset.source.num_train": 12})
    assert _digest(shapes_root) == before


# -- 7: eval and predict take the lock of the folder they write ----------------------------------------


def _hold(folder: Path, command: str) -> None:
    """A lock held by a live process (this test's) on this host."""
    import json
    import os
    import socket
    import time

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".segtrain.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "started": time.time(), "command": command}))


@pytest.mark.cli
def test_eval_refuses_a_live_training_run_directory(tmp_path, trained):
    run_dir = tmp_path / "live"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the training run's config\n")
    (run_dir / "train.log").write_text("iter 1/100\n")
    _hold(run_dir, "train")
    before = _digest(run_dir)
    result = run_cli("eval", f"ckpt={trained / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"run directory {run_dir} is in use by segtrain train (pid {__import__('os').getpid()}" in last, last
    assert _digest(run_dir) == before


@pytest.mark.cli
def test_a_second_predict_into_one_output_folder_is_refused_and_leftovers_go(tmp_path, trained):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(images / "a.png")
    out = tmp_path / "out"
    _hold(out, "predict")
    (out / ".a.999999.tmp.png").write_bytes(b"cut short")  # a SIGKILLed predict's partial image
    before = _digest(out)
    args = ["predict", f"ckpt={trained / 'checkpoints' / 'best.pt'}", f"input={images}", f"output={out}"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"output folder {out} is in use by segtrain predict" in last and "choose another output" in last, last
    assert _digest(out) == before
    (out / ".segtrain.lock").unlink()  # the first predict finished
    run_cli(*args, cwd=tmp_path, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_color.png", "a_overlay.png", "predict.log"]


# -- 8: resume knows its data -------------------------------------------------------------------------


def test_the_fingerprint_names_a_changed_file_and_survives_a_copy(tmp_path):
    import shutil

    from segtrain.data.shapes import shapes_samples
    from segtrain.engine.resume import check_same_data, data_fingerprint, recorded_fingerprint

    root = tmp_path / "D"
    samples = shapes_samples(root, "train", num_train=4, num_val=1, image_size=[40, 48])
    saved = recorded_fingerprint(data_fingerprint(samples, root))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # new modification times, the same bytes
    check_same_data(saved, data_fingerprint(shapes_samples(copy, "train", num_train=4, num_val=1,
                                                           image_size=[40, 48]), copy), "last.pt")
    image = root / "JPEGImages" / "train_00002.jpg"
    image.write_bytes((root / "JPEGImages" / "train_00001.jpg").read_bytes())  # another image, the same name
    with pytest.raises(ConfigError, match=r"^last.pt was trained on other contents of the same 4 files: "
                                          r"JPEGImages/train_00002.jpg changed since"):
        check_same_data(saved, data_fingerprint(samples, root), "last.pt")


@pytest.mark.cli
def test_resuming_a_finished_run_with_fewer_iterations_says_it_is_finished(tmp_path, trained, shapes_root):
    run_dir = _copy_checkpoints(trained, tmp_path / "run")
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 2})
    result = run_cli("train", *overrides, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"trainer.max_iters=2: the run in {run_dir} already finished 4 iterations" in last, last
    assert not (run_dir / "result.json").exists()
