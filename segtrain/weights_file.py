"""Reading weight files, which are untrusted: a checkpoint (`ckpt=`, `resume=`), `init_from=`, `backbone.weights=`.

A `.pt` file is a pickle, and unpickling can run any code the file names. Every weight file segtrain
reads goes through `load_weights_file`, which accepts tensors and plain Python types only
(`torch.load(weights_only=True)`) and turns every failure into one line naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from segtrain.errors import ANSI_COLOUR, WeightsError, first_line


def unpickling_culprit(exc: Exception) -> str:
    """What PyTorch's weights_only loader refused, in one plain line (its message is a paragraph,
    sometimes with terminal colour codes)."""
    text = ANSI_COLOUR.sub("", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it names the Python global {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "it needs arbitrary unpickling"


def load_weights_file(path: str | Path, setting: str | None = None, mmap: bool = False) -> Any:
    """The unpickled file on the CPU, tensors and plain types only: nothing in it can run code.

    `setting`: the config key that named the file (`init_from`), shown with the path in the errors.
    `mmap`: map the tensors' storage instead of reading it (only the pickled structure is read: cheap
    for a look at a checkpoint's small entries).
    """
    path = Path(path)
    named = f"{setting}={path}" if setting else str(path)
    if not path.is_file():
        raise WeightsError(f"{named}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"refusing to load {named}: it is not a plain file of tensors ({unpickling_culprit(exc)}; loading it "
            "could run code); if you trust it, save its tensors alone with torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files raise many types
        raise WeightsError(f"cannot read {named} ({first_line(exc)}): the file is cut short or not a PyTorch "
                           "weight file; copy or download it again") from None


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity (one host sync in all)."""
    floats = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats])
    if bool(finite.all()):
        return None
    return floats[int((~finite).nonzero()[0])][0]
