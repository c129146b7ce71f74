"""No host synchronisation per step: reads of tensor values happen at log intervals only (issue 23),
and a step skipped for a non-finite loss leaves no trace, decided on the device."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import HostReads, count_reads_per_iteration, count_reads_rank, preempt_rank
from torch import nn

from conftest import compose_config, tiny_overrides
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.distributed import DistContext
from segtrain.engine.ema import WeightEma
from segtrain.engine.evaluate import evaluate
from segtrain.engine.runtime import Runtime
from segtrain.engine.step import TrainStep
from segtrain.losses import CrossEntropy, OhemCrossEntropy
from segtrain.metrics import ConfusionMatrix

LOGGED = {3, 6}  # logging.interval=3 over 6 iterations; validation and checkpoints at 6 only


def _overrides(shapes_root, **extra) -> list[str]:
    return tiny_overrides(shapes_root, **{"logging.interval": 3, "trainer.val_interval": 6,
                                          "trainer.ckpt_interval": 6, "logging.image_interval": 6, **extra})


@pytest.mark.slow
def test_two_process_training_reads_the_device_only_at_log_intervals(tmp_path, shapes_root):
    run_dir = tmp_path / "ddp" / "run"
    run_dir.parent.mkdir()
    mp.spawn(count_reads_rank, args=(2, str(tmp_path / "init"), _overrides(shapes_root), str(run_dir),
                                     str(tmp_path / "reads")), nprocs=2, join=True)
    for rank in (0, 1):
        per_iteration = torch.load(f"{tmp_path / 'reads'}.{rank}", weights_only=True)
        assert sorted(per_iteration) == [1, 2, 3, 4, 5, 6]
        between = {i: n for i, n in per_iteration.items() if i not in LOGGED}
        assert set(between.values()) == {0}, (rank, per_iteration)
        assert per_iteration[3] > 0, per_iteration  # the log line reads the loss


@pytest.mark.slow
def test_ohem_and_skip_policy_read_the_device_only_at_log_intervals(tmp_path, shapes_root):
    overrides = _overrides(shapes_root, **{"loss": "ohem", "loss.min_kept": 64, "trainer.nan_policy": "skip"})
    per_iteration, result = count_reads_per_iteration(compose_config("train", overrides), tmp_path, poison_at=2)
    assert {i: n for i, n in per_iteration.items() if i not in LOGGED} == {1: 0, 2: 0, 4: 0, 5: 0}, per_iteration
    assert result.skipped_steps == 1  # counted on the device, read at iteration 3
    assert all(torch.isfinite(v.float()).all() for v in result.model.state_dict().values())


class NormSegmentor(nn.Module):
    """conv -> BatchNorm -> 1x1 conv: the smallest segmentor whose forward pass moves running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(torch.relu(self.norm(self.conv(images))))}


def _step(optimizer: str, amp: str = "off") -> TrainStep:
    torch.manual_seed(0)
    model = NormSegmentor()
    cpu = torch.device("cpu")
    optimizers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
        "sgd-loop": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    }
    return TrainStep(model, optimizers[optimizer](model.parameters()), CrossEntropy(4), lambda iteration: 0.1,
                     DistContext(0, 1, 0, cpu), Runtime(cpu, amp, channels_last=False), nan_policy="skip")


def _state(step: TrainStep) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in step.model.state_dict().items()}
    for n, values in enumerate(step.optimizer.state.values()):
        state.update({f"optimizer.{n}.{k}": v.clone() for k, v in values.items() if torch.is_tensor(v)})
    return state


def _batch(seed: int, poisoned: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 8, 8, generator=generator)
    if poisoned:
        images[0, :, 2:4, 2:4] = float("nan")
    return [(images, torch.randint(0, 4, (2, 8, 8), generator=generator))]


@pytest.mark.parametrize(("optimizer", "amp"), [("sgd", "off"), ("adamw", "off"), ("sgd-loop", "off"),
                                                ("sgd", "fp16")])
def test_a_skipped_step_leaves_no_trace(optimizer, amp):
    """Weights, optimizer state (momentum, Adam's moments and step count) and BatchNorm running statistics are
    as before a poisoned batch, also when it comes first (fused SGD's momentum starts at the first step)."""
    step = _step(optimizer, amp)
    first = step(1, _batch(1, poisoned=True))
    assert bool(first.skipped) and not bool(first.finite)
    clean = _step(optimizer, amp)
    assert all(torch.equal(a, b) for a, b in zip(step.model.state_dict().values(), clean.model.state_dict().values()))
    for iteration, seed in enumerate((2, 3), start=1):  # then trained like a run that never saw it
        step(iteration + 1, _batch(seed))
        clean(iteration, _batch(seed))
    assert _state(step).keys() == _state(clean).keys()
    for name, value in _state(step).items():
        assert torch.equal(value, _state(clean)[name]), name
    before = _state(step)
    result = step(4, _batch(4, poisoned=True))
    assert bool(result.skipped)
    for name, value in _state(step).items():
        assert torch.equal(value, before[name]), name  # running_mean, running_var and num_batches_tracked too


def test_the_average_of_the_weights_ignores_a_skipped_step():
    model = NormSegmentor()
    ema = WeightEma(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model, torch.tensor(True))
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema.update(model, torch.tensor(False))
    torch.testing.assert_close(ema.module.conv.bias, before["conv.bias"] * 0.9 + 0.1 * model.conv.bias)


def test_ohem_threshold_matches_the_full_sort():
    generator = torch.Generator().manual_seed(0)
    for min_kept in (1, 7, 300, 10_000):
        loss = OhemCrossEntropy(5, min_kept=min_kept, threshold=0.3)
        for ignored in (0.0, 0.5, 1.0):
            logits, target = torch.randn(2, 5, 16, 16, generator=generator), torch.randint(0, 5, (2, 16, 16))
            target[torch.rand(target.shape, generator=generator) < ignored] = 255
            labelled = target != 255
            prob = logits.softmax(1).gather(1, torch.where(labelled, target, 0).unsqueeze(1)).squeeze(1)
            ranked = prob[labelled].sort().values
            kth = ranked[min(min_kept, len(ranked) - 1)] if len(ranked) else torch.tensor(2.0)
            expected = labelled & (prob < max(float(kth), 0.3))
            reads = HostReads()
            with reads.mode:
                kept = loss.hard_pixels(logits, target)
            assert torch.equal(kept, expected) and reads.count == 0, (min_kept, ignored)


def test_confusion_matrix_updates_without_host_reads():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randint(0, 6, (2, 9, 7), generator=generator), torch.randint(0, 6, (2, 9, 7))
    target[0, :3] = 255
    matrix, reads = ConfusionMatrix(6), HostReads()
    with reads.mode:
        matrix.update(prediction, target)
    keep = target != 255
    assert reads.count == 0
    assert torch.equal(matrix.matrix, torch.bincount(target[keep] * 6 + prediction[keep], minlength=36).view(6, 6))


class CountingLoader(list):
    """Evaluation batches that pause the read counter while the loop takes the next one."""

    def __init__(self, batches: list, reads: HostReads) -> None:
        super().__init__(batches)
        self.dataset, self.reads = [s for batch in batches for s in batch], reads
        self.sampler = range(len(self.dataset))  # evaluate's progress counts the sampler's (this shard's) images

    def __iter__(self):
        for batch in list.__iter__(self):
            self.reads.paused = False
            yield batch
            self.reads.paused = True


def test_evaluation_reads_the_device_only_for_the_final_matrix():
    torch.manual_seed(0)
    model = NormSegmentor().eval()
    samples = [{"image": torch.randn(3, 10 + 2 * (i // 2), 12), "index": i, "skipped": ""} for i in range(5)]
    for sample in samples:
        sample["mask"] = torch.randint(0, 4, sample["image"].shape[1:])
    reads = HostReads()
    loader = CountingLoader([samples[:2], samples[2:4], samples[4:]], reads)
    with reads.mode:
        result = evaluate(model, loader, 4, torch.device("cpu"))
    # The counter stays paused after the last batch: the final matrix read and its scores are not counted.
    assert reads.count == 0
    assert result.matrix.sum() == sum(s["mask"].numel() for s in samples)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_iteration_with_a_checkpoint(tmp_path, shapes_root):
    """The flag is exchanged without blocking (read one iteration late): rank 1 is signalled in iteration 3,
    both ranks stop after iteration 4, and rank 0 wrote that iteration's checkpoint."""
    run_dir = tmp_path / "ddp" / "run"
    run_dir.parent.mkdir()
    overrides = tiny_overrides(shapes_root, **{"trainer.max_iters": 8, "trainer.val_interval": 8,
                                               "trainer.ckpt_interval": 8, "logging.image_interval": 8})
    mp.spawn(preempt_rank, args=(2, str(tmp_path / "init"), overrides, str(run_dir), str(tmp_path / "stop")),
             nprocs=2, join=True)
    stops = [torch.load(f"{tmp_path / 'stop'}.{rank}", weights_only=True) for rank in (0, 1)]
    assert all(s["preempted"] and s["exit_code"] == 143 for s in stops), stops
    assert all("after iteration 4;" in s["message"] for s in stops), stops
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["iteration"] == 4
