"""Custom-data mistakes people make, each answered by a message naming the file and the key to change."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config, run_cli
from segtrain.data.dataset import read_mask
from segtrain.data.folder import folder_samples
from segtrain.data.loading import build_dataset
from segtrain.data.normalization import normalization
from segtrain.errors import ConfigError, DataError


def folder(root: Path, write_mask, count: int = 4) -> Path:
    """`count` 10x14 images; `write_mask(path_without_suffix, labels)` stores each mask (a 0/1 square)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for n in range(count):
        Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(root / "images" / f"{n:04d}.jpg")
        labels = np.zeros((10, 14), np.uint8)
        labels[2:6, 3:9] = 1
        write_mask(root / "masks" / f"{n:04d}", labels)
    return root


def dataset_of(root: Path, *overrides: str, on_error: str = "raise"):
    cfg = compose_config("train", ["dataset=folder", f"dataset.root={root}", "dataset.class_names=[bg,fg]",
                                   "dataset.augment.crop_size=[8,8]", *overrides])
    return build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg), on_error=on_error)


def data_check(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("data", "check", "dataset=folder", f"dataset.root={root}", "dataset.class_names=[bg,fg]",
                   "data.split=all", "logging.progress=false", *overrides, cwd=root)


def test_jpeg_masks_are_refused_as_lossy_not_reported_missing(tmp_path):
    root = folder(tmp_path / "d", lambda stem, m: Image.fromarray(m * 255, "L").save(f"{stem}.jpg"))
    samples = folder_samples(root, "all")
    assert [Path(s[1]).name for s in samples] == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"]
    with pytest.raises(DataError) as caught:
        dataset_of(root)
    message = str(caught.value)
    assert "missing" not in message and "masks of split 'val' are JPEG files" in message
    assert "has the extension .jpg" in message and "lossless PNG" in message and "changes label values" in message
    # Read one by one (on_error=skip, data check): each file is named, with the PNG name expected.
    skipped = dataset_of(root, on_error="skip")[0]["skipped"]
    assert skipped.startswith(f"mask {root / 'masks'}") and ".jpg has the extension .jpg" in skipped
    assert ".png) is expected" in skipped
    # A JPEG saved under a .png name is caught by its content.
    renamed = folder(tmp_path / "r", lambda stem, m: Image.fromarray(m * 255, "L").save(f"{stem}.png", format="JPEG"))
    with pytest.raises(DataError, match=r"0\d{3}\.png is a JPEG file.*lossless PNG"):
        dataset_of(renamed)[0]


def test_rgb_masks_in_index_mode_point_at_mask_format_rgb_with_their_colours(tmp_path):
    colours = np.array([[0, 0, 0], [128, 0, 0]], np.uint8)
    root = folder(tmp_path / "c", lambda stem, m: Image.fromarray(colours[m], "RGB").save(f"{stem}.png"))
    with pytest.raises(DataError) as caught:
        dataset_of(root)[0]
    message = str(caught.value)
    assert str(root / "masks") in message and "is an RGB colour image" in message
    # The file's own colours, but no ready list: one file's colours are not the dataset's (data check builds it).
    assert "set dataset.source.mask_format=rgb and dataset.source.colors" in message
    assert "this mask holds [[0,0,0],[128,0,0]]" in message and "`segtrain data check` suggests the list" in message
    # The suggested keys read the masks.
    mask = dataset_of(root, "dataset.source.mask_format=rgb", "dataset.source.colors=[[0,0,0],[128,0,0]]")[0]["mask"]
    assert sorted(mask.unique().tolist()) == [0, 1]
    grey = folder(tmp_path / "g", lambda stem, m: Image.fromarray(np.stack([m] * 3, -1), "RGB").save(f"{stem}.png"))
    with pytest.raises(DataError, match=r"three channels are equal \(values \[0, 1\]\): save the masks as "
                                        r"single-channel"):
        dataset_of(grey)[0]


def test_out_of_range_labels_point_at_class_names_and_value_map(tmp_path):
    def seven(stem, m):
        m[0, 0] = 7
        Image.fromarray(m, "L").save(f"{stem}.png")

    root = folder(tmp_path / "r", seven)
    with pytest.raises(DataError) as caught:
        dataset_of(root)[0]
    message = str(caught.value)
    assert f"{root / 'masks'}" in message and "label values [7] outside the valid range 0..1" in message
    assert "dataset.class_names has 2 entries and sets the class count" in message
    assert "dataset.source.value_map={7:CLASS}" in message and "255 to ignore" in message
    # Either fix the message names works.
    assert dataset_of(root, "dataset.class_names=[a,b,c,d,e,f,g,h]")[0]["mask"].max() == 7
    assert dataset_of(root, "dataset.source.value_map={7:255}")[0]["mask"].max() == 255


@pytest.mark.cli
def test_binary_masks_warn_in_data_check_and_value_map_from_the_cli_fixes_them(tmp_path):
    root = folder(tmp_path / "b", lambda stem, m: Image.fromarray(m * 255, "L").save(f"{stem}.png"))
    plain = data_check(root)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    warning = [line for line in plain.stdout.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "4 mask(s) hold only the values 0 and 255" in warning[0]
    assert "'dataset.source.value_map={255:1}'" in warning[0]
    mapped = data_check(root, "dataset.source.value_map={255:1}")
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    assert "WARNING" not in mapped.stdout and "ignored (255) pixels: 0" in mapped.stdout
    fg = next(line for line in mapped.stdout.splitlines() if line.strip().startswith("fg"))
    assert fg.split()[1:] == ["17.143", "4"]  # 24 of 140 pixels in each of the 4 masks


def test_one_bit_masks_are_read_as_zero_and_one(tmp_path):
    Image.fromarray(np.eye(4, 5, dtype=bool)).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "1"
    assert np.array_equal(read_mask(tmp_path / "m.png"), np.eye(4, 5, dtype=np.uint8))


def test_value_map_is_applied_before_the_label_check_and_refuses_bad_entries(tmp_path):
    root = folder(tmp_path / "v", lambda stem, m: Image.fromarray(m * 255, "L").save(f"{stem}.png"))
    mask = dataset_of(root, "dataset.source.value_map={255:1}")[0]["mask"]
    assert int((mask == 1).sum()) == 24 and int((mask == 0).sum()) == 140 - 24
    train = dataset_of(root, "dataset.source.value_map={255:1}", "dataset.source.val_ratio=0.5")  # another split
    assert sorted(train[0]["mask"].unique().tolist()) == [0, 1]
    with pytest.raises(DataError, match=r"label values \[2\]"):
        dataset_of(root, "dataset.source.value_map={255:2}")[0]  # mapped values are checked too
    with pytest.raises(ConfigError, match=r"dataset.source.value_map: class index for 255: 300 .* 0\.\.255"):
        dataset_of(root, "dataset.source.value_map={255:300}")
    with pytest.raises(ConfigError, match=r"dataset.source.value_map must map raw mask values"):
        dataset_of(root, "dataset.source.value_map=[1,2]")
    with pytest.raises(ConfigError, match=r"value_map maps the values of single-channel masks.*remove value_map"):
        dataset_of(root, "dataset.source.value_map={255:1}", "dataset.source.mask_format=rgb",
                   "dataset.source.colors=[[0,0,0],[255,255,255]]")
