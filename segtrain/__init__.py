"""segtrain: a trainer for dilated-convolution semantic segmentation networks.

The Python API (segtrain.api) is imported on first use, so that `import segtrain` and the command line
start without loading torch: `segtrain.load(ckpt)`, `segtrain.train([...])`, `segtrain.evaluate(ckpt)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segtrain.api import Segmenter, evaluate, load, train

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__", "evaluate", "load", "train"]

_API = ("Segmenter", "evaluate", "load", "train")


def __getattr__(name: str) -> Any:
    if name in _API:
        from segtrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'segtrain' has no attribute {name!r}")
