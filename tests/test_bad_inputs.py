"""Every bad input is one line naming the key (or file) and what to give, with exit status 2, checked where
the value enters (composition and segtrain.config_checks), never a traceback from where it would explode."""

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets_builders import folder_dataset_with_a_bad_mask
from PIL import Image

from conftest import compose_config, folder_run_overrides, run_cli, run_main, tiny_overrides, write_random_checkpoint
from segtrain.errors import ConfigError, DataError, WeightsError

LONG_NAME = "x" * 100_000


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(command, overrides, key the message must name): the values of issue 25's items 10, 11 and 12."""
    a_file = tmp / "a_file.txt"
    train = "train", ["experiment=quickstart", f"dataset.root={tmp / 'shapes'}", f"hydra.run.dir={tmp / 'run'}"]
    checkpoint = ["ckpt=" + str(tmp / "none.pt")]
    table = [
        ("dataset.augment.crop_size=[]", "dataset.augment.crop_size"),
        ("dataset.augment.crop_size=[0,0]", "dataset.augment.crop_size"),
        ("dataset.augment.crop_size=[64]", "dataset.augment.crop_size"),
        ("dataset.augment.crop_size=[100000,100000]", "dataset.augment.crop_size"),
        (f"dataset.root={a_file}", "dataset.root"),
        ("trainer.seed=4294967296", "trainer.seed"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("model.aspp_channels=0", "model.aspp_channels"),
        ("model.low_level_channels=-8", "model.low_level_channels"),
        ("optimizer.momentum=1.5", "optimizer.momentum"),
        ("dataset.augment.color_jitter=-3", "dataset.augment.color_jitter"),
        ("trainer.max_iters=99999999999999999999", "trainer.max_iters"),
        ("hydra.run.dir=", "hydra.run.dir"),
        (f"hydra.run.dir={a_file / 'run'}", "hydra.run.dir"),
        ("dataset.class_names=[]", "dataset.class_names"),
        (f"dataset.class_names=[a,{LONG_NAME}]", "dataset.class_names[1]"),
        ("dataset.class_names=[a,'b\nc']", "dataset.class_names[1]"),
        ("dataset.name=ü", "dataset.name"),
        ("dataset.name=a=b", "dataset.name"),
        ("dataset.class_names=[a,b=c]", "dataset.class_names"),
        (f"init_from={tmp}", "init_from"),
    ]
    cases = [(train[0], [*train[1], override], key) for override, key in table]
    cases += [
        ("train", ["model=pspnet", "model.aux_channels=0", f"hydra.run.dir={tmp / 'run'}"], "model.aux_channels"),
        ("predict", [*checkpoint, f"input={tmp}", f"output={a_file}"], "output"),
        ("eval", [*checkpoint, f"hydra.run.dir={tmp / 'ev'}", f"dataset.class_names=[a,{LONG_NAME}]"],
         "dataset.class_names[1]"),
    ]
    return cases


CASE_IDS = [f"{command}-{overrides[-1][:48]}" for command, overrides, _ in _cases(Path("tmp"))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_a_bad_value_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys, index):
    (tmp_path / "a_file.txt").write_text("not a folder")
    command, overrides, key = _cases(tmp_path)[index]
    status, _, err = run_main(capsys, command, *overrides)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"segtrain {command}: error: "), err
    assert key in lines[0], lines[0]
    assert len(lines[0]) < 600  # a 100,000-character name is shown shortened
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()  # nothing created


@pytest.mark.cli
@pytest.mark.parametrize("override,key", [
    ("dataset.augment.crop_size=[]", "dataset.augment.crop_size"),
    ("dataset.name=ü", "dataset.name"),
    ("hydra.run.dir=", "hydra.run.dir"),
    ("trainer.seed=4294967296", "trainer.seed"),
])
def test_the_command_line_says_the_same_in_one_line(tmp_path, override, key):
    args = ["experiment=quickstart", f"dataset.root={tmp_path / 'shapes'}", "trainer.device=cpu"]
    if not override.startswith("hydra.run.dir"):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    result = run_cli("train", *args, override, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_an_unquoted_value_says_how_to_quote_it(tmp_path, capsys):
    status, _, err = run_main(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "dataset.class_names=[a,ü]")
    assert status == 2
    assert "dataset.class_names=[a,'ü']" in err and "token recognition error at: 'ü'" in err
    status, _, err = run_main(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "dataset.name=a=b")
    assert "dataset.name='a=b'" in err


def test_a_run_directory_on_a_read_only_file_system_is_one_line(tmp_path, capsys):
    target = Path("/sys/segtrain-test-run")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    status, _, err = run_main(capsys, "train", f"hydra.run.dir={target}")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"hydra.run.dir={target}: cannot write into /sys" in err
    status, _, err = run_main(capsys, "predict", "ckpt=x.pt", f"input={tmp_path}", f"output={target}")
    assert status == 2 and f"output={target}: cannot write into /sys" in err


def test_init_from_a_folder_names_the_checkpoint_inside(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"")
    status, _, err = run_main(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", f"init_from={tmp_path}")
    assert status == 2
    assert f"init_from={tmp_path} is a folder: give a checkpoint file (.pt/.pth), e.g. init_from=" \
           f"{tmp_path / 'checkpoints' / 'best.pt'}" in err
    from segtrain.engine.init_from import read_weights_file

    with pytest.raises(WeightsError, match="is a folder"):  # the Python API says the same
        read_weights_file(tmp_path)


def test_bounds_leave_sane_values_alone():
    cfg = compose_config("train", ["trainer.seed=4294967295", "trainer.max_iters=1000000000",
                                   "dataset.augment.crop_size=[8192,8192]", "dataset.augment.color_jitter=0.4"])
    assert cfg.trainer.seed == 2**32 - 1
    with pytest.raises(ConfigError, match="eval.crop_size must be at most 8192"):
        compose_config("train", ["eval.mode=slide", "eval.crop_size=[9000,512]"])
    with pytest.raises(ConfigError, match="bench.crop_size"):
        compose_config("bench", ["bench.crop_size=[0,512]"])


@pytest.fixture
def random_checkpoint(tmp_path, shapes_root):
    """A quickstart checkpoint with random weights, written the trainer's way; `names` replaces its classes."""
    def write(names: list[str] | None = None) -> Path:
        cfg = compose_config("train", tiny_overrides(shapes_root))
        if names is not None:
            cfg.dataset.class_names = names
        return write_random_checkpoint(cfg, tmp_path / "ckpt.pt")

    return write


def test_a_checkpoint_with_an_overlong_class_name_is_refused(random_checkpoint):
    from segtrain.engine.restore import load_for_inference

    path = random_checkpoint(["background", LONG_NAME, "square", "triangle", "cross"])
    with pytest.raises(ConfigError, match=r"dataset.class_names of .*ckpt.pt\[1\]='x+\.\.\. \(100000 characters\)'"):
        load_for_inference(compose_config("eval", [f"ckpt={path}"]), [f"ckpt={path}"])


def test_out_of_memory_in_predict_names_the_image(tmp_path, random_checkpoint, monkeypatch):
    from segtrain.commands import predict
    from segtrain.engine import predictor

    path = random_checkpoint()
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "in" / "a.png")

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(predictor, "infer", exhausted)
    overrides = [f"ckpt={path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "trainer.device=cpu"]
    with pytest.raises(DataError, match=r"out of memory segmenting .*a.png \(32x24 pixels, eval.scales=\[1.0\]\): "
                                        "use eval.mode=slide"):
        predict.run_predict(compose_config("predict", overrides), overrides)


def test_a_memory_error_in_any_command_is_one_line(tmp_path, capsys, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from segtrain.cli import _task

    monkeypatch.setattr(HydraConfig, "get", staticmethod(
        lambda: SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path)))))

    def body(cfg, run_dir):
        raise MemoryError

    with pytest.raises(SystemExit) as exited:
        _task("predict", body)(compose_config("train", []))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segtrain predict: error: out of memory (MemoryError): use smaller batches, crops or images, or "
                   "fewer data-loader workers"]


def test_a_lock_from_another_host_says_how_to_take_it_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".segtrain.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere-node-7", "started": time.time()}))
    assert socket.gethostname() != "elsewhere-node-7"
    status, _, err = run_main(capsys, "train", f"hydra.run.dir={run_dir}")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "pid 4242, host elsewhere-node-7" in err
    assert f"if that job no longer runs on elsewhere-node-7, delete {lock} to take the directory over" in err


@pytest.mark.slow
def test_skipped_validation_samples_reach_the_summary_and_result_json(tmp_path, caplog):
    from segtrain.engine.trainer import train

    root = folder_dataset_with_a_bad_mask(tmp_path / "data", 11)
    cfg = compose_config("train", folder_run_overrides(root, **{
        "trainer.max_iters": 2, "trainer.val_interval": 2, "data.on_error": "skip", "data.check_on_start": "false"}))
    with caplog.at_level("WARNING", logger="segtrain"):
        result = train(cfg, tmp_path / "run")
    assert result.skipped_val == 1
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["skipped_val_samples"] == 1 and written["skipped_samples"] == 0
    assert "1 validation samples left out of the final mIoU" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _long_run(tmp_path: Path) -> list[str]:
    return tiny_overrides(tmp_path / "shapes", **{"trainer.max_iters": 400, "trainer.val_interval": 1000,
                                                   "trainer.ckpt_interval": 5, "hydra.run.dir": tmp_path / "run"})


def _wait_for_iteration(run_dir: Path, iteration: int, processes: list, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    log = run_dir / "train.log"
    while not (log.is_file() and f"iter {iteration}/" in log.read_text()):
        assert all(p.poll() is None for p in processes), [p.communicate()[1][-2000:] for p in processes]
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.5)


@pytest.mark.cli
@pytest.mark.slow
def test_a_dead_peer_is_one_line_on_the_surviving_rank(tmp_path):
    from conftest import start_cli

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [start_cli("train", *_long_run(tmp_path), cwd=tmp_path, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    try:
        _wait_for_iteration(tmp_path / "run", 8, ranks)
        ranks[1].kill()
        _, err = ranks[0].communicate(timeout=60)
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("segtrain train: error: another training process of this job died")


@pytest.mark.cli
@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import checkout_env

    command = [sys.executable, "-m", "segtrain.launch", "--standalone", "--nproc_per_node=2", "-m", "segtrain",
               "train", *_long_run(tmp_path)]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=checkout_env({"OMP_NUM_THREADS": "1"}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_iteration(tmp_path / "run", 8, [launcher])
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("segtrain.launch: stopped by SIGTERM")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert "stopped by SIGTERM after iteration" in err
