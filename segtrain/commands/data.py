"""`segtrain data prepare ...` (fetch and convert datasets) and `segtrain data check ...` (validate them)."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from segtrain.data.dataset import check_pair, decode_image, read_decoded_mask
from segtrain.data.loading import source_samples
from segtrain.errors import DataError
from segtrain.progress import progress_enabled


def say(text: str) -> None:
    """A report line on the console (plain, as before) and in the run's data_check.log: the console
    handler would prefix Hydra's log format, so the line goes to the file handlers only."""
    print(text)
    record = logging.LogRecord("segtrain.data_check", logging.INFO, __file__, 0, text.lstrip("\n"), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def prepare_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segtrain data prepare",
        description="Download (VOC + SBD) or unpack (Cityscapes) a dataset into the layout segtrain reads.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    voc = sub.add_parser("voc", help="PASCAL VOC 2012 + SBD -> VOCdevkit/VOC2012 with train_aug")
    voc.add_argument("--root", type=Path, default=Path("data"), help="where VOCdevkit/ goes (default: data)")
    voc.add_argument("--archives", type=Path, help="folder that already holds VOCtrainval_11-May-2012.tar and "
                     "benchmark.tgz (no download)")
    voc.add_argument("--mirror", help="base URL of a mirror serving the two archives by file name")
    voc.add_argument("--skip-checksum", action="store_true", help="do not verify the archives' MD5")
    city = sub.add_parser("cityscapes", help="unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip")
    city.add_argument("--root", type=Path, default=Path("data/cityscapes"), help="default: data/cityscapes")
    city.add_argument("--archives", type=Path, help="folder holding the two zips (default: --root)")
    city.add_argument("--train-ids", action="store_true", help="also write *_labelTrainIds.png masks")
    parsed = parser.parse_args(args)
    if parsed.dataset == "voc":
        from segtrain.data.prepare_voc import prepare_voc

        report = prepare_voc(parsed.root, parsed.archives, parsed.mirror, check=not parsed.skip_checksum)
        print(f"PASCAL VOC 2012 ready in {report['root']}: train {report['train']}, val {report['val']}, "
              f"train_aug {report['train_aug']} ({report['converted_from_sbd']} masks converted from SBD, "
              f"{report['copied_from_voc']} from VOC)")
        print(f"use it with: segtrain train dataset=voc dataset.root={report['root']}")
    else:
        from segtrain.data.prepare_cityscapes import prepare_cityscapes

        report = prepare_cityscapes(parsed.root, parsed.archives, parsed.train_ids)
        print(f"Cityscapes ready in {report['root']}: train {report['train_images']}, val {report['val_images']} "
              "images" + (f"; {report['labelTrainIds_written']} labelTrainIds masks written"
                          if "labelTrainIds_written" in report else ""))
        print(f"use it with: segtrain train dataset=cityscapes dataset.root={report['root']}")
    return 0


@dataclass
class SplitReport:
    split: str
    samples: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    images_with: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    binary_masks: int = 0  # masks holding only the values 0 and 255 (after dataset.source.value_map)


def check_split(cfg: DictConfig, split: str, progress: bool) -> SplitReport:
    report = SplitReport(split)
    samples = source_samples(cfg.dataset, split)
    limit = int(cfg.data.max_image_pixels)
    num_classes, ignore = len(cfg.dataset.class_names), cfg.dataset.ignore_index
    for image_path, mask_path, *decoder in tqdm(samples, desc=f"check {split}", unit="img",
                                                disable=not progress_enabled(progress)):
        report.samples += 1
        image = mask = None
        try:
            image, note = decode_image(Path(image_path), limit)
            if note:
                report.conversions[note] += 1
        except DataError as exc:
            report.problems.append((str(image_path), str(exc)))
        try:
            mask = read_decoded_mask(Path(mask_path), decoder[0] if decoder else None, limit)
        except DataError as exc:
            report.problems.append((str(mask_path), f"{exc} (image {image_path})"))
        if image is None or mask is None:
            continue
        try:
            check_pair(image, mask, image_path, mask_path, num_classes, ignore)
        except DataError as exc:
            report.problems.append((str(mask_path), str(exc)))
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        report.pixels += counts
        report.images_with += counts > 0
        report.binary_masks += bool(counts[255] and counts[0] + counts[255] == mask.size)
    return report


def binary_mask_warning(report: SplitReport, class_names: list[str], ignore_index: int) -> str | None:
    """0/255 binary masks with two classes train without a single foreground pixel: 255 is ignored."""
    if len(class_names) != 2 or ignore_index != 255 or not report.binary_masks or report.pixels[1]:
        return None
    return (f"WARNING: {report.binary_masks} mask(s) hold only the values 0 and 255, no pixel has the value 1, and "
            f"dataset.class_names has 2 entries {class_names}: 255 is the ignore index, so every '{class_names[1]}' "
            "pixel would be ignored and the class never learnt. If 255 marks the foreground (0/255 binary masks), "
            "map it to class 1: 'dataset.source.value_map={255:1}'")


def print_report(report: SplitReport, class_names: list[str], ignore_index: int) -> None:
    usable = report.samples - len({f for f, _ in report.problems})
    say(f"\nsplit '{report.split}': {report.samples} samples, {len(report.problems)} problems")
    for path, reason in report.problems:
        say(f"  BAD {path}: {reason}")
    for kind, count in sorted(report.conversions.items()):
        say(f"  converted {count} {kind} image(s) to 8-bit RGB (usable, counted)")
    labelled = report.pixels[: len(class_names)].sum()
    if labelled:
        say(f"  {'class':<16} {'pixels %':>9} {'images':>7}")
        for index, name in enumerate(class_names):
            share = 100.0 * report.pixels[index] / labelled
            say(f"  {name:<16} {share:>9.3f} {report.images_with[index]:>7}")
        say(f"  ignored ({ignore_index}) pixels: {report.pixels[ignore_index]}")
    warning = binary_mask_warning(report, class_names, ignore_index)
    if warning:
        say(f"  {warning}")
    say(f"  usable samples: {max(usable, 0)} of {report.samples}")


def run_check(cfg: DictConfig) -> int:
    splits = [cfg.data.split] if cfg.data.split else [cfg.dataset.train_split, cfg.dataset.val_split]
    names = list(cfg.dataset.class_names)
    failed = False
    summary = {}
    for split in splits:
        report = check_split(cfg, str(split), cfg.logging.progress)
        print_report(report, names, cfg.dataset.ignore_index)
        failed |= bool(report.problems)
        summary[split] = {"samples": report.samples, "problems": report.problems,
                          "conversions": dict(report.conversions),
                          "class_pixels": {n: int(report.pixels[i]) for i, n in enumerate(names)}}
    say(json.dumps({s: {"samples": v["samples"], "problems": len(v["problems"])} for s, v in summary.items()}))
    if failed:
        say("data check: FAILED (unusable samples listed above as BAD)")
        return 1
    say("data check: OK")
    return 0
