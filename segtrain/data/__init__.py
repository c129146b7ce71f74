"""Datasets, transforms and loaders. A dataset is a list of (image, mask) files plus a transform."""
