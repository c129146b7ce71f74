"""Datasets and loaders from config; the resumable, seeded training sample stream."""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from segtrain.config import DatasetConfig
from segtrain.data.dataset import DEFAULT_MAX_PIXELS, LOSSY_MASK_SUFFIXES, SegmentationDataset, lossy_mask_message
from segtrain.data.transforms import eval_transform, train_transform
from segtrain.errors import ConfigError, DataError
from segtrain.instantiate import instantiate_checked

log = logging.getLogger("segtrain.data")


def source_samples(cfg: DatasetConfig | DictConfig, split: str) -> list:
    """The (image, mask) pairs of a split; an empty split is an error, for training and `data check` alike."""
    samples = instantiate_checked("dataset.source", cfg.source, root=cfg.root, split=split)
    if not samples:
        raise DataError(f"split '{split}' of dataset '{cfg.name}' at {cfg.root} is empty: its split file or folder "
                        "lists no images")
    return samples


def build_dataset(
    cfg: DatasetConfig | DictConfig, split: str, train: bool, normalize: tuple[list[float], list[float]],
    on_error: str = "raise", max_pixels: int = DEFAULT_MAX_PIXELS, max_samples: int | None = None,
) -> SegmentationDataset:
    """`normalize`: (mean, std) from segtrain.data.normalization.normalization(full config);
    `max_samples`: only the split's first N samples (None: all)."""
    samples = source_samples(cfg, split)[:max_samples]
    if on_error == "raise":
        # Seconds now rather than a crash hours into training.
        missing = [str(s[1]) for s in samples if not Path(s[1]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} masks of split '{split}' are missing, e.g. {missing[:3]}; add them, "
                            "remove those images, or set data.on_error=skip (segtrain data check lists all problems)")
        lossy = [Path(s[1]) for s in samples if Path(s[1]).suffix.lower() in LOSSY_MASK_SUFFIXES]
        if lossy:
            raise DataError(f"{len(lossy)} of the {len(samples)} masks of split '{split}' are JPEG files, e.g. "
                            + lossy_mask_message(lossy[0]).removeprefix("mask "))
    mean, std = list(normalize[0]), list(normalize[1])
    if train:
        augment = OmegaConf.to_object(cfg.augment) if isinstance(cfg, DictConfig) else cfg.augment
        flip_pairs = [list(pair) for pair in getattr(cfg, "flip_pairs", None) or []]
        transform = train_transform(augment, mean, std, cfg.ignore_index, flip_pairs=flip_pairs,
                                    num_classes=len(cfg.class_names))
    else:
        transform = eval_transform(len(cfg.class_names), cfg.ignore_index)
    return SegmentationDataset(samples, len(cfg.class_names), transform, cfg.ignore_index, on_error,
                               replace_unusable=train, max_pixels=max_pixels, normalization=(mean, std))


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at `position` of the training stream: a pure function."""
    return int(np.random.SeedSequence((seed, position)).generate_state(1)[0] & 0x7FFFFFFF)


class TrainStream(Sampler):
    """An endless stream of (index, augmentation seed) pairs, resumable at any position.

    Epoch e visits the dataset in the order randperm(seed, e); stream position p is sample
    p % n of epoch p // n. With world_size > 1, rank r takes positions r, r + W, r + 2W, ...
    so the ranks together consume the same stream a single process would.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.seed, self.start = num_samples, seed, start
        self.rank, self.world_size = rank, world_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        epoch, order = -1, None
        while True:
            if position // self.num_samples != epoch:
                epoch = position // self.num_samples
                order = self.epoch_order(epoch)
            yield int(order[position % self.num_samples]), sample_seed(self.seed, position)
            position += self.world_size


def ignore_termination_signals() -> None:
    """For data-loader workers: the main process decides when to stop (after checkpointing, see
    segtrain.engine.preemption) and then stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _seed_worker(worker_id: int) -> None:
    ignore_termination_signals()
    # Augmentation is seeded per sample; this only pins any other library randomness in workers.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(requested: int, key: str) -> int:
    """Loader workers, never more than the CPUs this process may use (more only add contention)."""
    if requested < 0:
        raise ConfigError(f"{key} must be >= 0, got {requested}")
    available = available_cpus()
    if requested > available:
        log.info("%s=%d but %d CPUs are available: using %d workers", key, requested, available, available)
        return available
    return requested


def train_worker_count(requested: int | str, workers_per_gpu: int) -> int:
    """trainer.num_workers (canonical: segtrain.config_checks) for this process.

    auto: the dataset's `workers_per_gpu` (what one GPU's training rate needs with its recipe, from
    benchmarks/data_pipeline.py), capped by this process's share of the CPUs: the node's training processes
    (torchrun's LOCAL_WORLD_SIZE) split them, and each keeps one for itself (the training loop, the host side
    of the step). A number is taken as given, capped by the CPUs (`worker_count`).
    """
    if requested != "auto":
        return worker_count(int(requested), "trainer.num_workers")
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(0, available_cpus() // local_processes - 1)
    workers = min(workers_per_gpu, share)
    log.info("trainer.num_workers=auto: %d loader workers (dataset.workers_per_gpu=%d, %d CPUs for %d process(es) "
             "on this node, one each for the process itself)", workers, workers_per_gpu, available_cpus(),
             local_processes)
    return workers


def train_loader(
    dataset: SegmentationDataset, batch_size: int, num_workers: int, seed: int, start_sample: int,
    pin_memory: bool, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """`batch_size` per process; `start_sample` is the global stream position (iteration x global batch)."""
    generator = torch.Generator().manual_seed(seed)
    workers = worker_count(num_workers, "trainer.num_workers")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=TrainStream(len(dataset), seed, start=start_sample, rank=rank, world_size=world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
        drop_last=True,
    )


def list_collate(batch: list[dict]) -> list[dict]:
    """Validation images keep their own sizes, so a batch stays a list."""
    return batch


class ShardSampler(Sampler):
    """Indices rank, rank + W, rank + 2W, ...: every sample exactly once across the processes (no
    padding duplicates, so a distributed confusion matrix equals the single-process one)."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: SegmentationDataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    sampler = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = ShardSampler(len(dataset), torch.distributed.get_rank(), torch.distributed.get_world_size())
    workers = worker_count(num_workers, "eval.num_workers")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        # Validation runs every trainer.val_interval: keep its workers instead of starting them each time.
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        pin_memory=pin_memory,
        collate_fn=list_collate,
        # Each pass over a DataLoader draws a seed from its generator: with its own, a validation leaves
        # the training's random stream alone, so a validation interrupted by a signal and redone after
        # resume trains on exactly as an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )
