"""Training data pipeline throughput: VOC-sized 500x375 JPEGs -> 513x513 training crops.

Writes N synthetic JPEGs (textured, so JPEG decoding costs what a photo costs), builds the VOC
training pipeline (read JPEG + palette PNG, random scale 0.5-2.0, pad with mean / 255, crop 513,
flip, normalise) and times a DataLoader over it.

    python benchmarks/data_pipeline.py [--images 64] [--samples 256] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from segtrain.config import AugmentConfig
from segtrain.data.dataset import SegmentationDataset
from segtrain.data.loading import train_loader
from segtrain.data.transforms import train_transform


def make_images(folder: Path, count: int) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(0)
    samples = []
    for n in range(count):
        coarse = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (500, 375), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        mask = cv2.resize(rng.integers(0, 21, (6, 8), dtype=np.uint8), (500, 375), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"{n}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        Image.fromarray(mask, mode="P").save(folder / f"{n}.png")
        samples.append((folder / f"{n}.jpg", folder / f"{n}.png"))
    return samples


def measure(samples: list, workers: int, total: int, batch: int) -> float:
    transform = train_transform(AugmentConfig(crop_size=[513, 513], scale_range=[0.5, 2.0]),
                                [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    dataset = SegmentationDataset(samples, 21, transform)
    loader = iter(train_loader(dataset, batch, workers, seed=0, start_sample=0, pin_memory=False))
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(total // batch):
        next(loader)
    return (total // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_images(Path(tmp), args.images)
        print(f"{'workers':>8} {'samples/s':>10} {'per worker':>11}")
        for workers in args.workers:
            rate = measure(samples, workers, args.samples, args.batch)
            print(f"{workers:>8} {rate:>10.1f} {rate / max(workers, 1):>11.1f}")


if __name__ == "__main__":
    main()
