"""Training-step time of segtrain's DeepLab v3+ (ResNet-50, output stride 16) against
segmentation_models_pytorch's DeepLabV3Plus("resnet50", encoder_output_stride=16), in one run on
the same machine and input (2x3x256x256 by default, on `--device`).

    pip install -e ".[bench]"   # segmentation-models-pytorch, for this comparison only
    python benchmarks/vs_smp.py [--steps 25] [--warmup 3] [--threads 2] [--device cpu|cuda]

A step is forward, cross-entropy (ignore 255), backward and an SGD update (lr, momentum and weight
decay of conf/optimizer/sgd.yaml):

- "segtrain": the trainer's own step (segtrain.engine.step.TrainStep, built by `segtrain bench`'s
  `bench_train_step`): its model, loss, optimizer (fused update where the device has one) and schedule.
- "smp": smp's model with the plain PyTorch step an smp user writes (`torch.optim.SGD`, defaults).

The ratio is median(segtrain) / median(smp). The two run one step each in turn, in alternating
order, so that machine noise hits both alike; the median of the per-round ratios (steps run back to
back) is printed too, as it is the least sensitive to a noisy (shared) machine. Both models are
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

from segtrain.commands.bench import bench_train_step
from segtrain.composition import compose_config, config_dir
from segtrain.config import register_configs
from segtrain.config_checks import check_config

Step = Callable[[int], object]


def segtrain_step(size: int, device: str) -> tuple[torch.nn.Module, Step]:
    register_configs()
    cfg = compose_config("bench", [
        # separable convs, as smp's DeepLabV3Plus (segtrain's default with ResNets is plain, as the paper)
        "model=deeplabv3plus", "model.separable=true", "backbone=resnet50", "backbone.output_stride=16",
        "bench.batch_size=2",
        f"bench.crop_size=[{size},{size}]", f"trainer.device={device}", "dataset=voc"])  # 21 classes
    check_config(cfg)
    setup = bench_train_step(cfg, torch.device(device))
    batches = [(setup.images, setup.masks)]
    return setup.model, lambda iteration: setup.step(iteration, batches)


def smp_step(images: torch.Tensor, masks: torch.Tensor, device: str) -> tuple[torch.nn.Module, Step]:
    import segmentation_models_pytorch as smp
    from omegaconf import OmegaConf

    model = smp.DeepLabV3Plus("resnet50", encoder_weights=None, encoder_output_stride=16, classes=21).to(device)
    hp = OmegaConf.load(config_dir() / "optimizer" / "sgd.yaml")
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def step(iteration: int) -> None:
        F.cross_entropy(model(images), masks, ignore_index=255).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per contender (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, our_step = segtrain_step(args.size, args.device)
    images = torch.randn(2, 3, args.size, args.size, device=args.device)
    masks = torch.randint(0, 21, (2, args.size, args.size), device=args.device)
    theirs, their_step = smp_step(images, masks, args.device)
    contenders = {"segtrain": (ours, our_step), "smp": (theirs, their_step)}
    for model, _ in contenders.values():
        model.train()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for n in range(args.warmup + args.steps):
        for name in names if n % 2 == 0 else names[::-1]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            contenders[name][1](n + 1)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if n >= args.warmup:
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"input 2x3x{args.size}x{args.size} on {args.device}, {args.threads} threads, {args.steps} timed steps "
          f"per contender after {args.warmup} warm-up steps")
    for name in names:
        params = sum(p.numel() for p in contenders[name][0].parameters()) / 1e6
        print(f"{name:>9}: median {median[name] * 1000:8.1f} ms/step, {params:.2f}M params")
    paired = statistics.median(x / y for x, y in zip(times["segtrain"], times["smp"]))
    print(f"segtrain's step / smp with a plain step = {median['segtrain'] / median['smp']:.3f}; median of "
          f"per-round ratios {paired:.3f}")


if __name__ == "__main__":
    main()
