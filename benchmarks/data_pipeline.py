"""Training data pipeline throughput: VOC-sized 500x375 JPEGs -> 513x513 training crops.

Writes synthetic textured JPEGs (decoding costs what a photo costs) and times segtrain's training
pipeline (read JPEG + palette PNG, random scale 0.5-2.0, pad with mean / 255, crop 513, flip,
normalise) through a DataLoader with 0 and 2 workers. `segtrain bench` reports the same figure.

    python benchmarks/data_pipeline.py [--images 64] [--samples 256] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from segtrain.commands.bench import data_pipeline_rate, synthetic_voc_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = synthetic_voc_images(Path(tmp), args.images)
        print(f"{'workers':>8} {'samples/s':>10} {'per worker':>11}")
        for workers in args.workers:
            rate = data_pipeline_rate(samples, [513, 513], workers, args.samples)
            print(f"{workers:>8} {rate:>10.1f} {rate / max(workers, 1):>11.1f}")


if __name__ == "__main__":
    main()
