"""The training step with each `trainer.compile` mode (off, model, regions), alternating step by step in one process.

    python benchmarks/compile_modes.py [--modes off model regions] [--batch 2] [--size 256] [--steps 20]
        [--warmup 3] [--rounds 1] [--threads N] [--device cpu|cuda] [segtrain config overrides]

Default network: DeepLab v3+ with ResNet-18 (`model=deeplabv3plus backbone=resnet18`); give any segtrain
overrides after the options (e.g. `experiment=deeplabv3plus_r101_voc trainer.amp=bf16
trainer.channels_last=true`). Each mode's step is `segtrain bench`'s (segtrain.engine.step.TrainStep from a
composed `bench` config with `trainer.compile=MODE`), so what is timed is what `segtrain train` runs.

All modes see the same batch (uint8 images and masks, as the loader hands them over). The first
`--warmup` rounds run one step of each mode untimed (compilation; the first step's wall time is printed
as each mode's cold start); then each round runs one step of each mode, in rotating order so that drift
(clocks, a shared machine) hits all alike, every step bracketed by a device synchronisation. Printed per
mode: the median ms per step, and against `off` the ratio of medians and the median of the per-round
ratios (below 1: faster than eager), the figure least sensitive to outliers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from segtrain.commands.bench import bench_train_step
from segtrain.composition import compose_config
from segtrain.config import register_configs
from segtrain.config_checks import COMPILE_MODES, check_config

DEFAULT_NETWORK = ["model=deeplabv3plus", "backbone=resnet18"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mode_steps(args: argparse.Namespace) -> dict[str, Callable[[int], object]]:
    """mode -> one training step (iteration -> None) of a freshly built model, all on the same batch."""
    register_configs()
    steps: dict[str, Callable[[int], object]] = {}
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []
    for mode in args.modes:
        torch.manual_seed(0)
        cfg = compose_config("bench", [*(args.overrides or DEFAULT_NETWORK), f"bench.batch_size={args.batch}",
                                       f"bench.crop_size=[{args.size},{args.size}]", f"trainer.device={args.device}",
                                       f"trainer.compile={mode}"])
        check_config(cfg)
        setup = bench_train_step(cfg, torch.device(args.device))
        setup.model.train()
        batch = batch or [(setup.images, setup.masks)]
        steps[mode] = _step_on(setup.step, batch)
    return steps


def _step_on(step: Callable[[int, list], object], batch: list) -> Callable[[int], object]:
    return lambda iteration: step(iteration, batch)


def race(steps: dict[str, Callable[[int], object]], args: argparse.Namespace) -> tuple[dict, dict]:
    """(seconds per timed step of each mode, wall time of each mode's first step)."""
    device = torch.device(args.device)
    modes = list(steps)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    first: dict[str, float] = {}
    for n in range(args.warmup + args.steps):
        for mode in modes[n % len(modes):] + modes[:n % len(modes)]:
            sync(device)
            start = time.perf_counter()
            steps[mode](n + 1)
            sync(device)
            elapsed = time.perf_counter() - start
            first.setdefault(mode, elapsed)
            if n >= args.warmup:
                times[mode].append(elapsed)
    return times, first


def report(times: dict[str, list[float]], first: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """Print each mode's figures; returns mode -> median of per-round ratios against the first mode."""
    base = args.modes[0]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"{' '.join(args.overrides or DEFAULT_NETWORK)}, batch {args.batch} x 3 x {args.size} x {args.size} on "
          f"{where} ({torch.get_num_threads()} CPU threads): {args.steps} timed steps per mode after {args.warmup} "
          "warm-up rounds")
    ratios = {}
    for mode in args.modes:
        median = statistics.median(times[mode])
        ratios[mode] = statistics.median(t / b for t, b in zip(times[mode], times[base]))
        print(f"  {mode:>8}: {median * 1000:8.1f} ms/step (median), {args.batch / median:7.2f} images/s, first step "
              f"{first[mode]:7.1f} s; vs {base}: {median / statistics.median(times[base]):.3f} (ratio of medians), "
              f"{ratios[mode]:.3f} (median of per-round ratios)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=COMPILE_MODES, default=list(COMPILE_MODES),
                        help="the first is the reference of the ratios")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="square crop side")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each mode per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (compilation)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the timed rounds, reporting each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="segtrain config overrides (default: " +
                        " ".join(DEFAULT_NETWORK) + ")")
    args = parser.parse_args()
    if args.batch < 2 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch must be >= 2 (BatchNorm), --steps >= 1, --warmup >= 1 (the first step compiles)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes, as `segtrain train` has it for its training steps
    steps = mode_steps(args)
    cold: dict[str, float] = {}
    for _ in range(args.rounds):
        times, first = race(steps, args)
        cold = cold or first  # the first steps of the first round: the compilations
        report(times, cold, args)
        args.warmup = 0


if __name__ == "__main__":
    main()
