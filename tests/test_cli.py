"""The command line as users run it: separate processes, real Hydra run directories."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides


def segtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "segtrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_top_level_help_lists_the_commands(tmp_path):
    result = segtrain("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout
    bare = segtrain(cwd=tmp_path)  # no command: the usage, and a failure status
    assert bare.returncode == 2 and bare.stderr.startswith("usage: segtrain <command>") and not bare.stdout


def test_version(tmp_path):
    from segtrain.cli import version

    result = segtrain("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"segtrain {version()}\n" and version()[0].isdigit()


def test_each_command_help_shows_its_own_examples_and_groups(tmp_path):
    def groups(text: str) -> set[str]:
        section = text.split("== Config groups ==")[1].split("== Config ==")[0] if "== Config groups" in text else ""
        return {line.split(":")[0] for line in section.splitlines() if ": " in line}

    helps = {}
    for command in ("eval", "predict", "export", "info", "bench"):
        result = segtrain(command, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"segtrain {command}: ")
        examples = result.stdout.split("Examples:")[1]
        assert f"segtrain {command} " in examples and "segtrain train" not in examples
        helps[command] = result.stdout
    assert groups(helps["eval"]) == groups(helps["predict"]) == {"dataset", "protocol"}
    assert groups(helps["export"]) == {"dataset"} and "protocol" not in groups(helps["info"])
    assert {"model", "backbone", "dataset"} <= groups(helps["info"]) and "optimizer" not in groups(helps["info"])
    assert "optimizer:" not in helps["eval"] and "ckpt: ???" in helps["eval"]
    data_check = segtrain("data", "check", "--help", cwd=tmp_path)
    assert data_check.returncode == 0 and "segtrain data check dataset=" in data_check.stdout
    assert not (tmp_path / "outputs").exists()


def test_xception_is_the_papers_name_for_xception65(tmp_path):
    result = segtrain("train", "model=deeplabv3plus", "backbone=xception", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: xception65" in result.stdout


def test_an_added_key_nothing_reads_fails_in_one_line(tmp_path):
    result = segtrain("train", "+trainer.max_iter=5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "unknown config key 'trainer.max_iter'; did you mean 'trainer.max_iters'?" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_train_help_is_hydras_with_the_config_groups(tmp_path):
    result = segtrain("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    group_section = result.stdout.split("== Config ==")[0]
    groups = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in group_section.splitlines()
              if line.split(":")[0] in ("model", "backbone", "dataset", "loss", "optimizer", "schedule", "experiment")}
    assert {"resnet50", "xception65", "hrnet_w48", "drn_d_105", "dla34", "timm"} <= set(groups["backbone"])
    assert {"deeplabv3plus", "pspnet", "hrnetv2", "drnseg", "dla_up"} <= set(groups["model"])
    assert "quickstart" in groups["experiment"] and groups["optimizer"] == ["adamw", "sgd"]
    assert groups["loss"] == ["cross_entropy", "ohem"] and "cosine" in groups["schedule"]


def test_unknown_command_is_one_line_naming_it(tmp_path):
    result = segtrain("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown command 'trian'" in result.stderr


@pytest.mark.parametrize("override,needle", [
    ("trainer.max_iter=5", "unknown config key 'trainer.max_iter'; did you mean 'trainer.max_iters'?"),
    ("dataset.augment.cropsize=[3,3]", "unknown config key 'dataset.augment.cropsize'; did you mean "
                                       "'dataset.augment.crop_size'?"),
    ("trainer.max_iters=many", "invalid value for 'trainer.max_iters'"),
    ("backbone=resnet7", "Could not find 'backbone/resnet7'"),
    ("optimizer=sgdd", "Could not find 'optimizer/sgdd'"),
    ("loss=focal", "Could not find 'loss/focal'"),
    ("trainer.nan_policy=skp", "invalid value for 'trainer.nan_policy'"),
    ("eval.mode=slid", "invalid value for 'eval.mode'"),
    ("data.on_error=skp", "invalid value for 'data.on_error'"),
    ("dataset.augment.pad_image_with=zeros", "invalid value for 'dataset.augment.pad_image_with'"),
    ("trainer.amp=bf61", "trainer.amp must be one of auto, off, bf16, fp16, got 'bf61'"),
    ("trainer.sync_bn=maybe", "trainer.sync_bn must be one of auto, true, false"),
    ("trainer.device=gpu", "trainer.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, override, needle):
    result = segtrain("train", override, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert needle in result.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = segtrain("train", "experiment=quickstart", "+backbone.model_kwargs.drop_rate=0.1", "--cfg", "job",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: resnet18" in result.stdout and "drop_rate: 0.1" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_eval_without_ckpt_says_how(tmp_path):
    result = segtrain("eval", cwd=tmp_path)
    assert result.returncode == 2
    assert "ckpt is required" in result.stderr


@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 3, "trainer.val_interval": 3})
    result = segtrain("train", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # outputs/<date>/<time>
    run = runs[0]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "train.log").is_file()
    log = (run / "train.log").read_text()
    assert "effective (global) batch 4 = 4 per pass x accumulation 1 x world size 1" in log
    first = log.splitlines()[:2]  # where the run goes, and how to watch it, come first
    assert f"run directory {run.resolve()}" in first[0] and f"tensorboard --logdir {run.resolve()}" in first[1]
    result = segtrain("eval", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={tmp_path / 'ev'}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["miou"] is not None


@pytest.mark.slow
def test_multirun_sweep_names_job_directories_by_their_overrides_and_writes_a_summary(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 2, "trainer.val_interval": 2})
    result = segtrain("train", "-m", *overrides, "optimizer.lr=0.01,0.02", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_optimizer.lr-0.01", "1_optimizer.lr-0.02"]
    for job, lr in zip(jobs, ("0.01", "0.02")):
        assert (job / "checkpoints" / "last.pt").is_file()
        assert f"lr: {lr}" in (job / ".hydra" / "config.yaml").read_text()
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["overrides"], r["best_iteration"], r["iterations"]) for r in rows] == [
        ("0", "optimizer.lr=0.01", "2", "2"), ("1", "optimizer.lr=0.02", "2", "2")]
    for row, job in zip(rows, jobs):
        assert Path(row["run_dir"]).resolve() == job.resolve()
        assert float(row["best_miou"]) == json.loads((job / "result.json").read_text())["best_miou"]
    assert "| 1 | optimizer.lr=0.02 |" in (sweep / "summary.md").read_text()
    assert "sweep summary (2 jobs)" in result.stdout and "| 0 | optimizer.lr=0.01 |" in result.stdout


def test_unwritable_dataset_root_error_is_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    result = segtrain("train", *tiny_overrides(tmp_path / "taken"), cwd=tmp_path)
    assert result.returncode == 2
    assert "not a generated shapes dataset" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_built_wheel_finds_its_configs(tmp_path):
    """`pip install .` users have no source tree: the configs must come from inside the wheel."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    # --no-build-isolation: build with this environment's setuptools, no network needed
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                            "-w",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("segtrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # Every config file of every group folder ships, a group added later included.
    shipped = {p.relative_to(tmp_path / "site" / "segtrain" / "conf") for p in
               (tmp_path / "site" / "segtrain" / "conf").rglob("*.yaml")}
    source = {p.relative_to(root / "conf") for p in (root / "conf").rglob("*.yaml")}
    assert shipped == source
    assert {p.parent.name for p in source} >= {"model", "backbone", "dataset", "loss", "optimizer", "schedule",
                                                "experiment"}
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-m", "segtrain", "train", "experiment=quickstart", "--cfg", "job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "name: resnet18" in run.stdout
    where = subprocess.run([sys.executable, "-c", "import segtrain.cli as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(tmp_path / "site" / "segtrain" / "conf")


def test_offline_pretrained_run_fails_within_seconds(tmp_path):
    env = {**os.environ, "SEGTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    for backbone in ("resnet50", "hrnet_w18"):
        model = "hrnetv2" if backbone.startswith("hrnet") else "deeplabv3plus"
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "segtrain", "train", f"model={model}", f"backbone={backbone}",
             "backbone.pretrained=true", *tiny_overrides(tmp_path / "shapes")[1:]],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert time.perf_counter() - start < 30
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert "backbone.pretrained=true" in last and "backbone.weights=" in last


def test_info_prints_parameters_and_gflops(tmp_path):
    result = segtrain("info", "model=drnseg", "backbone=drn_d_22", "info.input_size=[512,1024]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DRNSeg + drn_d_22" in result.stdout
    assert "15.88M total" in result.stdout and "GFLOPs" in result.stdout and "512x1024" in result.stdout
    assert not (tmp_path / "outputs").exists()
    assert not list(tmp_path.iterdir())  # nothing written: no outputs/, no info.log


@pytest.mark.slow
def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    result = segtrain("bench", "experiment=quickstart", "bench.batch_size=2", "bench.crop_size=[64,64]",
                      "bench.steps=2", "bench.warmup=1", "bench.data_samples=16", "trainer.device=cpu",
                      f"hydra.run.dir={tmp_path / 'b'}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    for key in ("train_images_per_s", "inference_images_per_s", "peak_memory_mb", "data_samples_per_s_per_worker",
                "gflops_per_image"):
        assert report[key] > 0, key
    assert "train images/s" in result.stdout and "GFLOPs per image" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (("model=dla_up", "backbone=resnet50"), "segtrain info: error: model.down_ratio=2 needs a backbone feature at "
                                            "stride 2"),
    (("model=hrnetv2", "backbone=resnet18", "model.branches=5"), "segtrain info: error: model.branches=5"),
    (("backbone.name=resnet50.tv_in2k",), "segtrain info: error: backbone.name='resnet50.tv_in2k'"),
])
def test_a_model_that_cannot_be_built_is_one_line_naming_the_key(tmp_path, args, needle):
    result = segtrain("info", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(needle), result.stderr


def test_info_estimates_training_memory(tmp_path):
    result = segtrain("info", "experiment=quickstart", "info.input_size=[128,128]", "info.batch_size=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GiB to train 4 x 128x128 per process" in result.stdout


def test_data_check_logs_into_its_run_directory_not_the_current_one(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    checkout = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(checkout)}
    check = ["data", "check", "dataset=shapes", f"dataset.root={tmp_path / 'shapes'}", "dataset.source.num_train=4",
             "dataset.source.num_val=2", "data.split=val", "logging.progress=false"]
    result = subprocess.run([sys.executable, "-m", "segtrain", *check, f"hydra.run.dir={tmp_path / 'check'}"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "data check: OK" in result.stdout
    log = (tmp_path / "check" / "data_check.log").read_text()
    assert "split 'val': 2 samples, 0 problems" in log and "data check: OK" in log
    assert (tmp_path / "check" / ".hydra" / "config.yaml").is_file()
    assert list(cwd.iterdir()) == []
    # Without hydra.run.dir: a dated directory under outputs/, still nothing in the current directory itself.
    default = subprocess.run([sys.executable, "-m", "segtrain", *check], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=300)
    assert default.returncode == 0, default.stderr
    assert [p.name for p in cwd.iterdir()] == ["outputs"]
    logs = list((cwd / "outputs").glob("*/*-data-check/data_check.log"))
    assert len(logs) == 1 and "data check: OK" in logs[0].read_text()
