"""The command line as users run it: separate processes (`cli` mark), real Hydra run directories; and the
config-error matrix through segtrain.cli.main in this process (errors stop before any run starts)."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHECKOUT, run_cli, run_main, tiny_overrides
from segtrain.cli import config_dir


@pytest.mark.cli
def test_top_level_help_lists_the_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout
    bare = run_cli(cwd=tmp_path)  # no command: the usage, and a failure status
    assert bare.returncode == 2 and bare.stderr.startswith("usage: segtrain <command>") and not bare.stdout


@pytest.mark.cli
def test_version(tmp_path):
    from segtrain.cli import version

    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"segtrain {version()}\n" and version()[0].isdigit()


def test_the_distribution_name_is_ours_and_version_reads_it():
    """The package index's `segtrain` is an unrelated project: pip must never be sent to it by our name."""
    from segtrain.cli import DISTRIBUTION

    declared = re.search(r'^name = "([^"]+)"', (CHECKOUT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert declared == DISTRIBUTION != "segtrain"


def test_each_command_help_shows_its_own_examples_and_groups(tmp_path, monkeypatch, capsys):
    def groups(text: str) -> set[str]:
        section = text.split("== Config groups ==")[1].split("== Config ==")[0] if "== Config groups" in text else ""
        return {line.split(":")[0] for line in section.splitlines() if ": " in line}

    helps = {}
    monkeypatch.chdir(tmp_path)
    for command in ("eval", "predict", "export", "info", "bench"):
        status, out, err = run_main(capsys, command, "--help")
        assert status == 0, err
        assert out.startswith(f"segtrain {command}: ")
        examples = out.split("Examples:")[1]
        assert f"segtrain {command} " in examples and "segtrain train" not in examples
        helps[command] = out
    assert groups(helps["eval"]) == {"dataset", "protocol", "logger"}  # eval records to the trackers too
    assert groups(helps["predict"]) == {"dataset", "protocol"}
    assert groups(helps["export"]) == {"dataset"} and "protocol" not in groups(helps["info"])
    assert {"model", "backbone", "dataset"} <= groups(helps["info"]) and "optimizer" not in groups(helps["info"])
    assert "optimizer:" not in helps["eval"] and "ckpt: ???" in helps["eval"]
    status, out, _ = run_main(capsys, "data", "check", "--help")
    assert status == 0 and "segtrain data check dataset=" in out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.cli
def test_xception_is_the_papers_name_for_xception65(tmp_path):
    result = run_cli("train", "model=deeplabv3plus", "backbone=xception", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: xception65" in result.stdout


@pytest.mark.cli
def test_an_added_key_nothing_reads_fails_in_one_line(tmp_path):
    result = run_cli("train", "+trainer.max_iter=5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "trainer.max_iter'" in result.stderr and "trainer.max_iters'" in result.stderr, result.stderr
    assert not (tmp_path / "outputs").exists()


def test_train_help_is_hydras_with_the_config_groups(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_main(capsys, "train", "--help")
    assert status == 0
    group_section = out.split("== Config ==")[0]
    listed = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in group_section.splitlines()
              if ": " in line}
    # Every config file of every group folder is an option, one added later included.
    on_disk = {group.name: sorted(p.stem for p in group.glob("*.yaml"))
               for group in Path(config_dir()).iterdir() if group.is_dir()}
    assert on_disk and all(sorted(listed.get(group, [])) == options for group, options in on_disk.items()), listed


@pytest.mark.cli
def test_unknown_command_is_one_line_naming_it(tmp_path):
    result = run_cli("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown command 'trian'" in result.stderr


@pytest.mark.parametrize("override,names", [
    ("trainer.max_iter=5", ["trainer.max_iter'", "trainer.max_iters'"]),  # the key, and the one meant
    ("dataset.augment.cropsize=[3,3]", ["dataset.augment.cropsize'", "dataset.augment.crop_size'"]),
    ("trainer.max_iters=many", ["trainer.max_iters"]),
    ("backbone=resnet7", ["backbone=resnet7: no option 'resnet7' in group 'backbone'", "resnet18, resnet34"]),
    ("optimizer=sgdd", ["optimizer=sgdd", "did you mean optimizer=sgd?"]),
    ("loss=focal", ["loss=focal", "; options: cross_entropy, ohem"]),
    ("trainer.nan_policy=skp", ["trainer.nan_policy"]),
    ("eval.mode=slid", ["eval.mode"]),
    ("data.on_error=skp", ["data.on_error"]),
    ("dataset.augment.pad_image_with=zeros", ["dataset.augment.pad_image_with"]),
    ("trainer.amp=bf61", ["trainer.amp", "bf61"]),
    ("trainer.sync_bn=maybe", ["trainer.sync_bn"]),
    ("trainer.device=gpu", ["trainer.device", "gpu"]),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, monkeypatch, capsys, override, names):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, "train", override)
    assert status == 2 and not out
    assert err.strip().count("\n") == 0, err
    assert all(name in err for name in names), err
    assert not list(tmp_path.iterdir())


@pytest.mark.cli
def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli("train", "experiment=quickstart", "+backbone.model_kwargs.drop_rate=0.1", "--cfg", "job",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: resnet18" in result.stdout and "drop_rate: 0.1" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.cli
def test_eval_without_ckpt_says_how(tmp_path):
    result = run_cli("eval", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "ckpt" in result.stderr, result.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 3, "trainer.val_interval": 3})
    result = run_cli("train", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # outputs/<date>/<time>
    run = runs[0]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "train.log").is_file()
    log = (run / "train.log").read_text()
    assert "effective (global) batch 4 = 4 per pass x accumulation 1 x world size 1" in log
    first = log.splitlines()[:2]  # where the run goes, and how to watch it, come first
    assert f"run directory {run.resolve()}" in first[0]
    assert first[1].endswith(f"tensorboard --logdir {run.resolve().parent}")  # above the run: it shows by its name
    result = run_cli("eval", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={tmp_path / 'ev'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["miou"] is not None
    assert list((run / "eval" / "shapes-val-whole").glob("events.out.tfevents.*"))  # beside its training run


@pytest.mark.cli
@pytest.mark.slow
def test_multirun_sweep_names_job_directories_by_their_overrides_and_writes_a_summary(tmp_path):
    overrides = tiny_overrides(tmp_path / "data" / "shapes", **{"trainer.max_iters": 2, "trainer.val_interval": 2})
    result = run_cli("train", "-m", *overrides, "optimizer.lr=0.01,0.02", cwd=tmp_path)
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


@pytest.mark.cli
def test_unwritable_dataset_root_error_is_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    result = run_cli("train", *tiny_overrides(tmp_path / "taken"), cwd=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "taken") in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_built_wheel_finds_its_configs(tmp_path):
    """`pip install .` users have no source tree: the configs must come from inside the wheel."""
    import zipfile

    root = CHECKOUT
    # --no-build-isolation: build with this environment's setuptools, no network needed
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                            "-w",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("segtrain_dilated-"), wheel.name  # not the index's unrelated `segtrain`
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # Every config file of every group folder ships, a group added later included.
    shipped = {p.relative_to(tmp_path / "site" / "segtrain" / "conf") for p in
               (tmp_path / "site" / "segtrain" / "conf").rglob("*.yaml")}
    source = {p.relative_to(root / "conf") for p in (root / "conf").rglob("*.yaml")}
    assert shipped == source
    assert {p.parent.name for p in source} >= {"model", "backbone", "dataset", "loss", "optimizer", "schedule",
                                                "experiment"}
    # The wheel's own copy, not the checkout: no run_cli here.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-m", "segtrain", "train", "experiment=quickstart", "--cfg", "job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "name: resnet18" in run.stdout
    where = subprocess.run([sys.executable, "-c", "import segtrain.cli as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(tmp_path / "site" / "segtrain" / "conf")
    # The version comes from the wheel's metadata under our distribution name; the command is still `segtrain`.
    metadata = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; d = m.distribution("
                               "'segtrain-dilated'); print(d.version, d.entry_points['segtrain'].value)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
    assert metadata.returncode == 0, metadata.stderr
    from segtrain import __version__

    assert metadata.stdout.split() == [__version__, "segtrain.cli:main"]


@pytest.mark.cli
def test_offline_pretrained_run_fails_within_seconds(tmp_path):
    env = {"SEGTRAIN_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    for backbone in ("resnet50", "hrnet_w18"):
        model = "hrnetv2" if backbone.startswith("hrnet") else "deeplabv3plus"
        start = time.perf_counter()
        result = run_cli("train", f"model={model}", f"backbone={backbone}", "backbone.pretrained=true",
                         *tiny_overrides(tmp_path / "shapes")[1:], cwd=tmp_path, env=env, timeout=120)
        assert time.perf_counter() - start < 30
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert "backbone.pretrained=true" in last and "backbone.weights=" in last


@pytest.mark.cli
def test_info_prints_parameters_and_gflops(tmp_path):
    result = run_cli("info", "model=drnseg", "backbone=drn_d_22", "info.input_size=[512,1024]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DRNSeg + drn_d_22" in result.stdout
    assert "15.88M total" in result.stdout and "GFLOPs" in result.stdout and "512x1024" in result.stdout
    assert not (tmp_path / "outputs").exists()
    assert not list(tmp_path.iterdir())  # nothing written: no outputs/, no info.log


@pytest.mark.cli
@pytest.mark.slow
def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    result = run_cli("bench", "experiment=quickstart", "bench.batch_size=2", "bench.crop_size=[64,64]",
                     "bench.steps=2", "bench.warmup=1", "bench.data_samples=16", "trainer.device=cpu",
                     f"hydra.run.dir={tmp_path / 'b'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    for key in ("train_images_per_s", "inference_images_per_s", "peak_memory_mb", "data_samples_per_s_per_worker",
                "gflops_per_image"):
        assert report[key] > 0, key
    assert "train images/s" in result.stdout and "GFLOPs per image" in result.stdout


@pytest.mark.cli
@pytest.mark.parametrize("args,needle", [
    (("model=dla_up", "backbone=resnet50"), "segtrain info: error: model.down_ratio=2"),
    (("model=hrnetv2", "backbone=resnet18", "model.branches=5"), "segtrain info: error: model.branches=5"),
    (("backbone.name=resnet50.tv_in2k",), "segtrain info: error: backbone.name='resnet50.tv_in2k'"),
])
def test_a_model_that_cannot_be_built_is_one_line_naming_the_key(tmp_path, args, needle):
    result = run_cli("info", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(needle), result.stderr


@pytest.mark.cli
def test_info_estimates_training_memory(tmp_path):
    result = run_cli("info", "experiment=quickstart", "info.input_size=[128,128]", "info.batch_size=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GiB to train 4 x 128x128 per process" in result.stdout


@pytest.mark.cli
def test_data_check_logs_into_its_run_directory_not_the_current_one(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    check = ["data", "check", "dataset=shapes", f"dataset.root={tmp_path / 'shapes'}", "dataset.source.num_train=4",
             "dataset.source.num_val=2", "data.split=val", "logging.progress=false"]
    result = run_cli(*check, f"hydra.run.dir={tmp_path / 'check'}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "data check: OK" in result.stdout
    log = (tmp_path / "check" / "data_check.log").read_text()
    assert "split 'val': 2 samples, 0 problems" in log and "data check: OK" in log
    assert (tmp_path / "check" / ".hydra" / "config.yaml").is_file()
    assert list(cwd.iterdir()) == []
    # Without hydra.run.dir: a dated directory under outputs/, still nothing in the current directory itself.
    default = run_cli(*check, cwd=cwd)
    assert default.returncode == 0, default.stderr
    assert [p.name for p in cwd.iterdir()] == ["outputs"]
    logs = list((cwd / "outputs").glob("*/*-data-check/data_check.log"))
    assert len(logs) == 1 and "data check: OK" in logs[0].read_text()


def test_the_wheel_lists_every_package_of_the_source_tree():
    """setuptools ships only the packages pyproject names: a new sub-package left out breaks installed copies."""
    listed = re.search(r"^packages = \[(.*?)\]", (CHECKOUT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    declared = set(re.findall(r'"([\w.]+)"', listed.group(1)))
    on_disk = {
        ".".join(init.parent.relative_to(CHECKOUT).parts) for init in (CHECKOUT / "segtrain").rglob("__init__.py")
    }
    assert on_disk <= declared, f"add to pyproject's packages: {sorted(on_disk - declared)}"
