"""Training-step time of segtrain's DeepLab v3+ (ResNet-50, output stride 16) against
segmentation_models_pytorch's DeepLabV3Plus("resnet50", encoder_output_stride=16), in one run on
the same machine and input (2x3x256x256, CPU, 2 threads by default).

    pip install -e ".[bench]"   # segmentation-models-pytorch, for this comparison only
    python benchmarks/vs_smp.py [--steps 7] [--warmup 2] [--threads 2]

A step is forward, cross-entropy (ignore 255), backward and an SGD step. Both models are built
without pretrained weights; the ratio is median(segtrain) / median(smp).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from segtrain.cli import config_dir
from segtrain.models import build_model


def step_times(model: torch.nn.Module, forward, images, masks, steps: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for n in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(forward(images), masks, ignore_index=255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import segmentation_models_pytorch as smp

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(2, 3, args.size, args.size)
    masks = torch.randint(0, 21, (2, args.size, args.size))
    ours = build_model(OmegaConf.load(config_dir() / "model" / "deeplabv3plus.yaml"),
                       OmegaConf.merge(OmegaConf.load(config_dir() / "backbone" / "resnet50.yaml"),
                                       {"output_stride": 16, "pretrained": False}), 21)
    theirs = smp.DeepLabV3Plus("resnet50", encoder_weights=None, encoder_output_stride=16, classes=21)
    results = {}
    contenders = [("segtrain", ours, lambda x: ours(x)["out"]), ("smp", theirs, theirs)]
    # Interleave the two, alternating which goes first, so that machine noise hits both alike.
    for round_ in range(args.rounds):
        for name, model, forward in contenders if round_ % 2 == 0 else contenders[::-1]:
            results.setdefault(name, []).extend(step_times(model, forward, images, masks, args.steps, args.warmup))
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("segtrain", ours), ("smp", theirs))}
    print(f"input {tuple(images.shape)}, {args.threads} threads, {len(results['smp'])} timed steps each")
    for name in ("segtrain", "smp"):
        print(f"{name:>9}: median {statistics.median(results[name]) * 1000:8.1f} ms/step, {params[name]:.2f}M params")
    ratio = statistics.median(results["segtrain"]) / statistics.median(results["smp"])
    print(f"ratio segtrain / smp = {ratio:.3f} ({'OK' if ratio <= 1.05 else 'SLOWER'}: target <= 1.05)")


if __name__ == "__main__":
    main()
