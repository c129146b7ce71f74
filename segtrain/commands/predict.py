"""`segtrain predict ckpt=PATH input=FILE|DIR|GLOB [output=DIR]`: segment images of any size.

Without `output=`, the files go into the run directory (outputs/<date>/<time>-predict).

For each image (named by its stem, or by its relative path where stems repeat): <stem>.png
(class indices, palette-encoded so viewers show colours),
<stem>_color.png (the colour mask) and <stem>_overlay.png (mask over image, `predict.alpha`).
Files that cannot be read as images are skipped with a warning and listed at the end.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import torch
from omegaconf import DictConfig
from PIL import Image

from segtrain.data.dataset import decode_image
from segtrain.engine.lock import RunLock
from segtrain.engine.predictor import Predictor
from segtrain.engine.restore import load_for_inference
from segtrain.errors import ConfigError, DataError
from segtrain.visualize import colorize, overlay

log = logging.getLogger("segtrain.predict")

OUTPUT_SUFFIXES = (".png", "_color.png", "_overlay.png")
LEFTOVER = re.compile(r"\..+\.\d+\.tmp\.png")  # atomic_save's temporary name


def input_files(spec: str) -> list[Path]:
    """A file, every file in a folder (non-images are reported, not hidden), or a glob pattern."""
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"input={spec}: no such file, folder or matching pattern")
    if not files:
        raise ConfigError(f"input={spec}: no files found")
    return files


def output_names(files: list[Path]) -> dict[Path, str]:
    """File stems, or, where two inputs share a stem, their paths relative to a common folder."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return dict(zip(files, stems))
    root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
    return {f: str(f.resolve().relative_to(root)).replace(os.sep, "__").replace(".", "_") for f in files}


def check_output_folder(spec: str, out: Path, files: list[Path], names: dict[Path, str]) -> None:
    """Never write over the user's files: not into the input folder, and not over an existing file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={out} is a file, not a folder: give a folder (predict writes three images per "
                          "input into it)")
    resolved = out.resolve()
    source = Path(spec)
    folders = {source.resolve()} if source.is_dir() else {f.parent.resolve() for f in files}
    for folder in folders:
        if resolved == folder or folder in resolved.parents:
            raise ConfigError(f"output={out} is the input folder or inside it ({folder}); choose an output folder "
                              "outside the input, so that no input image can be replaced")
    planned: dict[str, Path] = {}
    for f in files:
        for suffix in OUTPUT_SUFFIXES:
            name = f"{names[f]}{suffix}"
            if name in planned:  # e.g. a.jpg and a_color.jpg: both would write a_color.png
                raise ConfigError(f"inputs {planned[name].name} and {f.name} would both write {name}; rename one, "
                                  "or predict them into separate output folders")
            planned[name] = f
    existing = [out / name for name in planned if (out / name).exists()]
    if existing:
        raise ConfigError(f"output={out} already holds {len(existing)} of the files predict would write (e.g. "
                          f"{existing[0].name}); predict never replaces files: choose an empty or new output folder")


def atomic_save(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary file beside `path` (same extension, so the encoder is chosen by it), then
    rename: a killed predict leaves no truncated image under a final name."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if write(tmp) is False:  # cv2.imwrite reports failure by its return value
            raise DataError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_predict(composed: DictConfig, overrides: list[str], run_dir: Path | None = None) -> dict:
    if composed.input is None:
        raise ConfigError("predict needs input=FILE|DIR|GLOB (and optionally output=DIR; default: the run directory)")
    if composed.output is None and run_dir is None:
        raise ConfigError("predict needs output=DIR")
    alpha = float(composed.predict.alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"predict.alpha must be in [0, 1], got {alpha}")
    files = input_files(str(composed.input))
    out = Path(composed.output) if composed.output is not None else Path(run_dir)
    names = output_names(files)
    check_output_folder(str(composed.input), out, files, names)  # before the model: fail in a second
    lock = RunLock(out, "predict", "output")  # one writer per output folder: a second predict into it is refused
    lock.acquire()
    try:
        remove_leftovers(out)
        check_output_folder(str(composed.input), out, files, names)  # again: a writer may have finished meanwhile
        return _predict_into(composed, overrides, files, names, out)
    finally:
        lock.release()


def remove_leftovers(out: Path) -> None:
    """Partial images of a killed predict (`.<name>.<pid>.tmp.png`, atomic_save); the folder's lock is
    held, so no live writer owns them."""
    for leftover in out.glob(".*.tmp.png"):
        if LEFTOVER.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def _predict_into(composed: DictConfig, overrides: list[str], files: list[Path], names: dict[Path, str],
                  out: Path) -> dict:
    alpha = float(composed.predict.alpha)
    # The inference of the Python API's Segmenter: the checkpoint's normalisation, protocol (with the
    # overrides) and palette.
    predictor = Predictor(load_for_inference(composed, overrides))
    palette = predictor.palette
    flat_palette = palette.flatten().tolist()
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for path in files:
        try:
            image, _ = decode_image(path, predictor.max_pixels)
        except DataError as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped.append((path, str(exc)))
            continue
        try:
            prediction = predictor.segment([image])[0]
        except (MemoryError, torch.OutOfMemoryError):
            raise DataError(f"out of memory segmenting {path} ({image.shape[1]}x{image.shape[0]} pixels, "
                            f"eval.scales={list(predictor.settings.scales)}): use eval.mode=slide, fewer "
                            "eval.scales, or a smaller image") from None
        index_png = Image.fromarray(prediction, mode="P")
        index_png.putpalette(flat_palette)
        name = names[path]
        color = cv2.cvtColor(colorize(prediction, palette), cv2.COLOR_RGB2BGR)
        blended = cv2.cvtColor(overlay(image, prediction, palette, alpha), cv2.COLOR_RGB2BGR)
        atomic_save(out / f"{name}.png", index_png.save)
        atomic_save(out / f"{name}_color.png", lambda tmp, c=color: cv2.imwrite(str(tmp), c))
        atomic_save(out / f"{name}_overlay.png", lambda tmp, b=blended: cv2.imwrite(str(tmp), b))
        written += 1
    print(f"segmented {written} image(s) into {out}")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not readable images:")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    return {"written": written, "skipped": [str(p) for p, _ in skipped]}
