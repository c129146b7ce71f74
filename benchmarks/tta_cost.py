"""Cost of multi-scale + flip inference (segtrain.engine.inference.infer) against the forward passes it is
made of, on VOC-sized images of varying size.

    python benchmarks/tta_cost.py [--device cuda] [--images 10] [--max-side 500] [--repeats 3]
        [--scales 0.5 0.75 1.0 1.25 1.5 1.75] [--[no-]flip] [config overrides, e.g. backbone=resnet101]

The model comes from a composed `eval` config (default model=deeplabv3plus backbone=xception65
dataset=voc, random weights: speed does not depend on them) with its trainer.amp and
trainer.channels_last resolved for the device as training does, so the figures are those of validation
during `segtrain train`; give trainer.channels_last=false for `segtrain eval`'s layout. The test-time
protocol is the config's eval section (eval.mode, eval.scales, eval.flip), set from --scales / --flip.

Images: a seeded list of sizes like VOC's (the longest side --max-side, the other 60-100% of it, mostly
landscape; the first is 375x500). For each image it measures, with cuDNN autotuning off (as evaluation
runs; restored after):
  (a) the wall time of the whole `infer` call: every scale, flip, resize, softmax and the average;
  (b) the sum of the forward passes (a) is made of: each scaled (and mirrored) input built beforehand,
      then the model's forward alone at that size, timed on its own.
Every timing is bracketed by a device synchronisation. One untimed call on an unrelated size comes
first (CUDA context, kernel loading), then a "first seen" `infer` per image (printed, not in the
ratio), then --repeats rounds of (a) and (b), in alternating order; the median per image is kept.
Printed: per-image timings and the ratio sum(a) / sum(b), the price of everything around the forward
passes (the GPU issue's target: <= 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain.composition import compose_config
from segtrain.config import register_configs
from segtrain.config_checks import check_config
from segtrain.engine.inference import InferenceSettings, infer
from segtrain.engine.runtime import autocast, cudnn_autotuning, resolve_amp, resolve_channels_last, resolve_device
from segtrain.models import build_model

DEFAULT_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def voc_like_sizes(count: int, max_side: int, seed: int) -> list[tuple[int, int]]:
    """(height, width) pairs like PASCAL VOC's: longest side max_side, the first 375x500 (scaled)."""
    rng = np.random.default_rng(seed)
    sizes = [(round(max_side * 0.75), max_side)]
    while len(sizes) < count:
        short = int(round(max_side * rng.uniform(0.6, 1.0)))
        sizes.append((short, max_side) if rng.random() < 0.7 else (max_side, short))
    return sizes[:count]


def load_config(args: argparse.Namespace) -> DictConfig:
    register_configs()
    scales = ",".join(str(s) for s in args.scales)
    overrides = ["model=deeplabv3plus", "backbone=xception65", "dataset=voc", f"trainer.device={args.device}",
                 f"eval.scales=[{scales}]", f"eval.flip={str(args.flip).lower()}", *args.overrides]
    cfg = compose_config("eval", overrides)
    check_config(cfg)
    return cfg


def build(cfg: DictConfig, device: torch.device) -> nn.Module:
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "weights": None})
    model = build_model(cfg.model, backbone_cfg, len(cfg.dataset.class_names)).to(device).eval()
    if resolve_channels_last(cfg.trainer.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def pass_inputs(image: torch.Tensor, settings: InferenceSettings) -> list[torch.Tensor]:
    """The inputs of each forward pass of `infer(image)`, built as infer builds them."""
    height, width = image.shape[-2:]
    inputs = []
    for scale in settings.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                   align_corners=False)
        inputs.extend([scaled, scaled.flip(-1)] if settings.flip else [scaled])
    return inputs


def measure(model: nn.Module, images: list[torch.Tensor], settings: InferenceSettings, amp: str,
            device: torch.device, repeats: int) -> list[dict[str, float]]:
    """Per image: first-seen, median full-TTA and median summed-forward seconds."""
    # One pass of the same protocol (plain settings: `infer` is then exactly one forward, whole or slide).
    single = InferenceSettings(settings.mode, settings.crop_size, settings.stride)

    def full(image: torch.Tensor) -> None:
        with autocast(device, amp):
            infer(model, image, settings)

    def passes(inputs: list[torch.Tensor]) -> float:
        # One autocast region for all passes, as (a) has: autocast caches the low-precision copies of the
        # weights until its outermost region exits, so a region per pass would re-cast them every pass.
        total = 0.0
        with autocast(device, amp):
            for x in inputs:
                total += timed(lambda x=x: infer(model, x, single), device)
        return total

    rows = []
    first = [timed(lambda image=image: full(image), device) for image in images]
    runs: list[dict[str, list[float]]] = [{"tta": [], "passes": []} for _ in images]
    for r in range(repeats):
        for i, image in enumerate(images):
            inputs = pass_inputs(image, settings)
            # Alternate the order so that neither measurement always runs on a warmer cache.
            for kind in ("tta", "passes") if (r + i) % 2 == 0 else ("passes", "tta"):
                seconds = timed(lambda image=image: full(image), device) if kind == "tta" else passes(inputs)
                runs[i][kind].append(seconds)
    for i, image in enumerate(images):
        rows.append({"height": image.shape[-2], "width": image.shape[-1], "first_seen": first[i],
                     "tta": statistics.median(runs[i]["tta"]), "passes": statistics.median(runs[i]["passes"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=10, help="how many image sizes")
    parser.add_argument("--max-side", type=int, default=500, help="longest image side (VOC: 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sizes and contents")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per image (median kept)")
    parser.add_argument("--scales", type=float, nargs="+", default=DEFAULT_SCALES)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="segtrain config overrides (key=value)")
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1 or args.max_side < 16:
        parser.error("--images and --repeats must be >= 1, --max-side >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args)
    device = resolve_device(cfg.trainer.device)
    amp = resolve_amp(cfg.trainer.amp, device)
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size)
    torch.manual_seed(args.seed)
    model = build(cfg, device)
    sizes = voc_like_sizes(args.images, args.max_side, args.seed)
    images = [torch.randn(1, 3, h, w, device=device) for h, w in sizes]
    with torch.no_grad(), cudnn_autotuning(False):
        # Start-up costs (CUDA context, kernel loading) belong to no image: a square size none of them has.
        warm = max(16, args.max_side // 2)
        with autocast(device, amp):
            timed(lambda: infer(model, torch.randn(1, 3, warm, warm, device=device), settings), device)
        rows = measure(model, images, settings, amp, device, args.repeats)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    passes = len(settings.scales) * (2 if settings.flip else 1)
    print(f"{cfg.model._target_.rsplit('.', 1)[-1]} + {cfg.backbone.get('name')}, {settings.mode} inference, scales "
          f"{list(settings.scales)}, flip {settings.flip} ({passes} forward passes per image), amp {amp}, "
          f"channels_last {resolve_channels_last(cfg.trainer.channels_last, device)}, cuDNN autotuning off, on "
          f"{where}; median of {args.repeats} rounds per image")
    print(f"{'image':>9}  {'first seen s':>12}  {'(a) TTA s':>10}  {'(b) passes s':>12}  {'(a)/(b)':>7}")
    for row in rows:
        print(f"{row['height']:>4}x{row['width']:<4}  {row['first_seen']:12.4f}  {row['tta']:10.4f}  "
              f"{row['passes']:12.4f}  {row['tta'] / row['passes']:7.3f}")
    tta, forward = sum(r["tta"] for r in rows), sum(r["passes"] for r in rows)
    first = sum(r["first_seen"] for r in rows)
    print(f"per image: first seen {first / len(rows):.4f} s, (a) TTA {tta / len(rows):.4f} s, (b) sum of its "
          f"forward passes {forward / len(rows):.4f} s")
    print(f"TTA / sum of forward passes = {tta / forward:.3f} (target <= 1.15); median of per-image ratios "
          f"{statistics.median(r['tta'] / r['passes'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
