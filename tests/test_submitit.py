"""Training through Hydra's submitit launcher (hydra/launcher=submitit_slurm on a cluster): the ranks come
from submitit's job environment, a sweep is one job per point, and submitit's preemption signal checkpoints
and requeues the job, which resumes in the same job directory. Tested with submitit_local, which runs the
same job code as SLURM (tasks, signals, requeue) on this machine."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from conftest import checkout_env, run_cli, run_main, start_cli, tiny_overrides
from segtrain.engine.distributed import adopt_launcher_environment
from segtrain.engine.preemption import PreemptionHandler, hand_over_to_launcher, preemption_signals

TORCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
              "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
              "SLURM_JOB_NODELIST": "gpu[07-08]"}


def _without_torch_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TORCH_VARIABLES and not k.startswith("SUBMITIT")}


def _launcher_installed() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


needs_launcher = pytest.mark.skipif(not _launcher_installed(),
                                    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")


@needs_launcher
def test_a_slurm_task_reads_its_ranks_and_master_from_the_job_environment():
    root = logging.getLogger()
    shared_log = logging.FileHandler(os.devnull)
    root.addHandler(shared_log)
    try:
        with mock.patch.dict(os.environ, {**_without_torch_variables(), **SLURM_TASK}, clear=True):
            assert adopt_launcher_environment()
            assert {k: os.environ[k] for k in TORCH_VARIABLES[:5]} == {
                "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07"}
            port = os.environ["MASTER_PORT"]
            for name in TORCH_VARIABLES:
                del os.environ[name]
            assert adopt_launcher_environment() and os.environ["MASTER_PORT"] == port  # a requeue: the same port
        assert shared_log not in root.handlers  # rank 3 leaves train.log to rank 0
    finally:
        root.removeHandler(shared_log)


def test_torchrun_variables_and_plain_processes_are_left_alone():
    with mock.patch.dict(os.environ, {**_without_torch_variables(), **SLURM_TASK, "RANK": "0"}, clear=True):
        assert not adopt_launcher_environment()  # torchrun inside the job: its variables win
    with mock.patch.dict(os.environ, _without_torch_variables(), clear=True):
        assert not adopt_launcher_environment()
        assert "RANK" not in os.environ


def test_submitits_signal_checkpoints_and_is_handed_back_after_the_checkpoint():
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with mock.patch.dict(os.environ, {"SUBMITIT_EXECUTOR": "slurm"}):
            assert signal.SIGUSR2 in preemption_signals()
            with PreemptionHandler() as handler:
                signal.raise_signal(signal.SIGUSR2)
                assert handler.signum == signal.SIGUSR2 and received == []  # segtrain's: finish the step first
            hand_over_to_launcher(signal.SIGUSR2)  # after the checkpoint: submitit requeues
            assert received == [signal.SIGUSR2]
        with mock.patch.dict(os.environ, _without_torch_variables(), clear=True):
            assert signal.SIGUSR2 not in preemption_signals()
            hand_over_to_launcher(signal.SIGUSR2)  # not a submitit job: nothing to hand over to
            assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_requeued_job_takes_over_the_lock_of_its_earlier_start_on_another_node(tmp_path):
    from segtrain.engine.lock import LOCK_NAME, live_holder

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "gpu01", "started": 0.0, "job": "4242"}))
    with mock.patch.dict(os.environ, {**_without_torch_variables(), **SLURM_TASK}, clear=True):
        assert live_holder(tmp_path) is None
        os.environ["SLURM_JOB_ID"] = "4343"  # another job's run on another node: held
        assert live_holder(tmp_path)["host"] == "gpu01"


def test_a_launcher_without_multirun_is_refused_in_one_line(capsys):
    status, _, err = run_main(capsys, "train", "hydra/launcher=submitit_slurm")
    assert status == 2
    assert "hydra/launcher=submitit_slurm takes effect with -m only" in err and len(err.strip().splitlines()) == 1


def _launcher_args(root: Path, sweep_dir: Path, tasks: int, **extra: object) -> list[str]:
    values = {"trainer.max_iters": 2, "trainer.val_interval": 2, "trainer.ckpt_interval": 2, **extra}
    return [*tiny_overrides(root, **values), "hydra/launcher=submitit_local", f"hydra.launcher.tasks_per_node={tasks}",
            f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow
@pytest.mark.cli
@needs_launcher
def test_two_submitit_tasks_train_the_weights_of_torchrun_with_two_processes(tmp_path, shapes_root):
    sweep_dir, torchrun_dir = tmp_path / "sweep", tmp_path / "torchrun"
    done = run_cli("train", *_launcher_args(shapes_root, sweep_dir, 2), "-m", cwd=tmp_path,
                   env=_without_torch_variables())
    assert done.returncode == 0, done.stderr[-3000:]
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "world size 2" in log
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "segtrain",
               "train", *_launcher_args(shapes_root, sweep_dir, 2)[:-3], f"hydra.run.dir={torchrun_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    submitit = torch.load(sweep_dir / "0" / "checkpoints" / "last.pt", weights_only=False)
    torchrun = torch.load(torchrun_dir / "checkpoints" / "last.pt", weights_only=False)
    assert submitit["train_state"]["iteration"] == torchrun["train_state"]["iteration"] == 2
    for name, value in torchrun["model"].items():  # the tolerance of test_two_process_training_matches_one_process
        assert torch.allclose(submitit["model"][name].float(), value.float(), atol=1e-5), name


PACE = '''
import os
import time
from pathlib import Path

from segtrain.engine.callbacks import Callback


class Pace(Callback):
    """Slows the steps down so that a signal arrives mid-run, and tells the test which process trains."""

    def __init__(self, pid_file: str) -> None:
        self.pid_file = Path(pid_file)

    def on_fit_start(self, run) -> None:
        with open(self.pid_file, "a") as handle:
            handle.write(f"{run.run_dir.name} {os.getpid()}\\n")

    def on_step_end(self, run, result) -> None:
        time.sleep(0.3)
'''


def _wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended first: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.cli
@needs_launcher
def test_a_sweep_is_one_job_per_point_and_a_preempted_job_is_requeued_and_resumes_in_its_directory(tmp_path,
                                                                                                   shapes_root):
    (tmp_path / "pace_callback.py").write_text(PACE)
    sweep_dir, pids = tmp_path / "sweep", tmp_path / "pids"
    args = [*_launcher_args(shapes_root, sweep_dir, 1, **{"trainer.max_iters": 10, "trainer.val_interval": 10,
                                                           "trainer.ckpt_interval": 10}),
            "resume=auto", f"+callbacks.pace={{_target_: pace_callback.Pace, pid_file: '{pids}'}}",
            "optimizer.lr=0.01,0.02", "-m"]
    env = {**_without_torch_variables(), "PYTHONPATH": str(tmp_path)}
    sweep = start_cli("train", *args, cwd=tmp_path, env=env)
    job_dir = sweep_dir / "0_optimizer.lr-0.01"

    def processes_of_job_0() -> list[int]:
        lines = [line.split() for line in pids.read_text().splitlines()] if pids.is_file() else []
        return [int(pid) for name, pid in lines if name == job_dir.name]

    try:
        metrics = job_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 300, sweep)
        os.kill(processes_of_job_0()[0], signal.SIGUSR2)  # what SLURM sends before the time limit
        out, err = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err[-3000:]
    assert len(processes_of_job_0()) == 2  # the requeued job is a new process
    log = (job_dir / "train.log").read_text()
    assert "SIGUSR2 received" in log and "resumed from" in log
    result = json.loads((job_dir / "result.json").read_text())
    assert result["iteration"] == 10
    iterations = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()
                  if "train/loss" in json.loads(line)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 10
    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["overrides"]) for r in rows] == [("0", "optimizer.lr=0.01"), ("1", "optimizer.lr=0.02")]
    assert [Path(r["run_dir"]).name for r in rows] == ["0_optimizer.lr-0.01", "1_optimizer.lr-0.02"]
    assert len(list((sweep_dir / ".submitit").glob("*/*_submitted.pkl"))) == 2  # one submitted job per point
    assert "sweep summary (2 jobs)" in out
