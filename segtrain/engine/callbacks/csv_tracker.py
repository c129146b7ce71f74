"""logger=csv: plain files in `<run>/csv/`, for pandas or a spreadsheet (no server, no extra package).

    metrics.csv    iteration,tag,value: one row per scalar (long format: the validation tags and the
                   per-class IoU `val_iou/<class>` appear only at validations);
                   pandas.read_csv(...).pivot(index="iteration", columns="tag", values="value")
    hparams.csv    key,value: the run's hyper-parameters (segtrain.engine.hparams)
    config.yaml    the composed config
    images/        validation panels with their legend, <tag>_<iteration>.png

A resumed run drops the rows after its checkpoint's iteration and writes them again, as metrics.jsonl.

`segtrain eval logger=csv` writes the same files in the evaluation's run directory (beside its metrics.json):
`csv/metrics.csv` with the rows `eval/<protocol>/mIoU`, `pixel_acc`, `mean_acc` and `iou/<class>` at the
checkpoint's iteration, and the confusion matrix as `csv/images/eval_<protocol>_confusion_matrix_<iteration>.png`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from segtrain.engine.callbacks.tracker import Tracker
from segtrain.engine.run import Run

if TYPE_CHECKING:
    from segtrain.engine.eval_tracking import EvalScores, Evaluation

CSV_DIR = "csv"
METRICS_CSV = "metrics.csv"
HEADER = ["iteration", "tag", "value"]


def keep_rows_until(path: Path, iteration: int) -> None:
    """Drop the rows of `path` past `iteration` and a half-written last row; rewritten atomically."""
    if not path.is_file():
        return
    kept: list[list[str]] = []
    with open(path, newline="", encoding="utf-8") as file:
        for row in csv.reader(file):
            if row == HEADER:
                continue
            try:
                if len(row) == 3 and int(row[0]) <= iteration:
                    float(row[2])
                    kept.append(row)
            except ValueError:
                continue
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([HEADER, *kept])
    os.replace(tmp, path)


class CsvTracker(Tracker):
    name = "csv"

    def __init__(self, images: bool = True) -> None:
        super().__init__()
        self.records_images = images
        self.dir: Path | None = None
        self.file: Any = None
        self.writer: Any = None

    def start(self, run: Run) -> None:
        self._open(run.run_dir, run.state.iteration)

    def _open(self, run_dir: Path, iteration: int) -> None:
        self.dir = run_dir / CSV_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / METRICS_CSV
        keep_rows_until(path, iteration)
        new = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(HEADER)

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        self.writer.writerows([iteration, tag, "nan" if math.isnan(value) else repr(value)]
                              for tag, value in values.items())
        self.file.flush()

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        folder = self.dir / "images"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{tag.replace('/', '_')}_{iteration:07d}.png")

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        with open(self.dir / "hparams.csv", "w", newline="", encoding="utf-8") as file:
            csv.writer(file).writerows([["key", "value"], *hparams.items()])
        (self.dir / "config.yaml").write_text(config_yaml, encoding="utf-8")

    def finish(self, run: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def start_evaluation(self, evaluation: Evaluation) -> None:
        self._open(evaluation.run_dir, evaluation.iteration)

    def record_evaluation(self, evaluation: Evaluation, scores: EvalScores) -> None:
        self.log_scalars(evaluation.iteration, scores.scalars(evaluation.prefix))
        if self.records_images:
            self.log_image(f"{evaluation.prefix}/confusion_matrix", scores.matrix_image, evaluation.iteration)

    def finish_evaluation(self, failed: bool) -> None:
        self._close()
