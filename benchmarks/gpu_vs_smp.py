"""Training throughput of segtrain's DeepLab v3+ against segmentation_models_pytorch's DeepLabV3Plus with the
same encoder (output stride 16), alternating step by step in one process on one GPU.

    pip install -e ".[bench]"   # segmentation-models-pytorch, for this comparison only
    python benchmarks/gpu_vs_smp.py [--encoders resnet101 tu-xception65] [--batch 16] [--size 512]
        [--steps 30] [--warmup 5] [--amp bf16|fp16|off] [--[no-]channels-last] [--compile [model] [regions]]
        [--device cuda]
        [segtrain config overrides, e.g. model.dropout=0.0]

Encoders are smp's names; segtrain's backbone is the one of the same network: `resnet101` is
`backbone=resnet101`, `tu-xception65` is `backbone=xception65` (any `resnetN` / `tu-NAME` with a
conf/backbone/ entry works, e.g. `resnet18` for a quick smoke test).

- "segtrain": the step `segtrain train` runs (segtrain.engine.step.TrainStep, built by `segtrain bench`'s
  `bench_train_step` from a composed `bench` config). Its speed options are the config's own keys
  (trainer.amp, trainer.channels_last, trainer.compile), set from --amp, --channels-last and --compile,
  so what is timed is what `segtrain train` would run with those keys. `--compile` alone times both compile
  modes (`trainer.compile=model` and `=regions`), `--compile model` one of them: each is a contender
  ("segtrain[model]", "segtrain[regions]") next to eager segtrain ("segtrain[off]") in the same rounds, so the
  compile modes are compared with eager and with each other as well as with smp.
- "smp": the plain PyTorch step an smp user writes: torch.autocast with the same dtype (plus a GradScaler
  for fp16), F.cross_entropy(ignore_index=255), torch.optim.SGD with lr / momentum / weight decay of
  conf/optimizer/sgd.yaml; the model (and input) in channels_last when segtrain's is; torch.compile'd
  when --compile is given, so that both get the compiler or neither does.

Both models start from random weights and see the same batch of random images and masks (21 classes).
Each round runs one step of each, in rotating order so that drift (clocks, temperature, a shared
machine) hits both alike; every timed step is bracketed by torch.cuda.synchronize(); warm-up rounds
(compilation, cuDNN autotuning, allocator growth) are not timed. Printed per encoder: images/s of each
(batch x timed steps / their total time), the ratio segtrain / smp of those (the GPU issue's target on an
H100: >= 1.15) and the median of the per-round ratios, the figure least sensitive to outliers; with
--compile also each compile mode against eager segtrain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from segtrain.commands.bench import bench_train_step
from segtrain.composition import compose_config, config_dir
from segtrain.config import register_configs
from segtrain.config_checks import check_config

NUM_CLASSES = 21  # dataset=voc on segtrain's side, classes=21 on smp's


@dataclass
class Contender:
    name: str
    params_m: float
    step: Callable[[int], object]


def segtrain_backbone(encoder: str) -> str:
    """smp encoder name -> segtrain's conf/backbone entry of the same network."""
    name = encoder.removeprefix("tu-")
    if not (config_dir() / "backbone" / f"{name}.yaml").is_file():
        raise SystemExit(f"gpu_vs_smp.py: no segtrain backbone for smp encoder {encoder!r} "
                         f"(expected conf/backbone/{name}.yaml)")
    return name


def segtrain_contender(encoder: str, args: argparse.Namespace,
                       mode: str = "off") -> tuple[Contender, torch.Tensor, torch.Tensor]:
    register_configs()
    overrides = [
        # separable convs, as smp's DeepLabV3Plus (segtrain's default with ResNets is plain, as the paper)
        "model=deeplabv3plus", "model.separable=true", f"backbone={segtrain_backbone(encoder)}",
        "backbone.output_stride=16",
        "dataset=voc",  # 21 classes, as smp's head below
        f"bench.batch_size={args.batch}", f"bench.crop_size=[{args.size},{args.size}]",
        f"trainer.device={args.device}", f"trainer.amp={args.amp}",
        f"trainer.channels_last={str(args.channels_last).lower()}", f"trainer.compile={mode}",
        *args.overrides,
    ]
    cfg = compose_config("bench", overrides)
    check_config(cfg)
    torch.manual_seed(0)  # every segtrain contender: the same weights and batch
    setup = bench_train_step(cfg, torch.device(args.device))
    setup.model.train()
    batches = [(setup.images, setup.masks)]
    params = sum(p.numel() for p in setup.model.parameters()) / 1e6
    name = f"segtrain[{mode}]" if args.compile else "segtrain"
    return Contender(name, params, lambda iteration: setup.step(iteration, batches)), setup.images, setup.masks


def smp_contender(encoder: str, images: torch.Tensor, masks: torch.Tensor, args: argparse.Namespace) -> Contender:
    import segmentation_models_pytorch as smp

    device = torch.device(args.device)
    model = smp.DeepLabV3Plus(encoder, encoder_weights=None, encoder_output_stride=16, classes=NUM_CLASSES)
    model = model.to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    hp = OmegaConf.load(config_dir() / "optimizer" / "sgd.yaml")
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    forward = torch.compile(model) if args.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def step(iteration: int) -> None:
        # The idiomatic AMP step: the loss inside autocast too (autocast runs cross-entropy in fp32).
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(forward(images), masks, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return Contender("smp", params, step)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(contenders: list[Contender], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per timed step of each contender, one step each per round in alternating order."""
    device = torch.device(args.device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for n in range(args.warmup + args.steps):
        for contender in contenders[n % len(contenders):] + contenders[:n % len(contenders)]:
            sync(device)
            start = time.perf_counter()
            contender.step(n + 1)
            sync(device)
            if n >= args.warmup:
                times[contender.name].append(time.perf_counter() - start)
    return times


def compare(encoder: str, args: argparse.Namespace) -> float:
    """Time one encoder; returns the first segtrain contender's images/s over smp's."""
    torch.manual_seed(0)
    ours, images, masks = segtrain_contender(encoder, args)
    modes = [segtrain_contender(encoder, args, mode)[0] for mode in args.compile]
    theirs = smp_contender(encoder, images, masks, args)
    contenders = [ours, *modes, theirs]
    times = race(contenders, args)
    rate = {name: args.batch * len(values) / sum(values) for name, values in times.items()}

    def paired(a: str, b: str) -> float:
        # Per round: b's time / a's time is a's images/s over b's in that round.
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"{encoder} (segtrain backbone={segtrain_backbone(encoder)}), OS16, batch {args.batch} x 3 x {args.size} x "
          f"{args.size}, amp {args.amp}, channels_last {args.channels_last}, compile {' '.join(args.compile) or 'off'}"
          f", on {where} ({torch.get_num_threads()} CPU threads): {args.steps} timed steps each after {args.warmup} "
          "warm-up")
    for contender in contenders:
        print(f"  {contender.name:>17}: {rate[contender.name]:8.2f} images/s, median "
              f"{statistics.median(times[contender.name]) * 1000:8.1f} ms/step, {contender.params_m:.2f}M params")
    for contender in contenders[:-1]:
        print(f"  {contender.name} / smp images/s = {rate[contender.name] / rate['smp']:.3f} (target >= 1.15 on an "
              f"H100); median of per-round ratios {paired(contender.name, 'smp'):.3f}")
    for contender in modes:
        print(f"  {contender.name} / {ours.name} images/s = {rate[contender.name] / rate[ours.name]:.3f}; median of "
              f"per-round ratios {paired(contender.name, ours.name):.3f}")
    best = max(contenders[:-1], key=lambda c: rate[c.name])
    return rate[best.name] / rate["smp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet101", "tu-xception65"], help="smp encoder names")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="square crop side")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (compilation, autotuning)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", nargs="*", choices=["model", "regions"], default=None,
                        help="time segtrain with these trainer.compile modes too (none given: both), and smp "
                             "torch.compile'd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="extra segtrain config overrides (key=value)")
    args = parser.parse_args()
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2 (BatchNorm), --steps >= 1, --warmup >= 0")
    args.compile = [] if args.compile is None else args.compile or ["model", "regions"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # Fixed shapes: autotuning pays off, and `segtrain train` has it on for its training steps.
        torch.backends.cudnn.benchmark = True
    ratios = {encoder: compare(encoder, args) for encoder in args.encoders}
    if len(ratios) > 1:
        print("summary (fastest segtrain / smp): " + ", ".join(f"{encoder} {ratio:.3f}x"
                                                              for encoder, ratio in ratios.items()))


if __name__ == "__main__":
    main()
