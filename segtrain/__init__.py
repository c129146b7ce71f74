"""segtrain: a trainer for dilated-convolution semantic segmentation networks."""

__version__ = "0.1.0"
