"""What `segtrain data check` and the training start check find in a split's files, and what it means.

`check_samples` reads (image, mask) pairs as training would and counts what it finds: unreadable files,
label values, 0/255 binary masks, the colours of colour masks. The findings are worded once here, so the
report of `data check` and the start check of `segtrain train` (segtrain.engine.callbacks.data_check)
say the same thing: `fatal_findings` are conditions under which training learns nothing useful,
`weak_findings` those worth a warning. Repeated per-file problems collapse into one line with a count.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segtrain.data.dataset import (
    ColourMaskError,
    LabelRangeError,
    check_pair,
    code_colour,
    decode_image,
    out_of_range_message,
    read_decoded_mask,
)
from segtrain.errors import DataError
from segtrain.visualize import voc_palette

# Fewer validation images than this gives an mIoU too noisy to choose a checkpoint by: a warning.
MIN_VAL_IMAGES = 10


@dataclass
class SplitReport:
    split: str
    samples: int = 0  # pairs read
    total: int = 0  # pairs in the split (more than `samples` when the check read a sample of them)
    problems: list[tuple[str, str]] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    images_with: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    binary_masks: int = 0  # masks holding only the values 0 and 255 (after dataset.source.value_map)
    colour_masks: list[str] = field(default_factory=list)  # colour images read as index masks
    colours: Counter = field(default_factory=Counter)  # their colours (0xRRGGBB) -> pixels, over all of them
    colour_files: Counter = field(default_factory=Counter)  # colour -> masks holding it
    out_of_range: list[str] = field(default_factory=list)  # masks with labels outside the classes
    bad_values: set[int] = field(default_factory=set)  # those labels, over all masks

    @property
    def unusable(self) -> int:
        return len({path for path, _ in self.problems})

    @property
    def where(self) -> str:
        names = self.split.split("+")
        return f"split '{names[0]}'" if len(names) == 1 else "splits " + " and ".join(f"'{n}'" for n in names)


def combined(reports: Sequence[SplitReport]) -> SplitReport:
    """The reports of several splits as one: dataset-wide findings (the colours of all colour masks, 0/255
    masks) are worded once, not once per split."""
    total = SplitReport("+".join(r.split for r in reports))
    for report in reports:
        total.samples += report.samples
        total.total += report.total
        total.problems += report.problems
        total.conversions += report.conversions
        total.pixels += report.pixels
        total.images_with += report.images_with
        total.binary_masks += report.binary_masks
        total.colour_masks += report.colour_masks
        total.colours += report.colours
        total.colour_files += report.colour_files
        total.out_of_range += report.out_of_range
        total.bad_values |= report.bad_values
    return total


def spread(samples: Sequence, limit: int | None) -> list:
    """At most `limit` samples, spread evenly over the split (all of them when there are fewer)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    return [samples[round(i * (len(samples) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else [samples[0]]


def _read_mask(report: SplitReport, mask_path: Path, image_path: Path, decoder: object, limit: int) -> object:
    try:
        return read_decoded_mask(mask_path, decoder, limit)
    except ColourMaskError as exc:
        report.colour_masks.append(str(mask_path))
        for code, count in zip(exc.codes.tolist(), exc.counts.tolist()):
            report.colours[code] += count
            report.colour_files[code] += 1
        report.problems.append((str(mask_path), f"{exc} (image {image_path})"))
    except DataError as exc:
        report.problems.append((str(mask_path), f"{exc} (image {image_path})"))
    return None


def check_samples(samples: Sequence, split: str, num_classes: int, ignore_index: int, max_pixels: int,
                  progress: bool = False, limit: int | None = None, seconds: float | None = None) -> SplitReport:
    """Read every pair of `samples` (or `limit` of them spread over the split, stopping after `seconds`)."""
    report = SplitReport(split, total=len(samples))
    chosen = spread(samples, limit)
    deadline = None if seconds is None else time.monotonic() + seconds
    for image_path, mask_path, *decoder in tqdm(chosen, desc=f"check {split}", unit="img", disable=not progress):
        if deadline is not None and report.samples and time.monotonic() > deadline:
            break
        report.samples += 1
        image = None
        try:
            image, note = decode_image(Path(image_path), max_pixels)
            if note:
                report.conversions[note] += 1
        except DataError as exc:
            report.problems.append((str(image_path), str(exc)))
        mask = _read_mask(report, Path(mask_path), image_path, decoder[0] if decoder else None, max_pixels)
        if image is None or mask is None:
            continue
        try:
            check_pair(image, mask, image_path, mask_path, num_classes, ignore_index)
        except LabelRangeError as exc:
            report.out_of_range.append(str(mask_path))
            report.bad_values.update(exc.values)
            report.problems.append((str(mask_path), str(exc)))
            continue
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
    return (f"{report.binary_masks} mask(s) hold only the values 0 and 255 ({report.where}), no pixel has "
            f"the value 1, and dataset.class_names has 2 entries {class_names}: 255 is the ignore index, so every "
            f"'{class_names[1]}' pixel would be ignored and the class never learnt. If 255 marks the foreground "
            "(0/255 binary masks), map it to class 1: 'dataset.source.value_map={255:1}'")


def _listing(codes: Sequence[int]) -> str:
    return "[" + ",".join("[{},{},{}]".format(*code_colour(c)) for c in codes) + "]"


def colours_suggestion(report: SplitReport, class_names: list[str]) -> str | None:
    """One `dataset.source.colors` override from the colours of every colour mask seen.

    Colours of the VOC colour map (the usual convention of annotation tools) are put in its order,
    which is the class index; other colours cannot be ordered from the files, so the user is told to.
    """
    if not report.colours:
        return None
    voc = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(voc_palette(256)[:255])}
    codes = sorted(report.colours)
    ordered = all(c in voc for c in codes)
    if ordered:
        codes.sort(key=voc.__getitem__)
    files = len(report.colour_masks)
    text = (f"{files} mask(s) of {report.where} are colour images; together they hold {len(codes)} colours. "
            f"To read them as colours: dataset.source.mask_format=rgb dataset.source.colors={_listing(codes)}. ")
    if len(codes) == len(class_names):
        pairs = ", ".join(f"{name}={list(code_colour(c))}" for name, c in zip(class_names, codes))
        text += f"Position in the list is the class index, in dataset.class_names order: {pairs}"
    else:
        text += (f"Position in the list is the class index; dataset.class_names has {len(class_names)} entries for "
                 f"{len(codes)} colours: name one class per colour, or move the colours that mean 'ignore' to "
                 "dataset.source.ignore_colors")
    text += (" (ordered as the VOC colour map; check each pairing)" if ordered else
             " (ordered by colour value, not by meaning: reorder it so the i-th colour is class i)")
    rare = [c for c in codes if report.colour_files[c] == 1 and report.colours[c] < 16]
    if rare:
        text += f"; {_listing(rare)} occur in a single mask on under 16 pixels: anti-aliased edges?"
    return text


def _collapsed_problems(report: SplitReport, num_classes: int, ignore_index: int) -> list[str]:
    """The problems of a split as few lines: one per kind, with a count and an example file."""
    lines = []
    where = report.where
    if report.out_of_range:
        values = sorted(report.bad_values)
        example = out_of_range_message(Path(report.out_of_range[0]), values, num_classes, ignore_index)
        lines.append(f"{len(report.out_of_range)} mask(s) of {where} have labels outside the classes, e.g. {example}")
    handled = set(report.out_of_range) | set(report.colour_masks)
    others: dict[str, list[str]] = {}
    for path, reason in report.problems:
        if path not in handled:
            others.setdefault(reason.replace(path, "<file>").split(" (image ")[0], []).append(path)
    for reason, paths in others.items():
        if len(paths) == 1:
            lines.append(reason.replace("<file>", paths[0]))
        else:
            lines.append(f"{len(paths)} files of {where} are unusable like {paths[0]}: "
                         f"{reason.replace('<file>', paths[0])}")
    return lines


def findings(report: SplitReport, class_names: list[str], ignore_index: int,
             on_error: str) -> tuple[list[str], list[str]]:
    """(fatal, weak): what makes training meaningless (or, with data.on_error=raise, stops it at the first bad
    sample anyway), and what is only worth a warning (samples data.on_error=skip will replace)."""
    fatal = [binary] if (binary := binary_mask_warning(report, class_names, ignore_index)) else []
    problems = _collapsed_problems(report, len(class_names), ignore_index)
    suggestion = colours_suggestion(report, class_names)
    if suggestion:
        problems.insert(0, suggestion)
    if on_error == "raise" or report.unusable >= report.samples:
        return fatal + problems, []
    return fatal, [f"data.on_error=skip will skip these: {line}" for line in problems]


def validation_findings(report: SplitReport, class_names: list[str]) -> list[str]:
    """Warnings about the validation split: too few images to judge by, classes it never shows."""
    findings = []
    if report.total < MIN_VAL_IMAGES:
        findings.append(f"the validation split '{report.split}' has {report.total} image(s) (fewer than "
                        f"{MIN_VAL_IMAGES}): its mIoU, which chooses best.pt, is noisy; give it more images "
                        "(dataset.source.val_ratio, or the split file under dataset.source.split_dir)")
    usable = report.samples - report.unusable
    missing = [name for index, name in enumerate(class_names) if not report.images_with[index]]
    if usable and missing:
        seen = "" if report.samples == report.total else f" in the {report.samples} of {report.total} images checked"
        findings.append(f"no pixel of {missing} in the validation split '{report.split}'{seen}: their IoU is n/a "
                        "and mIoU averages the other classes; put images holding them into the validation split")
    return findings
