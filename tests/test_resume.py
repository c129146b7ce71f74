"""Resume: what may change (and is logged), what may not (refused), and unusable states."""

import os

import pytest
import torch

from conftest import compose_config, tiny_overrides
from segtrain.engine.checkpoint import find_resume_checkpoint, load_checkpoint
from segtrain.engine.resume import check_same_data
from segtrain.engine.schedules import poly_lr
from segtrain.engine.trainer import Trainer, train
from segtrain.errors import ConfigError, TrainingStopped, WeightsError


def _run(shapes_root, run_dir, *extra, **values):
    values = {"trainer.max_iters": 4, "trainer.val_interval": 2, "trainer.ckpt_interval": 2, **values}
    return train(compose_config("train", [*tiny_overrides(shapes_root, **values), *extra]), run_dir)


@pytest.mark.slow
def test_a_changed_learning_rate_applies_from_the_resumed_iteration_and_is_logged(tmp_path, shapes_root, caplog):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2, "optimizer.lr": 0.02})
    with caplog.at_level("INFO"):
        result = _run(shapes_root, tmp_path, "resume=auto", **{"optimizer.lr": 0.04, "optimizer.weight_decay": 0.0})
    assert [h["iteration"] for h in result.history] == [3, 4]
    assert result.history[0]["lr"] == pytest.approx(poly_lr(0.04, 2, 4))
    assert "resume: optimizer.lr: 0.02 -> 0.04 (from iteration 3)" in caplog.text
    assert "resume: optimizer.weight_decay: 0.0001 -> 0.0 (from iteration 3)" in caplog.text
    assert "resume: trainer.max_iters: 2 -> 4 (from iteration 3)" in caplog.text


@pytest.mark.slow
def test_a_changed_batch_size_continues_the_same_sample_stream(tmp_path, shapes_root):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2})  # 2 x 4 samples
    trainer = Trainer(compose_config("train", [*tiny_overrides(shapes_root, **{
        "trainer.max_iters": 4, "trainer.batch_size": 8, "trainer.val_interval": 4}), "resume=auto"]), tmp_path)
    trainer.setup()
    trainer.resume()
    trainer.build_loaders()
    assert trainer.run.loader.sampler.start == 8  # the next sample of the stream: none skipped, none repeated
    result = trainer.fit()
    assert [h["iteration"] for h in result.history] == [3, 4]
    assert trainer.run.state.samples_seen == 8 + 2 * 8
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_state"]["samples_seen"] == 24


@pytest.mark.slow
def test_a_different_backbone_or_model_is_refused_naming_what_the_checkpoint_holds(tmp_path, shapes_root):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2})
    with pytest.raises(ConfigError, match=r"holds a different backbone \(backbone.name: 'resnet18' in the "
                                          r"checkpoint, 'resnet34' now\)"):
        _run(shapes_root, tmp_path, "resume=auto", "backbone.name=resnet34")
    with pytest.raises(ConfigError, match=r"holds a different model \(model.aspp_channels: 64 in the checkpoint"):
        _run(shapes_root, tmp_path, "resume=auto", "model.aspp_channels=32")


@pytest.mark.slow
def test_a_different_training_set_is_refused(tmp_path, shapes_root):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2})
    with pytest.raises(ConfigError, match="was trained on a different training set .* start a new run directory"):
        _run(shapes_root, tmp_path, "resume=auto",
             **{"dataset.root": tmp_path / "data12", "dataset.source.num_train": 12})


def test_a_checkpoint_without_a_data_fingerprint_is_not_resumed():
    fingerprint = {"count": 2, "sha256": "0" * 64}
    with pytest.raises(WeightsError, match=r"^last.pt cannot be resumed: it records no training set .* init_from="):
        check_same_data(None, fingerprint, "last.pt")
    check_same_data(dict(fingerprint), fingerprint, "last.pt")


@pytest.mark.slow
def test_non_finite_buffers_are_never_saved(tmp_path, shapes_root, monkeypatch):
    from segtrain.engine.step import TrainStep

    original = TrainStep.__call__

    def poisoned(self, iteration, batches):
        result = original(self, iteration, batches)
        if iteration == 3:  # a finite loss, but BatchNorm statistics went bad
            bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    with pytest.raises(TrainingStopped, match=r"non-finite values \(NaN or infinity\) in backbone\.net\.bn1\."
                                              r"running_var at iteration 4: not saved"):
        _run(shapes_root, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_state"]["iteration"] == 2


@pytest.mark.slow
def test_loading_a_checkpoint_with_a_nan_tensor_names_it(tmp_path, shapes_root):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2})
    path = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["model"]["decoder_weight_probe"] = torch.tensor([1.0, float("nan")])
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(WeightsError, match="holds non-finite values .* in decoder_weight_probe"):
        load_checkpoint(tmp_path / "nan.pt")


@pytest.mark.slow
def test_resume_auto_prefers_the_newest_complete_checkpoint_and_cleans_up(tmp_path, shapes_root):
    _run(shapes_root, tmp_path)  # iter 2 and 4; last.pt -> iter 4
    ckpt = tmp_path / "checkpoints"
    # A kill between writing iter_6 and re-linking last.pt: last.pt is stale, iter_6 complete.
    state = load_checkpoint(ckpt / "iter_0000004.pt")
    state["train_state"]["iteration"] = 6
    torch.save(state, ckpt / "iter_0000006.pt")
    (ckpt / ".iter_0000008.pt.abc123.tmp").write_bytes(b"partial")
    path, found = find_resume_checkpoint(tmp_path)
    assert path.name == "iter_0000006.pt" and found["train_state"]["iteration"] == 6
    assert not list(ckpt.glob(".*.tmp"))


@pytest.mark.slow
def test_resume_auto_stops_when_checkpoints_exist_but_none_loads(tmp_path, shapes_root):
    _run(shapes_root, tmp_path)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        if path.name != "best.pt":
            os.truncate(path, 100)
    best = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(WeightsError, match=r"checkpoints exist in .* but none loads \(tried iter_0000004.pt, "
                                           r"iter_0000002.pt;"):
        _run(shapes_root, tmp_path, "resume=auto")
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == best


@pytest.mark.slow
def test_best_pt_is_only_replaced_by_a_better_miou(tmp_path, shapes_root):
    first = _run(shapes_root, tmp_path, **{"trainer.max_iters": 2, "trainer.val_interval": 2})
    best_path = tmp_path / "checkpoints" / "best.pt"
    assert load_checkpoint(best_path)["train_state"]["best_miou"] == first.best_miou
    # Stand in for a well-trained best.pt: a score no 1-iteration run of this tiny model reaches (the
    # tiny runs can tie, so the score is raised rather than earned by training longer).
    state = load_checkpoint(best_path)
    state["train_state"]["best_miou"] = first.best_miou + 0.5
    torch.save(state, best_path)
    before = best_path.read_bytes()
    worse = _run(shapes_root, tmp_path, "resume=auto", **{"trainer.max_iters": 3, "trainer.val_interval": 1})
    assert worse.best_miou < first.best_miou + 0.5
    assert best_path.read_bytes() == before


@pytest.mark.slow
def test_resume_with_another_optimizer_starts_its_state_fresh(tmp_path, shapes_root, caplog):
    _run(shapes_root, tmp_path, **{"trainer.max_iters": 2})
    with caplog.at_level("WARNING"):
        result = _run(shapes_root, tmp_path, "resume=auto", "optimizer=adamw", "optimizer.head_lr_mult=1.0")
    assert [h["iteration"] for h in result.history] == [3, 4]
    assert "the optimizer changed (torch.optim.SGD -> torch.optim.AdamW)" in caplog.text
