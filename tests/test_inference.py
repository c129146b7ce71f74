"""Test-time protocols (whole, slide, multi-scale, flip) and metric invariance (batch size, processes)."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import segtrain as segtrain_package
from conftest import compose_config, run_cli, run_main, tiny_overrides
from segtrain.data.loading import build_dataset, eval_loader
from segtrain.data.normalization import normalization
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings, infer, slide_logits
from segtrain.engine.trainer import train
from segtrain.models import build_model


class PointwiseModel(torch.nn.Module):
    """A single 1x1 convolution: translation-equivariant, so windows cannot change its output."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return {"out": self.conv(x)}


class Contextual(torch.nn.Module):
    """3x3 convolutions: windows do change the border context, as in real networks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1)
        )

    def forward(self, x):
        return {"out": self.net(x)}


@pytest.mark.parametrize("size", [(20, 30), (32, 32), (70, 90)], ids=["smaller", "equal", "larger"])
def test_slide_equals_whole_for_a_translation_equivariant_model(size):
    model = PointwiseModel()
    image = torch.randn(2, 3, *size)
    slide = infer(model, image, InferenceSettings("slide", (32, 32), (21, 21)))
    whole = infer(model, image, InferenceSettings("whole"))
    assert slide.shape == whole.shape == (2, 3, *size)
    assert torch.allclose(slide, whole, atol=1e-6)
    assert all(call == (32, 32) for call in model.calls[:-1])  # every window has the crop size


def test_slide_windows_cover_the_image_and_average_overlaps():
    model = Contextual()
    image = torch.randn(1, 3, 50, 50)
    out = slide_logits(model, image, (32, 32), (18, 18))
    # windows start at 0 and 18 on each axis; pixel (40, 40) is only in the (18, 18) window
    with torch.no_grad():
        corner = model(image[..., 18:50, 18:50])["out"]
        first = model(image[..., 0:32, 0:32])["out"]
        second = model(image[..., 0:32, 18:50])["out"]
    assert torch.allclose(out[..., 40, 40], corner[..., 22, 22])
    assert torch.allclose(out[..., 5, 25], (first[..., 5, 25] + second[..., 5, 7]) / 2, atol=1e-6)


def test_scale_one_without_flip_is_bit_identical_to_whole():
    model = Contextual()
    image = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        direct = model(image)["out"]
    assert torch.equal(infer(model, image, InferenceSettings("whole", scales=(1.0,), flip=False)), direct)


class SignModel(torch.nn.Module):
    """Two classes with logits (v, -v), v = the first channel: softmax is hand-computable."""

    def forward(self, x):
        v = x[:, :1]
        return {"out": torch.cat([v, -v], dim=1)}


def test_multi_scale_average_against_a_hand_computation():
    pixels = torch.tensor([[0.1, 0.3], [0.5, 0.9]])
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = pixels
    scores = infer(SignModel(), image, InferenceSettings("whole", scales=(0.5, 1.0)))
    # scale 0.5: the 2x2 image becomes its mean (0.45); the 1x1 logits are upsampled back (constant)
    def p0(v):
        return 1 / (1 + math.exp(-2 * v))  # softmax of (v, -v), class 0
    expected = torch.tensor([[(p0(0.45) + p0(v)) / 2 for v in row] for row in pixels.tolist()])
    assert torch.allclose(scores[0, 0], expected, atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(1, 2, 2))


def test_flip_averaging_mirrors_back():
    model = Contextual()
    image = torch.randn(1, 3, 16, 24)
    scores = infer(model, image, InferenceSettings("whole", flip=True))
    with torch.no_grad():
        plain = model(image)["out"].softmax(1)
        mirrored = model(image.flip(-1))["out"].flip(-1).softmax(1)
    assert torch.allclose(scores, (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(scores, plain)  # the mirrored pass really contributed


def test_many_scales_keep_memory_to_one_accumulator():
    model = PointwiseModel()
    image = torch.randn(1, 3, 40, 40)
    scores = infer(model, image, InferenceSettings("whole", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True))
    assert scores.shape == (1, 3, 40, 40) and torch.allclose(scores.sum(1), torch.ones(1, 40, 40), atol=1e-5)
    assert len(model.calls) == 12


def _equal_size_dataset(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"{n}.png")
        Image.fromarray(rng.integers(0, 3, (40, 56), dtype=np.uint8), mode="L").save(root / "masks" / f"{n}.png")


def _folder_cfg(root):
    cfg = compose_config("train", ["experiment=quickstart", "dataset=folder", f"dataset.root={root}",
                                   "dataset.class_names=[a,b,c]", "dataset.source.val_ratio=0.99",
                                   "backbone.out_indices=[1,2]"])
    return cfg


def test_metrics_identical_for_batch_sizes_1_and_4(tmp_path):
    _equal_size_dataset(tmp_path / "d")
    cfg = _folder_cfg(tmp_path / "d")
    model = build_model(cfg.model, cfg.backbone, 3).eval()
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    assert len(dataset) == 8
    results = [evaluate(model, eval_loader(dataset, b, 0, False), 3, torch.device("cpu")) for b in (1, 4)]
    assert torch.equal(results[0].matrix, results[1].matrix)
    assert results[0].metrics["miou"] == results[1].metrics["miou"]


@pytest.mark.slow
def test_metrics_identical_for_1_and_2_processes(tmp_path):
    import torch.multiprocessing as mp
    from dist_helpers import evaluate_shard

    _equal_size_dataset(tmp_path / "d")
    cfg = _folder_cfg(tmp_path / "d")
    model = build_model(cfg.model, cfg.backbone, 3).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    single = evaluate(model, eval_loader(dataset, 1, 0, False), 3, torch.device("cpu"))
    mp.spawn(evaluate_shard, args=(2, str(tmp_path / "init"), str(tmp_path / "model.pt"), OmegaConf.to_yaml(cfg),
                                   str(tmp_path / "out.pt")), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert distributed["shard"] == 4  # rank 0 saw its half: indices 0, 2, 4, 6
    assert torch.equal(distributed["matrix"], single.matrix)
    assert distributed["miou"] == single.metrics["miou"]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory, shapes_root):
    run = tmp_path_factory.mktemp("run")
    train(compose_config("train", tiny_overrides(shapes_root)), run)
    return run / "checkpoints" / "best.pt"


@pytest.mark.cli
def test_eval_writes_metrics_table_matrix_image_and_predictions(tmp_path, demo_checkpoint):
    result = run_cli("eval", f"ckpt={demo_checkpoint}", f"hydra.run.dir={tmp_path / 'ev'}", "eval.flip=true",
                     "eval.save_predictions=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("metrics.json", "per_class_iou.csv", "confusion_matrix.png"):
        assert (tmp_path / "ev" / name).is_file()
    assert len(list((tmp_path / "ev" / "predictions").glob("*.png"))) == 4
    beside_training = demo_checkpoint.parents[1] / "eval" / "shapes-val-whole-flip"  # the checkpoint's run
    assert list(beside_training.glob("events.out.tfevents.*")) and not list((tmp_path / "ev").glob("events.*"))
    assert "ms per image" in result.stdout


@pytest.mark.slow
def test_eval_output_stride_8_for_a_model_trained_at_16(tmp_path, demo_checkpoint):
    overrides = [f"ckpt={demo_checkpoint}", "eval.output_stride=8"]
    from segtrain.engine.restore import load_for_inference

    loaded = load_for_inference(compose_config("eval", overrides), overrides)
    assert loaded.model.backbone.strides[-1] == 8
    assert [b[0].dilation[0] for b in loaded.model.aspp.branches[1:4]] == [12, 24, 36]


@pytest.mark.cli
def test_predict_on_a_folder_with_a_non_image_grayscale_and_rgba(tmp_path, demo_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(folder / "color.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 31), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 20, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    (folder / "readme.txt").write_text("not an image")
    result = run_cli("predict", f"ckpt={demo_checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}",
                     "predict.alpha=0.4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "readme.txt" in result.stdout and "segmented 3 image(s)" in result.stdout
    for stem, size in (("color", (45, 37)), ("gray", (31, 30)), ("rgba", (20, 50))):
        index = Image.open(tmp_path / "out" / f"{stem}.png")
        assert index.mode == "P" and index.size == size
        assert Image.open(tmp_path / "out" / f"{stem}_color.png").size == size
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == size


@pytest.mark.cli
def test_export_onnx_is_one_file_with_metadata_and_matches_pytorch(tmp_path, demo_checkpoint):
    pytest.importorskip("onnxruntime", reason="onnx extras not installed (pip install 'segtrain[onnx]')")
    pytest.importorskip("onnxscript", reason="onnx extras not installed (pip install 'segtrain[onnx]')")
    result = run_cli("export", f"ckpt={demo_checkpoint}", "format=onnx", "export.input_size=[64,80]",
                     f"export.output={tmp_path / 'model.onnx'}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # No exporter chatter, no training-mode or other warnings: those go to export.log.
    assert result.stderr == "", result.stderr
    assert "INFO" not in result.stdout and "Warning" not in result.stdout
    assert "one self-contained file" in result.stdout
    assert "unused_removal" in (tmp_path / "export.log").read_text()
    assert [p.name for p in tmp_path.glob("model.onnx*")] == ["model.onnx"]  # no model.onnx.data
    import onnx
    import onnxruntime

    from segtrain.engine.restore import load_for_inference

    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    state = torch.load(demo_checkpoint, weights_only=False)
    assert json.loads(metadata["class_names"]) == state["class_names"] == ["background", "disc", "square",
                                                                          "triangle", "cross"]
    assert json.loads(metadata["palette"])[:2] == [[0, 0, 0], [128, 0, 0]]  # the VOC colours (palette null)
    assert json.loads(metadata["mean"]) == [0.485, 0.456, 0.406] and json.loads(metadata["std"])[2] == 0.225
    assert (metadata["input_layout"], metadata["input_channels"], metadata["input_dtype"]) == ("NCHW", "RGB",
                                                                                             "float32")
    assert metadata["segtrain_version"] == segtrain_package.__version__
    assert int(metadata["iteration"]) == state["train_state"]["iteration"]
    assert float(metadata["best_val_miou"]) == pytest.approx(state["train_state"]["best_miou"], abs=1e-6)
    assert int(metadata["best_iteration"]) == state["train_state"]["best_iteration"]

    overrides = [f"ckpt={demo_checkpoint}"]
    model = load_for_inference(compose_config("eval", overrides), overrides).model
    (tmp_path / "elsewhere").mkdir()
    shipped = (tmp_path / "elsewhere" / "copy.onnx")
    shipped.write_bytes((tmp_path / "model.onnx").read_bytes())  # the one file is all a deployment needs
    session = onnxruntime.InferenceSession(str(shipped), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 64, 80), (2, 3, 97, 51)):
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)["out"].numpy()
        actual = session.run(None, {"image": image.numpy()})[0]
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.slow
def test_export_onnx_above_the_single_file_limit_names_both_files(tmp_path):
    pytest.importorskip("onnxscript", reason="onnx extras not installed (pip install 'segtrain[onnx]')")
    import onnx

    from segtrain.commands.export import LogitsOnly, export_onnx

    written = export_onnx(LogitsOnly(Contextual()), torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", {"a": "1"},
                          single_file_limit=0)
    assert written == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"] and written[1].is_file()
    loaded = onnx.load(str(written[0]))
    assert {p.key: p.value for p in loaded.metadata_props} == {"a": "1"}


def test_export_failure_is_one_line_naming_the_real_cause(tmp_path):
    pytest.importorskip("onnxscript", reason="onnx extras not installed (pip install 'segtrain[onnx]')")
    from segtrain.commands.export import LogitsOnly, export_onnx, export_torchscript
    from segtrain.errors import SegtrainError

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("head is broken")

    for export in (export_onnx, export_torchscript):
        with pytest.raises(SegtrainError, match=r"export failed: ValueError: head is broken") as caught:
            export(LogitsOnly(Broken()), torch.randn(1, 3, 32, 32), tmp_path / "m", {})
        assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


@pytest.mark.cli
def test_export_torchscript_prints_no_warnings_and_carries_metadata(tmp_path, demo_checkpoint):
    result = run_cli("export", f"ckpt={demo_checkpoint}", "format=torchscript", "export.input_size=[64,64]",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no TracerWarning / deprecation wall
    assert (tmp_path / "model.pt").is_file() and "max difference" in result.stdout
    assert "TracerWarning" in (tmp_path / "export.log").read_text()  # kept for whoever needs it
    extra = {"segtrain.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    metadata = json.loads(extra["segtrain.json"])
    assert json.loads(metadata["class_names"])[1] == "disc" and metadata["input_layout"] == "NCHW"


def test_predict_output_names_stay_unique(tmp_path):
    from segtrain.commands.predict import output_names

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "y.png"]
    names = output_names(files)
    assert len(set(names.values())) == 3 and names[files[0]] == "a__x_jpg"
    assert output_names(files[:1] + files[2:]) == {files[0]: "x", files[2]: "y"}


@pytest.mark.cli
def test_predict_never_writes_over_the_users_files(tmp_path, demo_checkpoint):
    import hashlib

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (33, 41, 3), dtype=np.uint8)).save(folder / name)

    def hashes() -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.suffix == ".png"}

    before = hashes()
    for output in (folder, folder / "masks"):  # the input folder itself, or a folder inside it
        result = run_cli("predict", f"ckpt={demo_checkpoint}", f"input={folder}", f"output={output}", cwd=tmp_path)
        assert result.returncode == 2
        assert f"output={output}" in result.stderr.strip().splitlines()[-1], result.stderr
    assert hashes() == before
    # An output folder holding a file predict would write: refused, the file untouched.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_color.png").write_bytes(b"the user's own file")
    result = run_cli("predict", f"ckpt={demo_checkpoint}", f"input={folder}", f"output={out}", cwd=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and f"output={out}" in last and "a_color.png" in last, result.stderr
    assert (out / "a_color.png").read_bytes() == b"the user's own file"
    # A fresh folder: every output written through a temporary file and a rename, none left over.
    result = run_cli("predict", f"ckpt={demo_checkpoint}", f"input={folder}", f"output={tmp_path / 'new'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "new").glob("*.png")) == [
        "a.png", "a_color.png", "a_overlay.png", "b.png", "b_color.png", "b_overlay.png"]
    assert not list((tmp_path / "new").glob(".*"))
    assert hashes() == before


@pytest.mark.cli
def test_eval_into_a_directory_holding_an_evaluation_is_refused(tmp_path, demo_checkpoint):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.json").write_text('{"miou": 0.5}')
    result = run_cli("eval", f"ckpt={demo_checkpoint}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "metrics.json" in result.stderr.strip().splitlines()[-1], result.stderr
    assert (tmp_path / "ev" / "metrics.json").read_text() == '{"miou": 0.5}'
    assert not (tmp_path / "ev" / ".hydra").exists()  # refused before Hydra writes its files
    result = run_cli("eval", f"ckpt={demo_checkpoint}", "eval.num_workers=-1", f"hydra.run.dir={tmp_path / 'e2'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "eval.num_workers" in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.cli
def test_predict_refuses_inputs_whose_outputs_collide(tmp_path, demo_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("img.jpg", "img_color.jpg"):
        Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(folder / name)
    result = run_cli("predict", f"ckpt={demo_checkpoint}", f"input={folder}", f"output={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert all(name in result.stderr for name in ("img.jpg", "img_color.jpg", "img_color.png")), result.stderr


@pytest.mark.parametrize("override", ["+loss.foo=1", "optimizer.lr=5", "schedule=cosine", "trainer.max_iters=3"])
def test_training_only_keys_given_to_eval_are_refused(tmp_path, monkeypatch, capsys, demo_checkpoint, override):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, "eval", f"ckpt={demo_checkpoint}", override, f"hydra.run.dir={tmp_path / 'ev'}")
    assert status == 2 and err.strip().count("\n") == 0, err
    assert override.lstrip("+").split("=")[0] in err, err
    assert not (tmp_path / "ev").exists()
