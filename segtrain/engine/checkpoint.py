"""Checkpoints: atomic writes, safe reads (tensors and plain types only), RNG state capture."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.errors import CheckpointWriteError, WeightsError
from segtrain.weights_file import load_weights_file, nonfinite_tensor

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: `path` is never partial.

    If the write fails (disk full, quota), the temporary file is removed and the previous file at
    `path` stays intact; the error says so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from teammates
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, Exception):  # disk full, quota, I/O error (torch may wrap them in RuntimeError)
            kept = (f"the previous {path.name} is intact" if path.exists()
                    else f"nothing was written; the checkpoints already in {path.parent} are intact")
            reason = write_failure_reason(exc, path.parent)
            raise CheckpointWriteError(f"could not write checkpoint {path} ({reason}); {kept}. Free disk space "
                                       "and resume with resume=auto") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOW_SPACE_BYTES = 64 * 2**20


def write_failure_reason(exc: BaseException, directory: Path) -> str:
    """Why a write failed, in the user's terms: torch.save reports a full disk as a serialisation
    error ("PytorchStreamWriter failed writing file"), so the OS error and the free space are looked up."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE_BYTES:
        return f"no space left on device ({free / 2**20:.0f} MB free)"
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (segtrain.weights_file: nothing in the file can run code) and check its entries."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    state = load_weights_file(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise WeightsError(f"{path} is not a segtrain checkpoint (no 'model' and 'config' entries)")
    if not isinstance(state["model"], dict):
        raise WeightsError(f"{path} is not a segtrain checkpoint ('model' is not a state dict)")
    if "ema" in state and not isinstance(state["ema"], dict):
        raise WeightsError(f"{path} is not a segtrain checkpoint ('ema' is not a state dict)")
    for key, prefix in (("model", ""), ("ema", "the averaged weights, ")):
        bad = nonfinite_tensor(state.get(key) or {})
        if bad is not None:
            raise WeightsError(f"{path} holds non-finite values (NaN or infinity) in {prefix}{bad}: its weights are "
                               "unusable; take an earlier checkpoint")
    return state


def recorded_train_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `train_state` (iteration, best_miou, ...); empty when the file records none.

    Commands that only report these numbers (eval, info, export) take them from here and show what is
    missing as unknown: the weights and config are all they need.
    """
    recorded = state.get("train_state")
    return recorded if isinstance(recorded, dict) else {}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's own device only
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def periodic_checkpoint_path(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / f"iter_{iteration:07d}.pt"


@dataclass(frozen=True)
class Recorded:
    """A periodic checkpoint as recorded inside it: the run that wrote it and the iteration it holds."""

    path: Path
    run_id: str | None  # None: written before checkpoints carried a run id
    iteration: int


_recorded_cache: dict[tuple[str, int, int, int], Recorded | None] = {}


def recorded(path: Path) -> Recorded | None:
    """The run id and iteration stored in a checkpoint, read without its tensors (memory-mapped: the
    pickled structure only); None when the file does not load (empty, cut short, not a checkpoint)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _recorded_cache:
        _recorded_cache[key] = _read_record(path)
    return _recorded_cache[key]


def _read_record(path: Path) -> Recorded | None:
    try:
        state = load_weights_file(path, mmap=True)
    except WeightsError:  # an unloadable file in any way is "does not load"
        return None
    train_state = state.get("train_state") if isinstance(state, dict) and "model" in state else None
    iteration = train_state.get("iteration") if isinstance(train_state, dict) else None
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        return None
    run_id = state.get("run_id")
    return Recorded(path, run_id if isinstance(run_id, str) else None, iteration)


def _periodic(ckpt_dir: Path) -> tuple[list[Recorded], list[Path]]:
    """Periodic checkpoints that load, newest first by the iteration stored inside (file names can be
    another run's), and the ones that do not load."""
    loadable, broken = [], []
    for path in sorted(ckpt_dir.glob("iter_*.pt"), reverse=True):  # broken ones: newest name first
        found = recorded(path)
        if found is None:
            broken.append(path)
        else:
            loadable.append(found)
    loadable.sort(key=lambda r: (r.iteration, r.path.name), reverse=True)
    return loadable, broken


def directory_owner(ckpt_dir: Path) -> str | None:
    """The run a checkpoint directory continues: the one that wrote last.pt (the latest writer), else the
    one of the newest loadable periodic checkpoint."""
    last = recorded(ckpt_dir / "last.pt")
    if last is not None:
        return last.run_id
    loadable, _ = _periodic(ckpt_dir)
    return loadable[0].run_id if loadable else None


def save_periodic(state: dict[str, Any], ckpt_dir: Path, keep_last: int, iteration: int) -> Path:
    """Write iter_<iteration>.pt, point last.pt at it (a hard link: no second write) and prune old ones."""
    path = periodic_checkpoint_path(ckpt_dir, iteration)
    save_checkpoint(state, path)
    last = ckpt_dir / "last.pt"
    tmp = ckpt_dir / f".last.pt.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a full copy, made durable before the rename
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, last)
    prune(ckpt_dir, keep_last, state.get("run_id"), path)
    return path


def prune(ckpt_dir: Path, keep_last: int, run_id: str | None, written: Path) -> list[Path]:
    """Delete this run's periodic checkpoints beyond the newest `keep_last` (by the iteration inside).

    Only files this run wrote count: another run's files, and files that do not load, are never
    deleted nor counted, so a broken file never displaces a loadable one. Returns what was deleted.
    """
    loadable, broken = _periodic(ckpt_dir)
    ours = [r.path for r in loadable if r.run_id == run_id and run_id is not None]
    if broken:
        log.warning("checkpoints that do not load are kept, not counted among trainer.keep_last: %s",
                    ", ".join(p.name for p in broken))
    removed = [path for path in ours[max(1, keep_last):] if path != written]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def remove_temporary_files(ckpt_dir: Path) -> None:
    """Partial writes of a killed run (`.<name>.<random>.tmp`); never a complete checkpoint. Called
    with the run directory's lock held: no live writer owns them."""
    for leftover in ckpt_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of this run directory's run that loads, by the iteration stored inside.

    The directory's run is the one that wrote last.pt (segtrain.engine.checkpoint.directory_owner);
    another run's files are never resumed. `last.pt` is a link to the newest `iter_N.pt`; it is read
    only when no periodic checkpoint loads (a kill between writing `iter_N.pt` and re-linking leaves a
    stale `last.pt`). When checkpoints exist but none loads, the error lists what was tried: starting
    over would overwrite them.
    """
    ckpt_dir = run_dir / CHECKPOINT_DIR
    remove_temporary_files(ckpt_dir)
    tried, seen = [], set()
    for path in _periodic(ckpt_dir)[1]:
        try:
            load_checkpoint(path)
        except WeightsError as exc:
            log.warning("skipping unusable checkpoint: %s; trying an older one", exc)
            tried.append(path.name)
            seen.add((path.stat().st_dev, path.stat().st_ino))
    for path in resume_candidates(run_dir):
        identity = (path.stat().st_dev, path.stat().st_ino)
        if identity in seen:
            continue
        seen.add(identity)
        try:
            return path, load_checkpoint(path)
        except WeightsError as exc:
            log.warning("skipping unusable checkpoint: %s; trying an older one", exc)
            tried.append(path.name)
    if tried:
        raise WeightsError(
            f"resume=auto: checkpoints exist in {ckpt_dir} but none loads (tried {', '.join(tried)}; the log says "
            "why). Fix or move them, or start a new run directory (resume=null here would overwrite them)"
        )
    return None


def inference_checkpoint(given: str | Path) -> Path:
    """`ckpt=` of eval, predict, export and info: a file as it is; a training run's directory (or its
    checkpoints/ folder) stands for its best.pt, else its newest checkpoint (periodic, then last.pt,
    the order of resume=auto), and the log says which. Periodic files are written atomically, so
    every one listed is complete; partial writes (`.*.tmp`) are never candidates."""
    path = Path(given)
    if not path.is_dir():
        return path
    run_dir = path.parent if path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir() else path
    best = run_dir / CHECKPOINT_DIR / "best.pt"
    if best.is_file():
        chosen, which = best, "its best validation mIoU"
    else:
        candidates = resume_candidates(run_dir)
        if not any(recorded(path) for path in candidates):  # none loads: the newest by name, whose error says why
            candidates = sorted((run_dir / CHECKPOINT_DIR).glob("iter_*.pt"), reverse=True) + candidates
        if not candidates:
            raise WeightsError(f"ckpt={given}: no checkpoint in this directory (no best.pt, iter_*.pt or last.pt in "
                               f"{run_dir / CHECKPOINT_DIR}); give a checkpoint file or a training run's directory")
        chosen, which = candidates[0], "no best.pt: the newest checkpoint"
    log.info("ckpt=%s is a run directory: using %s (%s)", given, chosen, which)
    return chosen


def resume_candidates(run_dir: Path) -> list[Path]:
    """The files `resume=auto` tries, newest first: the directory's run's periodic checkpoints (by the
    iteration stored inside), then last.pt (not best.pt)."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    owner = directory_owner(ckpt_dir)
    ours = [r.path for r in _periodic(ckpt_dir)[0] if r.run_id == owner]
    return [path for path in [*ours, ckpt_dir / "last.pt"] if path.is_file()]


def held_checkpoints(run_dir: Path) -> list[str]:
    """Names of the checkpoints in a run directory (any run's, loadable or not)."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    return sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
