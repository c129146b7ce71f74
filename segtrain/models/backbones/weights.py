"""Pretrained ImageNet weights: download, cache lookup, checksum, and the message when they cannot be had.

Every backbone gets its pretrained weights through this module, from one of three sources:

- URL weights (the DRN release): torch.hub downloads them into `<torch hub dir>/checkpoints`
  ($TORCH_HOME/hub/checkpoints). Their file names carry the first hex digits of the file's SHA-256
  (`drn_d_22-4bd2f8ea.pth`, as torchvision's do). torch.hub checks that prefix only while
  downloading; a file already in the cache (copied there by hand, or cut short) is checked here.
- timm weights (ResNets, Xception, HRNet, DLA, any timm model): timm downloads them from the
  Hugging Face Hub into the Hugging Face cache, which verifies what it stores.
- Hand-placed files (the deep-stem ResNets of hszhao/semseg, published only in a Google Drive
  folder, with no URL a program can fetch): the user puts the file in `<torch hub dir>/checkpoints`
  under its published name, and `pretrained=true` reads it from there.

Offline, the libraries' retry loops take minutes and end in a traceback. So before asking them,
segtrain looks in the cache and, when the file is not there, probes the host once
(SEGTRAIN_OFFLINE=1 skips the probe), and fails within seconds with one line naming the file, where
to put it, and the `backbone.weights=` / `backbone.pretrained=false` alternatives.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from segtrain.errors import ConfigError, WeightsError, first_line

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes")


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False at once when SEGTRAIN_OFFLINE=1 (air-gapped machines); else whether a TCP connect succeeds."""
    if os.environ.get("SEGTRAIN_OFFLINE", "").lower() in _TRUE:
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def torch_hub_file(url: str) -> Path:
    """Where torch.hub keeps the file of `url`: <torch hub dir>/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _unavailable(name: str, problem: str, remedy: str, file_name: str) -> WeightsError:
    """The one offline message, for every source: what failed, where the file goes, the alternatives."""
    return WeightsError(
        f"backbone.pretrained=true: the ImageNet weights of {name} {problem}. {remedy}; or pass "
        f"backbone.weights=/path/to/{file_name}; or set backbone.pretrained=false."
    )


def _url_remedy(url: str, cached: Path) -> str:
    return f"On a machine with internet download {url} and put it at {cached} (torch hub checkpoints directory)"


def verify_file_hash(path: Path) -> None:
    """Raise WeightsError if `path` is named `<name>-<hex>.<ext>` and its SHA-256 does not begin with <hex>.

    The same rule as torch.hub's `check_hash=True`, applied to a file already on disk.
    """
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None or not match.group(1):
        return
    prefix = match.group(1)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    found = digest.hexdigest()[: len(prefix)]
    if found != prefix:
        raise WeightsError(
            f"{path}: the SHA-256 of this file begins with {found}, its name says {prefix}: it is incomplete "
            "or not the published file. Delete it and download it again (run again with internet, or fetch "
            "it yourself)."
        )


def load_url_weights(url: str, name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict at `url`, `fc.` classifier keys dropped: from torch's hub cache, else downloaded."""
    cached = torch_hub_file(url)
    if cached.is_file():
        verify_file_hash(cached)
    elif not host_reachable(url):
        raise _unavailable(name, f"are not cached and {urlparse(url).hostname} cannot be reached",
                           _url_remedy(url, cached), cached.name)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                   weights_only=True)
    except Exception as exc:  # noqa: BLE001 - network and file failures come in many types
        if cached.is_file():
            raise WeightsError(
                f"cannot read the ImageNet weights of {name} from {cached} ({first_line(exc)}). "
                "Delete it and download it again."
            ) from None
        if "invalid hash value" in str(exc):  # torch.hub's check_hash; it keeps nothing then
            raise WeightsError(
                f"the download of {url} does not match the SHA-256 prefix in its name, so nothing was written to "
                f"{cached}. Download it again (run again, or fetch it yourself and put it there)."
            ) from None
        raise _unavailable(name, f"could not be downloaded ({first_line(exc)})", _url_remedy(url, cached),
                           cached.name) from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def manual_weights_file(file_name: str, name: str, source: str) -> Path:
    """The hand-placed ImageNet file `file_name` of backbone `name`, in torch's hub checkpoints directory."""
    cached = torch_hub_file(file_name)
    if cached.is_file():
        return cached
    raise _unavailable(name, f"({file_name}) are not in the cache and cannot be downloaded automatically",
                       f"Download {file_name} from {source} and put it at {cached} (torch hub checkpoints "
                       "directory)", file_name)


def _timm_remedy(name: str, cfg: PretrainedCfg) -> str:
    fetch = f"On a machine with internet run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`"
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        folder = "models--" + cfg.hf_hub_id.replace("/", "--")
        return (f"{fetch} and put the {folder} folder it writes in the Hugging Face cache here "
                f"({constants.HF_HUB_CACHE})")
    return f"{fetch} and put the file it writes at {torch_hub_file(cfg.url)} (torch hub checkpoints directory)"


def _timm_file_name(name: str, cfg: PretrainedCfg) -> str:
    # A timm file, or the torchvision file behind a `.tv_in1k` tag: both load through backbone.weights.
    return Path(urlparse(cfg.url).path).name if cfg.url else f"{name}.pth"


def _timm_pretrained_cfg(name: str) -> PretrainedCfg:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(
            f"backbone.pretrained=true: timm has no pretrained weights for {name!r}; name a tag that has some "
            f"(timm.list_pretrained('{name.split('.')[0]}.*')) or set backbone.pretrained=false"
        )
    return cfg


def timm_weights_tag(name: str) -> str:
    """The tag of the weights timm loads for `name` (`xception65` -> `xception65.ra3_in1k`, its default)."""
    cfg = _timm_pretrained_cfg(name)
    return f"{cfg.architecture}.{cfg.tag}" if cfg.architecture and cfg.tag else name


def require_timm_weights(name: str) -> None:
    """For timm weights: in the Hugging Face cache (or torch's, for URL-only ones), or downloadable now."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = _timm_pretrained_cfg(name)
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename and isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
        if not offline and host_reachable(constants.ENDPOINT):
            return
        host = urlparse(constants.ENDPOINT).hostname
    else:
        if torch_hub_file(cfg.url).is_file() or host_reachable(cfg.url):
            return
        host = urlparse(cfg.url).hostname
    raise _unavailable(f"timm model {name!r}", f"are not cached and {host} cannot be reached",
                       _timm_remedy(name, cfg), _timm_file_name(name, cfg))


def timm_download_error(name: str, exc: BaseException) -> WeightsError:
    """timm.create_model(pretrained=True) failed after `require_timm_weights` passed (a download cut off, say)."""
    cfg = _timm_pretrained_cfg(name)
    return _unavailable(f"timm model {name!r}", f"could not be downloaded ({first_line(exc)})",
                        _timm_remedy(name, cfg), _timm_file_name(name, cfg))
