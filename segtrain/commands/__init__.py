"""Thin commands over the shared pieces: train, eval (and later predict, export, info, bench)."""
