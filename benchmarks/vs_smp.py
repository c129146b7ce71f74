"""Training-step time of segtrain's DeepLab v3+ (ResNet-50, output stride 16) against
segmentation_models_pytorch's DeepLabV3Plus("resnet50", encoder_output_stride=16), in one run on
the same machine and input (2x3x256x256, CPU, 2 threads by default).

    pip install -e ".[bench]"   # segmentation-models-pytorch, for this comparison only
    python benchmarks/vs_smp.py [--steps 25] [--warmup 3] [--threads 2]

A step is forward, cross-entropy (ignore 255), backward and an SGD update (lr 0.007, momentum 0.9,
weight decay 4e-5: conf/optimizer/sgd.yaml):

- "segtrain": segtrain's own step, as `segtrain train` runs it: its model, its loss and its
  optimizer builder (which uses PyTorch's fused update where the device has one).
- "smp": smp's model with the plain PyTorch step an smp user writes (`torch.optim.SGD`, defaults).

The headline ratio is median(segtrain) / median(smp). A second ratio times both models with the
very same plain `torch.optim.SGD` step, which isolates the models. The contenders run one step
each in turn, in a rotating order, so that machine noise hits all of them alike; the median of the
per-round ratios (steps run back to back) is printed too, as it is the least sensitive to a noisy
(shared) machine. Both models are
built without pretrained weights. segtrain's decoder is the paper's (two separable 3x3 convs,
BN + ReLU after the depthwise and the pointwise parts), heavier than smp's single separable conv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from segtrain.cli import config_dir
from segtrain.engine.losses import segmentation_loss
from segtrain.engine.optim import build_optimizer
from segtrain.models import build_model

Step = Callable[[], None]


def segtrain_model() -> torch.nn.Module:
    backbone = OmegaConf.merge(OmegaConf.load(config_dir() / "backbone" / "resnet50.yaml"),
                               {"output_stride": 16, "pretrained": False})
    return build_model(OmegaConf.load(config_dir() / "model" / "deeplabv3plus.yaml"), backbone, 21)


def smp_model() -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus("resnet50", encoder_weights=None, encoder_output_stride=16, classes=21)


def plain_step(model: torch.nn.Module, forward: Callable, images: torch.Tensor, masks: torch.Tensor,
               hp: dict) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"])

    def step() -> None:
        F.cross_entropy(forward(images), masks, ignore_index=255).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def segtrain_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, optimizer_cfg) -> Step:
    optimizer = build_optimizer(optimizer_cfg, model)

    def step() -> None:
        segmentation_loss(model(images), masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per contender (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(2, 3, args.size, args.size)
    masks = torch.randint(0, 21, (2, args.size, args.size))
    optimizer_cfg = OmegaConf.load(config_dir() / "optimizer" / "sgd.yaml")
    hp = {k: float(optimizer_cfg[k]) for k in ("lr", "momentum", "weight_decay")}

    ours, theirs = segtrain_model(), smp_model()
    ours_plain, theirs_plain = segtrain_model(), smp_model()
    contenders: dict[str, tuple[torch.nn.Module, Step]] = {
        "segtrain": (ours, segtrain_step(ours, images, masks, optimizer_cfg)),
        "smp": (theirs, plain_step(theirs, theirs, images, masks, hp)),
        "segtrain model, plain step": (ours_plain, plain_step(ours_plain, lambda x: ours_plain(x)["out"],
                                                              images, masks, hp)),
        "smp model, plain step": (theirs_plain, plain_step(theirs_plain, theirs_plain, images, masks, hp)),
    }
    for model, _ in contenders.values():
        model.train()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for n in range(args.warmup + args.steps):
        shift = n % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name][1]()
            if n >= args.warmup:
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"input {tuple(images.shape)}, {args.threads} threads, {args.steps} timed steps per contender "
          f"after {args.warmup} warm-up steps")
    for name in names:
        params = sum(p.numel() for p in contenders[name][0].parameters()) / 1e6
        print(f"{name:>27}: median {median[name] * 1000:8.1f} ms/step, {params:.2f}M params")

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratio = median["segtrain"] / median["smp"]
    models_only = median["segtrain model, plain step"] / median["smp model, plain step"]
    print(f"segtrain's step / smp with a plain step = {ratio:.3f}; median of per-round ratios "
          f"{paired('segtrain', 'smp'):.3f}")
    print(f"models alone, same plain step: {models_only:.3f}; median of per-round ratios "
          f"{paired('segtrain model, plain step', 'smp model, plain step'):.3f}")


if __name__ == "__main__":
    main()
