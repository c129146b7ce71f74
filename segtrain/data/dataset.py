"""Reading (image, mask) file pairs: the one code path every dataset goes through."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from segtrain.errors import ConfigError, DataError

# (image, mask) or (image, mask, decoder): the decoder turns the stored mask into class indices
# (Cityscapes label ids -> train ids, colour-coded masks -> indices) when the mask is read.
Sample = tuple


class LookupDecoder:
    """Single-channel masks whose values are mapped through a 256-entry table (Cityscapes label ids
    -> train ids, `dataset.source.value_map` of folder datasets)."""

    reads_rgb = False

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.uint8)

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return self.table[raw]


class ColorDecoder:
    """RGB colour-coded masks: each class colour -> its index, `ignore_colors` -> ignore index.

    A colour that is neither a class nor ignored is an error naming the file: guessing would
    silently corrupt the labels.
    """

    reads_rgb = True

    def __init__(self, colors: list, ignore_colors: list | None = None, ignore_index: int = 255) -> None:
        self.codes: dict[int, int] = {}
        for index, color in enumerate(colors):
            self.codes[self._code(color)] = index
        for color in ignore_colors or []:
            self.codes[self._code(color)] = ignore_index
        keys = np.array(sorted(self.codes), dtype=np.int64)
        self.keys, self.values = keys, np.array([self.codes[k] for k in keys], dtype=np.uint8)

    @staticmethod
    def _code(color: list) -> int:
        r, g, b = (int(c) for c in color)
        return (r << 16) | (g << 8) | b

    def __call__(self, raw: np.ndarray, path: Path) -> np.ndarray:
        codes = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
        position = np.clip(np.searchsorted(self.keys, codes), 0, len(self.keys) - 1)
        known = self.keys[position] == codes
        if not known.all():
            unknown = np.unique(codes[~known])[:5]
            colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in unknown]
            raise DataError(
                f"mask {path} has colours {colours} that are not in the dataset's class colours "
                "(dataset.source.colors) nor its ignore colours (dataset.source.ignore_colors)"
            )
        return self.values[position]


# data.max_image_pixels: Cityscapes frames are 2 MP; far larger files are refused before decoding.
DEFAULT_MAX_PIXELS = 100_000_000


def check_pixel_count(width: int, height: int, path: Path, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DataError(f"{path} is {width}x{height} ({width * height / 1e6:.0f} MP), above data.max_image_pixels="
                        f"{max_pixels}: refused before decoding (a decompression bomb, or resize it first)")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone. PNG's IHDR is read directly, so a file PIL refuses for
    another reason (a bad ancillary-chunk CRC, which OpenCV only warns about) is still measured."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # data.max_image_pixels is the limit, not PIL's built-in one
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - a format PIL does not know: OpenCV decides
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_header_size(data: bytes, path: Path, max_pixels: int) -> None:
    size = _header_size(data)
    if size is not None:
        check_pixel_count(*size, path, max_pixels)


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """(RGB uint8 HxWx3, what was converted: None, "grayscale", "rgba" or "16-bit").

    Pixels are used as stored: EXIF orientation is ignored, for images as for masks, so an image
    and its mask always line up. Truncated JPEG and PNG files are errors, not partial images.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise DataError(f"image {path} is an empty file")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        _check_jpeg_complete(path)  # rare: data after the image (motion photos), or truncation
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise DataError(f"image {path} is a truncated PNG (no IEND chunk)")
    _check_header_size(data, path, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None:
        raise DataError(f"cannot decode image {path} (not an image, or corrupt)")
    note = None
    if image.dtype == np.uint16:
        image, note = (image // 257).astype(np.uint8), "16-bit"
    elif image.dtype != np.uint8:
        raise DataError(f"image {path} has unsupported pixel type {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), note or "grayscale"
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB), note or "rgba"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), note


def _check_jpeg_complete(path: Path) -> None:
    """Decode fully with PIL, which refuses truncated JPEGs (OpenCV would return a grey-filled image)."""
    try:
        with Image.open(path) as img:
            img.load()
    except OSError as exc:
        raise DataError(f"image {path} is a truncated or corrupt JPEG ({exc})") from None


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 HxWx3; grayscale, RGBA and 16-bit images are converted."""
    return decode_image(path, max_pixels)[0]


# Lossy formats change label values at every edge, so they are refused as masks wherever they are found.
LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
LOSSY_MASK_FORMATS = ("JPEG", "MPO")


def lossy_mask_message(path: Path) -> str:
    path = Path(path)
    found = f" has the extension {path.suffix}: it" if path.suffix.lower() != ".png" else ""
    return (f"mask {path}{found} is a JPEG file where a PNG ({path.stem}.png) is expected: masks must be lossless "
            "PNGs, because JPEG compression changes label values along every edge (a class 1 pixel becomes 0, 2 "
            "or 3) and converting the JPEG cannot undo it; export the masks again as PNG from the annotation tool")


def colour_codes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct colours of an RGB image as 24-bit codes (0xRRGGBB), with their pixel counts."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    return np.unique(codes, return_counts=True)


def code_colour(code: int) -> tuple[int, int, int]:
    return (int(code) >> 16) & 255, (int(code) >> 8) & 255, int(code) & 255


class ColourMaskError(DataError):
    """A colour mask read as an index mask; it carries the colours it holds (codes and pixel counts), so that
    `data check` and the start check can build one `dataset.source.colors` suggestion from all masks."""

    def __init__(self, message: str, codes: np.ndarray | None = None, counts: np.ndarray | None = None) -> None:
        # Optional: PyTorch rebuilds a loader worker's exception from its message alone.
        super().__init__(message)
        self.codes = codes if codes is not None else np.zeros(0, np.int64)
        self.counts = counts if counts is not None else np.zeros(0, np.int64)


class LabelRangeError(DataError):
    """Label values outside the classes and the ignore index; `values` are the offending values."""

    def __init__(self, message: str, values: list[int] | None = None) -> None:
        super().__init__(message)
        self.values = values or []


def colour_mask_message(path: Path, mode: str, codes: np.ndarray) -> str:
    """Why a colour image is not an index mask, and the keys that read it. The file's own colours are listed,
    but the `colors=` override comes from `segtrain data check`, which sees the colours of every mask."""
    colours = [code_colour(c) for c in codes[:8]]
    listing = "[" + ",".join(f"[{r},{g},{b}]" for r, g, b in colours) + "]"
    more = f" (the first 8 of its {len(codes)})" if len(codes) > len(colours) else ""
    message = (f"mask {path} is an {mode} colour image, but dataset.source.mask_format=index reads class indices "
               "from single-channel (palette or grayscale) PNGs. ")
    if all(r == g == b for r, g, b in colours) and len(codes) <= 8:
        values = [r for r, _, _ in colours]
        message += (f"Its three channels are equal (values {values}): save the masks as single-channel 8-bit PNGs "
                    "(mode L), or read them as colours with dataset.source.mask_format=rgb")
    else:
        message += "If its colours are the classes, set dataset.source.mask_format=rgb"
    return (message + f" and dataset.source.colors, one [R,G,B] per class in dataset.class_names order; this mask "
            f"holds {listing}{more}. `segtrain data check` suggests the list from the colours of all masks")


def read_mask(path: Path, rgb: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxW uint8 read as palette indices (never through an RGB conversion); HxWx3 when `rgb`."""
    if not Path(path).is_file():
        raise DataError(f"mask {path} is missing")
    if Path(path).suffix.lower() in LOSSY_MASK_SUFFIXES:
        raise DataError(lossy_mask_message(path))
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # data.max_image_pixels, checked below before any pixel is read, is the limit
    try:
        img = Image.open(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read mask {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    try:
        with img:
            if img.format in LOSSY_MASK_FORMATS:
                raise DataError(lossy_mask_message(path))
            check_pixel_count(*img.size, path, max_pixels)
            if rgb:
                return np.array(img.convert("RGB"), dtype=np.uint8)
            if img.mode == "1":  # 1-bit PNGs (binary masks): bits 0 / 1 are the class indices
                return np.array(img, dtype=np.uint8)
            if img.mode in ("RGB", "RGBA", "LA", "PA"):
                codes, counts = colour_codes(np.array(img.convert("RGB"), dtype=np.uint8))
                raise ColourMaskError(colour_mask_message(path, img.mode, codes), codes, counts)
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} is a {img.mode} image; masks must be single-channel 8-bit index PNGs "
                    "(palette or grayscale) whose values are class indices, 255 = ignore"
                )
            return np.array(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read mask {path}: {exc}") from None


def check_pair(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path, num_classes: int,
               ignore_index: int = 255) -> None:
    """Raise a DataError naming the files when image and mask sizes differ or labels are invalid."""
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} "
            f"is {mask.shape[1]}x{mask.shape[0]}"
        )
    invalid = (mask >= num_classes) & (mask != ignore_index)
    if invalid.any():
        values = sorted(set(np.unique(mask[invalid]).tolist()))
        raise LabelRangeError(out_of_range_message(mask_path, values, num_classes, ignore_index), values)


def out_of_range_message(mask_path: Path, values: list[int], num_classes: int, ignore_index: int) -> str:
    """The keys that decide the valid labels: the class count comes from dataset.class_names alone."""
    shown = ", ".join(str(v) for v in values[:8]) + (f" and {len(values) - 8} more" if len(values) > 8 else "")
    names = f" ({values[-1] + 1} names for values up to {values[-1]})" if values[-1] < 64 else ""
    return (f"mask {mask_path} has label values [{shown}] outside the valid range 0..{num_classes - 1} and the "
            f"ignore index {ignore_index} (dataset.ignore_index): dataset.class_names has {num_classes} entries and "
            f"sets the class count, so list one name per class there{names}, mark unlabelled pixels "
            f"{ignore_index}, or map raw values to classes with dataset.source.value_map={{{values[0]}:CLASS}} "
            f"(CLASS a class index, or {ignore_index} to ignore them)")


def read_decoded_mask(mask_path: Path, decoder: object | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if decoder is None:
        return read_mask(mask_path, max_pixels=max_pixels)
    return decoder(read_mask(mask_path, rgb=decoder.reads_rgb, max_pixels=max_pixels), mask_path)


class SegmentationDataset(torch.utils.data.Dataset):
    """Items are `{"image": uint8 CHW RGB, "mask": uint8 HW (int16 beyond 255 labels), "index": int}` after
    `transform` (segtrain.data.transforms): compact to hand over; `normalization` is the (mean, std) the
    training step and the evaluation loop normalise them with on the device
    (segtrain.data.normalization.normalize_images).

    `transform(image, mask, seed)` receives a per-sample seed so augmentation does not depend on
    which worker process reads the sample. An index may be an int or an (index, seed) pair.
    """

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        transform: Callable[[np.ndarray, np.ndarray, int], tuple[torch.Tensor, torch.Tensor]],
        ignore_index: int = 255,
        on_error: str = "raise",
        replace_unusable: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        normalization: tuple[list[float], list[float]] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.samples = samples
        self.num_classes = num_classes
        self.transform = transform
        self.ignore_index = ignore_index
        self.on_error = on_error
        # Training replaces an unusable sample by the next usable one (the batch stays full);
        # evaluation drops it (`image` None), so no image is scored twice.
        self.replace_unusable = replace_unusable
        self.max_pixels = max_pixels
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, *decoder = self.samples[index]
        image = read_image(image_path, self.max_pixels)
        mask = read_decoded_mask(mask_path, decoder[0] if decoder else None, self.max_pixels)
        check_pair(image, mask, image_path, mask_path, self.num_classes, self.ignore_index)
        return image, mask

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """With on_error=skip, an unusable sample is replaced by the next usable one; the skipped
        files and reasons travel with the item ("skipped") so the training loop can count them."""
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        skipped: list[str] = []
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            try:
                image, mask = self.load(current)
                break
            except DataError as exc:
                if self.on_error == "raise":
                    raise
                skipped.append(str(exc))
                if not self.replace_unusable:
                    return {"image": None, "mask": None, "index": current, "skipped": str(exc)}
        else:
            raise DataError(f"every sample of the dataset is unusable; first problem: {skipped[0]}")
        image_t, mask_t = self.transform(image, mask, seed)
        return {"image": image_t, "mask": mask_t, "index": current, "skipped": "\n".join(skipped)}


def index_seed(index: int) -> int:
    return int(index) & 0x7FFFFFFF


def read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]  # spaces allowed in names


def voc_layout_samples(
    root: str | Path,
    split: str,
    image_dir: str = "JPEGImages",
    mask_dir: str = "SegmentationClass",
    split_dir: str = "ImageSets/Segmentation",
    image_ext: str = ".jpg",
    mask_ext: str = ".png",
) -> list[Sample]:
    """(image, mask) pairs of a VOC-style tree: ids listed in <split_dir>/<split>.txt."""
    root = Path(root)
    ids = read_split_file(root / split_dir / f"{split}.txt")
    if not ids:
        raise DataError(f"split file {root / split_dir / f'{split}.txt'} lists no samples")
    return [(root / image_dir / f"{i}{image_ext}", root / mask_dir / f"{i}{mask_ext}") for i in ids]
