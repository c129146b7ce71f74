"""Loader throughput per worker and the cost of handing a sample over, for VOC and Cityscapes recipes.

Per case (VOC 500x375 JPEGs to 513 crops with the DeepLab v3+ recipe's discrete scales; Cityscapes 2048x1024
PNGs to 769x769, 1024x1024 and full 1024x2048 crops with the dataset's scale 0.5-2 and flip), on synthetic
photo-like files (decoding costs what a photo costs), with one thread per worker:

- samples per worker-second: `dataset[i]` (read, decode, augment) in this process, i.e. one worker's rate;
- hand-off ms: what a DataLoader worker then spends on the sample: its collate into shared memory and
  pickling the handles (segtrain.data.loading's loaders, batch of one).

"before" is the former worker output (albumentations' Normalize in the worker: float32 image, int64 mask);
"after" is segtrain's (uint8 image and mask, normalised on the device). The two run in alternating rounds
in one process, so that other load on the machine falls on both alike; the medians are printed.
`--decoders` also times OpenCV, PIL and torchvision.io on the same files and checks that they agree.

    python benchmarks/data_pipeline.py [--rounds 5] [--samples 6] [--cases voc-513 city-1024] [--decoders]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers the shared-memory reductions of tensors
from PIL import Image

from segtrain.commands.bench import synthetic_voc_images
from segtrain.config import AugmentConfig
from segtrain.data.dataset import SegmentationDataset
from segtrain.data.transforms import train_transform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def synthetic_cityscapes(folder: Path, count: int) -> list[tuple[Path, Path]]:
    """2048x1024 PNG frames (smooth regions plus sensor noise: about the size of a real frame's PNG) and
    single-channel label PNGs of 19 classes in large regions."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for n in range(count):
        coarse = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (2048, 1024), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        mask = cv2.resize(rng.integers(0, 19, (16, 32), dtype=np.uint8), (2048, 1024), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"{n}_leftImg8bit.png"), image)
        Image.fromarray(mask, mode="L").save(folder / f"{n}_labelTrainIds.png")
        samples.append((folder / f"{n}_leftImg8bit.png", folder / f"{n}_labelTrainIds.png"))
    return samples


CASES = {  # name: (dataset, crop, recipe's augmentation beyond the crop)
    "voc-513": ("voc", [513, 513], {"scale_range": [0.5, 2.0], "scale_step": 0.25}),
    "city-769": ("cityscapes", [769, 769], {"scale_range": [0.5, 2.0]}),
    "city-1024": ("cityscapes", [1024, 1024], {"scale_range": [0.5, 2.0]}),
    "city-1024x2048": ("cityscapes", [1024, 2048], {"scale_range": [0.5, 2.0]}),
}


class FormerOutput:
    """The worker output before compact samples: normalised float32 image, int64 mask."""

    def __init__(self, transform) -> None:
        self.transform, self.normalize = transform, A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0)

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_t, mask_t = self.transform(image, mask, seed)
        floats = self.normalize(image=image_t.permute(1, 2, 0).numpy())["image"]
        return torch.from_numpy(np.ascontiguousarray(floats.transpose(2, 0, 1))), mask_t.long()


def hand_off_seconds(sample: dict) -> float:
    """A worker's collate of one sample into shared memory (as default_collate does in a worker) and pickling."""
    start = time.perf_counter()
    shared = {}
    for key in ("image", "mask"):
        tensor = sample[key]
        storage = tensor.untyped_storage()._new_shared(tensor.numel() * tensor.element_size())
        out = tensor.new(storage).resize_(1, *tensor.shape)
        torch.stack([tensor], out=out)
        shared[key] = out
    ForkingPickler.dumps(shared)
    return time.perf_counter() - start


def measure(dataset: SegmentationDataset, count: int, offset: int) -> tuple[float, float]:
    """(samples per second, hand-off ms per sample) over `count` samples."""
    decode, hand = 0.0, 0.0
    for n in range(count):
        start = time.perf_counter()
        sample = dataset[(n % len(dataset), offset + n)]
        decode += time.perf_counter() - start
        hand += hand_off_seconds(sample)
    return count / decode, 1000 * hand / count


def run_case(name: str, samples: list, rounds: int, count: int) -> dict:
    _, crop, augment = CASES[name]
    compact = train_transform(AugmentConfig(crop_size=crop, hflip=True, **augment), MEAN, STD, 255, num_classes=21)
    datasets = {"before": SegmentationDataset(samples, 21, FormerOutput(compact)),
                "after": SegmentationDataset(samples, 21, compact)}
    results: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    measure(datasets["after"], 1, 0)  # first-call costs
    for k in range(rounds):
        order = ("before", "after") if k % 2 == 0 else ("after", "before")
        for which in order:  # the same seeds (augmentations) for both
            results[which].append(measure(datasets[which], count, k * count))
    return {which: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for which, runs in results.items()}


def compare_decoders(path: Path, repeats: int = 5) -> dict[str, float]:
    """ms per decode of `path` to RGB uint8 by each library; each checked against OpenCV's pixels."""
    import torchvision.io as tvio

    data = path.read_bytes()
    decoders = {
        "opencv": lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                       cv2.COLOR_BGR2RGB),
        "pil": lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
        "torchvision": lambda: tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                 mode=tvio.ImageReadMode.RGB).permute(1, 2, 0).numpy(),
    }
    reference = decoders["opencv"]()
    times = {}
    for name, decode in decoders.items():
        pixels = decode()
        difference = int(np.abs(pixels.astype(np.int16) - reference).max())
        start = time.perf_counter()
        for _ in range(repeats):
            decode()
        times[name] = (1000 * (time.perf_counter() - start) / repeats, difference)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating before/after rounds")
    parser.add_argument("--samples", type=int, default=6, help="samples per round and variant")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--decoders", action="store_true", help="also time OpenCV, PIL and torchvision.io")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per worker, as in a DataLoader worker
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "voc").mkdir()
        sources = {"voc": synthetic_voc_images(Path(tmp) / "voc", 16),
                   "cityscapes": synthetic_cityscapes(Path(tmp) / "city", 4)}
        if args.decoders:
            for label, path in (("JPEG 500x375", sources["voc"][0][0]), ("PNG 2048x1024", sources["cityscapes"][0][0])):
                timings = compare_decoders(path)
                print(f"{label}: " + ", ".join(f"{name} {ms:.1f} ms (max diff {diff})"
                                               for name, (ms, diff) in timings.items()))
        print(f"{'case':>15} {'before /s':>10} {'after /s':>9} {'rate x':>7} {'hand-off before ms':>19} "
              f"{'after ms':>9} {'cheaper x':>10}")
        for name in args.cases:
            r = run_case(name, sources[CASES[name][0]], args.rounds, args.samples)
            (rate_b, hand_b), (rate_a, hand_a) = r["before"], r["after"]
            print(f"{name:>15} {rate_b:>10.2f} {rate_a:>9.2f} {rate_a / rate_b:>7.2f} {hand_b:>19.2f} "
                  f"{hand_a:>9.2f} {hand_b / hand_a:>10.1f}")


if __name__ == "__main__":
    main()
