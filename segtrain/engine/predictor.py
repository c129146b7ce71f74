"""A loaded checkpoint ready to segment images: the one inference path of `segtrain predict` and of the
Python API's `Segmenter` (segtrain.api), which adds the inputs and protocols a user passes."""

from __future__ import annotations

import numpy as np
import torch

from segtrain.data.normalization import normalization, normalize_images
from segtrain.engine.inference import InferenceSettings, infer
from segtrain.engine.restore import LoadedModel
from segtrain.engine.runtime import autocast, cudnn_autotuning, resolve_amp
from segtrain.visualize import make_palette


class Predictor:
    """The network (EMA weights when the run kept them) with the checkpoint's class names, palette,
    normalisation and test-time protocol (its eval section with the command line applied)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.cfg = loaded.cfg
        self.model = loaded.model
        self.device = loaded.device
        self.checkpoint = loaded.path
        self.class_names: list[str] = list(loaded.class_names)
        self.palette = make_palette(self.cfg.dataset.palette, len(self.class_names))  # num_classes x 3 uint8
        self.mean, self.std = normalization(self.cfg)  # as the checkpoint was trained
        self.amp = resolve_amp(self.cfg.trainer.amp, self.device)
        self.max_pixels = int(self.cfg.data.max_image_pixels)
        self.settings = InferenceSettings.from_config(self.cfg.eval, self.cfg.dataset.augment.crop_size,
                                                      self.cfg.dataset.get("flip_pairs"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def segment(self, images: list[np.ndarray], settings: InferenceSettings | None = None) -> list[np.ndarray]:
        """RGB uint8 HxWx3 images of one size -> H x W class indices (uint8; int64 beyond 256 classes)."""
        uint8 = torch.stack([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) for image in images])
        batch = normalize_images(uint8.to(self.device), self.mean, self.std)  # moved as uint8, normalised there
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int64
        with autocast(self.device, self.amp), cudnn_autotuning(False):  # images of varying size
            scores = infer(self.model, batch, settings or self.settings)
        return list(scores.argmax(1).to(dtype).cpu().numpy())
