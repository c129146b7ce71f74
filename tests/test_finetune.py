"""init_from (a checkpoint's weights, another class count) and the EMA of weights (trainer.ema_decay)."""

import pickle
import shutil

import pytest
import torch
from datasets_builders import write_folder_dataset

from conftest import compose_config, fit_recording_start, tiny_overrides
from segtrain.commands.eval import run_eval
from segtrain.engine.callbacks import Callback
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.init_from import load_init_weights
from segtrain.engine.restore import load_for_inference
from segtrain.engine.trainer import Trainer, train
from segtrain.errors import ConfigError, WeightsError
from segtrain.models import build_model

CLASSIFIER = ["classifier.weight", "classifier.bias"]  # DeepLab v3+'s only class-count-dependent tensors


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory, shapes_root):
    """A 5-class shapes run of 2 iterations: its last.pt."""
    run_dir = tmp_path_factory.mktemp("shapes_run")
    train(compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.max_iters": 2, "trainer.val_interval": 2, "trainer.ckpt_interval": 2})), run_dir)
    return run_dir / "checkpoints" / "last.pt"


def folder_overrides(shapes_root, root, *extra, **values):
    """The tiny run's settings on a 3-class folder dataset."""
    common = tiny_overrides(shapes_root, **values)[1:]
    return ["experiment=quickstart", *[o for o in common if not o.startswith("dataset.")], "dataset=folder",
            f"dataset.root={root}", "dataset.class_names=[sky,road,car]", "dataset.augment.crop_size=[32,32]",
            "dataset.source.val_ratio=0.25", *extra]


def tiny_model(cfg, num_classes):
    return build_model(cfg.model, cfg.backbone, num_classes)


@pytest.mark.slow
def test_fine_tuning_a_5_class_checkpoint_on_3_classes_reinitialises_only_the_classifier(
        tmp_path, shapes_root, shapes_checkpoint, caplog):
    root = write_folder_dataset(tmp_path / "mine", count=8, num_classes=3)
    cfg = compose_config("train", folder_overrides(shapes_root, root, f"init_from={shapes_checkpoint}", **{
        "trainer.max_iters": 3, "trainer.val_interval": 3, "trainer.ckpt_interval": 3}))
    source = load_checkpoint(shapes_checkpoint)["model"]
    with caplog.at_level("INFO"):
        trainer, weights, result = fit_recording_start(cfg, tmp_path / "run")
    report = trainer.run.init_report
    assert report.reinitialised == CLASSIFIER and report.file_classes == 5
    assert sorted(report.loaded) == sorted(set(source) - set(CLASSIFIER)) and not report.kept and not report.unused
    for name in report.loaded:
        assert torch.equal(weights[name], source[name]), name
    assert weights["classifier.weight"].shape[0] == 3 and source["classifier.weight"].shape[0] == 5
    assert (f"init_from={shapes_checkpoint}: segtrain checkpoint; loaded {len(source) - 2} of {len(source)} model "
            "tensors; re-initialised 2 for the class count (5 in the file): classifier.weight, classifier.bias"
            ) in caplog.text
    # A new run: iteration 1 at the full learning rate, fresh optimizer state.
    assert [h["iteration"] for h in result.history] == [1, 2, 3]
    assert result.history[0]["lr"] == pytest.approx(cfg.optimizer.lr)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["class_names"] == ["sky", "road", "car"] and saved["train_state"]["iteration"] == 3
    assert f"init_from: {shapes_checkpoint}" in saved["config"]
    overrides = [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"]  # the stored init_from is not eval's
    assert load_for_inference(compose_config("eval", overrides), overrides).class_names == ["sky", "road", "car"]


@pytest.mark.slow
def test_plain_state_dicts_load_wrapped_or_with_module_prefixes(tmp_path, shapes_root, shapes_checkpoint):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    source = load_checkpoint(shapes_checkpoint)["model"]
    layouts = {"plain.pt": source, "ddp.pth": {f"module.{k}": v for k, v in source.items()},
               "wrapped.pth": {"state_dict": source, "meta": {"epoch": 3}}, "model.pt": {"model": source}}
    for name, layout in layouts.items():
        torch.save(layout, tmp_path / name)
        model = tiny_model(cfg, 5)
        report = load_init_weights(model, tmp_path / name)
        assert len(report.loaded) == len(source) and not report.reinitialised, name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items()), name
    model = tiny_model(cfg, 2)  # another class count from a plain state dict
    report = load_init_weights(model, tmp_path / "ddp.pth")
    assert report.reinitialised == CLASSIFIER and report.file_classes == 5


@pytest.mark.parametrize("model,backbone", [("pspnet", "resnet18"), ("drnseg", "drn_d_22"), ("dla_up", "dla34"),
                                            ("hrnetv2", "hrnet_w18")])
@pytest.mark.slow
def test_every_family_reinitialises_exactly_its_class_count_tensors(tmp_path, model, backbone):
    cfg = compose_config("train", [f"model={model}", f"backbone={backbone}"])
    five, three = tiny_model(cfg, 5), tiny_model(cfg, 3)
    differing = sorted(k for k, v in three.state_dict().items() if v.shape != five.state_dict()[k].shape)
    torch.save(five.state_dict(), tmp_path / "five.pt")
    report = load_init_weights(three, tmp_path / "five.pt")
    assert sorted(report.reinitialised) == differing and report.file_classes == 5
    assert len(report.loaded) == len(five.state_dict()) - len(differing)
    if model == "pspnet":
        assert {"head.2.weight", "aux_head.2.weight"} <= set(differing)  # head and auxiliary classifiers


@pytest.mark.slow
def test_unusable_files_are_one_line_errors(tmp_path, shapes_root, shapes_checkpoint):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    source = load_checkpoint(shapes_checkpoint)["model"]
    wider = compose_config("train", tiny_overrides(shapes_root) + ["model.aspp_channels=32"])
    cases = {
        "missing.pt": (None, "no such file"),
        "empty.pt": ({"epoch": 3, "note": "no weights"}, "no tensors in it"),
        "foreign.pt": ({"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)},
                       r"only 0 of the model's \d+ tensors are in the file .* use backbone.weights= instead"),
        "nan.pt": ({**source, "classifier.bias": torch.full((5,), float("nan"))},
                   "holds non-finite values .* in classifier.bias"),
        "list.pt": ([1, 2, 3], "holds a list, not a checkpoint or state dict"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises(WeightsError, match=f"init_from={tmp_path / name}: {message}") as error:
            load_init_weights(tiny_model(cfg, 5), tmp_path / name)
        assert "\n" not in str(error.value)
    with pytest.raises(WeightsError, match=r"aspp.branches.0.0.weight is \[64, 128, 1, 1\] in the file but \[32, "
                                           r"128, 1, 1\] in the model, a difference the class count does not explain"):
        load_init_weights(tiny_model(wider, 3), shapes_checkpoint)


def test_a_file_that_would_run_code_is_refused(tmp_path, shapes_root):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle, protocol=2)
    cfg = compose_config("train", tiny_overrides(shapes_root))
    with pytest.raises(WeightsError, match=r"refusing to load init_from=\S*evil\.pt: .*could run code"):
        load_init_weights(tiny_model(cfg, 5), tmp_path / "evil.pt")
    assert (tmp_path / "victim").is_dir()


@pytest.mark.slow
def test_resume_auto_with_checkpoints_wins_over_init_from_and_an_explicit_resume_is_refused(
        tmp_path, shapes_root, shapes_checkpoint, caplog):
    values = {"trainer.max_iters": 2, "trainer.val_interval": 2, "trainer.ckpt_interval": 1}
    overrides = tiny_overrides(shapes_root, **values) + [f"init_from={shapes_checkpoint}", "resume=auto"]
    with caplog.at_level("INFO"):
        train(compose_config("train", overrides), tmp_path)  # no checkpoint yet: init_from applies
    assert "resume=auto: no checkpoint in" in caplog.text
    assert f"starting from init_from={shapes_checkpoint}" in caplog.text
    caplog.clear()
    overrides = tiny_overrides(shapes_root, **{**values, "trainer.max_iters": 3}) + [
        f"init_from={shapes_checkpoint}", "resume=auto"]
    with caplog.at_level("INFO"):
        result = train(compose_config("train", overrides), tmp_path)
    assert f"init_from={shapes_checkpoint} not applied: resume=auto continues this run's checkpoints" in caplog.text
    assert [h["iteration"] for h in result.history] == [3]
    with pytest.raises(ConfigError, match="init_from=.* and resume=.*: give one"):
        train(compose_config("train", tiny_overrides(shapes_root) + [
            f"init_from={shapes_checkpoint}", f"resume={shapes_checkpoint}"]), tmp_path / "b")


def test_refusals_at_resume_point_to_init_from(tmp_path, shapes_root, shapes_checkpoint):
    root = write_folder_dataset(tmp_path / "mine", count=8, num_classes=3)
    with pytest.raises(ConfigError, match=f"start a new run directory with init_from={shapes_checkpoint}"):
        train(compose_config("train", folder_overrides(shapes_root, root, f"resume={shapes_checkpoint}")),
              tmp_path / "a")
    with pytest.raises(ConfigError, match=f"different training set .* with init_from={shapes_checkpoint} to start"):
        train(compose_config("train", tiny_overrides(tmp_path / "data12", **{"dataset.source.num_train": 12}) + [
            f"resume={shapes_checkpoint}"]), tmp_path / "b")


# -- EMA ------------------------------------------------------------------------------------------


def test_ema_decay_outside_0_1_is_refused(tmp_path, shapes_root):
    for value in ("1.0", "-0.5", "1.5", "nan"):
        with pytest.raises(ConfigError, match=r"trainer.ema_decay must be in \[0, 1\)"):
            train(compose_config("train", tiny_overrides(shapes_root, **{"trainer.ema_decay": value})), tmp_path)


@pytest.mark.slow
def test_ema_matches_the_formula_and_validation_and_eval_use_it(tmp_path, shapes_root):
    decay = 0.7
    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.ema_decay": decay, "trainer.max_iters": 3, "trainer.val_interval": 3, "trainer.ckpt_interval": 3}))
    snapshots = []

    class Record(Callback):
        def on_step_end(self, run, result):
            snapshots.append({k: p.detach().clone() for k, p in run.model.named_parameters()})

    trainer = Trainer(cfg, tmp_path / "run", callbacks=[Record()])
    try:
        trainer.setup()
        start = {k: p.detach().clone() for k, p in trainer.run.model.named_parameters()}
        trainer.fit()
    finally:
        trainer.close()
    assert len(snapshots) == 3
    averaged = dict(trainer.run.ema.module.named_parameters())
    for name, initial in start.items():
        expected = initial
        for snapshot in snapshots:
            expected = decay * expected + (1 - decay) * snapshot[name]
        torch.testing.assert_close(averaged[name], expected, rtol=1e-5, atol=1e-6)
    moved = [n for n in start if not torch.equal(snapshots[-1][n], start[n])]
    assert moved and any(not torch.allclose(averaged[n], snapshots[-1][n]) for n in moved)  # an average, not a copy
    for (name, mine), theirs in zip(trainer.run.ema.module.named_buffers(), trainer.run.model.buffers()):
        assert torch.equal(mine, theirs), name  # BatchNorm statistics: copied
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["ema"].keys() == saved["model"].keys()
    assert all(torch.equal(saved["ema"][k], v) for k, v in trainer.run.ema.state_dict().items())
    # Validation scored the average; eval of the checkpoint loads it and reproduces that mIoU.
    run = trainer.run
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size)
    ema_miou = evaluate(run.ema.module, run.val_loader, 5, run.runtime.device, "off", 255, settings).metrics["miou"]
    assert trainer.run.state.last_miou == ema_miou
    overrides = [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"]
    loaded = load_for_inference(compose_config("eval", overrides), overrides)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved["ema"].items())
    (tmp_path / "eval").mkdir()
    assert run_eval(compose_config("eval", overrides), overrides, tmp_path / "eval")["miou"] == ema_miou


@pytest.mark.slow
def test_ema_resumes_exactly(tmp_path, shapes_root):
    values = {"trainer.ema_decay": 0.8, "trainer.max_iters": 4, "trainer.val_interval": 4,
              "trainer.ckpt_interval": 2}
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(compose_config("train", tiny_overrides(shapes_root, **values)), full_dir)
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full_dir / "checkpoints" / "iter_0000002.pt", resumed_dir / "checkpoints")
    train(compose_config("train", tiny_overrides(shapes_root, **values) + ["resume=auto"]), resumed_dir)
    full = load_checkpoint(full_dir / "checkpoints" / "last.pt")
    resumed = load_checkpoint(resumed_dir / "checkpoints" / "last.pt")
    assert resumed["train_state"]["iteration"] == 4
    for key in ("model", "ema"):
        assert full[key].keys() == resumed[key].keys()
        for name in full[key]:
            assert torch.equal(full[key][name], resumed[key][name]), (key, name)


def test_ema_turned_on_at_resume_starts_from_the_checkpoint_weights(tmp_path, shapes_root, shapes_checkpoint, caplog):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(shapes_checkpoint, tmp_path / "checkpoints" / "iter_0000002.pt")
    cfg = compose_config("train", tiny_overrides(shapes_root, **{
        "trainer.ema_decay": 0.9, "trainer.max_iters": 3, "trainer.val_interval": 3}) + ["resume=auto"])
    trainer = Trainer(cfg, tmp_path)
    try:
        with caplog.at_level("INFO"):
            trainer.setup()
            trainer.resume()
    finally:
        trainer.close()
    assert "holds no averaged weights; the average (trainer.ema_decay=0.9) starts from its weights" in caplog.text
    saved = load_checkpoint(shapes_checkpoint)["model"]
    assert all(torch.equal(trainer.run.ema.state_dict()[k], v) for k, v in saved.items())


def test_a_checkpoint_with_non_finite_averaged_weights_is_refused(tmp_path, shapes_checkpoint):
    state = load_checkpoint(shapes_checkpoint)
    state["ema"] = {k: v.clone() for k, v in state["model"].items()}
    state["ema"]["classifier.bias"][0] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"non-finite values .* in the averaged weights, classifier.bias"):
        load_checkpoint(tmp_path / "bad.pt")
