"""Pretrained ImageNet weights: fail in seconds, with the file named, when they cannot be fetched.

torchvision, timm (Hugging Face Hub) and the DRN release download and cache weights themselves on
a machine with internet. Offline, their retry loops take minutes and end in a library traceback;
so before asking them, segtrain checks the local cache and, if the file is not there, whether the
host answers at all.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from segtrain.errors import WeightsError

PROBE_TIMEOUT_S = 5.0


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False at once when SEGTRAIN_OFFLINE=1 (air-gapped machines); else whether a TCP connect succeeds."""
    if os.environ.get("SEGTRAIN_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def torch_hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def require_url_weights(url: str, name: str) -> None:
    """For torchvision and DRN weights: cached under torch's hub directory, or downloadable now."""
    cached = torch_hub_file(url)
    if cached.is_file() or host_reachable(url):
        return
    raise WeightsError(
        f"backbone.pretrained=true: the ImageNet weights of {name} are not cached and {urlparse(url).hostname} "
        f"cannot be reached. Download {url} on a machine with internet and put it at {cached}, or pass "
        f"backbone.weights=/path/to/{cached.name}, or set backbone.pretrained=false."
    )


def require_timm_weights(name: str) -> None:
    """For timm weights: in the Hugging Face cache, or the Hub reachable now."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"backbone.pretrained=true: timm has no pretrained weights for {name!r}")
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename and isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if not offline and host_reachable(constants.ENDPOINT):
            return
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) for repository {cfg.hf_hub_id}"
    else:
        if torch_hub_file(cfg.url).is_file() or host_reachable(cfg.url):
            return
        where = str(torch_hub_file(cfg.url))
    raise WeightsError(
        f"backbone.pretrained=true: the ImageNet weights of timm model {name!r} are not cached and cannot be "
        f"downloaded now. On a machine with internet run `python -c \"import timm; timm.create_model('{name}', "
        f"pretrained=True)\"` and copy {where} here, or pass backbone.weights=/path/to/{name}.pth "
        "(a timm state dict), or set backbone.pretrained=false."
    )
