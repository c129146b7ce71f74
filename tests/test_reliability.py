"""Failure cases: SIGKILL at any moment, truncated checkpoints, SIGTERM, malicious files, NaN loss,
out of memory, full disk. Each run is checked for bit-identical weights or a clear message."""

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets_builders import folder_dataset_with_a_bad_mask

from conftest import compose_config, folder_run_overrides, run_cli, start_cli, tiny_overrides
from segtrain.engine import checkpoint as checkpoint_module
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.trainer import train
from segtrain.errors import CheckpointWriteError, TrainingStopped, WeightsError
from segtrain.losses import SegmentationLoss

MAX_ITERS = 12


def run_overrides(shapes_root: Path, run_dir: Path, **extra) -> list[str]:
    # resnet18 up to its third stage (3.4M parameters, not 12.2M): a checkpoint every iteration is about a quarter
    # of the size, and a checkpoint write still lasts long enough to be caught mid-write.
    values = {"trainer.max_iters": MAX_ITERS, "trainer.ckpt_interval": 1, "trainer.val_interval": 6,
              "trainer.keep_last": 2, "backbone.out_indices": "[1,3]", **extra}
    return [*tiny_overrides(shapes_root, **values), f"hydra.run.dir={run_dir}"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return start_cli("train", *args, cwd=cwd)


def finish(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("train", *args, cwd=cwd)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["train_state"]["iteration"] == MAX_ITERS
    return state["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_root):
    work = tmp_path_factory.mktemp("reference")
    result = finish(run_overrides(shapes_root, work / "run"), work)
    assert result.returncode == 0, result.stderr
    return final_model(work / "run")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.002)


# Without loader workers the kill lands in a checkpoint write; with two, at a random iteration.
KILL_POINTS = [("while writing a checkpoint", 0), ("random iteration", 2)]


def kill_point_seed() -> int:
    """SEGTRAIN_TEST_SEED replays a failed run's kill points; unset, a fresh seed each run (printed)."""
    given = os.environ.get("SEGTRAIN_TEST_SEED")
    return int(given) if given else random.SystemRandom().randrange(2**32)


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("when,workers", KILL_POINTS, ids=["during-save", "iteration-2-workers"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, shapes_root, reference, when, workers):
    seed = kill_point_seed()
    kill_point = random.Random(f"{seed}/{when}/{workers}").randint(2, MAX_ITERS - 2)
    replay = f"kill point {kill_point} ({when}); replay with SEGTRAIN_TEST_SEED={seed}"
    print(replay)
    run_dir = tmp_path / "run"
    args = run_overrides(shapes_root, run_dir, **{"trainer.num_workers": workers})
    proc = start(args, tmp_path)
    ckpt_dir = run_dir / "checkpoints"
    if when == "while writing a checkpoint":
        wait_for(lambda: (ckpt_dir / f"iter_{kill_point:07d}.pt").exists(), proc)
        wait_for(lambda: any(ckpt_dir.glob(".*.tmp")), proc)  # the next checkpoint is being written right now
    else:
        log = run_dir / "train.log"
        wait_for(lambda: log.exists() and f"iter {kill_point}/" in log.read_text(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, replay
    resumed = finish([*args, "resume=auto"], tmp_path)
    assert resumed.returncode == 0, f"{replay}\n{resumed.stderr}"
    assert "resumed from" in (run_dir / "train.log").read_text(), replay
    try:
        assert_bit_identical(final_model(run_dir), reference)
    except AssertionError as error:
        raise AssertionError(f"{replay}: {error}") from error


@pytest.mark.cli
@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_identically(tmp_path, shapes_root, reference):
    run_dir = tmp_path / "run"
    args = run_overrides(shapes_root, run_dir, **{"trainer.ckpt_interval": 100})
    proc = start(args, tmp_path)
    log = run_dir / "train.log"
    wait_for(lambda: log.exists() and "iter 5/" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM after iteration" in stderr and "resume=auto" in stderr
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["iteration"]
    assert 5 <= stopped_at < MAX_ITERS
    resumed = finish([*args, "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(final_model(run_dir), reference)


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, shapes_root, caplog):
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 6, "trainer.ckpt_interval": 3})
    train(compose_config("train", overrides), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # also truncates iter_0000006.pt: last.pt is a hard link
    with caplog.at_level("INFO"):
        result = train(compose_config("train", [*overrides, "resume=auto", "trainer.max_iters=7"]), tmp_path)
    assert f"skipping unusable checkpoint: cannot read {tmp_path / 'checkpoints' / 'iter_0000006.pt'}" \
        in caplog.text
    assert f"resumed from {tmp_path / 'checkpoints' / 'iter_0000003.pt'} at iteration 3" in caplog.text
    assert result.history[0]["iteration"] == 4


class Evil:
    """Unpickling this calls Path.touch: a stand-in for arbitrary code in a stranger's checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.cli
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, shapes_root):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker), "config": "trainer: {}"}, evil)
    # The payload is genuine: unpickling the same kind of file without weights_only creates the file.
    probe = tmp_path / "probe"
    torch.save({"x": Evil(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    for args in (["eval", f"ckpt={evil}"], ["train", *tiny_overrides(shapes_root), f"resume={evil}"]):
        result = run_cli(*args, cwd=tmp_path, timeout=300)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert str(evil) in last and "getattr" in last and "\x1b" not in last, last  # the file, the global
        assert not marker.exists()
    with pytest.raises(WeightsError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.fixture()
def nan_at(monkeypatch):
    """Make the loss NaN at the given iterations (counted in optimizer steps)."""
    def install(iterations: set[int], accum: int = 1):
        calls = {"n": 0}
        original = SegmentationLoss.forward

        def loss(self, *args, **kwargs):
            calls["n"] += 1
            value = original(self, *args, **kwargs)
            iteration = (calls["n"] - 1) // accum + 1
            return value * float("nan") if iteration in iterations else value

        monkeypatch.setattr(SegmentationLoss, "forward", loss)
    return install


@pytest.mark.slow
def test_nan_loss_stops_naming_iteration_lr_and_last_good_checkpoint(tmp_path, shapes_root, nan_at):
    nan_at({5})
    cfg = compose_config("train", tiny_overrides(shapes_root, **{"trainer.max_iters": 8, "trainer.ckpt_interval": 2,
                                                                 "logging.interval": 4}))
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, tmp_path)
    message = str(stopped.value)
    assert "non-finite loss at iteration 5 (lr " in message
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'}" in message
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["train_state"]["iteration"] == 4  # nothing saved after the NaN
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


@pytest.mark.slow
def test_nan_loss_skip_policy_skips_counts_and_limits(tmp_path, shapes_root, nan_at):
    nan_at({3, 5})
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 6, "trainer.nan_policy": "skip"})
    result = train(compose_config("train", overrides), tmp_path / "a")
    assert result.skipped_steps == 2
    assert all(torch.isfinite(v.float()).all() for v in result.model.state_dict().values())
    nan_at({2, 3, 4})
    with pytest.raises(TrainingStopped, match=r"3 steps had a non-finite loss \(trainer.max_skipped_steps=2\)"):
        train(compose_config("train", [*overrides, "trainer.max_skipped_steps=2"]), tmp_path / "b")


def test_out_of_memory_message_suggests_accumulation(tmp_path, shapes_root, monkeypatch):
    from segtrain.models.segmentor import Segmentor

    def exhausted(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Segmentor, "forward", exhausted)
    with pytest.raises(TrainingStopped) as stopped:
        train(compose_config("train", tiny_overrides(shapes_root)), tmp_path)
    message = str(stopped.value)
    for part in ("out of GPU memory at iteration 1", "4 images of [32, 32] per pass", "trainer.batch_size=4",
                 "trainer.amp=off", "trainer.grad_accum_steps"):
        assert part in message


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, shapes_root, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # best.pt at 3, iter_3: fine; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    cfg = compose_config("train", tiny_overrides(shapes_root, **{"trainer.max_iters": 6}))
    with pytest.raises(CheckpointWriteError, match="No space left on device.*intact"):
        train(cfg, tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_state"]["iteration"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_requested_without_a_gpu_fails_before_any_work(tmp_path, shapes_root):
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA GPU"):
        train(compose_config("train", tiny_overrides(shapes_root, **{"trainer.device": "cuda"})), tmp_path)


@pytest.mark.cli
@pytest.mark.parametrize("where", ["train", "val"])
def test_a_data_error_in_a_loader_worker_exits_within_seconds(tmp_path, where):
    """Workers ignore SIGTERM (preemption checkpoints first); the error must still end the process."""
    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 3 if where == "train" else 11)
    # The start check would stop the run before any worker reads the bad mask: this test is about the workers.
    args = folder_run_overrides(root, **{"data.check_on_start": "false", "trainer.num_workers": 2,
                                         "eval.num_workers": 2, "trainer.max_iters": 4, "trainer.val_interval": 2,
                                         "hydra.run.dir": tmp_path / "run"})
    start = time.perf_counter()
    result = run_cli("train", *args, cwd=tmp_path, timeout=120)
    assert time.perf_counter() - start < 60
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"segtrain train: error: mask {root / 'masks'}")


@pytest.mark.cli
def test_a_checkpoint_config_naming_code_outside_segtrain_runs_nothing(tmp_path, shapes_root):
    """Weights load cleanly with weights_only=True; the stored config is the payload."""
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 1, "trainer.val_interval": 1})
    train(compose_config("train", overrides), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    marker = tmp_path / "pwned"
    config = yaml.safe_load(state["config"])
    config["backbone"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}  # would create the file
    state["config"] = yaml.safe_dump(config)
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    commands = {
        "eval": ["eval", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'ev'}"],
        "predict": ["predict", f"ckpt={evil}", f"input={shapes_root / 'JPEGImages'}", f"output={tmp_path / 'pred'}"],
        "export": ["export", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'ex'}"],
    }
    for name, args in commands.items():
        result = run_cli(*args, cwd=tmp_path, timeout=300)
        assert result.returncode == 2, (name, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert "backbone._target_='builtins.open'" in last and str(evil) in last, last
        assert not marker.exists(), name
    # resume builds from the command's own config and compares the stored one as data: refused, runs nothing
    resumed = run_cli("train", *tiny_overrides(shapes_root, **{"trainer.max_iters": 2, "trainer.val_interval": 2}),
                      f"resume={evil}", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 2, resumed.stderr
    assert "backbone._target_" in resumed.stderr and "builtins.open" in resumed.stderr, resumed.stderr
    assert not marker.exists()


@pytest.mark.cli
def test_any_exception_in_a_loader_worker_is_one_line_and_exit_2(tmp_path, shapes_root):
    """Not only DataError: a MemoryError (here raised when a worker opens an image) ends the run too."""
    (tmp_path / "exploding_source.py").write_text(
        "from pathlib import Path\n"
        "from torch.utils.data import get_worker_info\n"
        "from segtrain.data.shapes import shapes_samples\n\n"
        "class Exploding(type(Path())):\n"
        "    def __fspath__(self):\n"
        "        if get_worker_info() is not None:  # in a loader worker only (the start-up fingerprint reads too)\n"
        "            raise MemoryError('simulated: cannot allocate the decoded image')\n"
        "        return super().__fspath__()\n\n"
        "def samples(root, split, **kwargs):\n"
        "    pairs = shapes_samples(root, split, **kwargs)\n"
        "    return [(Exploding(image) if split == 'train' else image, mask) for image, mask in pairs]\n")
    overrides = tiny_overrides(shapes_root, **{"trainer.num_workers": 2, "trainer.max_iters": 2})
    start_time = time.perf_counter()
    result = run_cli("train", *overrides, "dataset.source._target_=exploding_source.samples",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120, env={"PYTHONPATH": str(tmp_path)})
    assert time.perf_counter() - start_time < 60
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("segtrain train: error: a data-loader worker failed: MemoryError: simulated: cannot allocate "
                    "the decoded image")
    assert last.split(": ", 1)[1] in (tmp_path / "run" / "train.log").read_text()  # also where people look


def test_a_full_disk_reported_by_torch_as_a_writer_error_says_no_space_left(tmp_path, monkeypatch):
    from collections import namedtuple

    from segtrain.engine.checkpoint import save_checkpoint

    def save(obj, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1472 vs 1366")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointWriteError, match=r"\(no space left on device \(0 MB free\)\); nothing was written"):
        save_checkpoint({"x": 1}, tmp_path / "a.pt")


@pytest.mark.cli
def test_a_second_train_on_a_live_run_directory_fails_at_once(tmp_path, shapes_root):
    run_dir = tmp_path / "run"
    args = run_overrides(shapes_root, run_dir, **{"trainer.max_iters": 100000, "trainer.val_interval": 100000})
    first = start(args, tmp_path)
    try:
        wait_for(lambda: (run_dir / "train.log").exists() and "iter 2/" in (run_dir / "train.log").read_text(),
                 first)
        config_before = (run_dir / ".hydra" / "config.yaml").read_text()
        started = time.perf_counter()
        second = finish([*args, "trainer.max_iters=3"], tmp_path)
        assert time.perf_counter() - started < 30
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert str(run_dir) in last and f"pid {first.pid}" in last, last
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before  # nothing of the second run
    finally:
        first.kill()
        first.wait()
    # The holder is gone (SIGKILL: no clean-up): the next run takes the lock over, with a warning.
    reached = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["iteration"]
    resumed = finish([*args, f"trainer.max_iters={reached + 1}", "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over" in (run_dir / "train.log").read_text()
    assert not (run_dir / ".segtrain.lock").exists()  # released on exit


@pytest.mark.cli
def test_validation_and_eval_honour_on_error_skip(tmp_path):
    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 11)  # a bad validation mask
    args = folder_run_overrides(root, **{"trainer.max_iters": 2, "trainer.val_interval": 2,
                                         "data.on_error": "skip"})
    result = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data.on_error=skip" in log and str(root / "masks" / "11.png") in log
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    evaluated = run_cli("eval", f"ckpt={last}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "data.on_error=skip" in evaluated.stdout
    import json

    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert len(metrics["skipped_samples"]) == 1 and "11.png" in metrics["skipped_samples"][0]


def _folder_cli(root: Path, tmp_path: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    args = [*folder_run_overrides(root), *extra]
    if command == "train":
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    cmd = ["train"] if command == "train" else ["data", "check"]
    return run_cli(*cmd, *args, cwd=tmp_path, timeout=300)


@pytest.mark.cli
def test_an_empty_split_is_an_error_for_data_check_and_training_alike(tmp_path):
    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 3)
    (root / "splits" / "val.txt").write_text("\n\n")
    for command in ("train", "check"):
        result = _folder_cli(root, tmp_path, command)
        assert result.returncode == 2, (command, result.stderr)
        assert "split 'val' of dataset 'folder'" in result.stderr and "is empty" in result.stderr, result.stderr


@pytest.mark.cli
def test_oversized_images_are_refused_before_decoding(tmp_path):
    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 3)
    result = _folder_cli(root, tmp_path, "check", "data.max_image_pixels=1000")
    assert result.returncode == 1
    assert "40x40" in result.stdout and "data.max_image_pixels=1000" in result.stdout


@pytest.mark.cli
def test_split_names_may_hold_spaces_and_symlink_loops_are_reported(tmp_path):
    import shutil as sh

    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 3)
    sh.move(root / "images" / "10.png", root / "images" / "ten a.png")
    sh.move(root / "masks" / "10.png", root / "masks" / "ten a.png")
    (root / "splits" / "val.txt").write_text("ten a\n11\n")
    result = _folder_cli(root, tmp_path, "check", "data.split=val")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usable samples: 2 of 2" in result.stdout
    (root / "images" / "loop.png").symlink_to(root / "images" / "loop.png")
    result = _folder_cli(root, tmp_path, "check", "data.split=val")
    assert result.returncode == 2
    assert str(root / "images" / "loop.png") in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_pixel_limit_holds_for_a_png_pil_cannot_open(tmp_path):
    """A bad ancillary-chunk CRC makes PIL refuse the file while OpenCV decodes it: the size comes from IHDR."""
    import struct
    import zlib

    from PIL import Image

    from segtrain.data.dataset import decode_image
    from segtrain.errors import DataError

    Image.new("L", (400, 300)).save(tmp_path / "plain.png")
    data = (tmp_path / "plain.png").read_bytes()
    body = b"tEXtComment\x00hi"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", (zlib.crc32(body) + 1) & 0xFFFFFFFF)
    (tmp_path / "crc.png").write_bytes(data[:33] + chunk + data[33:])
    with pytest.raises(DataError, match=r"is 400x300 \(0 MP\), above data.max_image_pixels=1000"):
        decode_image(tmp_path / "crc.png", max_pixels=1000)
    Image.new("L", (14200, 14200)).save(tmp_path / "big.png")  # above PIL's own bomb limit (~179 MP)
    assert decode_image(tmp_path / "big.png", max_pixels=300_000_000)[0].shape == (14200, 14200, 3)
