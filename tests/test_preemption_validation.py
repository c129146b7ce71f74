"""A signal during a long validation or evaluation: stop at the next batch, checkpoint, exit 128 + N in
seconds; the resumed run redoes the interrupted validation. A second Ctrl-C: one line, exit 130."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_cli, start_cli, tiny_overrides
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.trainer import train

# The latency under test is one validation batch plus a checkpoint; on a machine whose cores other test
# processes share, more threads than cores only add waiting.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_evaluate_stops_before_the_next_batch_when_asked():
    images = [{"image": torch.rand(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long), "index": i, "skipped": None}
              for i in range(5)]
    loader = torch.utils.data.DataLoader(images, batch_size=1, collate_fn=list)

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.calls = torch.nn.Conv2d(3, 2, 1), 0

        def forward(self, x: torch.Tensor) -> dict:
            self.calls += 1
            return {"out": self.conv(x)}

    model = Counting()
    asked = iter([False, False, True])
    result = evaluate(model, loader, 2, torch.device("cpu"), settings=InferenceSettings(),
                      stop_requested=lambda: next(asked))
    assert result.interrupted and model.calls == 2  # two batches, then the third ask said stop
    assert not evaluate(model, loader, 2, torch.device("cpu"), settings=InferenceSettings()).interrupted
    assert model.calls == 7


def test_once_the_process_is_stopping_another_ctrl_c_ends_it_at_once(monkeypatch):
    """Not a KeyboardInterrupt inside an atexit callback (loader workers, trackers): a traceback after the one line."""
    import os

    from segtrain.cli import _exit_at_once_on_ctrl_c

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    previous = signal.getsignal(signal.SIGINT)
    try:
        _exit_at_once_on_ctrl_c()
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exits == [130]


def _slow_validation(root: Path, run_dir: Path, **extra) -> list[str]:
    """24 validation images at 4 scales + flip: a validation of many seconds on a CPU, a fraction of one per image."""
    values = {"dataset.source.image_size": "[64,96]", "dataset.source.num_val": 24, "trainer.max_iters": 4,
              "trainer.val_interval": 2, "trainer.ckpt_interval": 100, "eval.scales": "[0.75,1.0,1.25,1.5]",
              "eval.flip": "true", "eval.batch_size": 1, **extra}
    return [*tiny_overrides(root, **values), f"hydra.run.dir={run_dir}"]


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None, f"the run ended first: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.cli
def test_sigterm_during_a_multiscale_validation_checkpoints_in_seconds_and_the_resume_redoes_it(tmp_path):
    run_dir = tmp_path / "run"
    args = _slow_validation(tmp_path / "shapes", run_dir)
    proc = start_cli("train", *args, cwd=tmp_path, env=ONE_THREAD)
    _wait_for_line(run_dir / "train.log", "iter 2: validating on 24 images", proc)
    time.sleep(0.5)  # inside the first scales of the first image
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - signalled
    assert proc.returncode == 143, stderr
    assert seconds < 10, seconds  # one validation batch (one image, 8 passes), then the checkpoint
    log = (run_dir / "train.log").read_text()
    assert "validation of iteration 2 interrupted by SIGTERM: it is redone after resume" in log
    assert "iter 2: val mIoU" not in log  # no half validation reported
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["train_state"]["iteration"] == 2
    assert any(entry.get("pending") == 2 for entry in state["callbacks"].values() if isinstance(entry, dict))
    # The resumed run validates iteration 2 before its first step (a single scale now: eval.* may change).
    resumed = run_cli("train", *args, "resume=auto", "eval.scales=[1.0]", "eval.flip=false", cwd=tmp_path,
                      timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "train.log").read_text()
    after = log.split("resumed from", 1)[1]
    assert after.index("iter 2: val mIoU") < after.index("iter 3/4")
    assert "iter 4: val mIoU" in after


@pytest.mark.slow
@pytest.mark.cli
def test_sigterm_during_eval_exits_143_at_the_next_batch_and_a_second_ctrl_c_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = _slow_validation(tmp_path / "shapes", run_dir, **{"trainer.max_iters": 1, "trainer.val_interval": 100,
                                                             "eval.scales": "[1.0]", "eval.flip": "false"})
    train(compose_config("train", args[:-1]), run_dir)  # without its hydra.run.dir: in this process
    eval_dir = tmp_path / "ev"
    proc = start_cli("eval", f"ckpt={run_dir}", "eval.scales=[0.75,1.0,1.25,1.5]", "eval.flip=true",
                     f"hydra.run.dir={eval_dir}", cwd=tmp_path, env=ONE_THREAD)
    _wait_for_line(eval_dir / "eval.log", "evaluating", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM during the evaluation of 24 images; no metrics were written" in stderr
    assert not (eval_dir / "metrics.json").exists()
    # Ctrl-C twice: the second exits at once with one line, no KeyboardInterrupt traceback
    proc = start_cli("eval", f"ckpt={run_dir}", "eval.scales=[0.75,1.0,1.25,1.5]", "eval.flip=true",
                     f"hydra.run.dir={tmp_path / 'ev2'}", cwd=tmp_path, env=ONE_THREAD)
    _wait_for_line(tmp_path / "ev2" / "eval.log", "evaluating", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # 130; or, when the second one lands while the process is already exiting, death by SIGINT itself
    assert proc.returncode in (128 + signal.SIGINT, -signal.SIGINT), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.slow
def test_a_validation_cut_by_a_signal_and_redone_after_resume_trains_on_bit_identically(tmp_path):
    """The redone validation must not shift the training's random stream (a DataLoader pass draws a seed)."""
    import signal as signals

    from segtrain.engine.callbacks import Callback
    from segtrain.errors import Preempted

    values = {"trainer.max_iters": 8, "trainer.val_interval": 4, "trainer.ckpt_interval": 100}
    overrides = tiny_overrides(tmp_path / "shapes", **values)
    train(compose_config("train", overrides), tmp_path / "reference")

    class SignalBeforeValidation(Callback):  # as if SIGTERM arrived during step 4: its validation is cut
        def on_step_end(self, run, result) -> None:
            if run.state.iteration == 4 and run.preemption is not None:
                run.preemption.signum = signals.SIGTERM

    with pytest.raises(Preempted):
        train(compose_config("train", overrides), tmp_path / "run", callbacks=[SignalBeforeValidation()])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["callbacks"]["ValidateAndKeepBest"] == {
        "pending": 4}
    train(compose_config("train", [*overrides, "resume=auto"]), tmp_path / "run")
    reference = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
