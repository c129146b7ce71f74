"""`segtrain train` checks a sample of its data before the first step (data.check_on_start), with the checks
of `segtrain data check`; colour masks get one `colors=` suggestion built from every mask seen."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config, run_cli, tiny_overrides
from segtrain.data.check import check_samples, colours_suggestion, findings, spread, validation_findings
from segtrain.data.folder import folder_samples
from segtrain.data.loading import source_samples
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError, DataError


def binary_folder(root: Path, count: int = 12, empty_val: bool = False) -> Path:
    """`count` 24x24 images with 0/255 masks (a 255 square); splits/ lists 0-9 as train, the rest as val.
    `empty_val`: the validation masks hold background only."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for n in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{n}.png")
        mask = np.zeros((24, 24), np.uint8)
        if not (empty_val and n >= 10):
            mask[4:12, 6:18] = 255
        Image.fromarray(mask, "L").save(root / "masks" / f"{n}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(str(n) for n in range(10)) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(str(n) for n in range(10, count)) + "\n")
    return root


def folder_args(shapes_root: Path, root: Path, *extra: str) -> list[str]:
    common = [o for o in tiny_overrides(shapes_root, **{"trainer.max_iters": 2, "trainer.val_interval": 2})
              if not o.startswith("dataset.")]
    return [*common, "dataset=folder", f"dataset.root={root}", "dataset.class_names=[bg,fg]",
            "dataset.source.split_dir=splits", "dataset.augment.crop_size=[16,16]", *extra]


@pytest.mark.cli
def test_binary_masks_stop_training_before_the_first_step_with_the_value_map_hint(tmp_path, shapes_root):
    root = binary_folder(tmp_path / "d")
    run_dir = tmp_path / "run"
    result = run_cli("train", *folder_args(shapes_root, root)[1:], "experiment=quickstart",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("segtrain train: error: data check before training: 12 mask(s) hold only the values 0")
    assert "(splits 'train' and 'val')" in last and "also:" not in last  # said once, not once per split
    assert "'dataset.source.value_map={255:1}'" in last and "data.check_on_start=false" in last
    assert not (run_dir / "checkpoints").exists()
    assert "iter " not in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_value_map_trains_and_a_weak_validation_split_warns_once(tmp_path, shapes_root, caplog):
    root = binary_folder(tmp_path / "d", empty_val=True)
    cfg = compose_config("train", folder_args(shapes_root, root, "dataset.source.value_map={255:1}"))
    with caplog.at_level(logging.WARNING, logger="segtrain"):
        result = train(cfg, tmp_path / "run")
    assert len(result.history) == 2
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data check:")]
    assert len([w for w in warnings if "no pixel of ['fg'] in the validation split 'val'" in w]) == 1, warnings
    assert len([w for w in warnings if "has 2 image(s) (fewer than 10)" in w]) == 1, warnings
    assert "dataset.source.val_ratio" in warnings[0]


def test_check_on_start_false_skips_the_check(tmp_path, shapes_root, monkeypatch):
    from segtrain.engine.callbacks import data_check

    root = binary_folder(tmp_path / "d")
    calls = []
    monkeypatch.setattr(data_check, "check_samples", lambda *a, **k: calls.append(a))

    class Stub:
        cfg = compose_config("train", folder_args(shapes_root, root, "data.check_on_start=false"))

    data_check.DataCheck().on_fit_start(Stub())
    assert calls == []


def test_a_folder_dataset_without_class_names_is_refused(tmp_path):
    for command in ("train", "data_check"):
        with pytest.raises(ConfigError, match=r"dataset.class_names is not set \(dataset=folder\): name every "
                                              r"class, the one of mask value 0 first.*is its class index"):
            compose_config(command, ["dataset=folder", f"dataset.root={tmp_path}"])


def test_labels_outside_the_classes_collapse_into_one_line_with_a_count(tmp_path):
    root = binary_folder(tmp_path / "d", count=20)
    samples = folder_samples(root, "all", value_map={255: 7})
    report = check_samples(samples, "all", 2, 255, 10**8)
    fatal, weak = findings(report, ["bg", "fg"], 255, "raise")
    assert len(fatal) == 1 and not weak
    assert fatal[0].startswith("20 mask(s) of split 'all' have labels outside the classes")
    assert "label values [7]" in fatal[0] and "dataset.source.value_map={7:CLASS}" in fatal[0]
    # on_error=skip: a few unusable masks are skipped (a warning); all of them unusable is still fatal.
    assert findings(report, ["bg", "fg"], 255, "skip") == (fatal, [])
    Image.fromarray(np.zeros((24, 24), np.uint8), "L").save(root / "masks" / "0.png")
    some = check_samples(folder_samples(root, "all", value_map={255: 7}), "all", 2, 255, 10**8)
    fatal, weak = findings(some, ["bg", "fg"], 255, "skip")
    assert not fatal and weak == ["data.on_error=skip will skip these: 19 mask(s) of split 'all' have labels "
                                  "outside the classes, e.g. " + some.problems[0][1].split(" (image ")[0]]
    assert spread(list(range(1000)), 5) == [0, 250, 500, 749, 999] and spread([1, 2], 5) == [1, 2]


def colour_folder(root: Path, subsets: list[list[int]]) -> tuple[Path, np.ndarray]:
    """One RGB mask per subset: horizontal bands of those VOC colours (classes 0, 1, 2, 3, 15)."""
    voc = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]] + [[0, 0, 0]] * 11 + [[192, 128, 128]],
                   np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n, subset in enumerate(subsets):
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "images" / f"{n}.png")
        bands = np.repeat(np.array(subset), -(-12 // len(subset)))[:12]
        Image.fromarray(voc[np.tile(bands[:, None], (1, 12))], "RGB").save(root / "masks" / f"{n}.png")
    return root, voc


@pytest.mark.cli
def test_colour_masks_with_different_colours_get_one_suggestion_covering_all(tmp_path):
    root, _ = colour_folder(tmp_path / "c", [[0, 1], [0, 2], [3, 1, 15], [0, 15]])
    result = run_cli("data", "check", "dataset=folder", f"dataset.root={root}", "dataset.class_names=[a,b,c,d,e]",
                     "logging.progress=false", cwd=tmp_path)  # train and val splits: masks of both count
    assert result.returncode == 1, result.stdout + result.stderr
    suggestions = [line for line in result.stdout.splitlines() if "dataset.source.colors=" in line]
    assert len(suggestions) == 1, result.stdout
    listing = "dataset.source.colors=[[0,0,0],[128,0,0],[0,128,0],[128,128,0],[192,128,128]]"
    assert "4 mask(s) of splits 'train' and 'val' are colour images; together they hold 5 colours" in suggestions[0]
    assert listing in suggestions[0] and "e=[192, 128, 128]" in suggestions[0]
    assert "ordered as the VOC colour map" in suggestions[0]
    assert sum("BAD" in line and "a colour image, read as an index mask" in line
               for line in result.stdout.splitlines()) == 4


def test_the_colours_suggestion_says_when_it_cannot_order_them(tmp_path):
    root, _ = colour_folder(tmp_path / "c", [[0, 1], [0, 2]])
    report = check_samples(folder_samples(root, "all"), "all", 2, 255, 10**8)
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8), "RGB").save(root / "masks" / "0.png")  # not a VOC colour
    odd = check_samples(folder_samples(root, "all"), "all", 2, 255, 10**8)
    voc = colours_suggestion(report, ["bg", "fg"])
    assert "together they hold 3 colours" in voc and "dataset.class_names has 2 entries for 3 colours" in voc
    text = colours_suggestion(odd, ["bg", "fg"])
    assert "dataset.source.colors=[[0,0,0],[0,128,0],[7,7,7]]" in text
    assert "ordered by colour value, not by meaning: reorder it so the i-th colour is class i" in text
    assert "bg=" not in text  # 3 colours for 2 names: no pairing offered


def test_the_start_check_is_cheap_on_the_tiny_shapes_data(shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    names = list(cfg.dataset.class_names)
    train_samples, val_samples = source_samples(cfg.dataset, "train"), source_samples(cfg.dataset, "val")
    start = time.perf_counter()
    reports = [check_samples(s, split, len(names), 255, 10**8, limit=200, seconds=10.0)
               for s, split in ((train_samples, "train"), (val_samples, "val"))]
    elapsed = time.perf_counter() - start
    assert [r.samples for r in reports] == [16, 4] and not any(r.problems for r in reports)
    assert findings(reports[0], names, 255, "raise") == ([], [])
    assert validation_findings(reports[1], names)  # 4 validation images: a warning
    assert elapsed < 0.5, elapsed  # measured 0.004-0.012 s (16 + 4 masks of 40x56, 2 cores)


def test_a_data_error_raised_in_a_worker_rebuilds_from_its_message():
    from segtrain.data.dataset import ColourMaskError, LabelRangeError

    for kind in (ColourMaskError, LabelRangeError):
        assert isinstance(kind("message"), DataError) and str(kind("message")) == "message"
