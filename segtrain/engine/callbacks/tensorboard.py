"""logger=tensorboard (the default): TensorBoard events in the run directory.

Scalars under their tags, validation panels under `val_images/<k>`, the config as text, and the
hyper-parameters for the HParams tab in the run's own event file (not a sub-run, as
`SummaryWriter.add_hparams` would make). A resumed run hides the events after its checkpoint's
iteration (purge_step), so each point is shown once. `tensorboard --logdir <the run's parent>` shows
the run under its own name. `logging.tensorboard=false` switches it off too.
"""

from __future__ import annotations

from typing import Any

from segtrain.engine.callbacks.tracker import Tracker
from segtrain.engine.run import Run


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self) -> None:
        super().__init__()
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter once started
        self.session_end: Any = None

    def start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir), purge_step=run.state.iteration + 1)

    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def log_image(self, tag: str, image: Any, iteration: int) -> None:
        self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def log_run_info(self, hparams: dict[str, float | str], metric_tags: list[str], config_yaml: str,
                     iteration: int) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        experiment, session_start, self.session_end = hparams_summaries(hparams, dict.fromkeys(metric_tags, 0.0))
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary, iteration)
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), iteration)

    def log_session_end(self, iteration: int) -> None:
        """Marks the HParams session as finished (a run stopped early shows as unfinished)."""
        if self.session_end is not None:
            self.writer.file_writer.add_summary(self.session_end, iteration)
            self.session_end = None

    def finish(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
