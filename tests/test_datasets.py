"""VOC + SBD, Cityscapes and folder datasets: preparation, splits, decoding, checking, bad samples."""

import http.server
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from datasets_builders import (
    CITY_FRAMES,
    SBD_TRAIN,
    SBD_VAL,
    VOC_TRAIN,
    VOC_VAL,
    build_cityscapes_archives,
    build_voc_archives,
    sbd_mask,
    write_jpeg,
)
from PIL import Image

from conftest import compose_config, run_cli, run_in_process, tiny_overrides
from segtrain.data.cityscapes import LABEL_TO_TRAIN, cityscapes_samples
from segtrain.data.dataset import read_mask
from segtrain.data.download import download
from segtrain.data.folder import folder_samples
from segtrain.data.loading import build_dataset
from segtrain.data.normalization import normalization
from segtrain.data.prepare_cityscapes import prepare_cityscapes
from segtrain.data.prepare_voc import prepare_voc
from segtrain.data.voc import voc_samples
from segtrain.engine.trainer import train
from segtrain.errors import DataError


@pytest.fixture(scope="module")
def voc_archives(tmp_path_factory):
    return build_voc_archives(tmp_path_factory.mktemp("voc"))


def test_prepare_voc_from_local_archives_builds_train_aug(capsys, tmp_path, voc_archives):
    result = run_in_process(capsys, "data", "prepare", "voc", "--root", str(tmp_path / "data"), "--archives",
                            str(voc_archives), "--skip-checksum")
    assert result.returncode == 0, result.stderr
    assert "train_aug 6" in result.stdout
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    train_aug = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert train_aug == sorted((set(SBD_TRAIN + SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
    assert not set(train_aug) & set(VOC_VAL)  # every VOC val image excluded
    assert len(voc_samples(voc, "train")) == 3 and len(voc_samples(voc, "val")) == 2
    assert len(voc_samples(voc, "train_aug")) == 6
    for image_id in set(train_aug) - set(VOC_TRAIN):  # converted from SBD .mat
        converted = Image.open(voc / "SegmentationClassAug" / f"{image_id}.png")
        assert converted.mode == "P"
        assert np.array_equal(np.array(converted), sbd_mask(image_id))
    for image_id in VOC_TRAIN:  # VOC's own masks (with 255 borders) take precedence
        assert np.array_equal(read_mask(voc / "SegmentationClassAug" / f"{image_id}.png"),
                              read_mask(voc / "SegmentationClass" / f"{image_id}.png"))


def test_prepare_voc_verifies_checksums(capsys, tmp_path, voc_archives):
    result = run_in_process(capsys, "data", "prepare", "voc", "--root", str(tmp_path), "--archives", str(voc_archives))
    assert result.returncode == 2
    assert "VOCtrainval_11-May-2012.tar has MD5" in result.stderr
    assert "expected 6cd6e144f989b92b3379bac3b3de84fd" in result.stderr


def test_prepare_voc_missing_archive_names_file_and_address(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_in_process(capsys, "data", "prepare", "voc", "--root", str(tmp_path), "--archives",
                            str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "VOCtrainval_11-May-2012.tar" in result.stderr and "http://host.robots.ox.ac.uk" in result.stderr


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    ranges: list = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.ranges.append(start)
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def mirror(voc_archives):
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(voc_archives), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_resumes_a_partial_file_and_verifies_md5(tmp_path, voc_archives, mirror):
    from segtrain.data.download import md5sum

    source = voc_archives / "benchmark.tgz"
    dest = tmp_path / "benchmark.tgz"
    part = tmp_path / "benchmark.tgz.part"
    part.write_bytes(source.read_bytes()[:1000])
    _RangeHandler.ranges.clear()
    download(f"{mirror}/benchmark.tgz", dest, md5sum(source), progress=False)
    assert _RangeHandler.ranges == [1000]
    assert dest.read_bytes() == source.read_bytes() and not part.exists()
    with pytest.raises(DataError, match="MD5"):
        download(f"{mirror}/benchmark.tgz", tmp_path / "again" / "benchmark.tgz", "0" * 32, progress=False)


def test_prepare_voc_downloads_from_a_mirror(tmp_path, mirror, capfd):
    report = prepare_voc(tmp_path / "data", mirror=mirror, check=False)
    assert report["train_aug"] == 6
    assert "%|" not in capfd.readouterr().err  # not a terminal: no download or conversion bars
    assert (tmp_path / "data" / "downloads" / "VOCtrainval_11-May-2012.tar").is_file()


def test_prepare_voc_offline_names_file_and_address(tmp_path):
    with pytest.raises(DataError, match=r"VOCtrainval_11-May-2012\.tar from http://127\.0\.0\.1:9/VOCtrainval"):
        prepare_voc(tmp_path, mirror="http://127.0.0.1:9", check=False)


@pytest.mark.cli
def test_train_on_missing_voc_says_how_to_get_it(tmp_path):
    start = time.perf_counter()
    result = run_cli("train", "dataset=voc", f"dataset.root={tmp_path / 'nothing'}", cwd=tmp_path)
    assert time.perf_counter() - start < 30
    assert result.returncode == 2
    assert "segtrain data prepare voc" in result.stderr.strip().splitlines()[-1]


def test_prepare_cityscapes_unpacks_and_writes_train_ids(tmp_path):
    zips = build_cityscapes_archives(tmp_path / "work")
    root = tmp_path / "cityscapes"
    report = prepare_cityscapes(root, zips, train_ids=True)
    assert report["train_images"] == 2 and report["val_images"] == 1 and report["labelTrainIds_written"] == 3
    samples = cityscapes_samples(root, "val")
    assert len(samples) == 1 and samples[0][1].name.endswith("_gtFine_labelTrainIds.png")
    labels = read_mask(root / "gtFine" / "val" / "frankfurt" / f"{CITY_FRAMES['val'][0]}_gtFine_labelIds.png")
    assert np.array_equal(read_mask(samples[0][1]), LABEL_TO_TRAIN[labels])
    # Without labelTrainIds files the label ids are mapped on the fly, to the same result.
    for path in root.glob("gtFine/*/*/*_labelTrainIds.png"):
        path.unlink()
    cfg = compose_config("train", ["dataset=cityscapes", f"dataset.root={root}"])
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    assert np.array_equal(dataset[0]["mask"].numpy(), LABEL_TO_TRAIN[labels])


def test_prepare_cityscapes_missing_zip_says_where_to_get_it(capsys, tmp_path):
    result = run_in_process(capsys, "data", "prepare", "cityscapes", "--root", str(tmp_path / "c"))
    assert result.returncode == 2
    assert "leftImg8bit_trainvaltest.zip" in result.stderr and "cityscapes-dataset.com" in result.stderr


def _folder_dataset(root: Path, count: int = 6, rgb: bool = False) -> None:
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    for n in range(count):
        write_jpeg(root / "images" / f"img{n}.jpg", 10, 14, n)
        mask = np.random.default_rng(n).integers(0, 3, (10, 14)).astype(np.uint8)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        if rgb:
            colored = np.array(colors, np.uint8)[mask]
            colored[0, 0] = (224, 224, 192)
            Image.fromarray(colored, mode="RGB").save(root / "masks" / f"img{n}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / "masks" / f"img{n}.png")


def test_folder_rgb_masks_are_decoded_through_the_palette(tmp_path):
    _folder_dataset(tmp_path, rgb=True)
    samples = folder_samples(tmp_path, "all", mask_format="rgb", colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
                             ignore_colors=[[224, 224, 192]])
    image_path, mask_path, decoder = samples[2]
    decoded = decoder(read_mask(mask_path, rgb=True), mask_path)
    expected = np.random.default_rng(2).integers(0, 3, (10, 14)).astype(np.uint8)
    expected[0, 0] = 255
    assert np.array_equal(decoded, expected)
    with pytest.raises(DataError, match=r"colours \[\(224, 224, 192\)\]"):
        folder_samples(tmp_path, "all", mask_format="rgb", colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])[0][2](
            read_mask(mask_path, rgb=True), mask_path)


def test_folder_splits_are_seeded_disjoint_or_from_files(tmp_path):
    _folder_dataset(tmp_path, count=10)
    train = [s[0].stem for s in folder_samples(tmp_path, "train", val_ratio=0.2, seed=1)]
    val = [s[0].stem for s in folder_samples(tmp_path, "val", val_ratio=0.2, seed=1)]
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert val == [s[0].stem for s in folder_samples(tmp_path, "val", val_ratio=0.2, seed=1)]
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("img3\nimg7\n")
    assert [s[0].stem for s in folder_samples(tmp_path, "val", split_dir="splits")] == ["img3", "img7"]


def _plant_bad_files(root: Path) -> dict[str, str]:
    _folder_dataset(root, count=6)
    truncated = root / "images" / "img0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(root / "masks" / "img1.png")  # size mismatch
    bad = np.zeros((10, 14), np.uint8)
    bad[3, 3] = 37
    Image.fromarray(bad, mode="L").save(root / "masks" / "img2.png")
    (root / "masks" / "img3.png").unlink()
    cv2.imwrite(str(root / "images" / "img4.png"), np.zeros((10, 14), np.uint8))  # grayscale: converted, fine
    (root / "images" / "img4.jpg").unlink()
    return {"img0.jpg": "truncated", "img1.png": "is 14x10 but its mask", "img2.png": "[37]", "img3.png": "missing"}


@pytest.mark.cli
def test_data_check_names_every_planted_bad_file(tmp_path):
    planted = _plant_bad_files(tmp_path / "mine")
    result = run_cli("data", "check", "dataset=folder", f"dataset.root={tmp_path / 'mine'}",
                     "dataset.class_names=[a,b,c]", "data.split=all", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    bad_lines = [line for line in result.stdout.splitlines() if line.strip().startswith("BAD")]
    assert len(bad_lines) == 4, bad_lines
    for name, reason in planted.items():
        assert any(name in line and reason in line for line in bad_lines), (name, bad_lines)
    assert "converted 1 grayscale image(s)" in result.stdout
    assert "usable samples: 2 of 6" in result.stdout


@pytest.mark.slow
def test_training_skips_bad_samples_when_asked(tmp_path, shapes_root):
    root = tmp_path / "mine"
    _plant_bad_files(root)
    (root / "masks" / "img3.png").write_bytes((root / "masks" / "img5.png").read_bytes())
    common = tiny_overrides(shapes_root, **{"trainer.max_iters": 2, "trainer.val_interval": 2})[1:]
    folder = ["dataset=folder", f"dataset.root={root}", "dataset.class_names=[a,b,c]",
              "dataset.augment.crop_size=[16,16]", "dataset.source.split_dir=splits"]
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img0\nimg1\nimg2\nimg3\nimg4\nimg5\n")
    (root / "splits" / "val.txt").write_text("img5\n")
    overrides = ["experiment=quickstart", *[o for o in common if not o.startswith("dataset.")], *folder]
    with pytest.raises(DataError, match=r"img\d"):
        train(compose_config("train", overrides + ["data.on_error=raise"]), tmp_path / "raise")
    result = train(compose_config("train", overrides + ["data.on_error=skip"]), tmp_path / "skip")
    assert result.skipped >= 1


def test_validation_of_a_split_keeps_full_size(tmp_path, voc_archives):
    shutil.unpack_archive(voc_archives / "VOCtrainval_11-May-2012.tar", tmp_path)
    cfg = compose_config("train", ["dataset=voc", f"dataset.root={tmp_path / 'VOCdevkit' / 'VOC2012'}"])
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    assert dataset[0]["image"].shape == (3, 12, 16) and dataset[0]["mask"].shape == (12, 16)
