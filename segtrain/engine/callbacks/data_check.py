"""data.check_on_start: before the first step, a sample of the training and validation files gets the checks
of `segtrain data check` (segtrain.data.check).

A run that could learn nothing (0/255 masks with two classes, labels outside the classes, colour masks read
as index masks) stops here with the data check's message and the key to change, instead of ending hours
later with an mIoU of 0; a weak validation split (too few images, classes it never shows) is a warning,
once. It runs on a fresh start only: a resumed run was checked when it started. The sample is bounded
(CHECK_SAMPLES files per split, CHECK_SECONDS in all), so a large dataset adds seconds, not minutes.
"""

from __future__ import annotations

import logging
import time

from segtrain.data.check import check_samples, combined, findings, validation_findings
from segtrain.engine.callbacks.base import Callback
from segtrain.engine.run import Run
from segtrain.errors import DataError

log = logging.getLogger("segtrain.train")

CHECK_SAMPLES = 200  # per split, spread evenly over it; all of them when fewer
CHECK_SECONDS = 10.0  # both splits together


class DataCheck(Callback):
    def on_fit_start(self, run: Run) -> None:
        cfg = run.cfg
        if not cfg.data.check_on_start or run.state.iteration > 0:
            return
        start = time.monotonic()
        names, ignore, on_error = run.class_names, cfg.dataset.ignore_index, str(cfg.data.on_error)
        reports, weak, read = [], [], []
        for dataset, validation in ((run.train_set, False), (run.val_set, True)):
            split = cfg.dataset.val_split if validation else cfg.dataset.train_split
            remaining = max(CHECK_SECONDS - (time.monotonic() - start), 0.0)
            report = check_samples(dataset.samples, str(split), len(names), ignore, int(cfg.data.max_image_pixels),
                                   limit=CHECK_SAMPLES, seconds=remaining)
            reports.append(report)
            weak += validation_findings(report, names) if validation else []
            read.append(f"{report.samples} of {report.total} {split}")
        fatal, skipped = findings(combined(reports), names, ignore, on_error)
        if fatal:
            raise DataError(f"data check before training: {fatal[0]}" + "".join(f"; also: {f}" for f in fatal[1:])
                            + " (segtrain data check lists every file; data.check_on_start=false skips this check)")
        if run.ctx.is_main:
            for finding in skipped + weak:
                log.warning("data check: %s", finding)
            log.info("data checked before training: %s samples in %.1f s", ", ".join(read), time.monotonic() - start)
